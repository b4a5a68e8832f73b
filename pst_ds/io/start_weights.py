"""The run's start folder: the backbone as a warm start that rewrites it left it.

SparseGPT's start (pst.init=sparsegpt) writes new values into every pruned weight once; then
they stay frozen. Checkpoints keep leaving the frozen backbone out, as after any other start:
the run writes the rewritten weights once, into ``<output_dir>/start`` (safetensors, by their
names in the model, in the dtype the run holds them), and records its fingerprint. Resume
reads them back over the base model; export reads the base model, then this folder over it.
Distillation's teacher keeps the original weights: it is read from the base model folder.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import deepspeed
import torch
from safetensors import safe_open

from .checkpoint_tensors import ShardWriter

START = "start"  # the folder's name in a run's output directory
SHARD_BYTES = 1 << 30


def rewritten(layers: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """The weights a rewriting start changed, by their names in the model."""
    return {f"{name}.weight": layer.weight for name, layer in layers.items()}


def write_start(layers: dict[str, torch.nn.Module], folder: Path, rank: int) -> None:
    """Write the pruned layers' weights into ``folder``, replacing what was there; a collective
    under ZeRO-3 (each weight is gathered in turn), rank 0 writes. The folder appears whole or
    not at all."""
    partial = folder.with_name(folder.name + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    with ShardWriter(partial, SHARD_BYTES) if rank == 0 else contextlib.nullcontext() as shards:
        for name, weight in rewritten(layers).items():
            with deepspeed.zero.GatheredParameters([weight]):
                if rank == 0:
                    shards.add(name, weight.detach().to("cpu", copy=True))
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)


def read_start(layers: dict[str, torch.nn.Module], folder: Path, rank: int) -> None:
    """Copy the weights ``write_start`` wrote back into the pruned layers; a collective under
    ZeRO-3 (rank 0 reads each file and its values are partitioned to every rank)."""
    where = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), path))
    for name, weight in rewritten(layers).items():
        partitioned = hasattr(weight, "ds_id")
        with torch.no_grad(), deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
            if rank == 0 or not partitioned:
                with safe_open(str(where[name]), framework="pt") as handle:
                    weight.copy_(handle.get_tensor(name))
