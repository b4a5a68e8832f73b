"""Sparsity report of an exported PST model: a markdown table per layer and a PNG figure.

    python tools/sparsity_report.py runs/default/export [--layer NAME] [--out DIR]

Counts the zeros in the exported weights themselves (not in pst_sparsity.json), so it
also checks the export: each matrix's zeros against the pruned count the export recorded,
and, for N:M and V:N:M masks, the pattern itself, with the mask kind's own check (N kept in
every M inputs of a row; at most 4 columns used per V x M block). The figure shows the sparsity of every
pruned matrix (learned thresholds make them differ) and, for one matrix (--layer, default
the first), its mask and the share kept per row and column.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pst_ds.masks.kinds import MASK_KINDS, described_kind  # noqa: E402


def pattern_check(kept: torch.Tensor, mask: dict, recorded: int | None) -> str:
    """'ok' if the nonzeros ``kept`` (out, in) follow the recorded N:M or V:N:M pattern, else why
    not ('-' for masks with no pattern beyond their count): the mask kind's own check, as export ran it."""
    if mask.get("kind") not in MASK_KINDS or recorded is None:
        return "-"
    kind = described_kind(mask)
    if not kind.grouped:
        return "-"
    problem = kind.pattern_problem(kept, torch.tensor(recorded))
    return "ok" if problem is None else f"broken: {problem}"


def weight_files(folder: Path) -> dict[str, str] | None:
    """An export's tensor -> shard file map (None: a single ``model.safetensors``)."""
    index = folder / "model.safetensors.index.json"
    return json.loads(index.read_text())["weight_map"] if index.is_file() else None


def exported_weight(folder: Path, files: dict[str, str] | None, name: str) -> torch.Tensor:
    """One tensor of an export, from ``model.safetensors`` or the shard ``files`` names."""
    file = files[name] if files is not None else "model.safetensors"
    with safe_open(str(folder / file), framework="pt") as tensors:
        return tensors.get_tensor(name)


def layer_table(folder: Path) -> list[dict]:
    report = json.loads((folder / "pst_sparsity.json").read_text())
    mask = report.get("mask", {})
    rows, files = [], weight_files(folder)
    for name, recorded in report["layers"].items():
        weight = exported_weight(folder, files, f"{name}.weight")
        zeros = int((weight == 0).sum())
        kept = weight != 0
        rows.append(
            {
                "layer": name,
                "shape": list(weight.shape),
                "zeros": zeros,
                "sparsity": zeros / weight.numel(),
                "recorded": recorded.get("mask_pruned"),
                "pattern": pattern_check(  # on (out, in)
                    kept.t() if recorded.get("conv1d") else kept, mask, recorded.get("mask_pruned")
                ),
            }
        )
    return rows


def markdown(rows: list[dict], mask: dict) -> str:
    described = ", ".join(f"{k}={v}" for k, v in mask.items()) or "unknown"
    lines = [
        f"mask: {described}",
        "",
        "| layer | shape | zeros | sparsity | pattern |",
        "|---|---|---:|---:|---|",
    ]
    for r in rows:
        zeros = f"{r['zeros']:,}"
        if r["recorded"] is not None and r["recorded"] != r["zeros"]:
            zeros += f" (recorded {r['recorded']:,})"
        shape = f"{r['shape'][0]}×{r['shape'][1]}"
        lines.append(f"| {r['layer']} | {shape} | {zeros} | {r['sparsity']:.4f} | {r['pattern']} |")
    zeros = sum(r["zeros"] for r in rows)
    numel = sum(r["shape"][0] * r["shape"][1] for r in rows)
    lines.append(f"| **total** ({len(rows)} matrices) | | {zeros:,} | {zeros / numel:.4f} | |")
    return "\n".join(lines) + "\n"


def figure(folder: Path, rows: list[dict], layer: str, path: Path) -> None:
    kept = (exported_weight(folder, weight_files(folder), f"{layer}.weight") != 0).float()
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [2, 1.2, 1]})
    axes[0].bar(range(len(rows)), [r["sparsity"] for r in rows], color="tab:blue")
    axes[0].set(
        title="sparsity per pruned matrix", xlabel="matrix (model order)", ylabel="sparsity", ylim=(0, 1)
    )
    axes[1].imshow(kept.numpy(), aspect="auto", cmap="gray_r", interpolation="nearest")
    axes[1].set(title=f"mask of {layer}\n(black: kept)", xlabel="stored column", ylabel="stored row")
    axes[2].plot(kept.mean(1).numpy(), label="per row")
    axes[2].plot(kept.mean(0).numpy(), label="per column", alpha=0.7)
    axes[2].set(title="share kept", xlabel="index", ylim=(0, 1))
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="an exported folder (with pst_sparsity.json)")
    parser.add_argument("--layer", default=None, help="matrix to draw (default: the first)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the export)")
    args = parser.parse_args(argv)
    if not (args.folder / "pst_sparsity.json").is_file():
        print(f"pst-ds: error: {args.folder} has no pst_sparsity.json: not a PST export", file=sys.stderr)
        return 2
    rows = layer_table(args.folder)
    names = [r["layer"] for r in rows]
    layer = args.layer or names[0]
    if layer not in names:
        print(f"pst-ds: error: --layer {layer!r} is not a pruned matrix of this export", file=sys.stderr)
        return 2
    out = args.out or args.folder
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, json.loads((args.folder / "pst_sparsity.json").read_text()).get("mask", {}))
    (out / "sparsity_report.md").write_text(table)
    figure(args.folder, rows, layer, out / "sparsity_report.png")
    print(table + f"\nwrote {out / 'sparsity_report.md'} and {out / 'sparsity_report.png'}")
    broken = [
        r["layer"]
        for r in rows
        if r["pattern"].startswith("broken") or r["recorded"] not in (None, r["zeros"])
    ]
    if broken:
        print(
            f"pst-ds: error: {len(broken)} matrices break their recorded mask, e.g. {broken[0]}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
