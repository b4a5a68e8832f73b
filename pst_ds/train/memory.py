"""The memory model: per-rank bytes of a run, from its configs, before anything is allocated.

    parameters   every weight's stored copy: 1/world of each under ZeRO-3 (small ones, below
                 stage3_param_persistence_threshold, whole), the whole model otherwise
    gathered     ZeRO-3 only: whole weights gathered for the layers computing now, bounded by
                 stage3_max_live_parameters (with the prefetch bucket) and by the model
    gradients    the trainable parameters' gradient partition (fp32) and the reduce bucket
    optimizer    the trainable parameters' fp32 master copy and Adam's two moments, 1/world
                 each from ZeRO-1 on (on the host with offload_optimizer)
    activations  what autograd saves for backward, counted on the meta device from the real
                 model's forward (so no formula per architecture); with gradient checkpointing
                 the blocks' inputs and one block's recomputation
    pst buffers  PST's weight-sized fp32 scratch of the largest pruned layer (W', S, M*W', dS,
                 dW' and the gradient: one workspace for all layers), and the mask bits each
                 layer keeps from forward to backward (out*in/8 bytes; one block's with checkpointing)
    runtime      the process itself (torch, DeepSpeed, transformers, the data): measured once on
                 CPU ranks (CPU_RUNTIME_BYTES); the CUDA context is outside torch's allocator

The data flows one way: the experiment and DeepSpeed configs in, an estimate out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from ..config import ExperimentConfig
from ..io.models import load_model, load_tokenizer
from ..layers.inject import build_model, iter_injected, iter_pst_layers
from ..methods import Method, method_class

GIB = 2**30
CPU_RUNTIME_BYTES = int(0.75 * GIB)  # measured: one CPU rank's RSS before the model is built
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank, by what holds them."""

    parameters: int
    gathered: int
    gradients: int
    optimizer: int
    activations: int
    pst_buffers: int
    runtime: int
    on_host: int  # of the optimizer, what offload puts in host memory instead (GPU ranks only)

    @property
    def total(self) -> int:
        """What the rank's device must hold."""
        return sum(v for k, v in asdict(self).items() if k != "on_host") - self.on_host

    def describe(self) -> str:
        parts = ", ".join(f"{k.replace('_', ' ')} {v / GIB:.2f}" for k, v in asdict(self).items() if v)
        return f"{self.total / GIB:.2f} GiB per rank ({parts})"

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def precision(ds_config: dict[str, Any]) -> str:
    for name in ("bf16", "fp16"):
        if ds_config.get(name, {}).get("enabled"):
            return name
    return "fp32"


def meta_model(method: Method, inject: bool = True) -> nn.Module:
    """The run's model, with its method's layers if ``inject``, on the meta device."""
    config = method.config
    labels = ["0", "1"] if config.model.task == "sequence_classification" else None
    tokenizer = load_tokenizer(config.model)
    if inject:
        return build_model(method, tokenizer, labels, meta=True)[0]
    return load_model(config.model, tokenizer, labels, meta=True)


def saved_activation_bytes(
    plain: nn.Module, batch: int, length: int, dtype_bytes: int, checkpointing: bool
) -> int:
    """Bytes autograd keeps from the forward to the backward, at the peak of backward.

    The ``plain`` meta model's forward runs with the weights of the layers a method adapts
    trainable (trained_weights), so each of those linears keeps its input as PST's layer does (a
    LoRA or PST layer adds O(rank) per token); weights are not activations and are skipped. With
    checkpointing each block keeps only its input, and one block is recomputed at a time.
    """
    seen = {id(p) for p in plain.parameters()}  # weights, and each buffer once however often saved
    blocks = _blocks(plain)
    per_block = [0] * len(blocks)
    current, outside, largest = [None], [0], [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in seen:
            seen.add(id(base))
            size = base.numel() * (dtype_bytes if base.is_floating_point() else base.element_size())
            largest[0] = max(largest[0], size)
            if current[0] is None:
                outside[0] += size
            else:
                per_block[current[0]] += size
        return base if tensor._base is None else tensor

    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, i=index: current.__setitem__(0, i))
        block.register_forward_hook(lambda *_: current.__setitem__(0, None))
    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    plain.train()
    # On the meta device SDPA falls back to its math path, which keeps the (length x length)
    # attention probabilities; the fused kernels a run uses (flash, memory-efficient, CPU flash)
    # keep q, k, v, the output and one log-sum-exp per row: counted through an attention
    # function of transformers' public registry that saves just those.
    plain.set_attn_implementation(FUSED_ATTENTION)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        plain(input_ids=ids, labels=ids)
    hidden = batch * length * plain.config.hidden_size * dtype_bytes
    kept = sum(per_block) if not checkpointing else len(blocks) * hidden + max(per_block, default=0)
    # The gradient flowing back through the largest saved tensor (the logits, for an LM).
    return outside[0] + kept + 2 * largest[0]


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel saves for backward, on meta tensors (no values)."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        output = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, output, query.new_empty(query.shape[:-1]))
        return output


