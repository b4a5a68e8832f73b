"""Export a PST run's checkpoint as a plain Hugging Face folder with the pruned weights.

    python launch/export.py --run runs/default [--tag step00000030] [--out runs/default/export]
        [--max_shard_gb 0.25]

Reads a ZeRO checkpoint of any world size on this one process, one layer at a time (a ZeRO-3
checkpoint is never consolidated whole), merges M * (W + beta U V) into the original weights,
drops the factors, and writes safetensors shards, the tokenizer and pst_sparsity.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Nothing is fetched from a hub: models and data are local or shipped by packages. Set here, in
# the program, before transformers and datasets are imported (they read these once).
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the training run's output_dir")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete)")
    parser.add_argument("--out", default=None, help="output folder (default: <run>/export)")
    parser.add_argument("--max_shard_gb", type=float, default=0.25, help="safetensors shard size (GiB)")
    args = parser.parse_args(argv)
    from pst_ds.config import ConfigError
    from pst_ds.io.export import WRITE_ERRORS, export_checkpoint

    out = Path(args.out or Path(args.run) / "export")
    start = time.time()
    try:
        report = export_checkpoint(Path(args.run), out, args.tag, int(args.max_shard_gb * 2**30))
    except ConfigError as err:
        print(f"pst-ds: error: {err}", file=sys.stderr)
        return 2
    except WRITE_ERRORS as err:  # a full disk or a folder it may not write: nothing half-written is left
        print(
            f"pst-ds: error: cannot write the pruned model to {out} ({type(err).__name__}: {err})",
            file=sys.stderr,
        )
        return 1
    total = report["total"]
    print(
        f"pst-ds: exported {report['checkpoint']} to {out} in {time.time() - start:.1f} s: "
        f"{total['layers']} pruned matrices, {total['zeros']:,} of {total['params']:,} "
        f"weights zero ({100 * total['sparsity']:.2f}%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
