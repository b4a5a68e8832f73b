"""RunLogger: metrics.jsonl records, replaced by a fresh run and continued by a resumed one."""

import json

from pst_ds.callbacks.records import RunLogger


def records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_fresh_run_replaces_and_resumed_run_appends(tmp_path):
    first = RunLogger(tmp_path, total_steps=2, enabled=True)
    first.log_step(1, loss=2.0, lr=0.1, sparsity=0.0, tokens_per_s=10.0)
    first.log_eval(1, loss=1.0, sparsity=0.0, accuracy=0.75)
    first.close()
    assert records(tmp_path) == [
        {"step": 1, "loss": 2.0, "lr": 0.1, "sparsity": 0.0, "tokens_per_s": 10.0},
        {"step": 1, "eval_loss": 1.0, "eval_ppl": 2.718281828459045, "sparsity": 0.0, "eval_accuracy": 0.75},
    ]
    resumed = RunLogger(tmp_path, total_steps=2, enabled=True, resumed=True)
    resumed.log_step(2, loss=1.5, lr=0.1, sparsity=0.5, tokens_per_s=10.0, mask_changed=0.25)
    resumed.close()
    assert [r["step"] for r in records(tmp_path)] == [1, 1, 2]
    assert records(tmp_path)[-1]["mask_changed"] == 0.25
    fresh = RunLogger(tmp_path, total_steps=2, enabled=True)
    fresh.close()
    assert records(tmp_path) == []
    assert (tmp_path / "tensorboard").is_dir()


def test_other_ranks_write_nothing(tmp_path):
    logger = RunLogger(tmp_path / "out", total_steps=1, enabled=False)
    logger.log_step(1, loss=1.0, lr=0.1, sparsity=0.0, tokens_per_s=1.0)
    logger.close()
    assert not (tmp_path / "out").exists()
