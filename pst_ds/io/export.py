"""Export: a PST checkpoint -> a plain Hugging Face folder holding the pruned weights.

Every PST layer becomes the plain layer it wrapped, with weight M * (W + beta U V) under
the original name and layout; the factors are dropped. M comes from the mask state saved in
the checkpoint (each layer's ``pruned`` counts, input norms and thresholds), never from the
config and the step, and each mask is checked against its kind's exact pattern. Works from a
ZeRO checkpoint of any world size, on one process.

It streams: the model is built on the meta device, and one module at a time is filled from
the checkpoint (io/checkpoint_tensors.py), merged, and handed to safetensors shards of at most
``max_shard_bytes`` (or the largest tensor). Peak memory is a shard and one layer's merge, not
the model (an 8B model is 32 GB in fp32).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
from safetensors import SafetensorError
from torch import nn
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from transformers.utils import logging as hf_logging

from ..config import ConfigError
from ..experiment import experiment_from_dict
from ..layers.base import SparseLinear, WrappedLinear
from ..layers.inject import build_model
from ..masks.kinds import mask_kind
from ..methods import Method, method_class
from ..paths import check_writable
from ..train import checkpoint
from .base_model import BaseRecord, BaseTensors, fingerprint_change
from .checkpoint_tensors import CheckpointTensors, ShardWriter
from .models import load_tokenizer, model_dir

SPARSITY_REPORT = "pst_sparsity.json"
# What a write of the export raises when the disk fills or the folder is not writable: Python's
# own OSError, and safetensors' error for its own writes ("No space left on device").
WRITE_ERRORS = (OSError, SafetensorError)
DEFAULT_SHARD_BYTES = 1 << 28  # 256 MiB: the writer holds about twice a shard


def _zeros(weight: torch.Tensor) -> dict[str, Any]:
    zeros = int((weight == 0).sum())
    return {"shape": list(weight.shape), "zeros": zeros, "sparsity": zeros / weight.numel()}


def _merged(layer: WrappedLinear) -> tuple[torch.Tensor, dict[str, Any]]:
    """(the merged weight, what the report says of its mask)."""
    if not isinstance(layer, SparseLinear):  # LoRA: merged, nothing pruned
        return layer.merged_weight(), {}
    weight, keep = layer.masked_weight_and_mask()
    problem = layer.mask_kind.pattern_problem(keep, layer.pruned)
    if problem is not None:
        raise RuntimeError(f"the {layer.mask_kind.name} mask breaks its pattern: {problem}")
    pruned = int(layer.pruned.sum())
    verified = {"mask_pruned": pruned, "pattern_verified": True, "conv1d": layer.transposed}
    return weight, verified


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A module's own parameters and saved buffers (what its state dict holds at this level)."""
    buffers = [
        (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
    ]
    return [*module.named_parameters(recurse=False), *buffers]


def _filled(module: nn.Module, prefix: str, tensors: CheckpointTensors) -> None:
    """Give a meta module its checkpointed values (fp32, as training's model was built); through
    load_state_dict, so a pruned layer puts the saved mask state in force."""
    module.to_empty(device="cpu", recurse=False)
    own = {name: tensors.get(prefix + name) for name, _ in _own_tensors(module)}
    module.load_state_dict(own, strict=False)


Item = tuple[str, torch.Tensor, "dict[str, Any] | None"]  # (name, tensor, mask report or None)


def _owning_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, list[tuple[str, torch.Tensor]]]]:
    """(prefix, module, its own tensors) for each module that owns a tensor not seen before:
    a weight shared by two modules (tied embeddings) is written once, as save_pretrained does."""
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not getattr(module, "exported", True):  # a layer's dense teacher: training's only
            continue
        own = [(n, t) for n, t in _own_tensors(module) if id(t) not in seen]
        seen.update(id(t) for _, t in own)
        if own:
            yield (f"{name}." if name else ""), module, own


def _merged_items(layer: WrappedLinear, prefix: str) -> Iterator[Item]:
    """An injected layer as the plain layer it wrapped: its merged weight (with the mask's
    report) and its bias, fp32 on the CPU."""
    weight, mask = _merged(layer)
    yield f"{prefix}weight", weight.float().cpu(), {**_zeros(weight), **mask}
    if layer.bias is not None:
        yield f"{prefix}bias", layer.bias.detach().float().cpu().clone(), None


def _as_saved(value: torch.Tensor) -> torch.Tensor:
    return value.float() if value.is_floating_point() else value


def stream_merged(model: nn.Module, tensors: CheckpointTensors) -> Iterator[Item]:
    """The exported state dict, one module at a time, from a checkpoint: each injected layer
    merged into its plain layer's weight and bias, the rest as saved."""
    for prefix, module, own in _owning_modules(model):
        if isinstance(module, WrappedLinear):
            _filled(module, prefix, tensors)
            yield from _merged_items(module, prefix)
            module.to_empty(device="meta", recurse=False)  # its memory goes back at once
            continue
        for local, _ in own:
            yield prefix + local, _as_saved(tensors.get(prefix + local)), None


