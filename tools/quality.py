"""Quality of PST beside its baselines: every method, the same steps, data, seed and engine.

    python tools/quality.py --task causal_lm --sparsities 0.5 0.7 --steps 30
    python tools/quality.py --task classification --sparsities 0.5 0.9 --steps 100
    python tools/quality.py --masks topk topk_row threshold nm topk_60 vnm --importances magnitude activation

With ``--masks`` it runs PST once per mask preset (MASKS) and importance instead of the methods.

For each pruning method and sparsity (and once for lora and dense, which do not prune) it
runs ``launch/train.py`` and reads summary.json: the validation metric before training
(the dense model: the reference line) and after. It writes quality_<task>.json, a markdown
table and a PNG of the metric against sparsity per method under --out. Learning rates per
method are the --lr_* options; say what you used when you publish the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from train_runs import train_once

TASKS = {
    "causal_lm": ("configs/experiments/default.yaml", "ppl"),
    "classification": ("configs/experiments/minilm_rotten_tomatoes.yaml", "accuracy"),
}
PRUNING = ("pst", "magnitude", "movement", "smp")
MASKS = {  # preset: (label, overrides)
    "topk": ("topk (matrix) 50%", ["pst.final_sparsity=0.5"]),
    "topk_row": ("topk (row) 50%", ["pst.final_sparsity=0.5", "pst.mask_scope=row"]),
    "threshold": ("threshold 50%", ["pst.final_sparsity=0.5", "pst.mask=threshold"]),
    "nm": ("nm 2:4", ["pst.final_sparsity=0.5", "pst.mask=nm"]),
    "topk_60": ("topk (matrix) 60%", ["pst.final_sparsity=0.6"]),
    "vnm": ("vnm 64:2:5", ["pst.final_sparsity=0.6", "pst.mask=vnm", "pst.mask_m=5", "pst.mask_v=64"]),
}


def run(method: str, sparsity: float, args: argparse.Namespace, out: Path, mask: str = "") -> dict:
    config, metric = TASKS[args.task]
    name = f"{method}-{sparsity}" if not mask else f"pst-{mask}"
    run_dir = out / "runs" / name
    lr = {"pst": args.lr_pst, "lora": args.lr_lora, "smp": args.lr_scores}.get(method, args.lr_weights)
    overrides = [
        f"method={method}", f"pst.final_sparsity={sparsity}", f"train.max_steps={args.steps}",
        f"train.lr={lr}", f"train.score_lr={args.lr_scores}", f"train.seed={args.seed}", *args.overrides,
    ]  # fmt: skip
    if mask:
        preset, importance = mask.rsplit("-", 1)
        overrides += [*MASKS[preset][1], f"pst.importance={importance}"]
    summary, arguments = train_once(
        args.num_gpus, args.ds_config, config, run_dir, overrides, out / f"{name}.log"
    )
    return {
        "method": method if not mask else f"pst {MASKS[preset][0]}, {importance}",
        "sparsity": summary["final_sparsity"],
        "lr": lr,
        "before": summary[f"eval_{metric}_before"],
        "after": summary[f"eval_{metric}_after"],
        "trainable_params": summary["trainable_params"],
        "wall_s": summary["wall_time_s"],
        "command": "launch/train.py " + " ".join(arguments),
    }


def plot(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["sparsity"], r["after"]) for r in rows if r["method"] == method)
        ax.plot(
            *zip(*points, strict=True), marker="o", label=method, linestyle="-" if len(points) > 1 else ""
        )
    ax.axhline(rows[0]["before"], color="grey", linestyle="--", label="dense, before training")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"validation {metric}")
    if metric == "ppl":
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=TASKS, default="causal_lm")
    parser.add_argument("--methods", nargs="+", default=[*PRUNING, "lora", "dense"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_gpus", type=int, default=1)
    parser.add_argument("--ds_config", default="configs/zero2.json")
    parser.add_argument("--lr_pst", type=float, default=1e-3)
    parser.add_argument("--lr_lora", type=float, default=1e-3)
    parser.add_argument("--lr_weights", type=float, default=5e-5, help="magnitude, movement, dense")
    parser.add_argument("--lr_scores", type=float, default=1e-2, help="movement and smp scores")
    parser.add_argument("--masks", nargs="+", default=[], choices=MASKS, help="PST mask presets instead")
    parser.add_argument(
        "--importances", nargs="+", default=["magnitude"], choices=["magnitude", "activation"]
    )
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("overrides", nargs="*", help="experiment overrides, key=value")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metric = TASKS[args.task][1]
    rows = []
    for preset in args.masks:
        for importance in args.importances:  # the preset's own sparsity wins over 0.0
            rows.append(run("pst", 0.0, args, out, mask=f"{preset}-{importance}"))
    for method in args.methods if not args.masks else []:
        for sparsity in args.sparsities if method in PRUNING else [0.0]:
            rows.append(run(method, sparsity, args, out))
    lines = [
        f"| method | sparsity | lr | validation {metric} (before -> after) | trainable params | wall |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['sparsity']:.2f} | {r['lr']:g} | {r['before']:.4f} -> {r['after']:.4f} "
            f"| {r['trainable_params']:,} | {r['wall_s']:.0f} s |"
        )
    (out / f"quality_{args.task}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (out / f"quality_{args.task}.md").write_text("\n".join(lines) + "\n")
    plot(rows, metric, out / f"quality_{args.task}.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
