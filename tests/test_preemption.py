"""Preemption: a scheduler's notice finishes the step, checkpoints every rank and exits 75; the
same command resumes with the losses of a run never interrupted. The notice comes either way a
cluster ends a job: a signal to the whole process group, or the end of the deepspeed command."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import ROOT
from helpers import deepspeed_command, ds_env
from test_checkpoint import losses_by_step
from test_distributed import write_ds_config

from pst_ds.callbacks.preemption import SIGNALS, PreemptionNotice
from pst_ds.train import checkpoint

RANK = """
import os, signal, sys, time
from pst_ds.callbacks.preemption import PreemptionNotice
notice = PreemptionNotice()
print("watching" if notice._watched else "not watching", flush=True)
deadline = time.time() + 30
while not notice.pending() and time.time() < deadline:
    time.sleep(0.05)
print("noted:", notice.received, flush=True)
"""


def keep(signum, frame):  # what the process had installed before the notice
    raise AssertionError("the notice's handler should have taken this signal")


@pytest.mark.parametrize("signals", [["SIGTERM"], ["SIGTERM", "SIGTERM"], ["SIGUSR1", "SIGTERM"]])
def test_the_first_signal_is_the_notice_and_a_relayed_one_changes_nothing(signals, capsys):
    before = {signum: signal.signal(signum, keep) for signum in SIGNALS}
    try:
        notice = PreemptionNotice()  # in this process: no DeepSpeed launcher above it
        assert notice._watched is None
        for name in signals:  # a launcher relays the group's signal: twice
            os.kill(os.getpid(), getattr(signal, name))
        assert notice.pending() and notice.pending()  # asked after every step
        assert notice.received == signals[0]
        said = capsys.readouterr().out + capsys.readouterr().err
        assert said.count("pst-ds:") == 1  # said once, outside the handler
        assert f"pst-ds: {signals[0]}: finishing this step, then saving a checkpoint" in said
        notice.uninstall()
        assert all(signal.getsignal(signum) is keep for signum in SIGNALS)  # the handlers before
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


# A stand-in for DeepSpeed's per-node launcher (its module name in the command line): starts the
# rank and outlives its own parent, as the real one does when the deepspeed runner dies.
LAUNCHER = """
import subprocess, sys
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
sys.exit(rank.wait())
"""
RUNNER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], "deepspeed.launcher.launch"])
time.sleep(600)
"""


@pytest.mark.slow  # three processes: the runner, the launcher, the rank
def test_a_rank_notices_when_the_deepspeed_command_that_started_its_launcher_ends():
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, LAUNCHER, RANK],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = iter(runner.stdout.readline, "")
    assert next(line for line in lines if "watching" in line).strip() == "watching"
    runner.terminate()  # the runner alone, as `timeout` or a container runtime ends it
    output = runner.communicate(timeout=60)[0]  # the pipe closes when the rank has ended too
    assert f"noted: the end of the deepspeed command (its runner, pid {runner.pid}, is gone)" in output


@pytest.mark.slow
@pytest.mark.distributed
def test_a_group_signal_and_the_end_of_the_deepspeed_command_both_checkpoint_and_resume_exactly(
    tmp_path, tiny_model_dir, small_text
):
    """PST stopped by a group signal, masked LoRA (under Wanda's frozen mask) by the end of the
    command: each resumes to the 30 losses of its own unbroken run, on 2 ZeRO-3 ranks."""
    ds_config = write_ds_config(tmp_path / "ds.json", 3, bf16=False)
    methods = {
        "group": ["method=pst"],
        "command": ["method=masked_lora", "pst.init=wanda", "pst.importance=activation"],
    }

    def command(out, method):
        return deepspeed_command([
            "launch/train.py",
            "--ds_config", str(ds_config), "--config", "configs/experiments/tiny_llama.yaml",
            "model.source=path", f"model.path={tiny_model_dir}", f"train.output_dir={out}",
            f"data.train_files=[{small_text}]", "train.max_steps=30", "train.micro_batch_size=2",
            "data.block_size=32", "data.max_validation_blocks=4", "data.validation_fraction=0.05",
            "oneshot.calibration_blocks=4", *method,
        ])  # fmt: skip

    for way, method in methods.items():
        reference = tmp_path / f"reference_{way}"
        done = subprocess.run(
            command(reference, method), cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        expected = losses_by_step(reference)

        run = tmp_path / way
        cmd = command(run, method)
        runner = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=ds_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, as a job's
        )
        deadline = time.time() + 300
        while time.time() < deadline:
            assert runner.poll() is None, "the run ended before the signal"
            if (run / "metrics.jsonl").is_file() and len(losses_by_step(run)) >= 3:
                break
            time.sleep(0.05)
        ranks = [
            p
            for p in psutil.Process(runner.pid).children(recursive=True)
            if "--local_rank" in str(p.cmdline())
        ]
        if way == "group":  # SLURM's scancel, tini -g: every process, the launcher relays it again
            os.killpg(runner.pid, signal.SIGTERM)
        else:  # `timeout`, a container runtime: the deepspeed command alone
            runner.send_signal(signal.SIGTERM)
        output = runner.communicate(timeout=300)[0]  # at EOF: every process that shares the pipe ended
        assert runner.returncode == -signal.SIGTERM  # DeepSpeed's runner dies of it either way
        assert [p.is_running() for p in ranks] == [False, False]
        tag = checkpoint.latest_tag(run / "checkpoints")
        assert tag is not None, output[-3000:]
        step = checkpoint.read_manifest(run / "checkpoints", tag)["step"]
        assert 3 <= step < 30
        assert f"after step {step}, saved in {run / 'checkpoints' / tag}: run the same command" in output
        notice = "pst-ds: SIGTERM:" if way == "group" else "pst-ds: the end of the deepspeed command"
        assert notice in output
        if way == "command":  # the per-node launcher outlived the runner and reports the ranks' status
            assert "exits with return code = 75" in output, output[-3000:]

        rerun = subprocess.run(cmd, cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert f"resumed from {run / 'checkpoints' / tag}" in rerun.stdout + rerun.stderr
        got = losses_by_step(run)
        assert json.loads((run / "summary.json").read_text())["method"] == method[0].removeprefix("method=")
        assert sorted(got) == list(range(1, 31))
        for k in range(1, 31):
            assert got[k] == pytest.approx(expected[k], rel=1e-6, abs=1e-7), (way, k)
