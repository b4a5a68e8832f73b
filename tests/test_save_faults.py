"""A save that fails part-way (a full disk, injected as ENOSPC inside DeepSpeed's write) stops
the run with one clear error; the partial checkpoint is removed, the previous one stays complete,
undamaged and resumable by the same command."""

import subprocess

from conftest import ROOT

from pst_ds.train import checkpoint


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_resumable(tmp_path, small_text, python):
    root = tmp_path / "run" / "checkpoints"
    args = [
        "--ds_config", "configs/zero2.json", "--config", "configs/experiments/tiny_llama.yaml",
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=4", f"data.train_files=[{small_text}]",
        "data.block_size=32", "train.save_every=2",
    ]  # fmt: skip
    full = subprocess.run(
        [python, "tests/save_fault_probe.py", checkpoint.tag_for(4), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
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
