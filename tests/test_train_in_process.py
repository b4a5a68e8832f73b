"""A whole small run in this process (one rank, ZeRO-2): setup, steps, checkpoint, export, and the
exported folder read back with plain transformers. The fast tier's end-to-end check; the
launcher, ZeRO-3 and several ranks are in the slow tier (test_distributed.py, test_export.py)."""

import json

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from pst_ds.config import load_experiment
from pst_ds.masks.select import num_pruned
from pst_ds.train.trainer import Trainer, load_ds_config

STEPS = 4


@pytest.fixture
def finished_run(tmp_path, small_text):
    overrides = [
        f"train.output_dir={tmp_path / 'run'}",
        f"train.max_steps={STEPS}",
        f"data.train_files=[{small_text}]",
        "data.block_size=32",
        "train.lr=0.02",
        "train.save_every=2",
        "train.export=true",
        "pst.compile=false",  # the compiled kernels have their own reference tests
    ]
    trainer = Trainer(
        load_experiment("configs/experiments/tiny_llama.yaml", overrides),
        load_ds_config("configs/zero2.json"),
    )
    trainer.setup()
    try:
        yield trainer, trainer.train(), tmp_path / "run"
    finally:
        dist.destroy_process_group()


def test_a_run_trains_checkpoints_and_exports_a_plain_model(finished_run):
    trainer, summary, run = finished_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert steps[-1]["sparsity"] == pytest.approx(0.5) and summary["final_sparsity"] == pytest.approx(0.5)
    assert summary["eval_ppl_after"] < summary["eval_ppl_before"]  # it learned while pruning
    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step00000002", "step00000004"]  # every save_every steps, the last one too

    report = json.loads((run / "export" / "pst_sparsity.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(run / "export", dtype=torch.float32)
    assert len(report["layers"]) == len(trainer.pst_layers) == 14
    for name, layer in report["layers"].items():
        weight = model.get_submodule(name).weight
        assert int((weight == 0).sum()) == layer["zeros"] == num_pruned(weight.numel(), 0.5), name