def stream_live(model: nn.Module, write: bool) -> Iterator[Item]:
    """What ``stream_merged`` yields, from a live model (under ZeRO-3, one module's parameters
    gathered at a time). Collective: every rank iterates it; only where ``write`` does it yield."""
    for prefix, module, own in _owning_modules(model):
        with deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False))), torch.no_grad():
            if not write:
                continue
            if isinstance(module, WrappedLinear):
                yield from _merged_items(module, prefix)
                continue
            for local, tensor in own:
                yield prefix + local, _as_saved(tensor.detach().cpu().clone()), None


def _mask_description(method: Method) -> dict[str, Any]:
    if not method.prunes:
        return {"kind": "none"}
    return {**mask_kind(method.pst).describe(), "importance": method.pst.importance}


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off: a bar per load and save step says nothing useful here."""
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def export_checkpoint(
    run_dir: Path, out_dir: Path, tag: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> dict[str, Any]:
    """Export checkpoint ``tag`` (default: the latest complete one) of a training run."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(
            f"{run_dir} is not a pst-ds training run (it has no config.json): give a run's train.output_dir"
        )
    check_writable(out_dir, "the export folder", folder=True)
    root = run_dir / "checkpoints"
    tag = tag or checkpoint.latest_tag(root)
    if tag is None or not checkpoint.is_complete(root, tag):
        complete = ", ".join(checkpoint.complete_tags(root)) or "none"
        named = f" {tag}" if tag else ""
        raise ConfigError(f"no complete checkpoint{named} under {root} (complete ones: {complete})")
    problem = checkpoint.damage(root, tag)
    if problem is not None:
        raise ConfigError(f"checkpoint {root / tag} is damaged: {problem}")
    # The config as saved: building it reads no file, so the training data may be gone by now.
    saved = json.loads((run_dir / "config.json").read_text())
    experiment = saved["experiment"]
    method = method_class(experiment.get("method", "pst"))(experiment_from_dict(experiment))
    manifest = checkpoint.read_manifest(root, tag)
    origin = {"checkpoint": str(root / tag), "step": manifest["step"]}
    base, read_back = manifest.get("base"), None
    if base:  # the checkpoint left the frozen backbone out: it is read from the model's folder
        folder = model_dir(method.config.model)
        start = run_dir / base["start"]["folder"] if base.get("start") else None
        change = fingerprint_change(base["files"], folder)
        if change is None and start is not None:
            change = fingerprint_change(base["start"]["files"], start)
        if change is not None:
            raise ConfigError(
                f"cannot export {root / tag}: the base model it builds on has changed: {change} (put "
                "back the model it was trained from; train.save_frozen=true makes checkpoints hold it)"
            )
        read_back = BaseRecord(folder, getattr(torch, base["dtype"].removeprefix("torch.")), start)
    with no_progress_bars():
        tokenizer = load_tokenizer(method.config.model)
        return export_deepspeed_checkpoint(
            root / tag, method, out_dir, origin, tokenizer, saved.get("labels"), max_shard_bytes, read_back
        )


def export_deepspeed_checkpoint(
    directory: Path,
    method: Method,
    out_dir: Path,
    origin: dict[str, Any],
    tokenizer: Any,
    labels: list[str] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    base: BaseRecord | None = None,
) -> dict[str, Any]:
    """Export the DeepSpeed checkpoint folder ``directory`` of a run of ``method``, streamed on
    one process: the model built on the meta device, filled one module at a time. ``base``: the
    model folder (the run's dtype, its start folder) that the tensors the checkpoint leaves out
    come from."""
    # A live HfDeepSpeedConfig (end of a ZeRO-3 run) would make the meta build partition
    # collectively and wait for the other ranks.
    unset_hf_deepspeed_config()
    model, layer_names = build_model(method, tokenizer, labels, meta=True)
    prefix = model.base_model_prefix
    frozen = None if base is None else BaseTensors(base.folder, prefix, base.dtype, base.start)
    with CheckpointTensors(directory, frozen) as tensors:
        return write_export(
            stream_merged(model, tensors),
            model,
            method,
            layer_names,
            tokenizer,
            out_dir,
            origin,
            max_shard_bytes,
        )


def write_export(
    items: Iterator[Item],
    model: nn.Module,
    method: Method,
    layer_names: list[str],
    tokenizer: Any,
    out_dir: Path,
    origin: dict[str, Any],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Write the merged tensors ``items`` (from ``stream_merged`` or ``stream_live``) as a plain HF
    folder, with the model's config, its tokenizer (if any) and the sparsity report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = {}
    with ShardWriter(out_dir, max_shard_bytes) as shards:
        for name, tensor, mask in items:
            shards.add(name, tensor.contiguous())
            layer = name.removesuffix(".weight")
            if mask is not None:
                layers[layer] = mask
            elif not method.injects and layer in layer_names:  # nothing injected: report as is
                layers[layer] = _zeros(tensor)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    zeros = sum(v["zeros"] for v in layers.values())
    numel = sum(v["shape"][0] * v["shape"][1] for v in layers.values())
    report = {
        **origin,
        "method": method.name,
        "mask": _mask_description(method),
        "sparsity_in_force": sum(v.get("mask_pruned", 0) for v in layers.values()) / numel,
        "total": {"layers": len(layers), "params": numel, "zeros": zeros, "sparsity": zeros / numel},
        "layers": layers,
        "config": method.config.to_dict(),
    }
    (out_dir / SPARSITY_REPORT).write_text(json.dumps(report, indent=1))
    return report
