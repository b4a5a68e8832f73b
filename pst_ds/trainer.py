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
from torch.utils.data import DataLoader, DistributedSampler
from transformers.integrations import HfDeepSpeedConfig

from . import checkpoint
from .config import ConfigError, ExperimentConfig, TrainConfig, resolve_path
from .data import collate_for, load_splits
from .distributed import agreed, init_distributed, on_cpu, rank_zero_first
from .export import export_checkpoint
from .inject import head_parameters, inject_pst, iter_pst_layers
from .logging import RunLogger
from .masks import NonFiniteScoresError
from .models import load_model, load_tokenizer
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


def linear_warmup_decay(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


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
        self._check_enough_data()
        if self.ds_config.get("zero_optimization", {}).get("stage") == 3:
            # Kept alive so that from_pretrained builds the backbone already partitioned.
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        # Collective under ZeRO-3: every rank at once.
        model = load_model(cfg.model, tokenizer, self.data.labels)
        self.collate = collate_for(cfg.model.task)
        self.metric = "ppl" if self.data.labels is None else "accuracy"
        self.layer_names = inject_pst(model, cfg.pst, cfg.method, cfg.lora)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.pst_layers = dict(iter_pst_layers(model))
        # The layer whose forward runs (or ran last), to name it if its scores are not finite.
        self._running_layer = "?"
        for name, layer in self.pst_layers.items():
            layer.register_forward_pre_hook(lambda *_, name=name: setattr(self, "_running_layer", name))
        weights = [model.get_submodule(name).weight for name in self.layer_names]
        self.sparsified_numel = sum(getattr(w, "ds_numel", w.numel()) for w in weights)
        self.controller = SparsityController(cfg.method, cfg.pst, cfg.train.max_steps, self.pst_layers)
        lrs = {
            "method": cfg.train.lr,
            "scores": cfg.train.score_lr,
            "head": cfg.train.head_lr,
            "thresholds": cfg.train.threshold_lr,
        }
        groups = [
            {"params": params, "lr": lrs[name] or cfg.train.lr}
            for name, params in self._parameter_groups(model).items()
            if params
        ]
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, linear_warmup_decay(cfg.train.warmup_steps, cfg.train.max_steps)
        )
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.sampler = DistributedSampler(
            self.data.train,
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=cfg.train.seed,
            drop_last=True,
        )
        self.loader = DataLoader(
            self.data.train,
            batch_size=cfg.train.micro_batch_size,
            sampler=self.sampler,
            collate_fn=self.collate,
            drop_last=True,
            # Its own generator: each iter() would otherwise draw from the global RNG, which a
            # resumed run restores at a different point than an uninterrupted one.
            generator=torch.Generator().manual_seed(cfg.train.seed),
        )
        self.checkpoints = self.output_dir / "checkpoints"
        self.step = self._resume() if cfg.train.resume == "auto" else 0
        self.controller.apply(self.step)
        self.logger = RunLogger(
            self.output_dir,
            cfg.train.max_steps,
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

    def _parameter_groups(self, model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
        """Trainable parameters by learning rate: task head, per-weight scores, threshold logits, the rest."""
        layers = self.pst_layers.values()
        group_of = {id(p): "head" for p in head_parameters(model, self.config.pst)}
        group_of.update({id(layer.scores): "scores" for layer in layers if hasattr(layer, "scores")})
        group_of.update(
            {id(layer.threshold_logit): "thresholds" for layer in layers if hasattr(layer, "threshold_logit")}
        )
        groups: dict[str, list[torch.nn.Parameter]] = {
            "method": [],
            "scores": [],
            "head": [],
            "thresholds": [],
        }
        for p in self.trainable:
            groups[group_of.get(id(p), "method")].append(p)
        return groups

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
        # ds_numel: ZeRO-3 has replaced the data of partitioned parameters by their shards.
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.trainable)

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

    def _batches(self, skip: int) -> Iterator[torch.Tensor]:
        """Training batches from micro-batch ``skip`` on: epochs reshuffle deterministically."""
        epoch, skip = divmod(skip, len(self.loader))
        while True:
            self.sampler.set_epoch(epoch)
            batches = iter(self.loader)
            for _ in range(skip):  # only on resume: fast-forward to the saved data position
                next(batches)
            skip = 0
            yield from batches
            epoch += 1

    def _mean_over_ranks(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(tensor)
        return (tensor / self.world_size).tolist()

    def train(self) -> dict[str, Any]:
        """Train to train.max_steps, evaluate, export if asked; return the run's summary."""
        try:
            return self._train()
        finally:
            self.logger.close()  # flushed even when training stops with an error

    def _train(self) -> dict[str, Any]:
        cfg = self.config.train
        tokens_per_step = (
            cfg.micro_batch_size
            * cfg.gradient_accumulation_steps
            * self.world_size
            * self.config.data.block_size
        )
        start = time.time()
        finished = self.step >= cfg.max_steps
        if finished:
            self.logger.info(
                f"pst-ds: {self.output_dir} is already trained to step {self.step} (train.max_steps); "
                "nothing to train (train.resume=never or another train.output_dir trains afresh)"
            )
        before = None if finished else self.evaluate()
        batches = self._batches(self.step * cfg.gradient_accumulation_steps)
        self.engine.train()
        step_times = []
        while self.step < cfg.max_steps:
            step_start, losses = time.time(), []
            logged = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.max_steps
            for layer in self.pst_layers.values():
                layer.track_mask = logged  # noted in the forward that follows
            for _ in range(cfg.gradient_accumulation_steps):
                with self._layer_failures_named(f"step {self.step + 1}"):
                    loss = self.engine(**self._to_device(next(batches))).loss
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
            step_times.append(time.time() - step_start)
            self.step += 1
            # The schedule moves after each optimizer step, as in the release.
            self.controller.apply(self.step)
            if logged:
                self.logger.log_step(
                    self.step,
                    mean_loss,
                    lr,
                    sparsity,
                    tokens_per_step / (time.time() - step_start),
                    mask_changed=self.mask_changed_fraction(),
                )
                if self.controller.learned:  # the learned split among matrices
                    self.logger.log_layers(self.step, layer_sparsities)
            self.logger.advance()
            if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == cfg.max_steps):
                self.save_checkpoint()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                self.evaluate()
        self.logger.end_progress()
        after = self.evaluate()
        summary = {
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
            "step_times_s": step_times,  # this session's steps, rank 0
            "tokens_per_step": tokens_per_step,
            "final_sparsity": self.pst_sparsity(),
            f"eval_{self.metric}_before": before,
            f"eval_{self.metric}_after": after,
            "wall_time_s": time.time() - start,
        }
        if cfg.export:
            summary["export"] = self.export()
        if self.rank == 0:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        change = f"{after:.4f}" if before is None else f"{before:.4f} -> {after:.4f}"
        self.logger.info(
            f"pst-ds: done in {time.time() - start:.1f} s; validation {self.metric} {change}; "
            f"output in {self.output_dir}"
        )
        return summary

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
        """Share of all mask entries that changed since the previous logged step (None at first)."""
        changes = [layer.mask_changes for layer in self.pst_layers.values()]
        return None if not changes or None in changes else sum(changes) / self.sparsified_numel

    def pst_sparsity(self) -> float:
        """The sparsity in force over all pruned matrices."""
        return self.controller.global_sparsity()

    # -------------------------------------------------------------- evaluate
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.engine.device) for key, value in batch.items()}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation loss (and accuracy, for classification) of the model as it stands, over all ranks.

        Returns the perplexity for a causal LM, the accuracy for a classifier. Every rank runs
        the same number of forwards (ZeRO-3 gathers are collective); a rank whose share has
        run out repeats an example with weight 0.
        """
        validation = self.data.validation
        batch = self.config.train.micro_batch_size
        mine = list(range(self.rank, len(validation), self.world_size))
        rounds = math.ceil(math.ceil(len(validation) / self.world_size) / batch)
        was_training = self.engine.module.training
        self.engine.eval()
        loss_sum, correct, count = 0.0, 0, 0
        for i in range(rounds):
            indices = mine[i * batch : (i + 1) * batch]
            inputs = self._to_device(self.collate([validation[j] for j in indices or [0]]))
            with self._layer_failures_named(f"the evaluation after step {self.step}"):
                output = self.engine(**inputs)
            loss_sum += output.loss.item() * len(indices)
            count += len(indices)
            if self.data.labels is not None and indices:
                correct += int((output.logits.argmax(-1) == inputs["labels"]).sum())
        self.engine.train(was_training)
        totals = torch.tensor([loss_sum, correct, count], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(totals)
        loss_sum, correct, count = totals.tolist()
        accuracy = correct / count if self.data.labels is not None else None
        ppl = self.logger.log_eval(self.step, loss_sum / count, self.pst_sparsity(), accuracy)
        return ppl if accuracy is None else accuracy


def resolve_output_dir(name: str) -> Path:
    """The run's folder (relative to the current directory); refused if it cannot be one."""
    path = Path(name) if Path(name).is_absolute() else Path.cwd() / name
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"train.output_dir {name}: {existing} exists and is not a folder")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"train.output_dir {name}: {existing} is not writable")
    return path
