"""Run ``launch/train.py`` once through the deepspeed launcher and read its summary (for the tools)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_once(
    num_gpus: int, ds_config: str, config: str, run_dir: Path, overrides: list[str], log: Path
) -> tuple[dict, list[str]]:
    """Train a fresh run into ``run_dir`` (output in ``log``); return its summary.json and the
    experiment arguments used. Exits with a message naming the log if the run fails."""
    arguments = [
        "--ds_config", ds_config, "--config", config,
        f"train.output_dir={run_dir}", "train.resume=never", "train.save_every=0",
        "train.export=false",  # the tools read summary.json; a checkpoint and export per run is waste
        *overrides,
    ]  # fmt: skip
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    with socket.socket() as probe:  # a free port: other jobs on this machine may hold the default
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        launcher, "--num_gpus", str(num_gpus), "--master_port", str(port),
        str(ROOT / "launch/train.py"), *arguments,
    ]  # fmt: skip
    print(f"{Path(sys.argv[0]).stem}:", " ".join(command), file=sys.stderr, flush=True)
    with log.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(overrides)}: training failed with exit code {code}; see {log}")
    return json.loads((run_dir / "summary.json").read_text()), arguments
