"""Checkpoint bytes and save time: the whole model (train.save_frozen=true, as before issue 20)
beside what trains (the default), from one run, one rank, after one optimizer step.

    python tools/checkpoint_bytes.py --label 135M [--config EXPERIMENT.yaml] [key=value ...]
    python tools/checkpoint_bytes.py --label 1B --config configs/experiments/llama_1b.yaml \\
        --base_dir /tmp/llama_1b_base data.block_size=64

A model.source=random model has no folder to read a frozen backbone back from: --base_dir saves
it (seeded, with its tokenizer) there once and the run reads it as model.source=path, as a run
from real weights would. Appends the figures to --out (.json and a .md table).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pst_ds.experiment import load_experiment  # noqa: E402
from pst_ds.integrations.run import build_run  # noqa: E402
from pst_ds.io.models import load_model, load_tokenizer  # noqa: E402
from pst_ds.train import checkpoint  # noqa: E402
from pst_ds.train.engine import load_ds_config  # noqa: E402


def materialised(config_path: str, overrides: list[str], folder: Path) -> list[str]:
    """Save the config's random model into ``folder`` (once); the overrides that read it."""
    if not (folder / "config.json").is_file():
        config = load_experiment(config_path, overrides)
        tokenizer = load_tokenizer(config.model)
        torch.manual_seed(config.train.seed)
        load_model(config.model, tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return ["model.source=path", f"model.path={folder}"]


def measure(config_path: str, overrides: list[str], ds_config: str, work: Path) -> dict:
    run = [f"train.output_dir={work}", "train.max_steps=1", "train.save_every=0", "train.export=false"]
    trainer = build_run(load_experiment(config_path, overrides + run), load_ds_config(ds_config))
    trainer.train()
    rows, root, manifest = {}, trainer.checkpoints.root, trainer.checkpoints.manifest(None)
    for step, label, exclude in ((11, "whole model", False), (12, "what trains", True)):
        start = time.time()
        tag = checkpoint.save(trainer.engine, root, step, manifest, 2, exclude)
        seconds = time.time() - start
        files = list((root / tag).iterdir())
        rows[label] = {"bytes": sum(f.stat().st_size for f in files), "save_s": round(seconds, 2)}
    trainable = trainer.records.facts["trainable_params"]
    dist.destroy_process_group()
    return {"trainable_params": trainable, **rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--config", default="configs/experiments/default.yaml")
    parser.add_argument("--ds_config", default="configs/zero3.json")
    parser.add_argument("--base_dir", type=Path, default=None)
    parser.add_argument("--out", default="docs/checkpoint_bytes")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = list(args.overrides)
    if args.base_dir is not None:
        overrides += materialised(args.config, overrides, args.base_dir)
    with tempfile.TemporaryDirectory() as work:
        figures = measure(args.config, overrides, args.ds_config, Path(work))
    whole, lean = figures["whole model"], figures["what trains"]
    row = {
        "label": args.label,
        "command": shlex.join(["python", *sys.argv]),
        **figures,
        "bytes_ratio": lean["bytes"] / whole["bytes"],
        "save_time_ratio": lean["save_s"] / whole["save_s"],
    }
    out = Path(args.out)
    rows = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else []
    rows = [r for r in rows if r["label"] != args.label] + [row]
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "| model | trainable params | whole model: MB, save s | what trains: MB, save s "
        "| bytes ratio | time ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        w, t = r["whole model"], r["what trains"]
        lines.append(
            f"| {r['label']} | {r['trainable_params']:,} | {w['bytes'] / 1e6:,.1f}, {w['save_s']} | "
            f"{t['bytes'] / 1e6:,.1f}, {t['save_s']} | {r['bytes_ratio']:.3f} | {r['save_time_ratio']:.3f} |"
        )
    table = "\n".join(lines) + "\n\nCommands:\n\n" + "\n".join(f"    {r['command']}" for r in rows) + "\n"
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
