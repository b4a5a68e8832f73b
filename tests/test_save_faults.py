"""A save that fails part-way (a full disk, injected as OSError inside DeepSpeed's write) stops
the run with one clear error; the partial checkpoint is removed, the previous one stays complete,
undamaged and resumable."""

import errno
import os
import subprocess

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT

from pst_ds.config import load_experiment
from pst_ds.io.models import LAUNCHER_VARIABLES
from pst_ds.train import checkpoint
from pst_ds.train.trainer import Trainer, TrainingError, load_ds_config

TINY = "configs/experiments/tiny_llama.yaml"


def overrides(tmp_path, small_text) -> list[str]:
    return [
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=4", f"data.train_files=[{small_text}]",
        "data.block_size=32", "train.save_every=2", "pst.compile=false",
    ]  # fmt: skip


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_resumable(
    tmp_path, small_text, monkeypatch, python
):
    root = tmp_path / "run" / "checkpoints"
    real_save = torch.save

    def disk_fills_at_step_4(obj, path, *args, **kwargs):
        if checkpoint.tag_for(4) in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_at_step_4)
    trainer = Trainer(
        load_experiment(TINY, overrides(tmp_path, small_text)), load_ds_config("configs/zero2.json")
    )
    trainer.setup()
    try:
        with pytest.raises(TrainingError) as failed:
            trainer.train()
    finally:
        dist.destroy_process_group()
    message = str(failed.value)
    assert f"cannot save checkpoint {root / checkpoint.tag_for(4)}" in message
    assert "No space left on device" in message and "MiB free there), so it was removed" in message
    assert f"the last complete checkpoint is {root / checkpoint.tag_for(2)}, intact" in message
    assert "run the same command to resume from it" in message
    assert not (root / checkpoint.tag_for(4)).exists()
    assert (
        checkpoint.latest_tag(root) == checkpoint.tag_for(2)
        and checkpoint.damage(root, checkpoint.tag_for(2)) is None
    )

    # Space again: the same command resumes from the previous checkpoint and finishes.
    command = [
        python,
        "launch/train.py",
        "--ds_config",
        "configs/zero2.json",
        "--config",
        TINY,
        *overrides(tmp_path, small_text),
    ]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}  # set by this process's run
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {root / checkpoint.tag_for(2)}" in rerun.stdout
    assert checkpoint.latest_tag(root) == checkpoint.tag_for(4)
