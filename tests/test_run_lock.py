"""One run per output folder: a live run's folder is refused naming its host and pid; a lock
left by a run that died is taken over with a warning."""

import json
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from pst_ds.callbacks.run_lock import LOCK_FILE, RunLock
from pst_ds.config import ConfigError

HOLD = """
import sys, time
from pathlib import Path
from pst_ds.callbacks.run_lock import RunLock
lock = RunLock(Path(sys.argv[1]))  # held while referenced
lock.acquire(print)
print("held", flush=True)
time.sleep(120)
"""


def test_a_held_lock_refuses_and_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        while (line := holder.stdout.readline()) and line.strip() != "held":  # past import noise
            pass
        assert line.strip() == "held"
        with pytest.raises(ConfigError) as refused:
            RunLock(tmp_path).acquire(print)
        assert f"is in use by the run of pid {holder.pid} on {socket.gethostname()}" in str(refused.value)
    finally:
        holder.kill()
        holder.wait()
    warnings = []
    lock = RunLock(tmp_path)
    lock.acquire(warnings.append)  # its process is gone: the kernel dropped its lock
    assert len(warnings) == 1 and f"left by the run of pid {holder.pid}" in warnings[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] != holder.pid
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock(tmp_path).acquire(warnings.append)  # released cleanly: nothing to warn about
    assert len(warnings) == 1


@pytest.mark.slow
@pytest.mark.e2e
def test_a_second_run_into_a_live_runs_folder_is_refused_before_it_loads(tmp_path, small_text, python):
    command = [
        python, "launch/train.py", "--config", "configs/experiments/tiny_llama.yaml",
        f"train.output_dir={tmp_path / 'run'}", f"data.train_files=[{small_text}]", "data.block_size=32",
        "train.max_steps=100000",
    ]  # fmt: skip
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "run" / "metrics.jsonl").is_file():  # past the lock: training
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.startswith("pst-ds: error:")]
    assert (
        len(errors) == 1 and f"is in use by the run of pid {first.pid} on {socket.gethostname()}" in errors[0]
    )
    assert "Traceback" not in second.stderr
    assert "memory model" not in second.stdout + second.stderr  # refused before the model was read


def test_a_refused_run_leaves_no_folder_it_created(tmp_path):
    lock = RunLock(tmp_path / "new" / "run")
    lock.acquire(print)
    assert (tmp_path / "new" / "run" / LOCK_FILE).is_file()
    lock.release()
    assert not (tmp_path / "new" / "run").exists()
    kept = RunLock(tmp_path)  # a folder that was there before stays
    kept.acquire(print)
    kept.release()
    assert tmp_path.is_dir() and not (tmp_path / LOCK_FILE).exists()
