"""The quality figure of docs/results.md: perplexity by method, sparsity and text, relative to
the dense model, from docs/quality_rows.json (the numbers and where each comes from).

    python tools/plot_quality.py [--rows docs/quality_rows.json] [--out docs/quality.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="docs/quality_rows.json")
    parser.add_argument("--out", default="docs/quality.png")
    args = parser.parse_args()
    data = json.loads(Path(args.rows).read_text())
    texts, dense, sparsities = data["texts"], data["dense"], list(data["rows"])
    figure, axes = plt.subplots(1, len(sparsities), figsize=(4.2 * len(sparsities), 3.6), sharey=True)
    for ax, sparsity in zip(axes, sparsities, strict=True):
        methods = data["rows"][sparsity]
        width = 0.8 / len(methods)
        for i, (method, values) in enumerate(methods.items()):
            ratios = [v / d for v, d in zip(values, dense, strict=True)]
            ax.bar(
                [t + (i - (len(methods) - 1) / 2) * width for t in range(len(texts))],
                ratios,
                width,
                label=method,
            )
        ax.set_yscale("log")
        ax.set_title(f"{sparsity} sparsity")
        ax.set_xticks(range(len(texts)), [t.split(" (")[0] for t in texts], rotation=20)
        ax.axhline(1.0, color="black", linewidth=0.8)
    axes[0].set_ylabel("perplexity / dense (log)")
    axes[-1].legend(fontsize=8)
    figure.suptitle("SmolLM2-135M pruned on Austen: lower is better (30 steps, seed 42)")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"plot_quality: wrote {args.out}")


if __name__ == "__main__":
    main()
