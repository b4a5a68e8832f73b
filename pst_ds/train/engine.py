"""The DeepSpeed side of a run: its config completed from the experiment's, the run folder, and
what a rank holds (parameters, optimizer state, peak memory) for the summary."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pydantic
import torch
from deepspeed.runtime.config import DeepSpeedConfig

from ..config import ConfigError, TrainConfig
from ..host_memory import peak_resident_bytes
from ..paths import check_writable, resolve_path
from .distributed import on_cpu


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
    _validate(config)
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {})
    if offload.get("device") == "cpu":
        # Our torch AdamW steps the factors' state on the CPU; DeepSpeedCPUAdam would need a
        # JIT compile for parameters this small.
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


def _validate(config: dict[str, Any]) -> None:
    """Check the DeepSpeed config with DeepSpeed's own config model, before anything starts: a
    value it rejects is one line naming the field, not a pydantic traceback from deepspeed.initialize."""
    try:
        DeepSpeedConfig(copy.deepcopy(config))
    except pydantic.ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']} (got {e['input']!r})"
            for e in err.errors()
        )
        raise ConfigError(f"the DeepSpeed config is not valid ({err.title}): {problems}") from None
    except (AssertionError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"the DeepSpeed config is not valid: {err}") from None


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

    # accelerate's wrapper (itself a torch Optimizer), DeepSpeed's ZeRO optimizer, torch's AdamW
    chain = [optimizer]
    while getattr(chain[-1], "optimizer", None) is not None:
        chain.append(chain[-1].optimizer)
    for state in chain[-1].state.values():
        for value in state.values():
            add(value)
    for level in chain:
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            for tensor in getattr(level, name, []) or []:
                add(tensor)
    return total


def peak_memory_bytes() -> int:
    """This process's peak accelerator memory, or its peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return peak_resident_bytes()


def resolve_output_dir(name: str) -> Path:
    """The run's folder (relative to the current directory); refused if it cannot be one."""
    path = Path(name) if Path(name).is_absolute() else Path.cwd() / name
    check_writable(path, "train.output_dir", folder=True)
    return path
