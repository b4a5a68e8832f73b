"""A run holds its lock and its signal handlers to the last byte: through the export and
summary.json, and on an error path; then the handlers that were there before are back."""

import json
import os
import signal

import pytest
from helpers import tiny_run

from pst_ds.callbacks import export as export_callback
from pst_ds.callbacks.run_lock import LOCK_FILE, RunLock
from pst_ds.config import ConfigError
from pst_ds.train.distributed import leave_process_group
from pst_ds.train.run_checkpoints import TrainingError

STEPS = ["train.max_steps=2", "train.export=true"]


def users_handler(signum, frame):  # what a user's script had installed before the run
    raise AssertionError("the run's own handler should have taken this signal")


@pytest.fixture
def users_sigterm():
    before = signal.signal(signal.SIGTERM, users_handler)
    yield
    signal.signal(signal.SIGTERM, before)


def trained(run) -> dict | None:
    try:
        return run.train()
    finally:
        leave_process_group()


def test_the_lock_and_the_handlers_hold_through_the_export_and_a_signal_there_stops_as_preempted(
    tmp_path, small_text, monkeypatch, users_sigterm
):
    folder, seen = tmp_path / "run", {}
    export = export_callback.export_checkpoint

    def exporting(run_dir, out_dir):  # mid-export: a second command into the folder, then a notice
        with pytest.raises(ConfigError) as refused:
            RunLock(run_dir).acquire(print)
        seen["refused"] = str(refused.value)
        os.kill(os.getpid(), signal.SIGTERM)  # recorded by the run's handler, not fatal
        return export(run_dir, out_dir)

    monkeypatch.setattr(export_callback, "export_checkpoint", exporting)
    run = tiny_run(folder, small_text, STEPS)
    summary = trained(run)
    assert "is in use by the run of pid" in seen["refused"] and "\n" not in seen["refused"]
    assert (folder / "export" / "pst_sparsity.json").is_file()  # the export finished all the same
    assert json.loads((folder / "summary.json").read_text())["steps"] == 2 == summary["steps"]
    assert (run.preemption.stopped, run.preemption.stopped_at) == ("SIGTERM", 2)  # exits 75
    assert signal.getsignal(signal.SIGTERM) is users_handler  # restored, not SIG_DFL
    assert not (folder / LOCK_FILE).exists()

    monkeypatch.undo()  # the same command again: ends without a notice, the export complete
    again = tiny_run(folder, small_text, STEPS)
    given = again.trainer.args
    assert trained(again)["steps"] == 2 and again.preemption.stopped is None
    assert given.max_steps == 2  # a finished run resumed leaves the caller's arguments as given
    assert json.loads((folder / "export" / "pst_sparsity.json").read_text())["layers"]
    assert signal.getsignal(signal.SIGTERM) is users_handler


def test_an_error_at_the_end_still_releases_the_lock_and_restores_the_handlers(
    tmp_path, small_text, monkeypatch, users_sigterm
):
    def full_disk(run_dir, out_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_callback, "export_checkpoint", full_disk)
    run = tiny_run(tmp_path / "run", small_text, STEPS)
    with pytest.raises(TrainingError, match="cannot write the pruned model"):
        trained(run)
    assert signal.getsignal(signal.SIGTERM) is users_handler
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    RunLock(tmp_path / "run").acquire(print)  # free for the next command
