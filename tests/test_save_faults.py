"""A save that fails part-way (a full disk, injected as ENOSPC inside DeepSpeed's write) stops
the run with one clear error; the partial checkpoint is removed, the previous one stays complete,
undamaged and resumable by the same command."""

import os
import subprocess

import pytest
from conftest import ROOT
from helpers import launch_ranks
from test_distributed import write_ds_config

from pst_ds.train import checkpoint


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_resumable(tmp_path, small_text, python):
    root = tmp_path / "run" / "checkpoints"
    args = [
        "--ds_config", "configs/zero2.json", "--config", "configs/experiments/tiny_llama.yaml",
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=4", f"data.train_files=[{small_text}]",
        "data.block_size=32", "train.save_every=2",
    ]  # fmt: skip
    env = {**os.environ, "FULL_AT": checkpoint.tag_for(4)}
    full = subprocess.run(
        [python, "tests/save_fault_probe.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("pst-ds: error:")]
    assert len(errors) == 1
    assert f"cannot save checkpoint {root / checkpoint.tag_for(4)}" in errors[0]
    assert "No space left on device" in errors[0] and "MiB free there), so it was removed" in errors[0]
    assert f"the last complete checkpoint is {root / checkpoint.tag_for(2)}, intact" in errors[0]
    assert errors[0].endswith("then run the same command to resume from it")
    assert not (root / checkpoint.tag_for(4)).exists()
    assert checkpoint.latest_tag(root) == checkpoint.tag_for(2)
    assert checkpoint.damage(root, checkpoint.tag_for(2)) is None

    # Space again: the same command resumes from the previous checkpoint and finishes.
    rerun = subprocess.run(
        [python, "launch/train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {root / checkpoint.tag_for(2)}" in rerun.stdout
    assert checkpoint.latest_tag(root) == checkpoint.tag_for(4)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("after", [0, 1, 2], ids=["first-write", "second-write", "rng-write"])
def test_a_save_failing_on_one_rank_stops_both_ranks_with_one_error(tmp_path, small_text, after):
    """Rank 1's disk fills inside DeepSpeed's save (at its first write, or its second, or at our
    own RNG file after DeepSpeed's) while rank 0 completes its part: both ranks agree (no rank
    left waiting in a collective), exit 1, and step 2 stays the last checkpoint."""
    root = tmp_path / "run" / "checkpoints"
    command = [
        "tests/save_fault_probe.py",
        "--ds_config", str(write_ds_config(tmp_path / "ds.json", 3, bf16=False)),
        "--config", "configs/experiments/tiny_llama.yaml", f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=4", f"data.train_files=[{small_text}]", "data.block_size=32", "train.save_every=2",
        "train.micro_batch_size=2", "data.max_validation_blocks=4", "data.validation_fraction=0.05",
    ]  # fmt: skip
    env = {"FULL_AT": checkpoint.tag_for(4), "FULL_ON_RANK": "1", "FULL_AFTER": str(after)}
    result = launch_ranks(command, tmp_path, timeout=600, env=env, expect=1)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "pst-ds: error:" in line]
    assert (
        len(errors) == 1
        and f"cannot save checkpoint {root / checkpoint.tag_for(4)} (on rank 1: " in errors[0]
    )
    assert not (root / checkpoint.tag_for(4)).exists()
    assert checkpoint.latest_tag(root) == checkpoint.tag_for(2)
    assert checkpoint.damage(root, checkpoint.tag_for(2)) is None
