"""The cost model: FLOPs and bytes moved per pruned layer and per optimizer step, for dense full
fine-tuning, LoRA and PST with each mask kind, and the time a device with given peak rates takes.

Every pass is a (FLOPs, bytes) pair, timed as a roofline: max(FLOPs / peak FLOP/s, bytes /
bandwidth), so GEMMs are compute-bound and the element-wise passes over a weight memory-bound.
For a layer of o x i weights, e = o i entries and T tokens per micro-batch (w: the weight's
bytes, a: the activations', 4: fp32 scratch):

    GEMMs      y = x W^T, dx = dy W, G = dy^T x: 2 o i T FLOPs each; dense trains all three,
               LoRA and the frozen head skip G, PST needs all three (G is M * W''s gradient)
    LoRA       rank-r factors: 3 x 2 r (o + i) T FLOPs each way
    PST        the passes of layers/pst_function.py, in bytes per entry:
                 forward   W -> W', S                       w + 8 (+ 1/8: a revivable start's kept set)
                           selection (the step's first forward only): the kind's selection_cost
                           W', S -> M * W' (+ bits)         8 + a (+ 1/8)
                           split (bf16/fp16, pst.low_precision_forward=split): M * W' in fp32
                           (4 instead of a), split into two halves (4 + 2a), a second GEMM
                 backward  bits:      G, W, bits -> M * W', dS, dW'   a + w + 1/8 + a + 8
                           recompute: W -> W', S; G, W', S -> ...     w + 8 + a + 8 + a + 8
                           the factors' thin GEMMs read dS and dW' twice each: 16
    masked LoRA  forward   W, bits -> M * (W + s B A)       w + 1/8 + a
                 backward  G, W, bits -> M * (W + s B A), M * G (over G)   w + 1/8 + 3a
                           dB, dA: thin GEMMs reading M * G once each: 2a
    Adam       dense only, once per step on the rank's share: 16 bytes of moments and master
               read and written, the gradient read and the weight written (4 + w)

Gradient checkpointing runs each forward twice (PST's recompute reuses the step's selection).
The data flows one way: shapes and rates in, seconds out; tools/estimate_step.py prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ..masks.kinds import MaskKind, TopK

if TYPE_CHECKING:
    from ..config import ExperimentConfig


@dataclass(frozen=True)
class Device:
    """Peak rates as reached by real kernels (not the datasheet's): GEMM FLOP/s at the run's
    precision and memory bandwidth in bytes/s."""

    name: str
    gemm_flops: float
    bandwidth: float

    def seconds(self, flops: float, bytes_moved: float) -> float:
        return max(flops / self.gemm_flops, bytes_moved / self.bandwidth)


# Datasheet peaks (dense bf16 tensor cores; HBM) at 70% and 80%, what large GEMMs and copies reach.
GPUS = {
    "h100": Device("NVIDIA H100 SXM (989 TFLOP/s bf16, 3.35 TB/s) at 70% / 80%", 0.7 * 989e12, 0.8 * 3.35e12),
    "h200": Device("NVIDIA H200 SXM (989 TFLOP/s bf16, 4.8 TB/s) at 70% / 80%", 0.7 * 989e12, 0.8 * 4.8e12),
}


@dataclass(frozen=True)
class LayerShape:
    out: int
    inp: int
    tokens: int  # per micro-batch and rank
    weight_bytes: int = 4
    act_bytes: int = 4

    @property
    def entries(self) -> int:
        return self.out * self.inp


@dataclass(frozen=True)
class Pass:
    name: str
    flops: float
    bytes: float
    forward: bool  # runs in the forward (again under gradient checkpointing)


def gemm(name: str, shape: LayerShape, forward: bool = False) -> Pass:
    """One of the layer's three GEMMs: FLOPs and the bytes of its operands and result."""
    s = shape
    moved = s.entries * s.weight_bytes + s.tokens * (s.out + s.inp) * s.act_bytes
    return Pass(name, 2.0 * s.entries * s.tokens, moved, forward)


class LayerCost:
    """One formulation of a pruned layer's forward and backward: its passes, and whether it trains
    the weight itself (then Adam runs over the weight, and the head's gradient is formed too)."""

    trains_weight: ClassVar[bool] = False

    def passes(self, shape: LayerShape, select: bool = True) -> list[Pass]:
        """The passes of one micro-batch; ``select``: this micro-batch makes the step's selection."""
        raise NotImplementedError


def gemms(shape: LayerShape) -> list[Pass]:
    return [gemm("y = x W^T", shape, True), gemm("dx = dy W", shape), gemm("G = dy^T x", shape)]


@dataclass(frozen=True)
class DenseCost(LayerCost):
    """Full fine-tuning: the three GEMMs."""

    trains_weight: ClassVar[bool] = True

    def passes(self, shape: LayerShape, select: bool = True) -> list[Pass]:
        return gemms(shape)


@dataclass(frozen=True)
class LoRACost(LayerCost):
    """A frozen weight (no G) and rank-r factors: 3 x 2 r (o + i) T FLOPs each way."""

    rank: int = 8

    def passes(self, shape: LayerShape, select: bool = True) -> list[Pass]:
        s, r = shape, self.rank
        thin = 2.0 * r * (s.out + s.inp) * s.tokens, r * (s.out + s.inp) * 4 + s.tokens * r * s.act_bytes
        return gemms(s)[:2] + [Pass("lora factors", *thin, i < 2) for i in range(6)]


@dataclass(frozen=True)
class PSTCost(LayerCost):
    """PST's passes (layers/pst_function.py) with a mask kind (its selection's cost is the kind's)."""

    kind: MaskKind = field(default_factory=TopK)
    saved_mask: str = "bits"
    rank: int = 8
    mask_rank: int = 8
    # bf16 / fp16 with pst.low_precision_forward=split: M * W' in fp32, split into two halves
    # (read 4, write 2 + 2 bytes an entry) and a second forward GEMM
    split: bool = False
    # a revivable start (pst.start_bias_decay after SparseGPT's): each pass that computes S also
    # reads the start's kept set, 1/8 byte an entry
    start_prior: bool = False

    def passes(self, shape: LayerShape, select: bool = True) -> list[Pass]:
        s, e = shape, shape.entries
        w, a = s.weight_bytes, s.act_bytes
        select_bytes, keep_flops = self.kind.selection_cost()
        factor_flops = 2.0 * (self.rank + self.mask_rank + 2)  # the unrolled low-rank products, per entry
        bits = self.saved_mask == "bits" and not self.kind.learned  # a learned threshold needs S in backward
        prior = 0.125 if self.start_prior else 0.0
        out = [*gemms(s), Pass("W -> W', S", e * factor_flops, e * (w + 8 + prior), True)]
        if select:
            out.append(Pass(f"selection ({self.kind.name})", e * 2.0, e * select_bytes, True))
        masked = (4 if self.split else a) + (0.125 if bits else 0)
        out.append(Pass("W', S -> M*W'", e * keep_flops, e * (8 + masked), True))
        if self.split:
            out += [Pass("M*W' -> high, low", e * 2.0, e * (4 + 2 * a), True), gemm("y += x low^T", s, True)]
        if bits:
            backward = Pass(
                "G, W, bits -> M*W', dS, dW'", e * (2.0 * self.rank + 8), e * (2 * a + w + 8.125), False
            )
            out.append(backward)
        else:
            out.append(Pass("W -> W', S (backward)", e * factor_flops, e * (w + 8 + prior), False))
            out.append(Pass("G, W', S -> M*W', dS, dW'", e * (keep_flops + 8), e * (2 * a + 16), False))
        thin = Pass("factor gradients", 2.0 * e * (self.rank + self.mask_rank + 1) / 2, e * 4.0, False)
        return out + [thin] * 4  # dU, dV from dW'; dA, dB (with R, C) from dS


@dataclass(frozen=True)
class MaskedLoRACost(LayerCost):
    """Masked LoRA's passes (layers/masked_lora.py): the frozen mask read from bits (1/8 byte an
    entry; none where W's zeros are the mask), merged with the rank-r update in one pass each way;
    G is needed (dB, dA are thin products of M * G)."""

    rank: int = 8
    bits: bool = True

    def passes(self, shape: LayerShape, select: bool = True) -> list[Pass]:
        s, e = shape, shape.entries
        w, a, m = s.weight_bytes, s.act_bytes, 0.125 if self.bits else 0.0
        merge_flops = 2.0 * self.rank + 2
        return [
            *gemms(s),
            Pass("W, bits -> M*(W + sBA)", e * merge_flops, e * (w + m + a), True),
            Pass("G, W, bits -> M*(W + sBA), M*G", e * (merge_flops + 1), e * (w + m + 3 * a), False),
            Pass("dB = s (M*G) A^T", 2.0 * e * self.rank, e * a, False),
            Pass("dA = s B^T (M*G)", 2.0 * e * self.rank, e * a, False),
        ]


def optimizer_pass(cost: LayerCost, shape: LayerShape, world_size: int) -> Pass:
    """Adam on the layer's trained parameters, once per step on this rank's share."""
    share = shape.entries / world_size if cost.trains_weight else 0.0  # thin factors: negligible
    return Pass("adam", 10.0 * share, share * (16 * 2 + 4 + shape.weight_bytes), False)


def layer_seconds(device: Device, cost: LayerCost, shape: LayerShape) -> float:
    """One forward and backward of the layer (the step's selection included)."""
    return sum(device.seconds(p.flops, p.bytes) for p in cost.passes(shape))


def step_seconds(
    device: Device,
    cost: LayerCost,
    shapes: list[LayerShape],
    micro_batches: int,
    checkpointing: bool,
    world_size: int = 1,
    rest: list[LayerShape] | None = None,
) -> float:
    """One optimizer step on one rank: every pruned layer's micro-batches (the selection in the
    first only), checkpointing's second forward (the held selection), Adam (dense only), and the
    model's other linears (``rest``, e.g. the head: trained by dense only)."""
    total = 0.0
    for shape in shapes:
        for micro in range(micro_batches):
            for p in cost.passes(shape, select=micro == 0):
                repeat = 2 if checkpointing and p.forward and not p.name.startswith("selection") else 1
                total += repeat * device.seconds(p.flops, p.bytes)
        adam = optimizer_pass(cost, shape, world_size)
        total += device.seconds(adam.flops, adam.bytes)
    for shape in rest or []:
        passes = gemms(shape)[: 3 if cost.trains_weight else 2]
        total += micro_batches * sum(device.seconds(p.flops, p.bytes) for p in passes)
        adam = optimizer_pass(cost, shape, world_size)
        total += device.seconds(adam.flops, adam.bytes)
    return total


def model_shapes(config: ExperimentConfig, act_bytes: int) -> tuple[list[LayerShape], list[LayerShape]]:
    """(the pruned layers, the model's other linears) of ``config``'s model, read on the meta
    device, at its micro-batch's tokens, in the precision of ``act_bytes`` (weights alike)."""
    from torch import nn

    from ..layers.inject import iter_injected
    from ..methods import method_class
    from .memory import meta_model

    method = method_class("pst")(config)
    model = meta_model(method)
    tokens = config.train.micro_batch_size * config.data.block_size
    pruned = [
        LayerShape(layer.out_features, layer.in_features, tokens, act_bytes, act_bytes)
        for _, layer in iter_injected(model)
    ]
    injected = {id(layer.weight) for _, layer in iter_injected(model)}
    rest = [
        LayerShape(m.out_features, m.in_features, tokens, act_bytes, act_bytes)
        for m in model.modules()
        if isinstance(m, nn.Linear) and id(m.weight) not in injected
    ]
    return pruned, rest
