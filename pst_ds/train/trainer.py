"""The training loop over a DeepSpeed engine: step, sparsity schedule, evaluation, logging."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from transformers.integrations import HfDeepSpeedConfig

from ..config import ONE_SHOT_METHODS, ConfigError, ExperimentConfig, TrainConfig, resolve_path
from ..io.data import TrainingBatches, collate_for, load_eval_texts, load_splits
from ..io.evaluate import evaluate_model
from ..io.export import export_checkpoint
from ..io.models import enable_gradient_checkpointing, load_tokenizer
from ..layers.inject import build_model, iter_pst_layers
from ..masks.select import NonFiniteScoresError
from ..oneshot.calibrate import prune_one_shot
from . import checkpoint
from .distill import distillation_loss, teacher_mode
from .distributed import agreed, init_distributed, on_cpu, rank_zero_first
from .logging import RunLogger
from .memory import MemoryEstimate, estimate
from .optim import build_optimizer
from .schedule import SparsityController


class TrainingError(RuntimeError):
    """Training cannot go on (it diverged, say); the message is the whole explanation."""


def load_ds_config(path: str) -> dict[str, Any]:
    file = resolve_path(path)
    if not file.is_file():
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None


def prepare_ds_config(ds_config: dict[str, Any], train: TrainConfig) -> dict[str, Any]:
    """Complete a DeepSpeed config from the experiment config; reject what would conflict.

    The DeepSpeed JSON owns the engine (ZeRO stage, precision, offload, clipping); batch
    sizes, the optimizer and the LR schedule come from the experiment config alone.
    """
    config = copy.deepcopy(ds_config)
    for key, ours in (
        ("optimizer", "train.lr / train.weight_decay"),
        ("scheduler", "train.warmup_steps"),
        ("train_batch_size", "train.micro_batch_size"),
        ("train_micro_batch_size_per_gpu", "train.micro_batch_size"),
        ("gradient_accumulation_steps", "train.gradient_accumulation_steps"),
    ):
        if key in config:
            raise ConfigError(f"the DeepSpeed config sets {key!r}; pst-ds takes it from {ours}")
    if config.get("fp16", {}).get("enabled") and on_cpu():
        raise ConfigError("fp16 needs a GPU and none was found: use a bf16 or fp32 config on CPU")
    config["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    config["gradient_accumulation_steps"] = train.gradient_accumulation_steps
    config.setdefault("steps_per_print", 10**9)  # the progress bar reports progress
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {})
    if offload.get("device") == "cpu":
        # Our torch AdamW steps the factors' state on the CPU; DeepSpeedCPUAdam would need a
        # JIT compile for parameters this small.
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


def partitioned_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this rank stores (its ZeRO-3 partition where one exists)."""
    total = 0
    for param in model.parameters():
        stored = getattr(param, "ds_tensor", param)
        total += stored.numel() * stored.element_size()
    return total


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of optimizer state this rank holds (Adam moments, and ZeRO's fp32 master
    partitions where the engine keeps them), read from the wrapped torch optimizer."""
    seen: set[int] = set()
    total = 0

    def add(tensor: Any) -> None:
        nonlocal total
        if torch.is_tensor(tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()

    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    for state in inner.state.values():
        for value in state.values():
            add(value)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        for tensor in getattr(optimizer, name, []) or []:
            add(tensor)
    return total


def peak_memory_bytes() -> int:
    """This process's peak accelerator memory, or its peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Trainer:
    """Builds the run (model, PST layers, data, engine) and trains it.

    ``setup`` validates and loads everything before the output directory is created, so a
    bad configuration fails without leaving a half-written run behind.
    """

    def __init__(self, config: ExperimentConfig, ds_config: dict[str, Any]) -> None:
        self.config = config
        self.ds_config = prepare_ds_config(ds_config, config.train)
        self.output_dir = resolve_output_dir(config.train.output_dir)

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        init_distributed()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        cfg = self.config
        torch.manual_seed(cfg.train.seed)  # identical factor init on every rank
        # Before any ZeRO-3 context exists, on every rank at once: loading the tokenizer
        # converts the embedded model on first use (a file lock lets one rank do it).
        tokenizer = agreed(lambda: load_tokenizer(cfg.model))
        self.data = rank_zero_first(lambda: load_splits(cfg.data, cfg.model.task, tokenizer))
        self.eval_texts = rank_zero_first(lambda: load_eval_texts(cfg.data, tokenizer))
        self._check_enough_data()
        self.peak_before_model = peak_memory_bytes()  # the process and its data, no model yet
        self.memory_estimate = self._estimate_memory()
        if self.ds_config.get("zero_optimization", {}).get("stage") == 3:
            # Kept alive so that from_pretrained builds the backbone already partitioned.
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        # Collective under ZeRO-3: every rank at once.
        model, self.layer_names = build_model(
            cfg.model, tokenizer, self.data.labels, cfg.pst, cfg.method, cfg.lora
        )
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.collate = collate_for(cfg.model.task)
        self.metric = "ppl" if self.data.labels is None else "accuracy"
        self.one_shot = cfg.method in ONE_SHOT_METHODS  # prunes from calibration data, trains nothing
        self.max_steps = 0 if self.one_shot else cfg.train.max_steps
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.pst_layers = dict(iter_pst_layers(model))
        # The layer whose forward runs (or ran last), to name it if its scores are not finite.
        self._running_layer = "?"
        for name, layer in self.pst_layers.items():
            layer.register_forward_pre_hook(lambda *_, name=name: setattr(self, "_running_layer", name))
        weights = [model.get_submodule(name).weight for name in self.layer_names]
        self.sparsified_numel = sum(getattr(w, "ds_numel", w.numel()) for w in weights)
        self.controller = SparsityController(cfg.method, cfg.pst, self.max_steps, self.pst_layers)
        optimizer, schedule = build_optimizer(model, list(self.pst_layers.values()), cfg.pst, cfg.train)
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config
        )
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
        self.step = self._resume() if cfg.train.resume == "auto" else 0
        self.controller.apply(self.step)
        self.logger = RunLogger(
            self.output_dir,
            self.max_steps,
            enabled=self.rank == 0,
            resumed=self.step > 0,
            label=cfg.method,
        )
        self.logger.advance(self.step)
        if self.rank == 0:
            (self.output_dir / "config.json").write_text(
                json.dumps(
                    {"experiment": cfg.to_dict(), "deepspeed": self.ds_config, "labels": self.data.labels},
                    indent=2,
                )
            )
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
        """Parameters trained (0 for a one-shot method, whose unused factors only carry the mask)."""
        # ds_numel: ZeRO-3 has replaced the data of partitioned parameters by their shards.
        return 0 if self.one_shot else sum(getattr(p, "ds_numel", p.numel()) for p in self.trainable)

    # ----------------------------------------------------------------- train
    def manifest(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed: the config and the world size."""
        experiment = self.config.to_dict()
        for key in TrainConfig.RESUMABLE_CHANGES:
            experiment["train"].pop(key)
        return {"experiment": experiment, "world_size": self.world_size}

    def _resume(self) -> int:
        """Load the newest sound complete checkpoint if there is one; return the step it holds.

        A checkpoint whose files no longer match what was saved is skipped with a warning.
        """
        tag = checkpoint.newest_sound(self.checkpoints, shared=True, warn=self.warn)
        if tag is None:
            return 0
        saved = checkpoint.read_manifest(self.checkpoints, tag)
        differences = checkpoint.config_differences(
            {k: saved[k] for k in ("experiment", "world_size")}, self.manifest()
        )
        if differences:
            raise ConfigError(
                f"cannot resume {self.checkpoints / tag}: "
                + "; ".join(differences)
                + " (set train.resume=never or another train.output_dir to start afresh)"
            )
        checkpoint.load(self.engine, self.checkpoints, tag)
        self.resumed = True
        if self.rank == 0:
            print(f"pst-ds: resumed from {self.checkpoints / tag}", flush=True)
        return saved["step"]

    def warn(self, message: str) -> None:
        if self.rank == 0:
            print(f"pst-ds: warning: {message}", flush=True)

    def save_checkpoint(self) -> None:
        start = time.time()
        tag = checkpoint.save(
            self.engine, self.checkpoints, self.step, self.manifest(), self.config.train.keep_last
        )
        self.logger.info(f"step {self.step}: saved {tag} in {time.time() - start:.1f} s")

    def export(self) -> dict[str, Any]:
        """Export the final state: checkpoint it (if not yet), then rank 0 consolidates it.
        Returns where it went and its sparsity (on every rank)."""
        if checkpoint.latest_tag(self.checkpoints) != checkpoint.tag_for(self.step):
            self.save_checkpoint()
        out, total = self.output_dir / "export", None
        if self.rank == 0:
            start = time.time()
            total = export_checkpoint(self.output_dir, out)["total"]
            self.logger.info(f"step {self.step}: exported in {time.time() - start:.1f} s")
        dist.barrier()
        return {"dir": str(out), **(total or {})}

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def _mean_over_ranks(self, values: list[float]) -> list[float]:
        return [value / self.world_size for value in self._sum_over_ranks(values)]

    def train(self) -> dict[str, Any]:
        """Train to train.max_steps, evaluate, export if asked; return the run's summary."""
        try:
            return self._train()
        finally:
            self.logger.close()  # flushed even when training stops with an error

    def _train(self) -> dict[str, Any]:
        """Evaluate, warm-start if asked, run the steps, evaluate, export: the whole run."""
        start, cfg = time.time(), self.config.train
        finished = self.resumed and self.step >= self.max_steps
        if finished:
            self.logger.info(
                f"pst-ds: {self.output_dir} is already trained to step {self.step} (train.max_steps); "
                "nothing to train (train.resume=never or another train.output_dir trains afresh)"
            )
        warm_start = self.step == 0 and not self.resumed and self.config.pst.init != "magnitude"
        for layer in self.pst_layers.values() if warm_start else ():
            layer.sparsity = 0.0  # "before" is the dense model, as for every run
        before = None if finished else self.evaluate()
        after_warm_start = None
        if warm_start:
            self.warm_start()
            self.controller.apply(0)
            after_warm_start = self.evaluate() if not self.one_shot else None
        batches = self.batches.from_position(self.step * cfg.gradient_accumulation_steps)
        self.engine.train()
        step_times = []
        while self.step < self.max_steps:
            step_start = time.time()
            logged = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == self.max_steps
            loss, lr, sparsity, layer_sparsities = self._step(batches, logged)
            step_times.append(time.time() - step_start)
            if logged:
                tokens_per_s = self.tokens_per_step() / (time.time() - step_start)
                self.logger.log_step(
                    self.step, loss, lr, sparsity, tokens_per_s, mask_changed=self.mask_changed_fraction()
                )
                if self.controller.learned:  # the learned split among matrices
                    self.logger.log_layers(self.step, layer_sparsities)
            self.logger.advance()
            if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == self.max_steps):
                self.save_checkpoint()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.max_steps:
                self.evaluate()
        self.logger.end_progress()
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

    def _step(
        self, batches: Iterator[dict[str, torch.Tensor]], logged: bool
    ) -> tuple[float, float, float, dict]:
        """One optimizer step; then the schedule moves (after each step, as in the release).
        Returns (the loss averaged over ranks, the LR, the sparsity and per-layer sparsities it ran at)."""
        for layer in self.pst_layers.values():
            layer.track_mask = logged  # noted in the forward that follows
        losses = []
        for _ in range(self.config.train.gradient_accumulation_steps):
            with self._layer_failures_named(f"step {self.step + 1}"):
                loss = self._loss(self._to_device(next(batches)))
                self.engine.backward(loss)
            lr = self.engine.get_lr()[0]  # the LR this step uses (stepped inside step())
            self.engine.step()
            losses.append(loss.item())
        # Every step (one scalar): a NaN loss on any rank stops all of them alike.
        (mean_loss,) = self._mean_over_ranks([sum(losses) / len(losses)])
        if not math.isfinite(mean_loss):
            raise TrainingError(
                f"the loss at step {self.step + 1} is {mean_loss}: training diverged (try a lower "
                f"train.lr){self._last_checkpoint_note()}"
            )
        sparsity, layer_sparsities = self.pst_sparsity(), self.controller.layer_sparsities()
        self.controller.end_step(self.step)
        self.step += 1
        self.controller.apply(self.step)
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
        with torch.no_grad(), teacher_mode(self.engine.module):
            teacher_logits = self.engine(**{k: v for k, v in batch.items() if k != "labels"}).logits
        output = self.engine(**batch)
        loss, _ = distillation_loss(
            output.loss, output.logits, teacher_logits, distill.weight, distill.temperature
        )
        return loss

    def warm_start(self) -> None:
        """Prune with the one-shot method of pst.init from calibration blocks of the training split."""
        cfg = self.config
        count = min(cfg.oneshot.calibration_blocks, len(self.data.train))
        chosen = torch.randperm(len(self.data.train), generator=torch.Generator().manual_seed(cfg.train.seed))
        blocks = [self.data.train[int(i)] for i in chosen[:count]]
        size = cfg.train.micro_batch_size
        batches = [self._to_device(self.collate(blocks[i : i + size])) for i in range(0, count, size)]
        start, was_training = time.time(), self.engine.module.training
        self.engine.eval()
        with self._layer_failures_named(f"{cfg.pst.init} calibration"):
            prune_one_shot(
                cfg.pst.init,
                self.engine.module,
                self.pst_layers,
                batches,
                lambda batch: self.engine(**batch),
                self.controller.sparsity_at(0),
                cfg.oneshot.sequential,
                cfg.oneshot.damp,
                cfg.oneshot.block_columns,
                progress=self.logger.info if self.rank == 0 else lambda _: None,
            )
        self.engine.train(was_training)
        self.logger.info(
            f"pst-ds: {cfg.pst.init} pruned {len(self.pst_layers)} layers to "
            f"{self.controller.sparsity_at(0):.3f} from {count} blocks of {cfg.data.block_size} tokens "
            f"in {time.time() - start:.1f} s"
        )

    def _last_checkpoint_note(self) -> str:
        tags = checkpoint.complete_tags(self.checkpoints)
        return f"; the last complete checkpoint is {self.checkpoints / tags[0]}" if tags else ""

    @contextlib.contextmanager
    def _layer_failures_named(self, when: str) -> Iterator[None]:
        """Turn non-finite importance scores into a TrainingError naming the layer and ``when``."""
        try:
            yield
        except NonFiniteScoresError as err:
            raise TrainingError(
                f"{err} in layer {self._running_layer} at {when}: S comes from the frozen weight and "
                "the factors, so either training diverged (try a lower train.lr) or the model's "
                f"weights hold NaN or inf{self._last_checkpoint_note()}"
            ) from None

    def mask_changed_fraction(self) -> float | None:
        """Share of all mask entries that changed since the previous logged step (None at
        first). Each rank counted its slice of every mask: summed over ranks (collective)."""
        changes = [layer.settling.changes for layer in self.pst_layers.values()]
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


def resolve_output_dir(name: str) -> Path:
    """The run's folder (relative to the current directory); refused if it cannot be one."""
    path = Path(name) if Path(name).is_absolute() else Path.cwd() / name
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"train.output_dir {name}: {existing} exists and is not a folder")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"train.output_dir {name}: {existing} is not writable")
    return path
