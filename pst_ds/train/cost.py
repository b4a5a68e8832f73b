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
                 forward   W -> W', S                       w + 8
                           selection (the step's first forward only): the kind's SELECT_BYTES
                           W', S -> M * W' (+ bits)         8 + a (+ 1/8)
                 backward  bits:      G, W, bits -> M * W', dS, dW'   a + w + 1/8 + a + 8
                           recompute: W -> W', S; G, W', S -> ...     w + 8 + a + 8 + a + 8
                           the factors' thin GEMMs read dS and dW' twice each: 16
    Adam       dense only, once per step on the rank's share: 16 bytes of moments and master
               read and written, the gradient read and the weight written (4 + w)

Gradient checkpointing runs each forward twice (PST's recompute reuses the step's selection).
The data flows one way: shapes and rates in, seconds out; tools/estimate_step.py prints them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import ExperimentConfig

# Bytes per entry that a selection reads and writes, by mask kind (masks/select.py, kinds.py):
# topk brackets the k-th value (a finiteness sum, two compares, the bracket's entries); a row
# scope runs a kthvalue per row and counts below and tied entries; nm and vnm need no selection
# pass (their masks are element-wise in S; vnm sums each block's columns once).
SELECT_BYTES = {"topk": 14.0, "row": 20.0, "threshold": 14.0, "nm": 0.0, "vnm": 4.0}
# Element-wise FLOPs per entry of a kind's mask test, beyond a threshold compare (group ranks).
KEEP_FLOPS = {"topk": 2.0, "row": 2.0, "threshold": 2.0, "nm": 16.0, "vnm": 24.0}


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


def passes(
    method: str,
    shape: LayerShape,
    kind: str = "topk",
    saved_mask: str = "bits",
    select: bool = True,
    rank: int = 8,
    mask_rank: int = 8,
) -> list[Pass]:
    """The passes of one micro-batch's forward and backward of a layer under ``method`` (dense |
    lora | pst); ``select``: this micro-batch makes the step's selection."""
    s, e = shape, shape.entries
    w, a = s.weight_bytes, s.act_bytes
    gemms = [gemm("y = x W^T", s, True), gemm("dx = dy W", s), gemm("G = dy^T x", s)]
    if method == "dense":
        return gemms
    if method == "lora":
        thin = 2.0 * rank * (s.out + s.inp) * s.tokens, rank * (s.out + s.inp) * 4 + s.tokens * rank * a
        return gemms[:2] + [Pass("lora factors", *thin, i < 2) for i in range(6)]
    if method != "pst":
        raise ValueError(f"no cost model for method {method!r}")
    factor_flops = 2.0 * (rank + mask_rank + 2)  # the unrolled low-rank products, per entry
    bits = saved_mask == "bits" and kind != "threshold"  # learned thresholds need S in backward
    out = [*gemms, Pass("W -> W', S", e * factor_flops, e * (w + 8), True)]
    if select:
        out.append(Pass(f"selection ({kind})", e * 2.0, e * SELECT_BYTES[kind], True))
    out.append(Pass("W', S -> M*W'", e * KEEP_FLOPS[kind], e * (8 + a + (0.125 if bits else 0)), True))
    if bits:
        out.append(Pass("G, W, bits -> M*W', dS, dW'", e * (2.0 * rank + 8), e * (2 * a + w + 8.125), False))
    else:
        out.append(Pass("W -> W', S (backward)", e * factor_flops, e * (w + 8), False))
        out.append(Pass("G, W', S -> M*W', dS, dW'", e * (KEEP_FLOPS[kind] + 8), e * (2 * a + 16), False))
    thin = Pass("factor gradients", 2.0 * e * (rank + mask_rank + 1) / 2, e * 4.0, False)
    return out + [thin] * 4  # dU, dV from dW'; dA, dB (with R, C) from dS


def optimizer_pass(method: str, shape: LayerShape, world_size: int) -> Pass:
    """Adam on the layer's trained parameters, once per step on this rank's share."""
    share = shape.entries / world_size if method == "dense" else 0.0  # thin factors: negligible
    return Pass("adam", 10.0 * share, share * (16 * 2 + 4 + shape.weight_bytes), False)


def layer_seconds(device: Device, method: str, shape: LayerShape, **knobs) -> float:
    """One forward and backward of the layer (the step's selection included)."""
    return sum(device.seconds(p.flops, p.bytes) for p in passes(method, shape, **knobs))


def step_seconds(
    device: Device,
    method: str,
    shapes: list[LayerShape],
    micro_batches: int,
    checkpointing: bool,
    world_size: int = 1,
    rest: list[LayerShape] | None = None,
    **knobs,
) -> float:
    """One optimizer step on one rank: every pruned layer's micro-batches (the selection in the
    first only), checkpointing's second forward (the held selection), Adam (dense only), and the
    model's other linears (``rest``, e.g. the head: trained by dense only)."""
    total = 0.0
    for shape in shapes:
        for micro in range(micro_batches):
            for p in passes(method, shape, select=micro == 0, **knobs):
                repeat = 2 if checkpointing and p.forward and not p.name.startswith("selection") else 1
                total += repeat * device.seconds(p.flops, p.bytes)
        adam = optimizer_pass(method, shape, world_size)
        total += device.seconds(adam.flops, adam.bytes)
    for shape in rest or []:
        gemms = passes("dense", shape)[: 3 if method == "dense" else 2]
        total += micro_batches * sum(device.seconds(p.flops, p.bytes) for p in gemms)
        adam = optimizer_pass(method, shape, world_size)
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
