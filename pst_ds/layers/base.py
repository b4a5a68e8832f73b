"""The bases every injected layer shares: WrappedLinear (a Linear or GPT-2 Conv1D whose weight
and bias Parameter objects are kept) and SparseLinear (a pruned layer: its mask kind, mask
state and activation importance). PST's own layer is in pst.py, the baselines' in baselines.py.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import PSTConfig
from ..masks.kinds import Selection, mask_kind
from ..masks.select import NonFiniteScoresError
from .importance import InputStatistics, column_scale
from .settling import MaskSettling
from .step import StepBoard, in_backward, optimizer_steps

# Set by dense_forward(): every injected layer computes x W^T + b (the frozen dense layer).
_DENSE = contextvars.ContextVar("pst_ds_dense_forward", default=False)


@contextlib.contextmanager
def dense_forward() -> Iterator[None]:
    """Within: every injected layer runs as the frozen dense layer it wraps (no mask, no
    update), e.g. for distillation's teacher pass. Nothing is written to the layers."""
    token = _DENSE.set(True)
    try:
        yield
    finally:
        _DENSE.reset(token)


class DenseTeacher(nn.Module):
    """A frozen copy of a layer's original weight, for distillation's teacher when a warm start
    rewrites the weight itself (pst.init=sparsegpt). A copy from birth, taken before any start
    runs: partitioned under ZeRO-3 (one more frozen weight per shard, never a whole one per
    rank), on the weight's own device (meta in a meta build). Frozen like the backbone, so a
    checkpoint leaves it out and resume reads it back from the base model; never exported."""

    exported = False

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
        return F.linear(x, self.weight.t() if transposed else self.weight, bias)


def dense_teacher(base: nn.Linear | Conv1D) -> DenseTeacher:
    """A DenseTeacher holding a copy of ``base``'s weight, on its device; under ZeRO-3 built
    partitioned and filled shard by shard (a weight and its copy split alike over the ranks)."""
    from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled() or not hasattr(base.weight, "ds_tensor"):
        return DenseTeacher(base.weight.detach().clone())
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
        teacher = DenseTeacher(torch.empty(tuple(base.weight.ds_shape), dtype=base.weight.dtype))
    with torch.no_grad():
        teacher.weight.ds_tensor.copy_(base.weight.ds_tensor)
    return teacher


@dataclass(frozen=True)
class LayerSite:
    """Where an injected layer sits, given to it when it is built: its qualified name in the
    model (for errors and per-layer state), the model's step board, and distillation's teacher
    when a warm start will rewrite the weight."""

    name: str = ""
    board: StepBoard = field(default_factory=StepBoard)
    teacher: DenseTeacher | None = None


