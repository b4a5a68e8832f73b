"""Weight-sized scratch buffers, reused by every PST layer instead of fresh ones for each pass.

A PST layer's forward and backward write several (out, in) tensors: W', S, the masked weight,
G and the backward terms. On the CPU, a fresh buffer that size costs page faults every time
(glibc maps and unmaps each allocation above 32 MiB), which took more time than the arithmetic
of a 7B-shape layer (docs/archive/results-history.md). The workspace keeps one buffer per slot, grown to the
largest layer that used it, and hands out views of it: the memory is what the fresh buffers of
the largest layer took at their peak, held once for the whole model. CUDA's caching allocator
already reuses its blocks, so there each request is a fresh tensor, freed as before.

A slot's contents live until the next request for that slot: callers use a slot for one pass
and never return it (or a view of it) to autograd.
"""

from __future__ import annotations

import math

import torch


class Workspace:
    """Named scratch slots, per dtype and device."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def take(
        self, slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape`` in ``slot``'s buffer."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        key, numel = (slot, dtype, device), math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop(key, None)  # freed before its larger successor is made
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


WORKSPACE = Workspace()
