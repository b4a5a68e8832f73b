"""MaskedLoRALinear: a LoRA update trained under a frozen one-shot mask, merged without losing its
zeros (the recipe of SPP, SQFT, LoSA and PERP's MaskLoRA): PST's layer with the importance frozen.

For a frozen weight W (out x in), with only the update's U (out x r) and V (r x in) trained (LoRA's
B and A: U = 0, V Kaiming-uniform, s = lora.alpha / lora.rank, layers/update.py):

    M  = the mask kind's kept set of S = |W| (times the input norms after Wanda's start), at the
         count the start put in force: W never changes, so neither does M
    y  = x @ (M * (W + s * U @ V)).T + b

Export writes M * (W + s U V), so every pruned entry stays zero. The forward, the backward and the
update are PST's (pst_function.py): what this class adds is how M is held.

M is selected once, at the first training forward, and kept in the cheapest form: nothing where
it is exactly W's own nonzeros (after SparseGPT's start, or a model already sparse), else packed
to bits (out*in/8 bytes, held for the run). Forward and backward read it in one fused pass each
with the merge: no S, no selection, no host sync in a step, and nothing weight-sized kept between
forward and backward.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LoRAConfig, PSTConfig
from ..masks.bits import pack_rows
from .base import LayerSite
from .pst import PSTLinear
from .pst_blocks import held_keep
from .pst_function import HeldMask, PSTLinearFunction
from .update import lora_update


class MaskedLoRALinear(PSTLinear):
    """A frozen, pruned ``nn.Linear`` or GPT-2 ``Conv1D`` with a LoRA update merged under its mask."""

    learns_mask = False

    def __init__(
        self, base: nn.Linear | Conv1D, config: PSTConfig, lora: LoRAConfig, site: LayerSite | None = None
    ) -> None:
        super().__init__(base, config, site, lora_update(lora))
        # The frozen mask's held form and what it was selected under (see held_mask).
        self._frozen: tuple[torch.Tensor, int, torch.Tensor | None] | None = None

    def frozen_scores(self) -> torch.Tensor:
        """S = |W| (times the input norms), fp32, (out, in): fixed for the whole run."""
        weight = self.oriented_weight().detach().float()
        scale = self.column_scale()
        return weight.abs() if scale is None else weight.abs() * scale

    def _frozen_under(self) -> tuple[torch.Tensor, int]:
        """What the frozen mask is selected under: the count in force (a new host tensor whenever
        another count is put in force or a checkpoint loaded) and the input norms' version (a
        warm start writes them; a step never does)."""
        return self._pruned_host, -1 if self.input_stats is None else self.input_sq._version

    @torch.no_grad()
    def held_mask(self) -> torch.Tensor | None:
        """M in its held form (``HeldMask``), selected the first time it is asked for under the
        count and input norms in force (the host syncs of a selection, once a run)."""
        count, norms = self._frozen_under()
        if self._frozen is None or self._frozen[0] is not count or self._frozen[1] != norms:
            keep = self.mask()
            weight = self.oriented_weight()
            if torch.equal(keep, weight != 0):
                held = None  # W's own zeros are the mask: nothing to keep
            elif keep.shape[1] % 8 == 0:
                held = pack_rows(keep)
            else:
                held = keep
            self._frozen = (count, norms, held)
        return self._frozen[2]

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """The bool (out, in) mask in force, selected afresh from S alone (the update plays no part)."""
        scores = self.frozen_scores()
        return self.selection(scores).mask(scores)

    def scores_and_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        update = self.hyper.beta * (self.U.detach().float() @ self.V.detach().float())
        return self.frozen_scores(), self.oriented_weight().detach().float() + update

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        # A training step reads the held mask; evaluation and calibration select afresh (a warm
        # start may be rewriting W under the same count).
        held = self.held_mask() if self.reuses_selection() else self.mask()
        if self.track_mask:
            with torch.no_grad():
                self.note_mask(held_keep(self.oriented_weight(), held))
        none = (None,) * 7  # A, B, R, C, the keep fraction, the column scale, a start prior: M is held
        return PSTLinearFunction.apply(
            x, self.weight, self.bias, self.U, self.V, *none, self.hyper, HeldMask(held), None
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.weight_rank}, "
            f"mask={self.mask_kind.describe()}, sparsity={self.sparsity:.4f}, conv1d={self.transposed}"
        )