class WrappedLinear(nn.Module):
    """A layer around an ``nn.Linear`` or GPT-2 ``Conv1D`` that keeps its weight and bias
    Parameter objects (so checkpoints and ZeRO-3 hooks still see them) and knows its
    (out, in) orientation."""

    def __init__(self, base: nn.Linear | Conv1D, site: LayerSite | None = None) -> None:
        super().__init__()
        # Conv1D stores its weight as (in, out) and computes x @ W.
        self.transposed = isinstance(base, Conv1D)
        self.weight = base.weight
        self.bias = base.bias
        # Under ZeRO-3 the weight may already be partitioned: its real shape is ds_shape.
        shape = tuple(getattr(base.weight, "ds_shape", base.weight.shape))
        self.out_features, self.in_features = (shape[1], shape[0]) if self.transposed else shape
        site = site or LayerSite()
        self.layer_name = site.name
        self.board = site.board  # read only: the controller publishes each step's record there
        self.dense_teacher = site.teacher  # the original weight, when a warm start rewrites it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _DENSE.get():
            if self.dense_teacher is not None:
                return self.dense_teacher(x, self.bias, self.transposed)
            return F.linear(x, self.oriented_weight(), self.bias)
        return self.adapted_forward(x)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """This layer's own trainable parameters by job (train/optim.py gives each job its rate)."""
        raise NotImplementedError

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
    written by the sparsity controller (``put_in_force``), saved with the model and read back by
    export, so the exported mask is the one in force, never recomputed from the config and the
    step. A host copy beside it is what the selection reads: no device sync per forward.
    """

    revivable = False  # holds a rewriting start as a decaying prior on S (PSTLinear.hold_start)

    def __init__(self, base: nn.Linear | Conv1D, config: PSTConfig, site: LayerSite | None = None) -> None:
        super().__init__(base, site)
        self.mask_kind = mask_kind(config)
        device = base.weight.device
        pruned = self.mask_kind.pruned_count(self.out_features, self.in_features, config.initial_sparsity)
        self.register_buffer("pruned", pruned.to(device, copy=True))  # apart from the host copy, on a CPU too
        self._pruned_host = pruned
        # A checkpoint's mask state (resume, export) replaces the buffer: the host copy follows.
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_host_state())
        self.input_stats: InputStatistics | None = None
        if config.importance == "activation":
            self.input_stats = InputStatistics()
            self.register_buffer("input_sq", torch.ones(self.in_features, dtype=torch.float32, device=device))
        # Mask settling, for logging: noted in the first training forward of a logged step.
        self.settling = MaskSettling()
        self._noted_step: int | None = None
        # The step's held selection and the key it was made under (layers/step.py).
        self._held: tuple[object, Selection] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return super().forward(x)
        except NonFiniteScoresError as err:  # name the layer: which one diverged is the clue
            raise NonFiniteScoresError(f"{err} in layer {self.layer_name or '?'}") from None

    def put_in_force(self, pruned: torch.Tensor) -> None:
        """Write the mask state: ``pruned`` entries (one count, or one per row). The sparsity
        controller's job; export's when it puts a checkpoint's state back. The host copy is the
        one compared and read: an unchanged count writes nothing, and a new one goes to the device
        without waiting for it (the controller's counts are on the host: no sync either way)."""
        self._held = None  # a state put in force (a new step's, or a warm start's): select again
        pruned = pruned.reshape(self.pruned.shape).to("cpu", torch.long)
        if not torch.equal(pruned, self._pruned_host):
            self.pruned.copy_(pruned, non_blocking=True)
            self._pruned_host = pruned.clone()

    def _refresh_host_state(self) -> None:
        self._pruned_host = self.pruned.detach().to("cpu", copy=True)
        self._held = None  # another state in force: select again

    def selection_key(self) -> object:
        """What a held selection stays valid for: this step of the record, and no optimizer step
        taken since (W and the factors change only at one)."""
        return (self.board.record.step, optimizer_steps())

    def reuses_selection(self) -> bool:
        """Whether the forward about to run takes (or makes) the step's held selection: training
        forwards under a published record only, so an evaluation or a warm start's calibration
        always selects afresh."""
        return self.board.record is not None and self.training and torch.is_grad_enabled()

    @property
    def track_mask(self) -> bool:
        """Whether this forward notes the mask (and checks its scores): the first training forward
        of a logged step, not a recompute in backward."""
        record = self.board.record
        return (
            record is not None
            and record.logged
            and self._noted_step != record.step
            and self.training
            and not in_backward()
        )

    @property
    def pruned_count(self) -> torch.Tensor:
        """The mask state in force, on the host (reading it never waits for the device)."""
        return self._pruned_host

    @property
    def sparsity(self) -> float:
        """The share of this matrix pruned now."""
        return int(self._pruned_host.sum()) / (self.out_features * self.in_features)

    @sparsity.setter
    def sparsity(self, sparsity: float) -> None:
        """Put the kind's mask for the scheduled ``sparsity`` in force."""
        self.put_in_force(self.mask_kind.pruned_count(self.out_features, self.in_features, sparsity))

    def column_scale(self) -> torch.Tensor | None:
        """Activation importance's per-input scale of |W| (None: magnitude importance)."""
        return None if self.input_stats is None else column_scale(self.input_sq)

    def observe_inputs(self, x: torch.Tensor) -> None:
        """Add x to this step's input statistics when the record gathers them (not in backward,
        where gradient checkpointing runs the forward again)."""
        record = self.board.record
        gathering = record is not None and record.gathering
        if self.input_stats is not None and gathering and self.training and not in_backward():
            self.input_stats.observe(x)

    def note_mask(self, mask: torch.Tensor) -> None:
        """Count the entries (of this rank's slice) changed since the previously noted mask;
        once per logged step, so a checkpointed forward's recomputation notes nothing."""
        self._noted_step = None if self.board.record is None else self.board.record.step
        self.settling.note(mask)

    def mask_changes(self) -> int | None:
        """Entries of this rank's slice changed between the last two noted masks (None: one so far)."""
        return self.settling.changes

    def scores_and_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, the weight the mask applies to), both (out, in) fp32, without autograd."""
        raise NotImplementedError

    def selection(self, scores: torch.Tensor, check: bool = True, reuse: bool = False) -> Selection:
        """The kind's mask of ``scores`` at the state in force; ``check``: refuse non-finite scores
        (a device sync, so training checks on logged steps only where the selection has none).
        ``reuse`` (``reuses_selection()``): the step's held selection, made now if none is held."""
        if reuse and self._held is not None and self._held[0] == self.selection_key():
            return self._held[1]
        selection = self.mask_kind.select(scores, self._pruned_host, check)
        if reuse:
            self._held = (self.selection_key(), selection)
        return selection

    def masked_forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x (M * W)^T + b with M chosen without autograd (the weight's own gradient, if it
        trains, is G * M); the mask is noted, and its scores checked, on logged steps."""
        weight, reuse = self.oriented_weight(), self.reuses_selection()
        with torch.no_grad():
            scores, _ = self.scores_and_weight()
            track = self.track_mask
            keep = self.selection(scores, check=track, reuse=reuse).mask(scores)
            if track:
                self.note_mask(keep)
        return F.linear(x, (weight * keep.to(weight.dtype)).to(x.dtype), self.bias)

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """The bool (out, in) mask in force (needs the whole weight gathered)."""
        scores, _ = self.scores_and_weight()
        return self.selection(scores).mask(scores)

    @torch.no_grad()
    def masked_weight_and_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M * W' in the base layer's own layout and dtype, M (out, in)): what export writes, and
        the mask it checks against the kind's pattern."""
        scores, weight = self.scores_and_weight()
        keep = self.selection(scores).mask(scores)
        return self.to_base_layout(weight * keep), keep

    def merged_weight(self) -> torch.Tensor:
        """The masked weight in the base layer's own layout and dtype (for export)."""
        return self.masked_weight_and_mask()[0]
