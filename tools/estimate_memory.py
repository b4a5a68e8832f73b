"""Per-rank memory of a training run, predicted from its configs before launching it.

    python tools/estimate_memory.py --config configs/experiments/llama_1b.yaml \
        --ds_config configs/zero3.json --world_size 2 [--gpu] [key=value ...]

Prints what holds the bytes (parameters, gathered ZeRO-3 weights, gradients, optimizer state,
activations, PST's transient buffers, the process itself) and their total, the figure a rank
must fit; --json FILE also writes it. The same model runs at the start of every training run
(pst_ds/train/memory.py), and docs/archive/results-history.md sets it beside measured peaks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pst_ds.config import ConfigError  # noqa: E402
from pst_ds.experiment import load_experiment  # noqa: E402
from pst_ds.paths import check_files  # noqa: E402
from pst_ds.train.engine import load_ds_config  # noqa: E402
from pst_ds.train.memory import GIB, estimate, precision  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/experiments/default.yaml", help="experiment YAML")
    parser.add_argument("--ds_config", default="configs/zero3.json", help="DeepSpeed JSON")
    parser.add_argument("--world_size", type=int, default=1, help="ranks (GPUs or CPU processes)")
    parser.add_argument(
        "--gpu", action="store_true", help="GPU ranks (no host runtime; the whole reduce bucket)"
    )
    parser.add_argument("--json", help="also write the estimate here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="experiment config overrides")
    args = parser.parse_args(argv)
    try:
        config = load_experiment(args.config, args.overrides)
        check_files(config)
        ds_config = load_ds_config(args.ds_config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = estimate(config, ds_config, args.world_size, on_gpu=args.gpu)
    zero = ds_config.get("zero_optimization", {}).get("stage", 0)
    print(
        f"{config.method} on {args.world_size} {'GPU' if args.gpu else 'CPU'} rank(s), ZeRO-{zero}, "
        f"{precision(ds_config)}, micro-batch {config.train.micro_batch_size} x {config.data.block_size} "
        "tokens, "
        f"gradient checkpointing {'on' if config.train.gradient_checkpointing else 'off'}"
    )
    print("| part | GiB per rank |\n|---|---|")
    for name, value in result.to_dict().items():
        print(f"| {name} | {value / GIB:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "bytes": result.to_dict()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
