"""Run ``launch/train.py`` once through the deepspeed launcher and read its summary (for the tools)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_port() -> int:
    """A port for a launcher's rendezvous, free now and outside the kernel's ephemeral range.

    A port the kernel hands out (bind to 0) may be handed out again, as the source port of
    another job's gloo connection, before the launched rank 0 binds it (EADDRINUSE, seen in CI).
    Ports outside that range are only ever taken by an explicit bind; each xdist worker draws
    from its own residue class so two workers never pick the same one. A machine whose ephemeral
    range covers them all gets the kernel's choice."""
    ephemeral = _ephemeral_ports()
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    workers = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), 1)
    candidates = [p for p in range(20000 + worker, 65536, workers) if p not in ephemeral]
    random.shuffle(candidates)
    for port in [*candidates, 0]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port")


def deepspeed_command(script_args: list[str], ranks: int = 2) -> list[str]:
    """``deepspeed --num_gpus RANKS --master_port FREE script args...``."""
    return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), *script_args]


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
    command = deepspeed_command([str(ROOT / "launch/train.py"), *arguments], num_gpus)
    print(f"{Path(sys.argv[0]).stem}:", " ".join(command), file=sys.stderr, flush=True)
    with log.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(overrides)}: training failed with exit code {code}; see {log}")
    return json.loads((run_dir / "summary.json").read_text()), arguments
