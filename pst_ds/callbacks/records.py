"""A run's records: the validation metric and data.eval_files' perplexities before and after
training (and after a warm start), each logged step in metrics.jsonl and TensorBoard, and
summary.json at the end. Every rank evaluates (the forwards are collective); rank 0 writes."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import TrainerCallback, TrainingArguments

from ..io.evaluate import evaluate_model, perplexity
from ..masks.select import NonFiniteScoresError
from ..methods import Method
from ..train.engine import optimizer_state_bytes, partitioned_param_bytes, peak_memory_bytes
from ..train.run_checkpoints import TrainingError
from .export import ExportCallback
from .sparsity import SparsityCallback


class RunLogger:
    """Rank 0's output: a progress bar, TensorBoard events and metrics.jsonl. Writes nothing on
    the other ranks, so callers need not branch."""

    def __init__(
        self, output_dir: Path, total_steps: int, enabled: bool, resumed: bool = False, label: str = "pst"
    ) -> None:
        self.enabled = enabled
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run continues its records; a fresh one replaces an earlier run's.
        self.metrics = (output_dir / "metrics.jsonl").open("a" if resumed else "w")
        self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        self.bar = tqdm(total=total_steps, desc=label, unit="step", dynamic_ncols=True)

    def info(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def _record(self, section: str, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl; its numbers also go to TensorBoard under ``section/``."""
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(f"{section}/{key.removeprefix('eval_')}", value, record["step"])

    def log_step(
        self,
        step: int,
        loss: float,
        lr: float,
        sparsity: float,
        tokens_per_s: float,
        mask_changed: float | None = None,
    ) -> None:
        if not self.enabled:
            return
        record = {"step": step, "loss": loss, "lr": lr, "sparsity": sparsity, "tokens_per_s": tokens_per_s}
        if mask_changed is not None:  # share of mask entries changed since the previous log
            record["mask_changed"] = mask_changed
        self._record("train", record)
        self.bar.set_postfix(loss=f"{loss:.4f}", sparsity=f"{sparsity:.3f}", tok_s=f"{tokens_per_s:.0f}")

    def log_layers(self, step: int, sparsities: dict[str, float]) -> None:
        """Per-matrix sparsities (TensorBoard only: one curve per matrix)."""
        if self.enabled:
            for name, sparsity in sparsities.items():
                self.writer.add_scalar(f"layer_sparsity/{name}", sparsity, step)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def log_eval(self, step: int, loss: float, sparsity: float, accuracy: float | None = None) -> float:
        """Record an evaluation; returns the perplexity exp(loss)."""
        ppl = perplexity(loss)
        if self.enabled:
            record = {"step": step, "eval_loss": loss, "eval_ppl": ppl, "sparsity": sparsity}
            shown = f"perplexity {ppl:.3f}"
            if accuracy is not None:
                record["eval_accuracy"] = accuracy
                shown = f"accuracy {accuracy:.4f}"
            self._record("eval", record)
            self.info(f"step {step}: validation {shown} at sparsity {sparsity:.3f}")
        return ppl

    def log_eval_text(self, step: int, name: str, loss: float) -> float:
        """Record the perplexity of one of data.eval_files (key eval_<name>_ppl); returns it."""
        ppl = perplexity(loss)
        if self.enabled:
            self._record("eval", {"step": step, f"eval_{name}_loss": loss, f"eval_{name}_ppl": ppl})
            self.info(f"step {step}: {name} perplexity {ppl:.3f}")
        return ppl

    def end_progress(self) -> None:
        """Close the progress bar, so that what follows prints below it (idempotent)."""
        if self.enabled:
            self.bar.close()

    def close(self) -> None:
        """Flush and close everything (idempotent)."""
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.metrics.close()


@contextlib.contextmanager
def layer_failures_named(when: str, recovery: str = "") -> Iterator[None]:
    """Non-finite importance scores (the layer names itself) as a TrainingError at ``when``."""
    try:
        yield
    except NonFiniteScoresError as err:
        raise TrainingError(
            f"{err} at {when}: S comes from the frozen weight and the factors, so either training "
            f"diverged (try a lower train.lr) or the model's weights hold NaN or inf{recovery}"
        ) from None


