"""The training loop over a DeepSpeed engine: step, sparsity schedule, evaluation, logging.

``Trainer.setup`` takes the folder's run lock, then builds the run (data, model with the
method's layers, engine) before anything else is written; ``Trainer.train`` evaluates,
warm-starts if asked, runs the steps and exports. The method (methods/) says what is injected
and whether it trains; the sparsity controller is the one writer of the layers' mask state and
of each step's record; the loop asks the layers for what it logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from transformers.integrations import HfDeepSpeedConfig

from ..config import ConfigError, ExperimentConfig, TrainConfig
from ..io.base_model import BaseTensors, fingerprint, fingerprint_change
from ..io.data import (
    TrainingBatches,
    calibration_batches,
    collate_for,
    load_calibration_blocks,
    load_eval_texts,
    load_splits,
)
from ..io.evaluate import evaluate_model
from ..io.export import WRITE_ERRORS as EXPORT_WRITE_ERRORS
from ..io.export import export_checkpoint
from ..io.models import enable_gradient_checkpointing, load_tokenizer, model_dir
from ..io.start_weights import START, read_start, write_start
from ..layers.base import DenseTeacher
from ..layers.inject import build_model, iter_pst_layers
from ..masks.select import NonFiniteScoresError
from ..methods import Calibration, method_class
from ..paths import check_files
from . import checkpoint
from .distill import distilled
from .distributed import agreed, first_problem, from_rank_zero, init_distributed, on_cpu, rank_zero_first
from .engine import (
    load_ds_config,
    optimizer_state_bytes,
    partitioned_param_bytes,
    peak_memory_bytes,
    prepare_ds_config,
    resolve_output_dir,
)
from .logging import RunLogger
from .memory import MemoryEstimate, estimate
from .optim import build_optimizer
from .preemption import Preempted, PreemptionNotice
from .run_lock import RunLock
from .schedule import SparsityController

__all__ = ["Preempted", "Trainer", "TrainingError", "load_ds_config"]


class TrainingError(RuntimeError):
    """Training cannot go on (it diverged, say); the message is the whole explanation."""


class Trainer:
    """Builds the run (model, the method's layers, data, engine) and trains it.

    ``setup`` takes the output folder's run lock first, then validates and loads everything
    before it writes anything else: a bad configuration fails without leaving a half-written
    run behind (nor the folder, if the run created it).
    """

    def __init__(self, config: ExperimentConfig, ds_config: dict[str, Any]) -> None:
        self.config = config
        self.method = method_class(config.method)(config)
        self.ds_config = prepare_ds_config(ds_config, config.train)
        self.output_dir = resolve_output_dir(config.train.output_dir)
        check_files(config)  # before the process group: a missing file stops every rank alike

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        init_distributed()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # First: another live run may be writing this folder, and a second one must not pay
        # the whole load before it is refused.
        self.lock = RunLock(self.output_dir)
        agreed(lambda: self.lock.acquire(self.warn), run_here=self.rank == 0)
        try:
            self._build()
            self._start_in_folder()
        except BaseException:
            self.lock.release()  # a refused run leaves the folder to the next one
            raise

    def _build(self) -> None:
        """Data, model with the method's layers, controller, engine."""
        cfg = self.config
        torch.manual_seed(cfg.train.seed)  # the same random-init model (model.source=random) on every rank
        # Before any ZeRO-3 context exists, on every rank at once: loading the tokenizer
        # converts the embedded model on first use (a file lock lets one rank do it).
        tokenizer = agreed(lambda: load_tokenizer(cfg.model))
        self.data = rank_zero_first(lambda: load_splits(cfg.data, cfg.model.task, tokenizer))
        self.eval_texts = rank_zero_first(lambda: load_eval_texts(cfg.data, tokenizer))
        self.calibration = self.data.train  # what a warm start calibrates on
        if cfg.oneshot.calibration_files:
            files = cfg.oneshot.calibration_files
            self.calibration = rank_zero_first(lambda: load_calibration_blocks(files, cfg.data, tokenizer))
        self._check_enough_data()
        self.peak_before_model = peak_memory_bytes()  # the process and its data, no model yet
        self.memory_estimate = self._estimate_memory()
        if self.ds_config.get("zero_optimization", {}).get("stage") == 3:
            # Kept alive so that from_pretrained builds the backbone already partitioned.
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        # Collective under ZeRO-3: every rank at once.
        model, self.layer_names = build_model(self.method, tokenizer, self.data.labels)
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.collate = collate_for(cfg.model.task)
        self.metric = "ppl" if self.data.labels is None else "accuracy"
        self.max_steps = cfg.train.max_steps if self.method.trains else 0
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.pst_layers = dict(iter_pst_layers(model))
        weights = [model.get_submodule(name).weight for name in self.layer_names]
        self.sparsified_numel = sum(getattr(w, "ds_numel", w.numel()) for w in weights)
        self.controller = SparsityController(self.method, self.max_steps, self.pst_layers)
        optimizer, schedule = build_optimizer(model, self.method.pst, cfg.train)
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config
        )
        self.base = self._base_record(model)
        self.batches = TrainingBatches(
            self.data.train,
            cfg.train.micro_batch_size,
            self.rank,
            self.world_size,
            cfg.train.seed,
            cfg.model.task,
        )
        self.checkpoints = self.output_dir / "checkpoints"
        self.resumed = False
        # The step whose state this run holds in a checkpoint (None: none yet). Not the folder's
        # newest tag: with train.resume=never an earlier run's checkpoint may carry the same step.
        self.saved_step: int | None = None

    def _start_in_folder(self) -> None:
        """Resume if asked, open the run's records and say what runs."""
        cfg = self.config
        self.step = self._resume() if cfg.train.resume == "auto" else 0
        self.controller.apply(self.step, self.logs(self.step))
        self.logger = RunLogger(
            self.output_dir, self.max_steps, enabled=self.rank == 0, resumed=self.step > 0, label=cfg.method
        )
        self.logger.advance(self.step)
        if self.resumed and self.base is not None and self.method.rewrites_backbone_at_start():
            if "start" not in self.base:  # resumed from a checkpoint that held the rewritten backbone
                self._write_start()
        if self.rank == 0:
            saved = {"experiment": cfg.to_dict(), "deepspeed": self.ds_config, "labels": self.data.labels}
            saved["layers"] = dataclasses.asdict(self.method.pst)  # the PST section the method's layers use
            (self.output_dir / "config.json").write_text(json.dumps(saved, indent=2))
        self.logger.info(
            f"pst-ds: {cfg.method} on {len(self.layer_names)} layers, {self.num_trainable():,} trainable "
            f"parameters ({100 * self.num_trainable() / self.sparsified_numel:.2f}% of the "
            f"{self.sparsified_numel:,} sparsified weights), world size {self.world_size}"
        )

    def _estimate_memory(self) -> MemoryEstimate | None:
        """The memory model's per-rank figure, printed before the model is built (rank 0)."""
        if self.rank != 0:
            return None
        try:
            with torch.random.fork_rng():  # rank 0 alone: the ranks' factor inits must not drift
                result = estimate(self.config, self.ds_config, self.world_size, on_gpu=not on_cpu())
        except Exception as err:  # a diagnostic only: an architecture it cannot trace must still train
            print(
                f"pst-ds: memory model unavailable for this model ({type(err).__name__}: {err})", flush=True
            )
            return None
        print(f"pst-ds: memory model: {result.describe()}", flush=True)
        return result

    def _check_enough_data(self) -> None:
        """Every rank needs one full micro-batch of training data (identical on all ranks)."""
        cfg, blocks = self.config, len(self.data.train)
        if blocks // self.world_size // cfg.train.micro_batch_size == 0:
            unit = "examples" if self.data.labels is not None else f"blocks of {cfg.data.block_size} tokens"
            raise ConfigError(
                f"too little training data: {blocks} {unit} for {self.world_size} rank(s) × "
                f"train.micro_batch_size={cfg.train.micro_batch_size}; add text to data.train_files "
                "or lower data.block_size or train.micro_batch_size"
            )

    def num_trainable(self) -> int:
        """Parameters trained (0 for a method that takes no step: its layers only carry the mask)."""
        # ds_numel: ZeRO-3 has replaced the data of partitioned parameters by their shards.
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.trainable) if self.method.trains else 0

    # ----------------------------------------------------------------- checkpoints
    def _base_record(self, model: torch.nn.Module) -> dict[str, Any] | None:
        """Where checkpoints read the frozen backbone back from, when they leave it out: the model's
        folder, its fingerprint and the dtype the run holds the weights in. None when checkpoints
        hold it: the method changes it, the model has no folder (model.source=random), the folder
        lacks a frozen tensor (a new task head), or train.save_frozen asks for it."""
        cfg = self.config
        if cfg.train.save_frozen or cfg.model.source == "random" or self.method.changes_backbone():
            return None
        folder = model_dir(cfg.model)
        teachers = {id(m.weight) for m in model.modules() if isinstance(m, DenseTeacher)}  # the base's own
        frozen = [(n, p) for n, p in model.named_parameters() if not (p.requires_grad or id(p) in teachers)]
        files = BaseTensors(folder, model.base_model_prefix)
        if not frozen or any(files.key(name) is None for name, _ in frozen):
            return None
        files = from_rank_zero(lambda: fingerprint(folder, functools.partial(print, flush=True)))
        return {"path": str(folder), "dtype": str(frozen[0][1].dtype), "files": files}

    def manifest(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed: the config and the world size; and the
        base model it builds on, when it leaves the frozen backbone out."""
        experiment = self.config.to_dict()
        for key in TrainConfig.RESUMABLE_CHANGES:
            experiment["train"].pop(key)
        return {
            "experiment": experiment,
            "world_size": self.world_size,
            "zero_stage": self.ds_config.get("zero_optimization", {}).get("stage", 0),
            "base": self.base,
            "sparsity_profile": self.controller.profile,  # found at the warm start; not found again
        }

    def _resume(self) -> int:
        """Load the newest sound complete checkpoint if there is one; return the step it holds.

        A checkpoint whose files no longer match what was saved is skipped with a warning.
        """
        tag = checkpoint.newest_sound(self.checkpoints, shared=True, warn=self.warn)
        if tag is None:
            return 0
        saved = checkpoint.read_manifest(self.checkpoints, tag)
        agreed_on, current = ("experiment", "world_size"), self.manifest()
        differences = checkpoint.config_differences(
            {k: saved[k] for k in agreed_on}, {k: current[k] for k in agreed_on}
        )
        if saved.get("zero_stage", current["zero_stage"]) != current["zero_stage"]:  # files differ by stage
            differences.append(
                f"it was saved under ZeRO stage {saved['zero_stage']}, this run's --ds_config uses stage "
                f"{current['zero_stage']}"
            )
        base, start = saved.get("base") or {}, (saved.get("base") or {}).get("start")
        if base:
            change = fingerprint_change(base["files"], model_dir(self.config.model))
            if change is None and start:
                change = fingerprint_change(start["files"], self.output_dir / start["folder"])
            if change is not None:
                differences.append(f"the base model it builds on has changed: {change}")
        if differences:
            raise ConfigError(
                f"cannot resume {self.checkpoints / tag}: "
                + "; ".join(differences)
                + " (set train.resume=never or another train.output_dir to start afresh)"
            )
        checkpoint.load(self.engine, self.checkpoints, tag)
        if start:  # the warm start's rewritten backbone, which the checkpoint left out
            read_start(self.pst_layers, self.output_dir / start["folder"], self.rank)
            if self.base is not None:  # None: this run's checkpoints hold it (train.save_frozen)
                self.base = {**self.base, "start": start}
        self.controller.profile = saved.get("sparsity_profile")
        self.resumed, self.saved_step = True, saved["step"]
        if self.rank == 0:
            print(f"pst-ds: resumed from {self.checkpoints / tag}", flush=True)
        return saved["step"]

    def _write_start(self) -> None:
        """Write the backbone the warm start rewrote, once, as the run's start folder; the
        checkpoints' manifests refer to it by fingerprint (io/start_weights.py)."""
        began, folder = time.time(), self.output_dir / START
        write_start(self.pst_layers, folder, self.rank)
        files = from_rank_zero(lambda: fingerprint(folder))  # rank 0 wrote the folder
        self.base = {**self.base, "start": {"folder": START, "files": files}}
        self.logger.info(f"pst-ds: wrote the rewritten backbone to {folder} in {time.time() - began:.1f} s")

    def warn(self, message: str) -> None:
        if self.rank == 0:
            print(f"pst-ds: warning: {message}", flush=True)

    def save_checkpoint(self) -> None:
        start = time.time()
        try:
            tag = checkpoint.save(
                self.engine,
                self.checkpoints,
                self.step,
                self.manifest(),
                self.config.train.keep_last,
                exclude_frozen=self.base is not None,
            )
        except checkpoint.SaveFailed as err:
            raise TrainingError(
                f"cannot save checkpoint {self.checkpoints / checkpoint.tag_for(self.step)} ({err}; "
                f"{checkpoint.free_mib(self.checkpoints):,.0f} MiB free there), so it was removed"
                f"{self._last_checkpoint_note() or '; no checkpoint is complete yet'}: free space or fix "
                "the folder's permissions, then run the same command"
                + (" to resume from it" if checkpoint.complete_tags(self.checkpoints) else "")
            ) from None
        self.saved_step = self.step
        self.logger.info(f"step {self.step}: saved {tag} in {time.time() - start:.1f} s")

    def export(self) -> dict[str, Any]:
        """Export the final state: checkpoint it (if not yet), then rank 0 consolidates it.
        Returns where it went and its sparsity (on every rank)."""
        if self.saved_step != self.step:
            self.save_checkpoint()
        out, total, problem = self.output_dir / "export", None, None
        if self.rank == 0:
            start = time.time()
            try:
                total = export_checkpoint(self.output_dir, out)["total"]
                self.logger.info(f"step {self.step}: exported in {time.time() - start:.1f} s")
            except EXPORT_WRITE_ERRORS as err:
                problem = (
                    f"cannot write the pruned model to {out} ({type(err).__name__}: {err}; "
                    f"{checkpoint.free_mib(out):,.0f} MiB free there){self._last_checkpoint_note()}: free "
                    f"space, then python launch/export.py --run {self.output_dir} writes it"
                )
        problem = first_problem(problem)  # every rank waits for rank 0's export, and stops alike
        if problem is not None:
            raise TrainingError(problem)
        return {"dir": str(out), **(total or {})}

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    # ----------------------------------------------------------------- train
    def train(self) -> dict[str, Any]:
        """Train to train.max_steps, evaluate, export if asked; return the run's summary."""
        self.notice, self.preempted = PreemptionNotice(), False
        try:
            return self._train()
        finally:
            self.notice.uninstall()
            self.logger.close()  # flushed even when training stops with an error
            self.lock.release()

    def _train(self) -> dict[str, Any]:
        """Evaluate, warm-start if asked, run the steps, evaluate, export: the whole run."""
        start, cfg = time.time(), self.config.train
        finished = self.resumed and self.step >= self.max_steps
        if finished:
            self.logger.info(
                f"pst-ds: {self.output_dir} is already trained to step {self.step} (train.max_steps); "
                "nothing to train (train.resume=never or another train.output_dir trains afresh)"
            )
        # A run that starts pruned (a one-shot start, or no training): "before" is still the dense
        # model, as for every run.
        fresh = self.step == 0 and not self.resumed
        warm = fresh and self.method.warm_start_method() is not None
        starts_pruned = warm or (fresh and self.method.holds_final_sparsity())
        if starts_pruned:
            self.controller.put_in_force(self.pst_layers, 0.0)
        before = None if finished else self.evaluate()
        after_warm_start = None
        if starts_pruned:
            if warm:
                self.warm_start()
                if self.base is not None and self.method.rewrites_backbone_at_start():
                    self._write_start()
            self.controller.apply(0, self.logs(0))
            after_warm_start = self.evaluate() if warm and self.method.trains else None
        batches = self.batches.from_position(self.step * cfg.gradient_accumulation_steps)
        self.engine.train()
        step_times = []
        while self.step < self.max_steps:
            step_start = time.time()
            logged = self.logs(self.step)
            loss, lr, sparsity, layer_sparsities = self._step(batches)
            step_times.append(time.time() - step_start)
            if logged:
                tokens_per_s = self.tokens_per_step() / (time.time() - step_start)
                changed = self.mask_changed_fraction()
                self.logger.log_step(self.step, loss, lr, sparsity, tokens_per_s, mask_changed=changed)
                if self.controller.learned:  # the learned split among matrices
                    self.logger.log_layers(self.step, layer_sparsities)
            self.logger.advance()
            if self.preempted:
                self.save_checkpoint()
                raise Preempted(
                    f"pst-ds: stopped on {self.notice.received or 'a signal on another rank'} after step "
                    f"{self.step}, saved in {self.checkpoints / checkpoint.tag_for(self.step)}: run the same "
                    "command to resume"
                )
            if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == self.max_steps):
                self.save_checkpoint()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.max_steps:
                self.evaluate()
        self.logger.end_progress()
        if self.saved_step != self.step:  # a run always ends with what it trained saved
            self.save_checkpoint()
        after = self.evaluate()
        summary = self._summary(before, after, after_warm_start, step_times, start)
        if cfg.export:
            summary["export"] = self.export()
        if self.rank == 0:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        change = f"{after['validation']:.4f}"
        if before is not None:
            change = f"{before['validation']:.4f} -> {change}"
        self.logger.info(
            f"pst-ds: done in {time.time() - start:.1f} s; validation {self.metric} {change}; "
            f"output in {self.output_dir}"
        )
        return summary

    def logs(self, step: int) -> bool:
        """Whether step ``step + 1`` is logged (its first forward notes the mask, too)."""
        return (step + 1) % self.config.train.log_every == 0 or step + 1 == self.max_steps

    def _step(self, batches: Iterator[dict[str, torch.Tensor]]) -> tuple[float, float, float, dict]:
        """One optimizer step; then the schedule moves (after each step, as in the release).
        Returns (the loss averaged over ranks, the LR, the sparsity and per-layer sparsities it ran at)."""
        losses = []
        for _ in range(self.config.train.gradient_accumulation_steps):
            with self._layer_failures_named(f"step {self.step + 1}"):
                loss = self._loss(self._to_device(next(batches)))
                self.engine.backward(loss)
            lr = self.engine.get_lr()[0]  # the LR this step uses (stepped inside step())
            self.engine.step()
            losses.append(loss.item())
        # Every step, one all-reduce: a NaN loss on any rank stops all of them alike, and so does a
        # preemption signal that reached any of them.
        loss_sum, signalled = self._sum_over_ranks([sum(losses) / len(losses), float(self.notice.pending())])
        mean_loss, self.preempted = loss_sum / self.world_size, signalled > 0
        if not math.isfinite(mean_loss):
            raise TrainingError(
                f"the loss at step {self.step + 1} is {mean_loss}: training diverged (try a lower "
                f"train.lr){self._last_checkpoint_note()}"
            )
        sparsity, layer_sparsities = self.pst_sparsity(), self.controller.layer_sparsities()
        self.controller.end_step(self.step)
        self.step += 1
        self.controller.apply(self.step, self.logs(self.step))
        return mean_loss, lr, sparsity, layer_sparsities

    def tokens_per_step(self) -> int:
        train = self.config.train
        return (
            train.micro_batch_size
            * train.gradient_accumulation_steps
            * self.world_size
            * self.config.data.block_size
        )

    def _summary(
        self,
        before: dict | None,
        after: dict,
        after_warm_start: dict | None,
        step_times: list[float],
        start: float,
    ) -> dict[str, Any]:
        def texts(results: dict | None) -> dict | None:
            return None if results is None else {k: v for k, v in results.items() if k != "validation"}

        return {
            "method": self.config.method,
            "steps": self.step,
            "world_size": self.world_size,
            "pst_layers": len(self.layer_names),
            "trainable_params": self.num_trainable(),
            "sparsified_params": self.sparsified_numel,
            "trainable_percent_of_sparsified": 100 * self.num_trainable() / self.sparsified_numel,
            "param_bytes_rank0": partitioned_param_bytes(self.engine.module),
            "optimizer_state_bytes_rank0": optimizer_state_bytes(self.optimizer),
            "peak_memory_bytes_rank0": peak_memory_bytes(),
            "memory_estimate_bytes_rank0": self.memory_estimate and self.memory_estimate.to_dict(),
            "peak_memory_before_model_bytes_rank0": self.peak_before_model,
            "step_times_s": step_times,  # this session's steps, rank 0
            "tokens_per_step": self.tokens_per_step(),
            "final_sparsity": self.pst_sparsity(),
            f"eval_{self.metric}_before": None if before is None else before["validation"],
            f"eval_{self.metric}_after": after["validation"],
            "eval_texts_before": texts(before),  # data.eval_files' perplexities
            "eval_texts_after": texts(after),
            "eval_after_warm_start": after_warm_start,  # pst.init's one-shot model, before training
            "wall_time_s": time.time() - start,
        }

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of one micro-batch: CE, or CE and the KL to the frozen dense backbone."""
        distill = self.config.train.distill
        if not distill.weight:
            return self.engine(**batch).loss
        return distilled(self.engine, batch, distill)[0]

    def warm_start(self) -> None:
        """Prune with the one-shot method of pst.init from calibration blocks (of the training split,
        or of oneshot.calibration_files)."""
        cfg, init = self.config, self.method.warm_start_method()
        count = min(cfg.oneshot.calibration_blocks, len(self.calibration))
        batches = [
            self._to_device(batch)
            for batch in calibration_batches(
                self.calibration, count, cfg.train.seed, cfg.train.micro_batch_size, self.collate
            )
        ]
        start, was_training = time.time(), self.engine.module.training
        self.engine.eval()
        calibration = Calibration(
            self.engine.module,
            self.pst_layers,
            batches,
            lambda batch: self.engine(**batch),
            self.controller.sparsity_at(0),
            self.controller.put_in_force,
            progress=self.logger.info if self.rank == 0 else lambda _: None,
        )
        with self._layer_failures_named(f"{init.name} calibration"):
            self.controller.warm_start(calibration)
        self.engine.train(was_training)
        self.logger.info(
            f"pst-ds: {init.name} pruned {len(self.pst_layers)} layers to "
            f"{self.controller.sparsity_at(0):.3f} from {count} blocks of {cfg.data.block_size} tokens "
            f"in {time.time() - start:.1f} s"
        )

    def _last_checkpoint_note(self) -> str:
        tags = checkpoint.complete_tags(self.checkpoints)
        return f"; the last complete checkpoint is {self.checkpoints / tags[0]}, intact" if tags else ""

    @contextlib.contextmanager
    def _layer_failures_named(self, when: str) -> Iterator[None]:
        """Turn non-finite importance scores (the layer names itself) into a TrainingError at ``when``."""
        try:
            yield
        except NonFiniteScoresError as err:
            raise TrainingError(
                f"{err} at {when}: S comes from the frozen weight and the factors, so either training "
                "diverged (try a lower train.lr) or the model's weights hold NaN or inf"
                f"{self._last_checkpoint_note()}"
            ) from None

    def mask_changed_fraction(self) -> float | None:
        """Share of all mask entries that changed since the previous logged step (None at
        first). Each rank counted its slice of every mask: summed over ranks (collective)."""
        changes = [layer.mask_changes() for layer in self.pst_layers.values()]
        if not changes or None in changes:
            return None
        (total,) = self._sum_over_ranks([float(sum(changes))])
        return total / self.sparsified_numel

    def pst_sparsity(self) -> float:
        """The sparsity in force over all pruned matrices."""
        return self.controller.global_sparsity()

    # -------------------------------------------------------------- evaluate
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.engine.device) for key, value in batch.items()}

    def evaluate(self) -> dict[str, float]:
        """The validation metric (perplexity, or accuracy for a classifier) of the model as it
        stands, and the perplexity of each of data.eval_files, over all ranks."""
        results = {}
        texts = {"validation": self.data.validation, **self.eval_texts}
        for name, dataset in texts.items():
            with self._layer_failures_named(f"the evaluation after step {self.step}"):
                result = evaluate_model(
                    self.engine,
                    dataset,
                    self.config.model.task,
                    self.config.train.micro_batch_size,
                    self.engine.device,
                )
            if name == "validation":
                ppl = self.logger.log_eval(
                    self.step, result["loss"], self.pst_sparsity(), result.get("accuracy")
                )
                results[name] = result.get("accuracy", ppl)
            else:
                results[name] = self.logger.log_eval_text(self.step, name, result["loss"])
        return results
