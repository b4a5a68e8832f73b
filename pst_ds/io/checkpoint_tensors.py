"""Whole tensors out of a DeepSpeed checkpoint one at a time, and safetensors shards written as
they fill: what lets export stream a model larger than the memory it runs in.

A ZeRO-3 checkpoint holds, per rank, 1/world of every frozen weight (``frozen_param_fragments``
in the model-states file) and of every trained one (the fp32 flat groups in the optimizer-states
file). The files are opened memory-mapped; a tensor is assembled from its ranks' fragments when
asked for, and the file pages it read are handed back to the kernel at once (they are clean
pages of a private mapping: dropping them loses nothing, they are read again if touched). A
ZeRO-1/2 checkpoint is consolidated whole by DeepSpeed: such a run held the whole model on
every rank anyway.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from deepspeed.checkpoint.constants import (
    BUFFER_NAMES,
    FP32_FLAT_GROUPS,
    FROZEN_PARAM_FRAGMENTS,
    FROZEN_PARAM_SHAPES,
    OPTIMIZER_STATE_DICT,
    PARAM_SHAPES,
    ZERO_STAGE,
)
from deepspeed.utils.zero_to_fp32 import (
    GatheredTensor,
    get_fp32_state_dict_from_zero_checkpoint,
    get_model_state_files,
    get_optim_files,
    zero3_partitioned_param_info,
)
from safetensors.torch import save_file

from .base_model import BaseTensors

_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None


def _drop_pages(tensor: torch.Tensor) -> None:
    """Hand the whole pages under a memory-mapped ``tensor`` back to the kernel."""
    if _libc is None or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # only pages wholly inside the tensor
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


class CheckpointTensors:
    """``get(name)``: one whole tensor of a DeepSpeed checkpoint folder (as saved, on the CPU);
    one the checkpoint left out (a frozen weight) from ``base``, the model it was trained from."""

    def __init__(self, directory: Path, base: BaseTensors | None = None) -> None:
        self.directory, self.base = directory, base
        optim = [
            torch.load(f, map_location="cpu", mmap=True, weights_only=False)
            for f in get_optim_files(directory)
        ]
        self.stage = optim[0][OPTIMIZER_STATE_DICT][ZERO_STAGE]
        if self.stage != 3:
            self.whole = get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name)
            return
        files = get_model_state_files(directory)
        self.states = [torch.load(f, map_location="cpu", mmap=True, weights_only=False) for f in files]
        first = self.states[0]
        self.buffers = {k: v for k, v in first["module"].items() if k in first[BUFFER_NAMES]}
        self.frozen_shapes = first.get(FROZEN_PARAM_SHAPES) or {}
        # Trained parameters: consecutive partitions of the per-rank flat fp32 groups.
        groups = [state[OPTIMIZER_STATE_DICT][FP32_FLAT_GROUPS] for state in optim]
        group_offsets = [0, *np.cumsum([flat.numel() for flat in groups[0]]).tolist()]
        self.trained: dict[str, GatheredTensor] = {}
        offset = 0
        for name, shape in ((k, v) for shapes in first[PARAM_SHAPES] for k, v in shapes.items()):
            partition, _ = zero3_partitioned_param_info(shape.numel(), len(files))
            self.trained[name] = GatheredTensor(groups, group_offsets, offset, partition, shape)
            offset += partition

    def get(self, name: str) -> torch.Tensor:
        if self.stage != 3:
            return self.whole[name] if name in self.whole or self.base is None else self.base.get(name)
        if name in self.buffers:
            return self.buffers[name]
        if name in self.trained:
            return self.trained[name].contiguous()
        if name not in self.frozen_shapes:
            if self.base is not None:
                return self.base.get(name)
            raise KeyError(f"{name} is not in the checkpoint {self.directory}")
        shape = self.frozen_shapes[name]
        fragments = [state[FROZEN_PARAM_FRAGMENTS][name] for state in self.states]
        whole = torch.cat(fragments).narrow(0, 0, shape.numel()).view(shape)
        for fragment in fragments:
            _drop_pages(fragment)
        return whole

    def __enter__(self) -> CheckpointTensors:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.states, self.trained, self.whole = [], {}, {}


class ShardWriter:
    """Tensors into safetensors shards of at most ``max_bytes`` each (a larger tensor alone), in
    order, with Hugging Face's names: ``model.safetensors`` when one shard holds everything,
    else ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``."""

    def __init__(self, out_dir: Path, max_bytes: int) -> None:
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self.written):05d}.partial"
        try:
            save_file(self.pending, str(path), metadata={"format": "pt"})
        except BaseException:
            path.unlink(missing_ok=True)  # what a failed write left of this shard
            raise
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if kind is not None:  # a failed export leaves no shard that looks complete
            for path, _ in self.written:
                path.unlink(missing_ok=True)
            return
        if self.pending:
            self._flush()
        count = len(self.written)
        if count == 1:
            self.written[0][0].rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for index, (path, names) in enumerate(self.written, start=1):
            final = f"model-{index:05d}-of-{count:05d}.safetensors"
            path.rename(self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"
        )
