"""Tokenise an experiment's data into the cache ahead of a job, and say what it holds.

    python tools/prepare_data.py [--config EXPERIMENT.yaml] [key=value ...] [--out RESULT.json]

Reads and packs data.train_files (and data.eval_files, oneshot.calibration_files) exactly as a
run would, so the run's ranks find them in the cache (``PST_DS_CACHE`` or .cache/). Prints the
blocks and tokens of each split, the time it took and this process's peak resident memory, and
its peak anonymous memory (resident memory less the pages of the memory-mapped cache files).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class AnonymousPeak:
    """The peak of this process's anonymous resident memory (RssAnon: its heap, not the pages of
    memory-mapped cache files, which the kernel can drop at will), sampled every ``every`` s."""

    def __init__(self, every: float = 0.2) -> None:
        self.peak, self.every = 0, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as status:
            line = next((x for x in status if x.startswith("RssAnon:")), "RssAnon: 0 kB")
        return int(line.split()[1]) * 1024

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/experiments/default.yaml")
    parser.add_argument("--out", help="also write the figures here as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after --out
    from pst_ds.config import ConfigError
    from pst_ds.experiment import load_experiment
    from pst_ds.host_memory import peak_resident_bytes
    from pst_ds.io.data import load_calibration_blocks, load_eval_texts, load_splits
    from pst_ds.io.models import load_tokenizer
    from pst_ds.paths import check_files

    start, anonymous = time.time(), AnonymousPeak()
    try:
        config = load_experiment(args.config, args.overrides)
        check_files(config)
        tokenizer = load_tokenizer(config.model)
        splits = load_splits(config.data, config.model.task, tokenizer)
        held = {"train": splits.train, "validation": splits.validation}
        held.update({f"eval {name}": data for name, data in load_eval_texts(config.data, tokenizer).items()})
        if config.oneshot.calibration_files:
            held["calibration"] = load_calibration_blocks(
                config.oneshot.calibration_files, config.data, tokenizer
            )
    except ConfigError as err:
        print(f"pst-ds: error: {err}", file=sys.stderr)
        return 2
    result = {
        "splits": {
            name: {"blocks": len(data), "tokens": len(data) * config.data.block_size}
            for name, data in held.items()
        },
        "seconds": round(time.time() - start, 1),
        "peak_rss_bytes": peak_resident_bytes(),
        "peak_anonymous_bytes": anonymous.stop(),
    }
    for name, figures in result["splits"].items():
        print(f"pst-ds: {name}: {figures['blocks']:,} blocks of {config.data.block_size} tokens")
    print(
        f"pst-ds: prepared in {result['seconds']} s; "
        f"peak resident memory {result['peak_rss_bytes'] / 2**20:,.0f} MiB; peak anonymous memory "
        f"{result['peak_anonymous_bytes'] / 2**20:,.0f} MiB (resident less the mapped cache files)"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
