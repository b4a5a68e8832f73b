"""Perplexity (causal LM) or accuracy (classifier) of any Hugging Face folder, dense or exported.

    python launch/evaluate.py --model runs/default/export [--config EXPERIMENT.yaml] \
        [--split validation|test|all] [--out results.json] [key=value ...]

The data goes through the training pipeline (the ``data`` section and ``model.task`` of the
experiment config: files, block size, splits), so the figures compare with training's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Nothing is fetched from a hub: models and data are local or shipped by packages. Set here, in
# the program, before transformers and datasets are imported (they read these once).
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face folder")
    parser.add_argument("--config", default="configs/experiments/default.yaml")
    parser.add_argument("--split", choices=("validation", "test", "all"), default="validation")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    import torch
    from datasets import concatenate_datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from pst_ds.config import ConfigError
    from pst_ds.experiment import load_experiment
    from pst_ds.io.data import load_splits
    from pst_ds.io.evaluate import evaluate_model
    from pst_ds.paths import check_files, check_writable, model_folder_problem

    try:
        config = load_experiment(args.config, args.overrides)
        check_files(config)
        problem = model_folder_problem(Path(args.model))
        if problem is not None:
            raise ConfigError(f"--model {args.model} {problem}")
        if args.out is not None:
            check_writable(Path(args.out), "--out")
    except ConfigError as err:
        print(f"pst-ds: error: {err}", file=sys.stderr)
        return 2
    task = config.model.task
    if args.split == "test" and task != "sequence_classification":
        print(
            "pst-ds: error: --split test is for classification (causal LM: validation or all)",
            file=sys.stderr,
        )
        return 2
    auto = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = auto.from_pretrained(args.model, dtype=torch.float32)
    splits = load_splits(config.data, task, tokenizer)
    if args.split == "all":
        parts = [splits.train, splits.validation] + ([splits.test] if splits.test is not None else [])
        data = concatenate_datasets(parts)
    else:
        data = getattr(splits, args.split)
    result = {"model": args.model, "split": args.split, **evaluate_model(model, data, task, args.batch_size)}
    metric = "accuracy" if task == "sequence_classification" else "perplexity"
    print(
        f"| model | split | examples | loss | {metric} |\n|---|---|---|---|---|\n"
        f"| {args.model} | {args.split} | {result['examples']} | {result['loss']:.4f} | "
        f"{result[metric]:.4f} |"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
