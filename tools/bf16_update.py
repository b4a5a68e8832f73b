"""Does PST's weight update reach a bf16 forward? The same run in fp32 and in bf16 (one rank,
ZeRO-2, in this process), side by side: the losses, the validation perplexity, and, at the end
of each run, how much of each pruned layer's update beta*U*V survives in the weight its forward
multiplies by (M * W' rounded to the run's dtype, plus the remainder with
pst.low_precision_forward=split, against M * W).

    python tools/bf16_update.py [--config EXPERIMENT.yaml] [--out runs/bf16_update] \
        [--precisions fp32,bf16] [key=value ...]

Prints a markdown table and writes it with the JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pst_ds.experiment import load_experiment  # noqa: E402
from pst_ds.integrations.run import Run, build_run  # noqa: E402
from pst_ds.train.distributed import leave_process_group  # noqa: E402
from pst_ds.train.engine import load_ds_config  # noqa: E402

PRECISIONS = {"fp32": False, "bf16": True}


@torch.no_grad()
def update_reaching_forward(trainer: Run) -> dict:
    """Over all pruned layers: <M*(fwd - W), M*delta> / |M*delta|^2 (the share of the update
    the forward carries: rounding noise averages out of it; and what M * W' rounded alone would
    carry), the share of kept entries whose nonzero update vanishes in that rounding, and the
    median |delta| / |W| of kept entries."""
    carried = carried_rounded = total = vanished = kept = 0.0
    ratios = []
    for layer in trainer.layers.values():
        scores, updated = layer.scores_and_weight()
        keep = layer.selection(scores).mask(scores)
        weight = layer.oriented_weight().float()
        delta = (updated - weight) * keep
        exact = updated * keep
        rounded = exact.to(layer.weight.dtype).float()  # M * W' rounded alone
        forward = rounded  # what F.linear multiplies by
        if layer.hyper.split_rounding and layer.weight.dtype != torch.float32:  # and the remainder
            forward = rounded + (exact - rounded).to(layer.weight.dtype).float()
        carried += float(((forward - weight * keep) * delta).sum())
        carried_rounded += float(((rounded - weight * keep) * delta).sum())
        total += float(delta.norm() ** 2)
        moved = keep & (delta != 0)
        vanished += float((moved & (rounded == weight * keep)).sum())
        kept += float(moved.sum())
        ratios.append((delta.abs() / weight.abs().clamp(min=1e-12))[moved].flatten())
    return {
        "update_carried": carried / total if total else None,
        "update_carried_if_rounded": carried_rounded / total if total else None,
        "updated_entries_vanished": vanished / kept if kept else None,
        "median_update_over_weight": float(torch.cat(ratios).median()) if ratios else None,
    }


def run(config: str, overrides: list[str], out: Path, bf16: bool, label: str) -> dict:
    ds_config = load_ds_config(str(ROOT / "configs/zero2.json"))
    ds_config["bf16"] = {"enabled": bf16}
    run_overrides = [*overrides, f"train.output_dir={out / label}", "train.export=false"]
    experiment = load_experiment(config, run_overrides)
    trainer = build_run(experiment, ds_config)
    try:
        summary = trainer.train()
        result = update_reaching_forward(trainer)
    finally:
        leave_process_group()
    records = [json.loads(line) for line in (out / label / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    return {
        **result,
        "eval_ppl_before": summary["eval_ppl_before"],
        "eval_ppl_after": summary["eval_ppl_after"],
        "eval_texts_after": summary["eval_texts_after"],
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "median_step_s": sorted(summary["step_times_s"])[len(summary["step_times_s"]) // 2],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/experiments/default.yaml")
    parser.add_argument("--out", default="runs/bf16_update")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    out = Path(args.out)
    precisions = args.precisions.split(",")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        parser.error(f"--precisions: unknown {', '.join(unknown)} (known: {', '.join(PRECISIONS)})")
    results = {p: run(args.config, args.overrides, out, PRECISIONS[p], p) for p in precisions}
    command = shlex.join(["python", "tools/bf16_update.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"`{command}`",
        "",
        "| precision | validation ppl before → after | far texts after | loss first → last | "
        "update the forward carries (rounded alone) | updated entries rounded away | "
        "median abs(delta)/abs(W) | step s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        texts = ", ".join(f"{k} {v:.2f}" for k, v in (r["eval_texts_after"] or {}).items()) or "-"
        lines.append(
            f"| {name} | {r['eval_ppl_before']:.2f} → {r['eval_ppl_after']:.2f} | {texts} | "
            f"{r['first_loss']:.4f} → {r['last_loss']:.4f} | "
            f"{r['update_carried']:.3f} ({r['update_carried_if_rounded']:.3f}) | "
            f"{r['updated_entries_vanished']:.3f} | {r['median_update_over_weight']:.5f} | "
            f"{r['median_step_s']:.2f} |"
        )
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bf16_update.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    (out / "bf16_update.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
