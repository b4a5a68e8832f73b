"""Speed and memory of PST beside its baselines, measured in one run: per layer and end to end.

    python tools/bench.py layers  [--shapes smollm2-mlp llama7b-mlp] [--repeats 5] [--dtype bf16]
                                  [--only pst pst_nm_2_4 ...]
    python tools/bench.py passes  [--shapes llama7b-mlp] [--repeats 5]
    python tools/bench.py methods [--methods pst dense ...] [--num_gpus 2] [--steps 6] [overrides]

``layers`` times one layer's forward+backward for each formulation in the same process,
interleaved repeat by repeat, in a shuffled order each time, so that machine noise and what the
previous formulation left behind hit all alike, and reports medians and
ratios to dense fine-tuning of that layer. ``passes`` times each pass of PST's layer alone, beside
dense's three GEMMs: where the time goes. ``methods`` runs ``launch/train.py`` through the
deepspeed launcher once per method on the same model, data and engine, and reads each run's
summary.json: trainable parameters, optimizer-state bytes and peak memory per rank, median
step time after warm-up, tokens/s, and ratios to PST. Both print a markdown table and write
JSON + markdown under --out.
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "THP_MEM_ALLOC_ENABLE", "1"
)  # before torch allocates: see docs/archive/results-history.md

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train_runs import train_once  # noqa: E402

from pst_ds import PSTConfig, PSTLinear  # noqa: E402
from pst_ds.config import LoRAConfig  # noqa: E402
from pst_ds.layers.baselines import LoRALinear  # noqa: E402
from pst_ds.layers.masked_lora import MaskedLoRALinear  # noqa: E402
from pst_ds.layers.step import StepRecord  # noqa: E402
from pst_ds.methods import METHODS  # noqa: E402

# (out, in, tokens) per named shape: the SmolLM2-135M and LLaMA-7B block linears.
SHAPES = {
    "smollm2-attn": (576, 576, 1024),
    "smollm2-mlp": (1536, 576, 1024),
    "smollm2-down": (576, 1536, 1024),
    "llama7b-attn": (4096, 4096, 512),
    "llama7b-mlp": (11008, 4096, 512),
    "llama7b-down": (4096, 11008, 512),
    "tiny": (64, 48, 16),  # for the smoke test
}


class SortEveryForward(nn.Module):
    """The release's formulation: W', S and a float mask through autograd, a full argsort."""

    def __init__(self, layer: PSTLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, h = self.layer, self.layer.hyper
        updated = p.weight + h.beta * p.U @ p.V
        scores = updated.abs() + h.alpha1 * p.A @ p.B + h.alpha2 * (p.R[:, None] + p.C[None, :])
        k = int(scores.numel() * p.sparsity)
        mask = torch.ones_like(scores).reshape(-1)
        mask[scores.detach().reshape(-1).argsort()[:k]] = 0
        mask = mask.reshape(scores.shape) + scores - scores.detach()  # straight-through
        return F.linear(x, mask * updated, p.bias)


# Mask kinds and importance beside the default PST layer (topk per matrix, magnitude); nm and
# vnm prune their pattern's share (50% and 60%), the others --sparsity.
KIND_VARIANTS = {
    "pst_row": {"mask_scope": "row"},
    "pst_threshold": {"mask": "threshold"},
    "pst_nm_2_4": {"mask": "nm", "final_sparsity": 0.5},
    "pst_vnm_64_2_5": {"mask": "vnm", "mask_m": 5, "final_sparsity": 0.6},
    "pst_activation": {"importance": "activation"},
    "pst_recompute": {"saved_mask": "recompute"},  # backward selects again instead of saved bits
}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def layer_variants(
    out_f: int, in_f: int, sparsity: float, kinds: bool = True, dtype: torch.dtype = torch.float32
) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=False).to(DEVICE, dtype)
    frozen = nn.Linear(in_f, out_f, bias=False).requires_grad_(False).to(DEVICE, dtype)
    configs = {"pst": PSTConfig(), "pst_eager": PSTConfig(compile=False)}
    if kinds:
        configs.update({name: PSTConfig(**knobs) for name, knobs in KIND_VARIANTS.items()})
    pst_layers = {name: PSTLinear(frozen, config) for name, config in configs.items()}
    if kinds:  # after SparseGPT's start: its kept set as a prior on S, mid-decay (every S pass reads it)
        revived = nn.Linear(in_f, out_f, bias=False).requires_grad_(False).to(DEVICE, dtype)
        revived.weight.copy_(frozen.weight)
        pst_layers["pst_revivable"] = PSTLinear(revived, PSTConfig(), revivable=True)
        pst_layers["pst_revivable"].sparsity = sparsity
        pst_layers["pst_revivable"].hold_start(frozen.weight * (torch.rand_like(frozen.weight) > sparsity))
        pst_layers["pst_revivable"].put_start_strength(0.5)
        configs["pst_revivable"] = PSTConfig()
    for name, layer in pst_layers.items():  # a pattern's own share, not a ramp into it
        layer.sparsity = configs[name].final_sparsity if layer.mask_kind.grouped else sparsity
        with torch.no_grad():  # trained-looking factors (fp32 scores of large matrices still tie)
            for name in ("U", "V", "B", "R", "C"):
                getattr(layer, name).normal_(0, 0.01)
        if layer.input_stats is not None:  # as gathered from real inputs: positive, uneven
            layer.input_sq.copy_(torch.rand(in_f) * 2)
        layer.to(DEVICE)
    masked_lora = MaskedLoRALinear(frozen, PSTConfig(final_sparsity=sparsity), LoRAConfig()).to(DEVICE)
    masked_lora.sparsity = sparsity
    masked_lora.board.publish(StepRecord(0))  # as a controller does: a frozen mask is selected once
    with torch.no_grad():
        masked_lora.U.normal_(0, 0.01)
    return {
        "dense": dense,
        "lora": LoRALinear(frozen, LoRAConfig()),
        "masked_lora": masked_lora,
        **pst_layers,
        "pst_sort_autograd": SortEveryForward(pst_layers["pst"]),
    }


def _time_step(module: nn.Module, x: torch.Tensor) -> float:
    """Seconds of one forward+backward."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    _synchronize()
    start = time.perf_counter()
    module(x).sum().backward()
    _synchronize()
    return time.perf_counter() - start


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def bench_layers(args: argparse.Namespace) -> dict:
    results = {}
    for shape in args.shapes:
        out_f, in_f, tokens = SHAPES[shape]
        dtype = DTYPES[args.dtype]
        variants = layer_variants(out_f, in_f, args.sparsity, kinds=not args.no_kinds, dtype=dtype)
        if args.only:  # dense stays: every ratio is to it
            unknown = sorted(set(args.only) - set(variants))
            if unknown:
                known = ", ".join(variants)
                sys.exit(f"pst-ds: error: --only names no layer {', '.join(unknown)}; there are {known}")
            variants = {name: m for name, m in variants.items() if name == "dense" or name in args.only}
        x = torch.randn(tokens, in_f, device=DEVICE, dtype=dtype, requires_grad=True)
        times: dict[str, list[float]] = {name: [] for name in variants}

        for module in variants.values():  # warm-up: compilation, allocator
            _time_step(module, x)
        order = random.Random(0)  # a new order each repeat: no formulation always follows the same one
        for _ in range(args.repeats):
            names = list(variants)
            order.shuffle(names)
            for name in names:
                times[name].append(_time_step(variants[name], x))
        medians = {name: statistics.median(t) for name, t in times.items()}
        results[shape] = {
            "out": out_f,
            "in": in_f,
            "tokens": tokens,
            "sparsity": args.sparsity,
            "dtype": args.dtype,
            "median_ms": {n: 1e3 * t for n, t in medians.items()},
            "ratio_to_dense": {n: t / medians["dense"] for n, t in medians.items()},
            "all_ms": {n: [1e3 * v for v in t] for n, t in times.items()},
        }
        print(f"bench: {shape} done", file=sys.stderr, flush=True)
    names = list(next(iter(results.values()))["median_ms"])
    lines = [
        "| shape (out x in, tokens) | " + " | ".join(f"{n} ms (x dense)" for n in names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for shape, r in results.items():
        cells = [f"{r['median_ms'][n]:.1f} ({r['ratio_to_dense'][n]:.2f}x)" for n in names]
        lines.append(f"| {shape} ({r['out']}x{r['in']}, {r['tokens']}) | " + " | ".join(cells) + " |")
    return {"kind": "layers", "threads": torch.get_num_threads(), "results": results, "table": lines}


def pass_timings(out_f: int, in_f: int, tokens: int, sparsity: float, repeats: int) -> dict[str, float]:
    """Median ms of each pass of PST's default layer at one shape, each run alone, beside dense's GEMMs:
    where a PST layer's time goes (pst_function.py names the passes)."""
    from pst_ds.layers import pst_blocks as pf

    layer = layer_variants(out_f, in_f, sparsity, kinds=False)["pst"]
    h, w = layer.hyper, layer.weight
    x = torch.randn(tokens, in_f, device=DEVICE)
    dy = torch.randn(tokens, out_f, device=DEVICE)
    Ae, Be = pf.extended_importance_factors(layer.A, layer.B, layer.R, layer.C, h.alpha1, h.alpha2)
    k = pf.kernels(h.compiled)
    scratch = [torch.empty(out_f, in_f, device=DEVICE) for _ in range(6)]
    with torch.no_grad():
        updated, scores = k["updated_and_scores"](
            w, layer.U, layer.V, Ae, Be, h.beta, False, None, out=scratch[:2]
        )
        selection = layer.mask_kind.select(scores, layer.pruned_count)
        apply = pf.kernels(h.compiled, selection.keep)["apply_mask"]
        _, bits = apply(updated, scores, *selection.args, out=scratch[2], pack=True)
        grad = dy.t().mm(x)
        runs = {
            "GEMM y = x W^T": lambda: F.linear(x, w),
            "GEMM dx = dy W": lambda: dy.mm(w),
            "GEMM G = dy^T x": lambda: torch.mm(dy.t(), x, out=scratch[3]),
            "W -> W', S": lambda: k["updated_and_scores"](
                w, layer.U, layer.V, Ae, Be, h.beta, False, None, out=scratch[:2]
            ),
            "selection (topk)": lambda: layer.mask_kind.select(scores, layer.pruned_count, check=False),
            "W', S -> M*W' + bits": lambda: apply(
                updated, scores, *selection.args, out=scratch[2], pack=True
            ),
            "G, W, bits -> M*W', dS, dW'": lambda: k["backward_terms_from_bits"](
                grad, w, layer.U, layer.V, h.beta, False, None, bits, out=scratch[3:6]
            ),
            "factor GEMMs (4, thin)": lambda: (
                scratch[5].mm(layer.V.t()),
                layer.U.t().mm(scratch[5]),
                scratch[4].mm(Be[: layer.mask_rank + 1].t()),
                Ae.t().mm(scratch[4]),
            ),
        }
        times = {name: [] for name in runs}
        for run in runs.values():
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                _synchronize()
                start = time.perf_counter()
                run()
                _synchronize()
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def bench_passes(args: argparse.Namespace) -> dict:
    results, lines = {}, []
    for shape in args.shapes:
        out_f, in_f, tokens = SHAPES[shape]
        ms = pass_timings(out_f, in_f, tokens, args.sparsity, args.repeats)
        dense = sum(v for n, v in ms.items() if n.startswith("GEMM"))
        results[shape] = {"median_ms": ms, "dense_gemms_ms": dense}
        lines += [f"| {shape} ({out_f}x{in_f}, {tokens}) pass | ms | x dense's 3 GEMMs |", "|---|---|---|"]
        lines += [f"| {name} | {v:.1f} | {v / dense:.3f} |" for name, v in ms.items()]
        lines.append(f"| all PST passes | {sum(ms.values()):.1f} | {sum(ms.values()) / dense:.2f} |")
    return {"kind": "passes", "threads": torch.get_num_threads(), "results": results, "table": lines}


# Methods that train (one-shot ones take no step), and variants of them: name -> overrides.
TRAINED = {name: [f"method={name}"] for name, method in METHODS.items() if method.trains}
TRAINED["pst_distill"] = ["method=pst", "train.distill.weight=0.5"]  # + the teacher's forward


def bench_methods(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    results = {}
    for method in args.methods:
        summary, _ = train_once(
            args.num_gpus,
            args.ds_config,
            args.config,
            out / "runs" / method,
            [
                *TRAINED[method],
                f"train.max_steps={args.steps}",
                "data.max_validation_blocks=1",
                *args.overrides,
            ],
            out / f"{method}.log",
        )
        steady = summary["step_times_s"][args.warmup_steps :] or summary["step_times_s"]
        step_s = statistics.median(steady)
        results[method] = {
            "trainable_params": summary["trainable_params"],
            "optimizer_state_bytes_per_rank": summary["optimizer_state_bytes_rank0"],
            "peak_memory_bytes_per_rank": summary["peak_memory_bytes_rank0"],
            "param_bytes_per_rank": summary["param_bytes_rank0"],
            "median_step_s": step_s,
            "tokens_per_s": summary["tokens_per_step"] / step_s,
        }
    reference = results.get("pst") or next(iter(results.values()))
    fields = list(next(iter(results.values())))
    for r in results.values():
        r["ratio_to_pst"] = {f: r[f] / reference[f] if reference[f] else None for f in fields}
    lines = [
        "| method | trainable params | optimizer state / rank | peak memory / rank "
        "| median step | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        q = r["ratio_to_pst"]
        lines.append(
            f"| {method} | {r['trainable_params']:,} ({q['trainable_params']:.2f}x) "
            f"| {r['optimizer_state_bytes_per_rank'] / 2**20:.1f} MiB "
            f"({q['optimizer_state_bytes_per_rank']:.2f}x) "
            f"| {r['peak_memory_bytes_per_rank'] / 2**20:.0f} MiB ({q['peak_memory_bytes_per_rank']:.2f}x) "
            f"| {r['median_step_s']:.2f} s ({q['median_step_s']:.2f}x) "
            f"| {r['tokens_per_s']:.0f} ({q['tokens_per_s']:.2f}x) |"
        )
    return {"kind": "methods", "command_args": vars(args), "results": results, "table": lines}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    layers = sub.add_parser("layers", help="one layer's forward+backward per formulation")
    layers.add_argument("--shapes", nargs="+", default=["smollm2-mlp", "llama7b-mlp"], choices=SHAPES)
    layers.add_argument("--repeats", type=int, default=5)
    layers.add_argument("--sparsity", type=float, default=0.5)
    layers.add_argument("--no_kinds", action="store_true", help="only the default PST layer and baselines")
    layers.add_argument("--dtype", default="fp32", choices=DTYPES, help="the weights' and inputs' dtype")
    layers.add_argument("--only", nargs="+", help="only these formulations (and dense), e.g. for a bisect")
    passes_ = sub.add_parser("passes", help="each pass of PST's layer alone, beside dense's GEMMs")
    passes_.add_argument("--shapes", nargs="+", default=["llama7b-mlp"], choices=SHAPES)
    passes_.add_argument("--repeats", type=int, default=5)
    passes_.add_argument("--sparsity", type=float, default=0.5)
    methods = sub.add_parser("methods", help="whole training runs, one per method")
    methods.add_argument("--methods", nargs="+", default=list(TRAINED), choices=TRAINED)
    methods.add_argument("--num_gpus", type=int, default=2, help="ranks (CPU ranks without a GPU)")
    methods.add_argument("--ds_config", default="configs/zero2.json")
    methods.add_argument("--config", default="configs/experiments/default.yaml")
    methods.add_argument("--steps", type=int, default=6)
    methods.add_argument("--warmup_steps", type=int, default=2, help="steps left out of the median")
    methods.add_argument("overrides", nargs="*", help="experiment overrides, key=value")
    for p in (layers, passes_, methods):
        p.add_argument("--out", default="runs/bench")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"layers": bench_layers, "passes": bench_passes, "methods": bench_methods}[args.kind](args)
    report["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    # The CPU allocator changes the figures (see docs/archive/results-history.md): say which one ran.
    report["ld_preload"] = os.environ.get("LD_PRELOAD", "")
    (out / f"{args.kind}.json").write_text(json.dumps(report, indent=1))
    (out / f"{args.kind}.md").write_text("\n".join(report["table"]) + "\n")
    print("\n".join(report["table"]))


if __name__ == "__main__":
    main()
