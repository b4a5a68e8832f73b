"""PSTLinear: a frozen linear layer pruned by PST (Li et al., IJCAI 2022), trained through tiny factors.

Also the bases the baselines share: WrappedLinear and SparseLinear.

For a frozen weight W (out x in), with only U, V, A, B, R, C trained:

    W' = W + beta * U @ V                                         (low-rank weight update)
    S  = |W'| + alpha1 * A @ B + alpha2 * (R[:, None] + C[None, :])  (importance)
    M  = the mask kind's kept set of S (mask_kinds.py), straight-through gradient to S
    y  = x @ (M * W').T + b

Init U ~ N(0, pst.update_init_std^2), A ~ N(0, 1) and V, B, R, C = 0, so training starts as
magnitude pruning (S = |W|), or from a one-shot method's mask with pst.init (oneshot.py).
With ``pst.importance=activation`` |W'| is scaled per input column (importance.py); with
``pst.mask=threshold`` a trained logit per matrix (or row) sets its share (allocation.py).
S and the masked weight are computed in fp32 whatever the model's dtype, so ties from a
low-precision W cannot make the sparsity inexact. The forward and backward themselves live
in pst_function.py, which keeps nothing weight-sized between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import PSTConfig
from .importance import InputStatistics, column_scale
from .mask_kinds import Selection, mask_kind
from .pst_function import PSTHyper, PSTLinearFunction, extended_importance_factors, kernels
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


class PSTLinear(SparseLinear):
    """PST on an ``nn.Linear`` or a GPT-2 ``Conv1D``: the weight frozen, six small factors trained.

    The factors are shaped for the (out, in) orientation whatever the base layout.
    """

    def __init__(self, base: nn.Linear | Conv1D, config: PSTConfig) -> None:
        super().__init__(base, config)
        out_features, in_features = self.out_features, self.in_features
        self.hyper = PSTHyper(
            config.alpha1, config.alpha2, config.beta, self.transposed, config.compile, config.threshold_band
        )
        self.weight_rank, self.mask_rank = config.weight_rank, config.mask_rank
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.U = nn.Parameter(
            config.update_init_std * torch.randn(out_features, config.weight_rank, **factory)
        )
        self.V = nn.Parameter(torch.zeros(config.weight_rank, in_features, **factory))
        self.A = nn.Parameter(torch.randn(out_features, config.mask_rank, **factory))
        self.B = nn.Parameter(torch.zeros(config.mask_rank, in_features, **factory))
        self.R = nn.Parameter(torch.zeros(out_features, **factory))
        self.C = nn.Parameter(torch.zeros(in_features, **factory))
        if self.mask_kind.learned:  # the threshold's logit: 0, a uniform share, to start
            self.threshold_logit = nn.Parameter(
                torch.zeros(out_features if self.mask_kind.per_row else 1, **factory)
            )
            self.threshold_shift = 0.0  # the model-wide shift c, set by the sparsity controller

    def updated_and_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', S), (out, in), fp32, without autograd (needs the whole weight gathered).

        Through the forward's own kernel, so the mask reported and exported is bit for bit
        the one training used (the compiled and eager roundings of W' may differ).
        """
        hyper = self.hyper
        with torch.no_grad():
            Ae, Be = extended_importance_factors(self.A, self.B, self.R, self.C, hyper.alpha1, hyper.alpha2)
            run = kernels(hyper.compiled)["updated_and_scores"]
            return run(self.weight, self.U, self.V, Ae, Be, hyper.beta, hyper.transposed, self.column_scale())

    def scores_and_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        updated, scores = self.updated_and_scores()
        return scores, updated

    def keep_fraction(self) -> torch.Tensor | None:
        """rho = sigmoid(logit + c) of a learned threshold, for its gradient (allocation.py)."""
        if not self.mask_kind.learned:
            return None
        return torch.sigmoid(self.threshold_logit + self.threshold_shift)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observe_inputs(x)
        record = [] if self.track_mask else None
        y = PSTLinearFunction.apply(
            x,
            self.weight,
            self.bias,
            self.U,
            self.V,
            self.A,
            self.B,
            self.R,
            self.C,
            self.keep_fraction(),
            self.column_scale(),
            self.hyper,
            self.mask_kind,
            self.pruned,
            record,
        )
        if record:
            self.note_mask(record[0])
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight_rank={self.weight_rank}, mask_rank={self.mask_rank}, "
            f"mask={self.mask_kind.describe()}, sparsity={self.sparsity:.4f}, conv1d={self.transposed}"
        )
