"""The cost model's step times and ratios (pst_ds/train/cost.py): checked against this machine,
predicted for GPUs.

    python tools/estimate_step.py [--measured runs/bench/layers.json] [--configs A.yaml B.yaml]
        [--gpus h100 h200] [--out runs/estimate_step]

1. This machine: its GEMM FLOP/s (fp32) and copy bandwidth, measured here in a few seconds.
2. Layers: each formulation's forward+backward over dense fine-tuning's, predicted from those
   rates, beside a ``tools/bench.py layers`` JSON's measured ratios when --measured names one.
3. Steps: per rank, one optimizer step of each config's model (the pruned layers and the other
   linears, at its micro-batch, accumulation and checkpointing, in bf16) on each GPU: dense full
   fine-tuning, LoRA and PST with each mask kind, as PST's step time over dense's and PST's
   tokens/s over LoRA's.
Prints markdown tables; writes JSON + markdown under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from pst_ds.config import ConfigError  # noqa: E402
from pst_ds.experiment import load_experiment  # noqa: E402
from pst_ds.masks.kinds import NM, VNM, LearnedThreshold, TopK  # noqa: E402
from pst_ds.train.cost import (  # noqa: E402
    GPUS,
    DenseCost,
    Device,
    LayerShape,
    LoRACost,
    MaskedLoRACost,
    PSTCost,
    layer_seconds,
    model_shapes,
    step_seconds,
)

# The mask kinds the step table compares, by the column each gets.
KINDS = {
    "topk": TopK(),
    "row": TopK("row"),
    "threshold": LearnedThreshold(),
    "nm": NM(2, 4),
    "vnm": VNM(64, 5),
}
# bench.py's layer formulations, by its names.
FORMULATIONS = {
    "lora": LoRACost(),
    "masked_lora": MaskedLoRACost(),
    "pst": PSTCost(),
    "pst_recompute": PSTCost(saved_mask="recompute"),
    "pst_revivable": PSTCost(start_prior=True),  # after SparseGPT's start, its kept set as a prior
    "pst_row": PSTCost(KINDS["row"]),
    "pst_threshold": PSTCost(KINDS["threshold"]),
    "pst_nm_2_4": PSTCost(KINDS["nm"]),
    "pst_vnm_64_2_5": PSTCost(KINDS["vnm"]),
}


def _median_seconds(run, repeats: int = 5) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def this_machine() -> Device:
    """fp32 GEMM FLOP/s (a 7B-shape layer's forward GEMM) and bandwidth (a 180 MB copy: read + write)."""
    x, w = torch.randn(512, 4096), torch.randn(11008, 4096)
    flops = 2 * 512 * 4096 * 11008 / _median_seconds(lambda: torch.nn.functional.linear(x, w))
    src, dst = torch.randn(11008, 4096), torch.empty(11008, 4096)
    bandwidth = 2 * src.numel() * 4 / _median_seconds(lambda: dst.copy_(src))
    return Device(f"this machine ({torch.get_num_threads()} threads, fp32)", flops, bandwidth)


def layer_check(device: Device, measured: dict | None) -> tuple[dict, list[str]]:
    from bench import SHAPES

    shapes = list(measured["results"]) if measured else ["smollm2-mlp", "smollm2-down", "llama7b-mlp"]
    results, lines = {}, []
    lines.append("| shape | formulation | predicted x dense | measured x dense | measured / predicted |")
    lines.append("|---|---|---|---|---|")
    for name in shapes:
        out, inp, tokens = SHAPES[name]
        shape = LayerShape(out, inp, tokens)
        dense = layer_seconds(device, DenseCost(), shape)
        got = measured["results"][name]["ratio_to_dense"] if measured else {}
        for formulation, cost in FORMULATIONS.items():
            predicted = layer_seconds(device, cost, shape) / dense
            actual = got.get(formulation)
            results[f"{name}/{formulation}"] = {"predicted": predicted, "measured": actual}
            m = f"{actual:.2f}" if actual else "-"
            q = f"{actual / predicted:.2f}" if actual else "-"
            lines.append(f"| {name} ({out}x{inp}, {tokens}) | {formulation} | {predicted:.2f} | {m} | {q} |")
    return results, lines


def step_predictions(configs: list[str], gpus: list[str]) -> tuple[dict, list[str]]:
    results, lines = {}, []
    lines.append(
        "| model (config) | device | tokens / micro-batch x micro-batches | dense step | "
        + " | ".join(f"pst {k}: step x dense, tok/s x lora" for k in KINDS)
        + " | masked lora: step x dense, tok/s x lora |"
    )
    lines.append("|---" * (5 + len(KINDS)) + "|")
    for path in configs:
        config = load_experiment(path)
        pruned, rest = model_shapes(config, act_bytes=2)
        micro, checkpointing = config.train.gradient_accumulation_steps, config.train.gradient_checkpointing
        for gpu in gpus:
            step = partial(
                step_seconds,
                GPUS[gpu],
                shapes=pruned,
                micro_batches=micro,
                checkpointing=checkpointing,
                rest=rest,
            )

            dense, lora = step(DenseCost()), step(LoRACost())
            row = {"dense_s": dense, "lora_s": lora}
            cells = []
            for kind, mask in KINDS.items():
                pst = step(PSTCost(mask, split=True))  # bf16, pst.low_precision_forward=split
                row[kind] = {"pst_s": pst, "step_x_dense": pst / dense, "tokens_per_s_x_lora": lora / pst}
                cells.append(f"{pst / dense:.2f}, {lora / pst:.2f}")
            masked = step(MaskedLoRACost())
            row["masked_lora"] = {
                "step_s": masked,
                "step_x_dense": masked / dense,
                "tokens_per_s_x_lora": lora / masked,
            }
            cells.append(f"{masked / dense:.2f}, {lora / masked:.2f}")
            results[f"{Path(path).stem}/{gpu}"] = row
            tokens = pruned[0].tokens if pruned else 0
            lines.append(
                f"| {Path(path).stem} | {gpu} | {tokens} x {micro} | {1e3 * dense:.0f} ms | "
                + " | ".join(cells)
                + " |"
            )
    return results, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measured", help="a tools/bench.py layers JSON to check the layer ratios against")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["configs/experiments/llama_1b.yaml", "configs/experiments/llama3_8b.yaml"],
    )
    parser.add_argument("--gpus", nargs="+", default=list(GPUS), choices=GPUS)
    parser.add_argument("--out", default="runs/estimate_step")
    args = parser.parse_args(argv)
    try:
        measured = json.loads(Path(args.measured).read_text()) if args.measured else None
        device = this_machine()
        layers, layer_lines = layer_check(device, measured)
        steps, step_lines = step_predictions(args.configs, args.gpus)
    except (ConfigError, OSError, KeyError, json.JSONDecodeError) as err:
        print(f"pst-ds: error: {err}", file=sys.stderr)
        return 2
    rates = (
        f"{device.name}: GEMM {device.gemm_flops / 1e9:.0f} GFLOP/s, "
        f"bandwidth {device.bandwidth / 1e9:.1f} GB/s"
    )
    table = [rates, "", *layer_lines, "", "Predicted GPU steps (bf16, per rank):", "", *step_lines]
    for name, gpu in GPUS.items():
        table.append(f"- {name}: {gpu.name}")
    print("\n".join(table))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "machine": vars(device), "layers": layers, "steps": steps}
    (out / "estimate_step.json").write_text(json.dumps(report, indent=1))
    (out / "estimate_step.md").write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
