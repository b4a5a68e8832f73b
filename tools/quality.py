"""Quality of PST beside one-shot pruning and the trained baselines: same steps, data, seed, engine.

    python tools/quality.py --rows wanda sparsegpt pst pst_distill --sparsities 0.5 0.7 2:4 --steps 150
    python tools/quality.py --task classification --rows magnitude movement smp pst --sparsities 0.5 0.9
    python tools/quality.py --table                  # assemble the table from the rows saved so far

Each row (ROWS: a label and the experiment overrides that make it) at each sparsity is one run
of ``launch/train.py``; its result is saved to ``<out>/rows/<row>-<sparsity>.json`` as soon as
it finishes and is not run again while that file exists, so a long grid can be stopped,
resumed and assembled from runs made at different times. ``2:4`` is the nm mask at 50%.

A row records the validation metric before training (the dense model) and after, the
perplexity of every ``data.eval_files`` text (out of domain) before and after, trainable
parameters and wall time. The table (markdown and JSON) is written to ``<out>``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from train_runs import train_once

TASKS = {
    "causal_lm": ("configs/experiments/default.yaml", "ppl"),
    "classification": ("configs/experiments/minilm_rotten_tomatoes.yaml", "accuracy"),
}
# The release's PST: magnitude importance, U ~ N(0, 1), one learning rate for all factors, the
# cubic schedule from a dense start.
RELEASE = [
    "pst.importance=magnitude",
    "pst.init=magnitude",
    "pst.update=scaled",
    "pst.beta=1.0",
    "pst.update_init_std=1.0",
]
PLAIN = ["pst.importance=magnitude", "pst.init=magnitude"]  # for methods that have neither
ROWS: dict[str, tuple[str, list[str]]] = {  # row: (label, overrides of the task's experiment YAML)
    "dense": ("dense (fine-tuned; 'before' is the dense model)", ["method=dense", "train.lr=5e-5", *PLAIN]),
    "lora": ("LoRA (no pruning)", ["method=lora", *PLAIN]),
    "random": ("random mask, no training (the floor)", ["method=random"]),
    "magnitude_oneshot": ("magnitude, one-shot", ["method=pst", "train.max_steps=0", *PLAIN]),
    "wanda": ("Wanda, one-shot", ["method=wanda"]),
    "sparsegpt": ("SparseGPT, one-shot", ["method=sparsegpt"]),
    "magnitude": ("magnitude, gradual (W trained)", ["method=magnitude", "train.lr=5e-5", *PLAIN]),
    "movement": (
        "movement (scores from |W|)",
        ["method=movement", "train.lr=5e-5", "train.score_lr=1e-2", *PLAIN],
    ),
    "smp": ("smp (scores from |W|)", ["method=smp", "train.score_lr=1e-2", *PLAIN]),
    "pst_release": ("PST, release settings", ["method=pst", *RELEASE]),
    "pst_threshold": (
        "PST, learned thresholds (release settings)",
        ["method=pst", *RELEASE, "pst.mask=threshold"],
    ),
    "pst_activation": ("PST, activation importance, beta 0.1", ["method=pst", "pst.init=magnitude"]),
    "pst": ("PST, the default experiment", ["method=pst"]),
    "masked_lora": ("masked LoRA: the start's mask frozen, LoRA merged under it", ["method=masked_lora"]),
    "masked_lora_owl": (
        "masked LoRA on OWL's layer-wise profile",
        ["method=masked_lora", "pst.sparsity_profile=owl"],
    ),
    "pst_owl": ("PST on OWL's layer-wise profile", ["method=pst", "pst.sparsity_profile=owl"]),
    "pst_revival": (
        "PST, the revivable start (SparseGPT's kept set a bias on S, gone after a third)",
        ["method=pst", "pst.start_bias_decay=0.33"],
    ),
    "pst_scaled": (
        "PST, the scaled update beta U V (the default before issue 38), revivable start",
        ["method=pst", "pst.update=scaled", "pst.start_bias_decay=0.33"],
    ),
    "pst_thresholds": (
        "PST, learned thresholds (the default otherwise), revivable start",
        ["method=pst", "pst.mask=threshold", "pst.start_bias_decay=0.33"],
    ),
    "pst_scaled_no_revival": (
        "PST before issue 38: the scaled update, the start's zeros in W",
        ["method=pst", "pst.update=scaled"],
    ),
    "pst_update_off": (
        "PST, the learned mask alone (LoRA's update at scale 0), revivable start",
        ["method=pst", "lora.alpha=0", "pst.start_bias_decay=0.33"],
    ),
    "pst_mask_only": (
        "PST, the learned mask alone (the scaled update at pst.beta=0)",
        ["method=pst", "pst.update=scaled", "pst.beta=0"],
    ),
    "pst_frozen_importance": (
        "PST, importance factors frozen (train.importance_lr=1e-12)",
        ["method=pst", "train.importance_lr=1e-12"],
    ),
    "pst_distill": ("PST + distillation", ["method=pst", "train.distill.weight=0.5"]),
    "pst_wanda_row": ("PST + Wanda warm start, per-row top-k", ["method=pst", "pst.mask_scope=row"]),
    "pst_wanda": ("PST + Wanda warm start", ["method=pst", "pst.init=wanda"]),
    "pst_sparsegpt": ("PST + SparseGPT warm start", ["method=pst", "pst.init=sparsegpt"]),
    "pst_sparsegpt_ramp": (
        "PST + SparseGPT warm start at 5/7 of the sparsity, then the schedule",
        ["method=pst", "pst.init=sparsegpt", "pst.init_schedule=ramp"],
    ),
}
# Judged beyond the training text: fiction of the same century, modern reviews, a legal text.
EVAL_TEXTS = "data.eval_files=[data/mobydick/mobydick_excerpt.txt,data/ood/reviews.txt,data/ood/gpl3.txt]"
UNPRUNED = ("dense", "lora")  # one column, "-": no sparsity to set


def sparsity_overrides(sparsity: str, row: str) -> list[str]:
    """The overrides of one sparsity column ('0.5', '2:4' for the nm mask at 50%, '64:2:5' for
    V:N:M at 60%, or '-': none)."""
    if sparsity == "-":
        return []
    if sparsity.count(":") == 2:  # V:N:M (N is 2)
        v, _, m = (int(x) for x in sparsity.split(":"))
        fraction = 1 - 2 / m
        overrides = ["pst.mask=vnm", f"pst.mask_v={v}", f"pst.mask_m={m}", f"pst.final_sparsity={fraction:g}"]
    elif ":" in sparsity:
        n, m = (int(v) for v in sparsity.split(":"))
        fraction = 1 - n / m
        overrides = ["pst.mask=nm", f"pst.mask_n={n}", f"pst.mask_m={m}", f"pst.final_sparsity={fraction:g}"]
    else:
        fraction = float(sparsity)
        overrides = [f"pst.final_sparsity={sparsity}"]
    if row == "magnitude_oneshot":  # no step: the mask at final sparsity from the start
        overrides.append(f"pst.initial_sparsity={fraction:g}")
    if row == "pst_sparsegpt_ramp":  # 70% -> the one-shot at 50%, then the cubic schedule
        overrides.append(f"pst.initial_sparsity={fraction * 5 / 7:.4g}")
    return overrides


def run_row(row: str, sparsity: str, args: argparse.Namespace, out: Path) -> dict:
    config, metric = args.config or TASKS[args.task][0], TASKS[args.task][1]
    name = row if sparsity == "-" else f"{row}-{sparsity.replace(':', 'of')}"
    saved = out / "rows" / f"{name}.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    label, overrides = ROWS[row]
    overrides = [f"train.max_steps={args.steps}", f"train.seed={args.seed}", *overrides]
    if args.task == "causal_lm":
        overrides.insert(0, EVAL_TEXTS)
    overrides += sparsity_overrides(sparsity, row) + args.overrides
    (out / "logs").mkdir(parents=True, exist_ok=True)
    summary, arguments = train_once(
        args.num_gpus, args.ds_config, config, out / "runs" / name, overrides, out / "logs" / f"{name}.log"
    )
    result = {
        "row": row,
        "label": label,
        "column": sparsity,
        "sparsity": summary["final_sparsity"],
        "steps": summary["steps"],
        "seed": args.seed,
        "before": summary[f"eval_{metric}_before"],
        "after": summary[f"eval_{metric}_after"],
        "texts_before": summary.get("eval_texts_before") or {},
        "texts_after": summary.get("eval_texts_after") or {},
        "after_warm_start": summary.get("eval_after_warm_start"),
        "trainable_params": summary["trainable_params"],
        "wall_s": summary["wall_time_s"],
        "step_s": median_step(summary),
        "command": "launch/train.py " + " ".join(arguments),
    }
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result, indent=1))
    return result


def median_step(summary: dict) -> float | None:
    """The median optimizer step in seconds, the first (compilation, warm-up) left out."""
    times = summary.get("step_times_s") or []
    times = times[1:] if len(times) > 1 else times
    return statistics.median(times) if times else None


EQUAL_TIME_REFERENCE = "masked_lora"  # the recipe PST must beat at equal time as at equal tokens


def equal_time_table(rows: list[dict]) -> str:
    """Markdown: each trained row's median step over masked LoRA's in its column, and the steps
    it fits in masked LoRA's time for its steps (fewer than its own: it needs more time)."""
    reference = {r["column"]: r for r in rows if r["row"] == EQUAL_TIME_REFERENCE and r.get("step_s")}
    lines = []
    for r in rows:
        ref = reference.get(r["column"])
        if ref is None or not r.get("step_s") or r["row"] in ONE_SHOT:
            continue
        ratio = r["step_s"] / ref["step_s"]
        fits = ref["steps"] / ratio
        lines.append(f"| {r['label']} | {r['column']} | {r['step_s']:.2f} s | {ratio:.2f} | {fits:.1f} |")
    if not lines:
        return ""
    head = "| method | column | median step | step / masked LoRA's | steps in masked LoRA's time |"
    return "\n".join([head, "|---|---|---|---|---|", *lines]) + "\n"


