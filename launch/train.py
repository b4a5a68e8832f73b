"""Prune and fine-tune a language model with PST on DeepSpeed.

    deepspeed launch/train.py --ds_config configs/zero3.json [--config EXPERIMENT.yaml] [key=value ...]

With no --config, runs the embedded default (SmolLM2-135M on Jane Austen's novels).
Overrides address any field of the experiment YAML, e.g. ``train.max_steps=20``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

# Nothing is fetched from a hub: models and data are local or shipped by packages. Set here, in
# the program, before transformers and datasets are imported (they read these once).
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Transparent huge pages for PyTorch's large CPU buffers (read by torch at import): fresh
# weight-sized tensors then cost far fewer page faults. See docs/archive/results-history.md for the figures.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# DeepSpeed 0.19 calls c10d functions that torch 2.13 deprecates, once per step: noise a user
# cannot act on.
warnings.filterwarnings(
    "ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning
)

DEFAULT_EXPERIMENT = "configs/experiments/default.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ds_config", default="configs/zero3.json", help="DeepSpeed JSON config")
    parser.add_argument("--config", default=DEFAULT_EXPERIMENT, help="experiment YAML config")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest complete checkpoint (same as train.resume=auto)",
    )
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override a field of the experiment config, e.g. train.max_steps=20",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pst_ds.callbacks.preemption import PREEMPTED_EXIT
    from pst_ds.config import ConfigError
    from pst_ds.experiment import load_experiment
    from pst_ds.integrations.run import build_run
    from pst_ds.train.checkpoint import tag_for
    from pst_ds.train.distributed import leave_process_group
    from pst_ds.train.engine import load_ds_config
    from pst_ds.train.run_checkpoints import TrainingError

    rank_zero = os.environ.get("RANK", "0") == "0"
    try:
        overrides = args.overrides + (["train.resume=auto"] if args.resume else [])
        config = load_experiment(args.config, overrides)
        run = build_run(config, load_ds_config(args.ds_config))
    except ConfigError as err:  # bad input: found before anything is written
        return stop(f"pst-ds: error: {err}", 2, rank_zero)
    try:
        run.train()
    except ConfigError as err:  # bad input found as training begins (a model a method cannot start from)
        return stop(f"pst-ds: error: {err}", 2, rank_zero)
    except TrainingError as err:
        return stop(f"pst-ds: error: {err}", 1, rank_zero)
    preempted = run.preemption
    if preempted.stopped is not None:  # a scheduler's signal: checkpointed, to be resumed
        folder = run.checkpoints.root / tag_for(preempted.stopped_at)
        message = (
            f"pst-ds: stopped on {preempted.stopped} after step {preempted.stopped_at}, saved in {folder}: "
            "run the same command to resume"
        )
        return stop(message, PREEMPTED_EXIT, rank_zero)
    if rank_zero and run.export is not None and run.export.report is not None:
        print(how_to_use(run.export.report, args.config), flush=True)
    leave_process_group()
    return 0


def stop(message: str, status: int, rank_zero: bool) -> int:
    """Report an error (rank 0 only: every rank stops alike) and end with ``status``.

    A rank that joined a process group leaves at once, without C++ destructors: tearing a gloo
    group down after a peer has exited can abort the process (SIGABRT), and the launcher would
    then report -6 instead of this status.
    """
    if rank_zero:
        print(message, file=sys.stderr, flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def shown(path: str) -> str:
    """A path as a user would type it here: relative below the current folder, else absolute."""
    relative = os.path.relpath(path)
    return os.path.abspath(path) if relative.startswith("..") else relative


def how_to_use(export: dict, config: str) -> str:
    """Where the pruned model is, and the command that evaluates it."""
    data = "" if config == DEFAULT_EXPERIMENT else f" --config {config}"
    return (
        f"pst-ds: pruned model in {shown(export['dir'])}: {export['zeros']:,} of {export['params']:,} "
        f"pruned weights are zero ({100 * export['sparsity']:.2f}%); it loads with plain transformers\n"
        f"pst-ds: evaluate it: {shown(sys.executable)} launch/evaluate.py "
        f"--model {shown(export['dir'])}{data}"
    )


if __name__ == "__main__":
    sys.exit(main())