class RunRecordsCallback(TrainerCallback):
    """Evaluates, logs and summarises a run into ``output_dir``. ``texts``: the validation set
    first, then each of data.eval_files by name. ``summary``: what summary.json holds, at the end."""

    def __init__(
        self,
        output_dir: str | Path,
        method: Method,
        texts: dict[str, Dataset],
        task: str,
        sparsity: SparsityCallback,
        export: ExportCallback | None = None,
        facts: dict[str, Any] | None = None,
        tokens_per_step: int | None = None,
        eval_every: int = 0,
    ) -> None:
        self.output_dir, self.method, self.texts, self.task = Path(output_dir), method, texts, task
        self.sparsity, self.export = sparsity, export
        self.facts = facts or {}  # what the run knew before training (sizes, the memory model)
        self.tokens_per_step = tokens_per_step
        self.eval_every = eval_every  # also every N steps (0: before and after training only)
        self.metric = "ppl" if task == "causal_lm" else "accuracy"
        self.before: dict[str, float] | None = None
        self.after_warm_start: dict[str, float] | None = None
        self.summary: dict[str, Any] | None = None
        self.logger: RunLogger | None = None
        self.step_times: list[float] = []

    # ------------------------------------------------------------------ the loop's events
    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.began = time.time()
        self.logger = RunLogger(
            self.output_dir,
            max(state.max_steps, state.global_step),  # a finished run resumed has 0 steps to go
            state.is_world_process_zero,
            state.global_step > 0,
            self.method.name,
        )
        self.logger.advance(state.global_step)
        self.batch_size = args.per_device_eval_batch_size
        self.warm = state.global_step == 0 and self.method.warm_start_method() is not None
        finished = 0 < state.global_step >= state.max_steps  # resumed from its last step
        if finished:
            self.logger.info(
                f"pst-ds: {self.output_dir} is already trained to step {state.global_step} "
                "(train.max_steps); nothing to train (train.resume=never or another train.output_dir "
                "trains afresh)"
            )
        else:
            self.before = self.evaluate(kwargs["model"], state.global_step)

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.warm:  # the warm start ran as this first step began
            self.warm = False
            if self.method.trains:
                self.after_warm_start = self.evaluate(kwargs["model"], 0)
        self.step_began = time.time()
        self.step_sparsity = self.sparsity.controller.global_sparsity()
        schedule = kwargs.get("lr_scheduler")
        self.step_lr = schedule.get_last_lr()[0] if schedule is not None else args.learning_rate

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_times.append(time.time() - self.step_began)
        self.logger.advance()
        step = state.global_step
        if self.eval_every and step % self.eval_every == 0 and step < state.max_steps:
            self.evaluate(kwargs["model"], step)

    def on_log(
        self, args: TrainingArguments, state: Any, control: Any, logs: Any = None, **kwargs: Any
    ) -> None:
        if not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        if not math.isfinite(loss):  # every rank logs the same mean: all stop alike
            raise TrainingError(
                f"the loss at step {state.global_step} is {loss}: training diverged (try a lower train.lr)"
            )
        changed = self.mask_changed_fraction()
        tokens = self.tokens_per_step / self.step_times[-1] if self.tokens_per_step else 0.0
        self.logger.log_step(state.global_step, loss, self.step_lr, self.step_sparsity, tokens, changed)
        if self.sparsity.controller.learned:  # the learned split among matrices
            self.logger.log_layers(state.global_step, self.sparsity.controller.layer_sparsities())

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.logger.end_progress()
        try:
            if state.global_step < state.max_steps:  # stopped early (preempted): resumed later
                return
            after = self.evaluate(kwargs["model"], state.global_step)
            self.summary = self._summary(state, after, kwargs)
            if state.is_world_process_zero:
                (self.output_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
            change = f"{after['validation']:.4f}"
            if self.before is not None:
                change = f"{self.before['validation']:.4f} -> {change}"
            self.logger.info(
                f"pst-ds: done in {time.time() - self.began:.1f} s; validation {self.metric} {change}; "
                f"output in {self.output_dir}"
            )
        finally:
            self.close()

    def close(self) -> None:
        """Close the progress bar and the files (idempotent): after an error, what follows is
        printed below the bar."""
        if self.logger is not None:
            self.logger.close()

    # ------------------------------------------------------------------ what it measures
    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """The validation metric (perplexity, or accuracy for a classifier) of the model as it
        stands, and the perplexity of each of data.eval_files, over all ranks."""
        results = {}
        sparsity = self.sparsity.controller.global_sparsity()
        device = next(model.parameters()).device
        for name, dataset in self.texts.items():
            with layer_failures_named(f"the evaluation after step {step}"):
                result = evaluate_model(model, dataset, self.task, self.batch_size, device)
            if name == "validation":
                ppl = self.logger.log_eval(step, result["loss"], sparsity, result.get("accuracy"))
                results[name] = result.get("accuracy", ppl)
            else:
                results[name] = self.logger.log_eval_text(step, name, result["loss"])
        return results

    def mask_changed_fraction(self) -> float | None:
        """Share of all mask entries that changed since the previous logged step (None at
        first). Each rank counted its slice of every mask: summed over ranks (collective)."""
        layers = self.sparsity.layers.values()
        changes = [layer.mask_changes() for layer in layers]
        if not changes or None in changes:
            return None
        total = torch.tensor([float(sum(changes))], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(total)
        return float(total.item()) / sum(layer.out_features * layer.in_features for layer in layers)

    def _summary(self, state: Any, after: dict, kwargs: dict[str, Any]) -> dict[str, Any]:
        def texts(results: dict | None) -> dict | None:
            return None if results is None else {k: v for k, v in results.items() if k != "validation"}

        model, optimizer = kwargs["model"], kwargs.get("optimizer")
        summary = {
            "method": self.method.name,
            "steps": state.global_step,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            **self.facts,
            "param_bytes_rank0": partitioned_param_bytes(model),
            "optimizer_state_bytes_rank0": optimizer_state_bytes(optimizer) if optimizer is not None else 0,
            "peak_memory_bytes_rank0": peak_memory_bytes(),
            "step_times_s": self.step_times,  # this session's steps, rank 0
            "tokens_per_step": self.tokens_per_step,
            "final_sparsity": self.sparsity.controller.global_sparsity(),
            f"eval_{self.metric}_before": None if self.before is None else self.before["validation"],
            f"eval_{self.metric}_after": after["validation"],
            "eval_texts_before": texts(self.before),  # data.eval_files' perplexities
            "eval_texts_after": texts(after),
            "eval_after_warm_start": self.after_warm_start,  # pst.init's one-shot model, before training
            "wall_time_s": time.time() - self.began,
        }
        if self.export is not None and self.export.report is not None:
            summary["export"] = self.export.report
        return summary
