"""Perplexity of any Hugging Face causal-LM folder (dense or exported) on a text file.

    python launch/evaluate.py --model runs/default/export [--config EXPERIMENT.yaml] \
        [--split validation|all] [--out results.json] [key=value ...]

The text goes through the training data pipeline (``data`` section of the experiment
config: files, block size, held-out tail), so the figures compare with training's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face folder")
    parser.add_argument("--config", default="configs/experiments/default.yaml")
    parser.add_argument("--split", choices=("validation", "all"), default="validation")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    import torch
    from datasets import concatenate_datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pst_ds.config import ConfigError, load_experiment
    from pst_ds.data import load_text_blocks
    from pst_ds.evaluate import perplexity

    try:
        config = load_experiment(args.config, args.overrides)
        if not os.path.isdir(args.model):
            raise ConfigError(f"model folder not found: {args.model}")
    except ConfigError as err:
        print(f"pst-ds: error: {err}", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    blocks = load_text_blocks(config.data, tokenizer)
    data = (
        blocks.validation
        if args.split == "validation"
        else concatenate_datasets([blocks.train, blocks.validation])
    )
    loss, ppl = perplexity(model, data, args.batch_size)
    result = {
        "model": args.model,
        "split": args.split,
        "blocks": len(data),
        "block_size": config.data.block_size,
        "loss": loss,
        "perplexity": ppl,
    }
    print(
        f"| model | split | blocks | loss | perplexity |\n|---|---|---|---|---|\n"
        f"| {args.model} | {args.split} | {len(data)} | {loss:.4f} | {ppl:.3f} |"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
