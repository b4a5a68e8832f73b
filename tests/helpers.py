"""Helpers shared by test modules (fixtures live in conftest.py): tiny in-process runs, and
launching real ranks through the deepspeed launcher."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def launch_ranks(script_args: list[str], tmp_path, ranks: int = 2, timeout: int = 900):
    """``deepspeed --num_gpus RANKS --master_port FREE script args...`` from the repo root on
    CPU ranks, with its own torch-extensions folder; asserts exit 0 and that nothing was
    JIT-compiled (a build needs a compiler, and one killed half-way leaves a lock that hangs every
    later start). Returns the CompletedProcess."""
    import os
    import socket
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    extensions = Path(tmp_path) / "extensions"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": str(extensions)}  # fmt: skip
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    command = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(port), *script_args]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    built = sorted(p.name for p in extensions.glob("*")) if extensions.exists() else []
    assert built == [], f"JIT-compiled at run time: {built}"
    return result
