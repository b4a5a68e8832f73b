"""A whole small run in this process (one rank, ZeRO-2): setup, steps, checkpoint, export, and the
exported folder read back with plain transformers. The fast tier's end-to-end check; the
launcher, ZeRO-3 and several ranks are in the slow tier (test_distributed.py, test_export.py)."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import ROOT
from transformers import AutoModelForCausalLM

from pst_ds.experiment import load_experiment
from pst_ds.integrations.run import Run, build_run
from pst_ds.io.models import LAUNCHER_VARIABLES
from pst_ds.masks.select import num_pruned
from pst_ds.train import checkpoint
from pst_ds.train.distributed import leave_process_group
from pst_ds.train.engine import load_ds_config

STEPS = 4


def tiny_trainer(overrides: list[str]) -> Run:
    """An in-process run of tiny_llama under ZeRO-2 with ``overrides``, built."""
    config = load_experiment("configs/experiments/tiny_llama.yaml", overrides)
    return build_run(config, load_ds_config("configs/zero2.json"))


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
    trainer = tiny_trainer(overrides)
    try:
        yield trainer, trainer.train(), tmp_path / "run"
    finally:
        leave_process_group()


def test_a_run_trains_checkpoints_and_exports_a_plain_model(finished_run):
    trainer, summary, run = finished_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert steps[-1]["sparsity"] == pytest.approx(0.5) and summary["final_sparsity"] == pytest.approx(0.5)
    assert summary["eval_ppl_after"] < summary["eval_ppl_before"]  # it learned while pruning
    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step00000002", "step00000004"]  # every save_every steps, the last one too
    state = json.loads((run / "checkpoints" / "step00000004" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS  # the Trainer's state, its stateful callbacks as at the save:
    assert state["stateful_callbacks"]["TrainerControl"]["args"]["should_save"] is True

    report = json.loads((run / "export" / "pst_sparsity.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(run / "export", dtype=torch.float32)
    assert len(report["layers"]) == len(trainer.layers) == 14
    for name, layer in report["layers"].items():
        weight = model.get_submodule(name).weight
        assert int((weight == 0).sum()) == layer["zeros"] == num_pruned(weight.numel(), 0.5), name


def test_a_run_without_saves_or_export_still_ends_with_its_checkpoint(tmp_path, small_text):
    overrides = [
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", f"data.train_files=[{small_text}]",
        "data.block_size=32", "train.save_every=0", "train.export=false", "pst.compile=false",
    ]  # fmt: skip
    trainer = tiny_trainer(overrides)
    try:
        trainer.train()
    finally:
        leave_process_group()
    root = tmp_path / "run" / "checkpoints"
    assert checkpoint.complete_tags(root) == ["step00000002"]  # what it trained, to export or resume
    assert not (tmp_path / "run" / "export").exists()


def test_owl_profile_and_a_ramped_warm_start_run_resume_and_export(tmp_path, small_text, python):
    """pst.init=wanda found at initial_sparsity then ramped (init_schedule=ramp) under an OWL
    profile: every block ends at its own sparsity, the profile is in the checkpoint, and a run
    resumed from it puts the same per-layer state in force."""
    overrides = [
        f"train.output_dir={tmp_path / 'run'}",
        f"train.max_steps={STEPS}",
        f"data.train_files=[{small_text}]",
        "data.block_size=32",
        "train.save_every=2",
        "train.keep_last=2",
        "train.export=false",
        "pst.compile=false",
        "pst.importance=activation",
        "pst.init=wanda",
        "pst.init_schedule=ramp",
        "pst.initial_sparsity=0.3",
        "pst.final_sparsity=0.6",
        "pst.initial_warmup=0.25",
        "pst.final_warmup=0.25",
        "pst.sparsity_profile=owl",
        "pst.owl_m=3",
        "oneshot.calibration_blocks=4",
    ]
    trainer = tiny_trainer(overrides)
    try:
        summary = trainer.train()
        profile = trainer.controller.profile
        ended = trainer.controller.layer_sparsities()
    finally:
        leave_process_group()
    assert len({round(s, 6) for s in profile.values()}) > 1  # blocks differ
    for name, sparsity in ended.items():
        layer = trainer.layers[name]
        assert sparsity == pytest.approx(profile[name], abs=1 / layer.in_features)
    assert summary["eval_after_warm_start"] is not None  # the warm start ran, at initial sparsity
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "loss" in r)
    assert first["sparsity"] == pytest.approx(0.3, abs=0.02)  # the ramp starts at the one-shot's
    manifest = json.loads(next((tmp_path / "run" / "checkpoints").glob("*/COMPLETE")).read_text())
    assert manifest["sparsity_profile"] == profile

    # Resumed in a process of its own from step 2: the profile comes back from the checkpoint,
    # so the exported per-layer sparsities are those the uninterrupted run ended with.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step00000004")
    resumed = subprocess.run(
        [python, "launch/train.py", "--ds_config", "configs/zero2.json",
         "--config", "configs/experiments/tiny_llama.yaml", *overrides, "train.export=true"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES},  # this process's rendezvous
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    report = json.loads((tmp_path / "run" / "export" / "pst_sparsity.json").read_text())["layers"]
    for name, sparsity in ended.items():
        assert report[name]["sparsity"] == pytest.approx(sparsity, abs=1e-9), name


def test_distillation_after_a_sparsegpt_start_is_taught_by_the_original_weights(tmp_path, small_text):
    """pst.init=sparsegpt rewrites W; with train.distill each layer keeps the original W for the
    teacher's pass, so the teacher is the dense model as loaded, and the export leaves it out."""
    from pst_ds.io.models import load_model, load_tokenizer
    from pst_ds.layers.base import dense_forward

    overrides = [
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=2",
        f"data.train_files=[{small_text}]",
        "data.block_size=32",
        "train.export=true",
        "pst.compile=false",
        "pst.init=sparsegpt",
        "pst.final_sparsity=0.5",
        "oneshot.calibration_blocks=4",
        "oneshot.block_columns=16",
        "train.distill.weight=0.5",
    ]
    trainer = tiny_trainer(overrides)
    config = trainer.config
    try:
        trainer.train()
        torch.manual_seed(config.train.seed)  # the same random init the run loaded
        original = load_model(config.model, load_tokenizer(config.model)).eval()
        ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(5))
        model = trainer.engine.module.eval()
        with torch.no_grad(), dense_forward():
            taught = model(input_ids=ids).logits
        with torch.no_grad():
            expected = original(input_ids=ids).logits
        torch.testing.assert_close(taught, expected, rtol=1e-5, atol=1e-5)  # the dense model as loaded
        layer = trainer.layers["model.layers.0.mlp.up_proj"]
        plain = original.get_submodule("model.layers.0.mlp.up_proj").weight
        assert torch.equal(layer.dense_teacher.weight, plain)
        assert not torch.equal(layer.weight, plain) and int((layer.weight == 0).sum()) > 0  # rewritten
    finally:
        leave_process_group()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export")
    assert not any("dense_teacher" in name for name in exported.state_dict())
