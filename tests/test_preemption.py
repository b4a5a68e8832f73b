"""Preemption: a signal finishes the step, checkpoints every rank and exits 75; a second one
exits at once; the same command resumes with the losses of a run never interrupted."""

import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import ROOT
from test_checkpoint import losses_by_step
from test_distributed import DEEPSPEED, ds_env, free_port, write_ds_config

from pst_ds.train import checkpoint
from pst_ds.train.preemption import PREEMPTED_EXIT

NOTICE = """
import os, signal, sys, time
from pst_ds.train.preemption import PreemptionNotice
notice = PreemptionNotice()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
print("noted:", notice.received, flush=True)
if sys.argv[1] == "twice":
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    print("still running", flush=True)
"""


@pytest.mark.parametrize("times", ["once", "twice"])
def test_the_first_signal_is_noted_and_a_second_one_exits_at_once(times):
    result = subprocess.run(
        [sys.executable, "-c", NOTICE, times], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert "pst-ds: SIGTERM received: finishing this optimizer step" in result.stdout
    assert "noted: SIGTERM" in result.stdout
    if times == "once":
        assert result.returncode == 0
    else:
        assert result.returncode == -signal.SIGTERM and "still running" not in result.stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_a_signal_on_one_rank_checkpoints_all_and_the_rerun_resumes_exactly(
    tmp_path, tiny_model_dir, small_text
):
    ds_config = write_ds_config(tmp_path / "ds.json", 3, bf16=False)

    def command(out):
        return [
            DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
            "--ds_config", str(ds_config), "--config", "configs/experiments/tiny_llama.yaml",
            "model.source=path", f"model.path={tiny_model_dir}", f"train.output_dir={out}",
            f"data.train_files=[{small_text}]", "train.max_steps=40", "train.micro_batch_size=2",
            "data.block_size=32", "data.max_validation_blocks=4", "data.validation_fraction=0.05",
        ]  # fmt: skip

    reference = tmp_path / "reference"
    done = subprocess.run(
        command(reference), cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected = losses_by_step(reference)

    # SIGUSR1 (SLURM's warning) to rank 1 alone, a few steps in.
    run = tmp_path / "run"
    cmd = command(run)
    launcher = subprocess.Popen(
        cmd, cwd=ROOT, env=ds_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        assert launcher.poll() is None, "the run ended before the signal"
        if (run / "metrics.jsonl").is_file() and len(losses_by_step(run)) >= 3:
            break
        time.sleep(0.05)
    rank1 = [
        p for p in psutil.Process(launcher.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()
    ]
    rank1[0].send_signal(signal.SIGUSR1)
    output = launcher.communicate(timeout=300)[0]
    assert launcher.returncode == PREEMPTED_EXIT, output[-3000:]
    assert "pst-ds: SIGUSR1 received" in output
    tag = checkpoint.latest_tag(run / "checkpoints")
    step = checkpoint.read_manifest(run / "checkpoints", tag)["step"]
    assert 3 <= step < 40
    assert (
        f"pst-ds: stopped on a signal on another rank after step {step}, saved in {run / 'checkpoints' / tag}"
        in output
    )
    assert sorted({p.name for p in (run / "checkpoints" / tag).glob("rng_rank*.pt")}) == [
        "rng_rank0.pt",
        "rng_rank1.pt",
    ]
    assert checkpoint.read_manifest(run / "checkpoints", tag)["base"] is not None  # without the backbone

    rerun = subprocess.run(cmd, cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / tag}" in rerun.stdout + rerun.stderr
    got = losses_by_step(run)
    assert sorted(got) == list(range(1, 41))
    for k in range(1, 41):
        assert got[k] == pytest.approx(expected[k], rel=1e-6, abs=1e-7), k