def _fused_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_: Any, **__: Any
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (batch, heads, length, dim) in, (batch, length, heads,
    dim) out, no attention weights."""
    return _FusedAttention.apply(query, key, value).transpose(1, 2), None


FUSED_ATTENTION = "pst_ds_meta_fused"
AttentionInterface.register(FUSED_ATTENTION, _fused_attention)


def trained_weights(plain: nn.Module, adapted: set[str], everything: bool) -> None:
    """Mark trainable what saves inputs in training: the adapted linears' weights (or all)."""
    for name, param in plain.named_parameters():
        module, _, local = name.rpartition(".")
        param.requires_grad_(everything or (module in adapted and local == "weight"))


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (the longest ModuleList), where checkpointing applies."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def estimate(
    config: ExperimentConfig, ds_config: dict[str, Any], world_size: int, on_gpu: bool
) -> MemoryEstimate:
    """The per-rank memory of training ``config`` under ``ds_config`` on ``world_size`` ranks."""
    method = method_class(config.method)(config)
    model = meta_model(method)
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    dtype = DTYPE_BYTES[precision(ds_config)]
    # A method that takes no step (one-shot) trains nothing: its layers only carry the mask.
    trainable = [p for p in model.parameters() if p.requires_grad and method.trains]
    numel = sum(p.numel() for p in model.parameters())
    trainable_numel = sum(p.numel() for p in trainable)

    if stage == 3:
        threshold = int(zero.get("stage3_param_persistence_threshold", 100_000))
        persistent = sum(p.numel() for p in model.parameters() if p.numel() <= threshold)
        # Each partitioned weight is padded to a multiple of the world size.
        shards = sum(-(-p.numel() // world_size) for p in model.parameters() if p.numel() > threshold)
        parameters = (persistent + shards) * dtype
        largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        live = int(zero.get("stage3_max_live_parameters", 1_000_000_000))
        prefetch = int(zero.get("stage3_prefetch_bucket_size", 50_000_000))
        gathered = min(numel - persistent, max(live, largest_module) + prefetch) * dtype
    else:
        parameters, gathered = numel * dtype, 0

    shard = world_size if stage >= 1 else 1
    bucket = int(zero.get("reduce_bucket_size", 500_000_000))
    # The reduce bucket is allocated whole; on CPU only the pages written count (the gradients).
    gradients = (
        -(-trainable_numel // (world_size if stage >= 2 else 1))
        + (bucket if on_gpu else min(bucket, trainable_numel))
    ) * 4
    optimizer = -(-trainable_numel // shard) * (8 + 4)  # Adam moments and the fp32 master copy
    offloaded = zero.get("offload_optimizer", {}).get("device") == "cpu"
    on_host = optimizer if offloaded and on_gpu else 0  # on CPU ranks the host is the device

    train = config.train
    plain = meta_model(method, inject=False)
    adapted = {name for name, _ in iter_injected(model)}
    trained_weights(plain, adapted, everything=not method.injects)
    activations = saved_activation_bytes(
        plain,
        train.micro_batch_size,
        config.data.block_size,
        dtype,
        train.gradient_checkpointing,
    )
    pruned = [layer for _, layer in iter_pst_layers(model)]
    largest_pruned = max((layer.out_features * layer.in_features for layer in pruned), default=0)
    pst_buffers = method.transient_weight_copies * 4 * largest_pruned
    # Each pruned layer's mask bits live from its forward to its backward: every layer's at once,
    # or one block's when checkpointing recomputes the blocks one at a time.
    kept = sum(method.mask_bytes_kept(layer.out_features * layer.in_features) for layer in pruned)
    pst_buffers += kept // max(len(_blocks(model)), 1) if train.gradient_checkpointing else kept
    pst_buffers += sum(method.mask_bytes_held(layer.out_features * layer.in_features) for layer in pruned)
    runtime = 0 if on_gpu else CPU_RUNTIME_BYTES
    return MemoryEstimate(
        parameters, gathered, gradients, optimizer, activations, pst_buffers, runtime, on_host
    )