def table(rows: list[dict], metric: str) -> str:
    """Markdown: the dense model first (every run's 'before'), then one line per row."""
    texts = sorted({name for r in rows for name in r["texts_after"]})

    def cells(main: float, others: dict) -> str:
        return " | ".join([f"{main:.2f}", *(f"{others.get(t, float('nan')):.2f}" for t in texts)])

    head = f"| method | column | steps | validation {metric} | " + " | ".join(f"{t} ppl" for t in texts)
    lines = [head + " | after the warm start | trainable params | wall |", "|---" * (7 + len(texts)) + "|"]
    lines.append(
        f"| dense, no training | - | 0 | {cells(rows[0]['before'], rows[0]['texts_before'])} | - | 0 | - |"
    )
    for r in rows:
        warm = r.get("after_warm_start")
        start = " / ".join(f"{v:.2f}" for v in warm.values()) if warm else "-"
        lines.append(
            f"| {r['label']} | {r['column']} | {r['steps']} | {cells(r['after'], r['texts_after'])} "
            f"| {start} | {r['trainable_params']:,} | {r['wall_s']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


ONE_SHOT = ("wanda", "sparsegpt")


def ratio_table(rows: list[dict]) -> str:
    """Markdown: each trained row's perplexity over the better one-shot row's of its column, text
    by text (the goals of issue 21 are written as these ratios). Empty when no column has both."""
    texts = sorted({name for r in rows for name in r["texts_after"]})

    def values(r: dict) -> list[float]:
        return [r["after"], *(r["texts_after"].get(t, float("nan")) for t in texts)]

    best: dict[str, list[float]] = {}
    for r in rows:
        if r["row"] in ONE_SHOT:
            seen = best.get(r["column"], values(r))
            best[r["column"]] = [min(a, b) for a, b in zip(seen, values(r), strict=True)]
    trained = [r for r in rows if r["row"] not in ONE_SHOT and r["column"] in best]
    if not trained:
        return ""
    lines = [
        "| method | column | steps | validation | " + " | ".join(texts) + " |",
        "|---" * (4 + len(texts)) + "|",
    ]
    for r in trained:
        ratios = [a / b for a, b in zip(values(r), best[r["column"]], strict=True)]
        lines.append(
            f"| {r['label']} | {r['column']} | {r['steps']} | "
            + " | ".join(f"{x:.2f}" for x in ratios)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=TASKS, default="causal_lm")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--sparsities", nargs="+", default=["0.5", "0.7", "2:4"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num_gpus", type=int, default=1)
    parser.add_argument("--ds_config", default="configs/zero2.json")
    parser.add_argument("--config", default=None, help="experiment YAML (default: the task's)")
    parser.add_argument("--table", action="store_true", help="only assemble the table from saved rows")
    parser.add_argument("--out", default=None, help="default: runs/quality/<task>")
    parser.add_argument("overrides", nargs="*", help="experiment overrides for every row, key=value")
    args = parser.parse_args()
    for column in args.sparsities:  # an override after --sparsities lands here: say where it goes
        if not re.fullmatch(r"-|0?\.\d+|\d+:\d+(:\d+)?", column):
            parser.error(
                f"--sparsities takes 0.5, 2:4 or 64:2:5, not {column!r}: give experiment overrides before "
                "the options, or after --"
            )
    out = Path(args.out or f"runs/quality/{args.task}")
    metric = TASKS[args.task][1]
    if not args.table:
        for row in args.rows:
            for sparsity in ["-"] if row in UNPRUNED else args.sparsities:
                run_row(row, sparsity, args, out)
    rows = [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))]
    for r in rows:  # rows saved before step times were kept: from their run's summary
        summary = (
            out / "runs" / Path(r["command"].split("train.output_dir=")[-1].split()[0]).name / "summary.json"
        )
        if "step_s" not in r and summary.is_file():
            r["step_s"] = median_step(json.loads(summary.read_text()))
    if not rows:
        parser.error(f"no rows saved in {out / 'rows'} yet")
    order = {row: i for i, row in enumerate(ROWS)}
    rows.sort(key=lambda r: (order.get(r["row"], len(order)), r["column"], r["steps"]))
    markdown = table(rows, metric)
    if metric == "ppl":
        ratios = ratio_table(rows)
        markdown += (
            f"\nOver the better one-shot (Wanda, SparseGPT) of each column:\n\n{ratios}" if ratios else ""
        )
        timed = equal_time_table(rows)
        markdown += (
            f"\nAt equal time (step times of runs that may have shared the machine):\n\n{timed}"
            if timed
            else ""
        )
    (out / f"quality_{args.task}.md").write_text(markdown)
    (out / f"quality_{args.task}.json").write_text(json.dumps(rows, indent=1))
    print(markdown)


if __name__ == "__main__":
    main()
