"""Checkpoints: atomic `latest`, exact resume after a killed rank, refusal of a changed config."""

import json
import subprocess
import time

import psutil
import pytest
from conftest import ROOT
from helpers import deepspeed_command, ds_env
from test_distributed import read_metrics, write_ds_config

from pst_ds.train import checkpoint


def make_tag(root, step, complete=True):
    tag = root / checkpoint.tag_for(step)
    tag.mkdir(parents=True)
    (tag / "model_states.pt").write_bytes(b"x")
    if complete:
        (tag / checkpoint.COMPLETE).write_text(json.dumps({"step": step}))
    return tag.name


def test_latest_names_only_complete_checkpoints(tmp_path):
    assert checkpoint.latest_tag(tmp_path) is None
    make_tag(tmp_path, 4)
    (tmp_path / "latest").write_text(checkpoint.tag_for(4))
    make_tag(tmp_path, 8, complete=False)  # a save that died part-way
    assert checkpoint.latest_tag(tmp_path) == checkpoint.tag_for(4)
    (tmp_path / "latest").write_text(checkpoint.tag_for(8))  # even if pointed at, it is not used
    assert checkpoint.latest_tag(tmp_path) is None


def test_prune_keeps_the_newest_complete_ones(tmp_path):
    for step in (2, 4, 6):
        make_tag(tmp_path, step)
    make_tag(tmp_path, 5, complete=False)  # left over by a crash
    checkpoint._prune(tmp_path, keep=2, newest=checkpoint.tag_for(6))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [checkpoint.tag_for(4), checkpoint.tag_for(6)]


def test_config_differences_are_named():
    saved = {"experiment": {"pst": {"final_sparsity": 0.5, "beta": 1.0}}, "world_size": 2}
    now = {"experiment": {"pst": {"final_sparsity": 0.6, "beta": 1.0}}, "world_size": 2}
    assert checkpoint.config_differences(saved, now) == [
        "experiment.pst.final_sparsity: checkpoint 0.5, now 0.6"
    ]


def train_cmd(tmp_path, out, text):
    ds_config = write_ds_config(tmp_path / "ds.json", 3, bf16=False)
    return deepspeed_command(
        [
            "launch/train.py",
            "--ds_config",
            str(ds_config),
            "--config",
            "configs/experiments/tiny_gpt2.yaml",
            f"train.output_dir={out}",
            f"data.train_files=[{text}]",
            "train.max_steps=16",
            "train.save_every=2",
            "train.micro_batch_size=2",
            "data.block_size=32",
            "data.max_validation_blocks=4",
            "data.validation_fraction=0.05",
        ]
    )


def losses_by_step(run):
    steps, _ = read_metrics(run)
    return {r["step"]: r["loss"] for r in steps}  # the last record of a step wins


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_rank_then_rerun_resumes_with_identical_losses(tmp_path, small_text):
    # The reference: uninterrupted. GPT-2 has dropout, so the RNG state must be restored too.
    reference = tmp_path / "reference"
    subprocess.run(
        train_cmd(tmp_path, reference, small_text),
        cwd=ROOT,
        env=ds_env(),
        check=True,
        capture_output=True,
        timeout=600,
    )
    expected = losses_by_step(reference)
    assert sorted(expected) == list(range(1, 17))

    # Kill rank 1 as soon as a first checkpoint is complete.
    run = tmp_path / "run"
    cmd = train_cmd(tmp_path, run, small_text)
    launcher = subprocess.Popen(
        cmd, cwd=ROOT, env=ds_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 300
    while checkpoint.latest_tag(run / "checkpoints") is None and time.time() < deadline:
        assert launcher.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    victims = [
        p for p in psutil.Process(launcher.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()
    ]
    assert victims, "rank 1 not found"
    victims[0].kill()
    output = launcher.communicate(timeout=300)[0]
    assert launcher.returncode != 0
    assert "exits with return code = -9" in output  # the launcher names the killed rank
    resumed_from = checkpoint.read_manifest(run / "checkpoints", checkpoint.latest_tag(run / "checkpoints"))[
        "step"
    ]
    assert resumed_from < 16
    make_tag(run / "checkpoints", 15, complete=False)  # and a save interrupted part-way

    rerun = subprocess.run(cmd, cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout + rerun.stderr
    got = losses_by_step(run)
    assert sorted(got) == list(range(1, 17))
    for step in range(1, 17):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step

    # Resuming with another config is refused, naming what differs.
    changed = subprocess.run(
        cmd + ["pst.final_sparsity=0.6"], cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=600
    )
    assert changed.returncode != 0
    assert "experiment.pst.final_sparsity: checkpoint 0.5, now 0.6" in changed.stderr + changed.stdout


@pytest.mark.slow
@pytest.mark.e2e
def test_damaged_checkpoint_is_detected_and_the_previous_one_used(tmp_path, small_text, python):
    run = tmp_path / "run"
    root = run / "checkpoints"
    cmd = [
        python, "launch/train.py", "--config", "configs/experiments/tiny_gpt2.yaml",
        f"train.output_dir={run}", f"data.train_files=[{small_text}]", "train.max_steps=6",
        "train.save_every=2", "data.block_size=32", "data.max_validation_blocks=4",
        "data.validation_fraction=0.05",
    ]  # fmt: skip

    def train() -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)

    assert train().returncode == 0
    expected = losses_by_step(run)
    newest, older = checkpoint.complete_tags(root)
    assert (newest, older) == (checkpoint.tag_for(6), checkpoint.tag_for(4))
    recorded = checkpoint.read_manifest(root, newest)["files"]
    on_disk = {p.name for p in (root / newest).iterdir()} - {checkpoint.COMPLETE}
    assert set(recorded) == on_disk and all(len(f["sha256"]) == 64 for f in recorded.values())
    assert checkpoint.damage(root, newest) is None

    # One flipped byte in the middle of the largest file: same size, other contents.
    victim = max((root / newest / name for name in recorded), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    problem = f"{victim} differs from the checksum recorded when it was saved"
    assert checkpoint.damage(root, newest) == problem

    export = subprocess.run(
        [python, "launch/export.py", "--run", str(run), "--tag", newest],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert export.returncode == 2 and f"is damaged: {problem}" in export.stderr

    rerun = train()
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert f"pst-ds: warning: checkpoint {root / newest} is damaged: {problem}" in output
    assert f"resumed from {root / older}" in output
    got = losses_by_step(run)
    for step in (5, 6):  # retrained from step 4: the same losses as the first time
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    assert checkpoint.damage(root, newest) is None  # saved again, whole

    # Every checkpoint truncated: refused before anything is written, naming the file.
    for tag in checkpoint.complete_tags(root):
        largest = max((root / tag).iterdir(), key=lambda p: p.stat().st_size)
        largest.write_bytes(largest.read_bytes()[:100])
    broken = train()
    assert broken.returncode == 2, broken.stderr[-3000:]
    errors = [line for line in broken.stderr.splitlines() if line.startswith("pst-ds: error:")]
    assert len(errors) == 1 and f"every checkpoint under {root} is damaged" in errors[0]
    assert "has 100 bytes" in errors[0] and "train.resume=never" in errors[0]
