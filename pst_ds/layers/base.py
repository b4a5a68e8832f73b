"""The bases every injected layer shares: WrappedLinear (a Linear or GPT-2 Conv1D whose weight
and bias Parameter objects are kept) and SparseLinear (a pruned layer: its mask kind, mask
state and activation importance). PST's own layer is in pst.py, the baselines' in baselines.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import PSTConfig
from ..masks.kinds import Selection, mask_kind
from .importance import InputStatistics, column_scale
from .settling import MaskSettling


class WrappedLinear(nn.Module):
    """A layer around an ``nn.Linear`` or GPT-2 ``Conv1D`` that keeps its weight and bias
    Parameter objects (so checkpoints and ZeRO-3 hooks still see them) and knows its
    (out, in) orientation."""

    def __init__(self, base: nn.Linear | Conv1D) -> None:
        super().__init__()
        # Conv1D stores its weight as (in, out) and computes x @ W.
        self.transposed = isinstance(base, Conv1D)
        self.weight = base.weight
        self.bias = base.bias
        # Under ZeRO-3 the weight may already be partitioned: its real shape is ds_shape.
        shape = tuple(getattr(base.weight, "ds_shape", base.weight.shape))
        self.out_features, self.in_features = (shape[1], shape[0]) if self.transposed else shape
        self.as_teacher = False  # distill.py: run as the frozen dense layer (no mask, no update)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.as_teacher:
            return F.linear(x, self.oriented_weight(), self.bias)
        return self.adapted_forward(x)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The method's own forward (pruned, updated)."""
        raise NotImplementedError

    def oriented_weight(self) -> torch.Tensor:
        """The base weight as (out, in), in its own dtype (a view)."""
        return self.weight.t() if self.transposed else self.weight

    def to_base_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """An (out, in) weight in the base layer's own layout and dtype (for export)."""
        weight = weight.t() if self.transposed else weight
        return weight.to(self.weight.dtype).contiguous()


class SparseLinear(WrappedLinear):
    """What every pruned layer shares: its mask kind and mask state, the optional input
    statistics of activation importance, and the mask-settling bookkeeping. Subclasses give
    the scores.

    The mask state is the ``pruned`` buffer (entries pruned now: one count, or one per row),
    written by the sparsity controller, saved with the model and read back by export, so the
    exported mask is the one in force, never recomputed from the config and the step.
    """

    def __init__(self, base: nn.Linear | Conv1D, config: PSTConfig) -> None:
        super().__init__(base)
        self.mask_kind = mask_kind(config)
        device = base.weight.device
        pruned = self.mask_kind.pruned_count(self.out_features, self.in_features, config.initial_sparsity)
        self.register_buffer("pruned", pruned.to(device))
        self.input_stats: InputStatistics | None = None
        if config.importance == "activation":
            self.input_stats = InputStatistics()
            self.register_buffer("input_sq", torch.ones(self.in_features, dtype=torch.float32, device=device))
        # Mask settling, for logging: the trainer sets track_mask before a logged step's forward.
        self.track_mask = False
        self.settling = MaskSettling()

    @property
    def sparsity(self) -> float:
        """The share of this matrix pruned now."""
        return int(self.pruned.sum()) / (self.out_features * self.in_features)

    @sparsity.setter
    def sparsity(self, sparsity: float) -> None:
        """Put the kind's mask for the scheduled ``sparsity`` in force."""
        counts = self.mask_kind.pruned_count(self.out_features, self.in_features, sparsity)
        self.pruned.copy_(counts)

    def column_scale(self) -> torch.Tensor | None:
        """Activation importance's per-input scale of |W| (None: magnitude importance)."""
        return None if self.input_stats is None else column_scale(self.input_sq)

    def observe_inputs(self, x: torch.Tensor) -> None:
        if self.input_stats is None or not self.input_stats.collecting or not self.training:
            return
        # Not again in backward, where gradient checkpointing re-runs the forward: a private
        # torch call, -1 outside any backward pass.
        if torch._C._current_graph_task_id() == -1:
            self.input_stats.observe(x)

    def note_mask(self, mask: torch.Tensor) -> None:
        """Count the entries (of this rank's slice) changed since the previously noted mask;
        once per logged step, so a checkpointed forward's recomputation notes nothing."""
        self.track_mask = False
        self.settling.note(mask)

    def scores_and_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, the weight the mask applies to), both (out, in) fp32, without autograd."""
        raise NotImplementedError

    def selection(self, scores: torch.Tensor) -> Selection:
        return self.mask_kind.select(scores, self.pruned)

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """The bool (out, in) mask in force (needs the whole weight gathered)."""
        scores, _ = self.scores_and_weight()
        return self.selection(scores).mask(scores)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The masked weight in the base layer's own layout and dtype (for export)."""
        scores, weight = self.scores_and_weight()
        return self.to_base_layout(weight * self.selection(scores).mask(scores))
