"""Helpers shared by test modules (fixtures live in conftest.py): tiny in-process runs, and
launching real ranks through the deepspeed launcher."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

# The tools and the tests launch alike.
from tools.train_runs import DEEPSPEED, deepspeed_command, free_port  # noqa: F401  (tests import them here)

ROOT = Path(__file__).resolve().parents[1]


def ds_env() -> dict:
    """The launched ranks' environment: CPU ranks, one thread each, no hub."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}


def half_kept(out_features: int, in_features: int, mask: str) -> torch.Tensor:
    """A random mask keeping half of an (out, in) weight: top-k over random scores, or 2:4 ("nm")
    over groups of 4 along the input."""
    scores = torch.rand(out_features, in_features)
    if mask == "topk":
        return scores > scores.reshape(-1).kthvalue(out_features * in_features // 2).values
    groups = scores.reshape(out_features, -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, -1).indices, True)
    return keep.reshape(out_features, in_features)


TINY_RUN = [
    "data.block_size=32",
    "train.save_every=0",
    "pst.compile=false",  # the compiled kernels have their own reference tests
]


def tiny_run(output_dir, train_file, overrides: list[str] = ()):
    """An in-process run of tiny_llama under ZeRO-2 into ``output_dir``, built (one rank, no
    process started): the fast tier's end-to-end runs."""
    from pst_ds.experiment import load_experiment
    from pst_ds.integrations.run import build_run
    from pst_ds.train.engine import load_ds_config

    settings = [f"train.output_dir={output_dir}", f"data.train_files=[{train_file}]", *TINY_RUN, *overrides]
    config = load_experiment("configs/experiments/tiny_llama.yaml", settings)
    return build_run(config, load_ds_config("configs/zero2.json"))


def run_launcher(
    command: list[str], extensions: Path, timeout: int = 900, env: dict | None = None, expect: int | None = 0
) -> subprocess.CompletedProcess:
    """Run a launcher command (deepspeed's or accelerate's) from the repo root on CPU ranks, with
    its own torch-extensions folder. Asserts the exit status ``expect`` (None: any) and that
    nothing was JIT-compiled: a build needs a compiler, and one killed half-way leaves a lock that
    hangs every later start (DeepSpeed's CPU shared-memory op did, under accelerate)."""
    env = {**ds_env(), **(env or {}), "TORCH_EXTENSIONS_DIR": str(extensions)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if expect is not None:
        assert result.returncode == expect, (result.stdout + result.stderr)[-4000:]
    built = sorted(p.name for p in extensions.glob("*")) if extensions.exists() else []
    assert built == [], f"JIT-compiled at run time: {built}"
    return result


def launch_ranks(
    script_args: list[str],
    tmp_path: Path,
    ranks: int = 2,
    timeout: int = 900,
    env: dict | None = None,
    expect: int | None = 0,
) -> subprocess.CompletedProcess:
    """``script args...`` on RANKS CPU ranks through the deepspeed launcher (see run_launcher)."""
    extensions = Path(tmp_path) / "extensions"
    return run_launcher(deepspeed_command(script_args, ranks), extensions, timeout, env, expect)
