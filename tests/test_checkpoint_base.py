"""Checkpoints that leave the frozen backbone out: the base model's fingerprint, which methods
must keep saving it, and a run whose export equals the self-contained checkpoint's, tensor by
tensor, and which refuses a base model that changed after it was saved."""

import os
import shutil
import subprocess

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from pst_ds.config import PSTConfig
from pst_ds.experiment import experiment_config
from pst_ds.io import base_model
from pst_ds.methods import method_class
from pst_ds.train import checkpoint


def test_a_fingerprint_is_hashed_once_and_notices_a_change(tmp_path, monkeypatch):
    monkeypatch.setenv("PST_DS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights" * 1000)
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("a model card")
    (folder / "tokenizer.json").write_text("{}")
    hashed = []
    first = base_model.fingerprint(folder, hashed.append)
    assert len(hashed) == 1 and set(first) == {"model.safetensors", "config.json"}
    assert first["model.safetensors"]["bytes"] == 7000
    assert base_model.fingerprint(folder, hashed.append) == first and len(hashed) == 1  # cached
    assert base_model.fingerprint_change(first, folder) is None
    (folder / "README.md").write_text("a model card, edited")  # not what a checkpoint builds on
    (folder / "tokenizer.json").write_text('{"edited": true}')
    assert base_model.fingerprint_change(first, folder) is None

    (folder / "model.safetensors").write_bytes(b"Weights" * 1000)  # same size, other bytes
    assert base_model.fingerprint_change(first, folder) == (
        f"{folder / 'model.safetensors'} is not the file it was (size or sha256)"
    )
    (folder / "model.safetensors").unlink()
    assert base_model.fingerprint_change(first, folder) == f"{folder / 'model.safetensors'} is missing"


@pytest.mark.parametrize(
    ("method", "init", "changes", "rewrites_at_start"),
    [
        ("pst", "magnitude", False, False),
        ("pst", "wanda", False, False),
        ("pst", "sparsegpt", False, True),  # the warm start writes new weights into W, once
        ("masked_lora", "sparsegpt", False, True),
        ("lora", "magnitude", False, False),
        ("wanda", "magnitude", False, False),
        ("sparsegpt", "magnitude", False, True),
        ("dense", "magnitude", True, False),  # training writes W
        ("magnitude", "magnitude", True, False),
        ("movement", "magnitude", True, False),
    ],
)
def test_methods_that_train_the_backbone_keep_saving_it(method, init, changes, rewrites_at_start):
    importance = {"importance": "activation"} if init == "wanda" else {}  # as pst.init=wanda asks
    config = experiment_config(method=method, pst=PSTConfig.release(init=init, **importance))
    assert (not method_class(method).frozen_backbone) is changes
    assert method_class(method)(config).writes_start_folder() is rewrites_at_start


def tensors(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_same_tensors(written, reference):
    assert written.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(written[name], tensor), name


@pytest.mark.slow
@pytest.mark.e2e
def test_a_checkpoint_without_the_backbone_exports_the_same_model(
    tmp_path, tiny_model_dir, small_text, python
):
    base = tmp_path / "base"  # a copy: changed in place below
    shutil.copytree(tiny_model_dir, base)
    env = {**os.environ, "PST_DS_CACHE": str(tmp_path / "cache")}

    def run(command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [python, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )

    def train(out, *extra) -> subprocess.CompletedProcess:
        return run([
            "launch/train.py", "--config", "configs/experiments/tiny_llama.yaml", "model.source=path",
            f"model.path={base}", f"train.output_dir={out}", f"data.train_files=[{small_text}]",
            "data.block_size=32", "train.max_steps=3", "train.save_every=3", "train.export=true",
            "pst.init=wanda", "pst.importance=activation", *extra,
        ])  # fmt: skip

    lean, whole = tmp_path / "lean", tmp_path / "whole"
    for out, extra in ((lean, []), (whole, ["train.save_frozen=true"])):
        result = train(out, *extra)
        assert result.returncode == 0, result.stderr[-3000:]

    # The lean checkpoint records its base and holds none of the frozen weights.
    tag = checkpoint.tag_for(3)
    recorded = checkpoint.read_manifest(lean / "checkpoints", tag)["base"]
    assert recorded["files"]["model.safetensors"]["sha256"] == base_model.file_sha256(
        base / "model.safetensors"
    )
    assert checkpoint.read_manifest(whole / "checkpoints", tag)["base"] is None
    states = torch.load(next((lean / "checkpoints" / tag).glob("*model_states.pt")), weights_only=False)
    assert not states.get("frozen_param_fragments")
    lean_bytes = sum(f.stat().st_size for f in (lean / "checkpoints" / tag).iterdir())
    whole_bytes = sum(f.stat().st_size for f in (whole / "checkpoints" / tag).iterdir())
    assert whole_bytes - lean_bytes > 0.9 * (base / "model.safetensors").stat().st_size

    # Export reads the frozen weights back from the folder: the same model, tensor by tensor.
    reference = tensors(whole / "export")
    assert_same_tensors(tensors(lean / "export"), reference)

    # The base model changed since (same size, one bit): export and resume refuse it, in one line.
    weights = bytearray((base / "model.safetensors").read_bytes())
    weights[-8] ^= 1
    (base / "model.safetensors").write_bytes(bytes(weights))
    problem = f"the base model it builds on has changed: {base / 'model.safetensors'} is not the file it was"
    for result, what in (
        (run(["launch/export.py", "--run", str(lean), "--out", str(tmp_path / "again")]), "export"),
        (train(lean), "resume"),
    ):
        errors = [line for line in result.stderr.splitlines() if line.startswith("pst-ds: error:")]
        assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
        assert f"cannot {what} {lean / 'checkpoints' / tag}: {problem}" in errors[0]
        assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_a_rewriting_start_is_written_once_and_resume_and_export_equal_a_whole_checkpoint(
    tmp_path, tiny_model_dir, small_text
):
    """SparseGPT's start at 70% with distillation, 2 ZeRO-3 ranks: the checkpoints leave out the
    rewritten backbone and the teacher's copy, the start folder holds the backbone once, and a
    run resumed from them trains and exports exactly as one whose checkpoints hold everything."""
    from helpers import launch_ranks
    from test_distributed import read_metrics, write_ds_config

    ds_config = write_ds_config(tmp_path / "ds.json", 3, bf16=False)

    def train(out, *extra) -> subprocess.CompletedProcess:
        command = [
            "launch/train.py",
            "--ds_config", str(ds_config), "--config", "configs/experiments/tiny_llama.yaml",
            "model.source=path", f"model.path={tiny_model_dir}", f"train.output_dir={out}",
            f"data.train_files=[{small_text}]", "data.block_size=32", "train.micro_batch_size=2",
            "data.max_validation_blocks=8", "train.max_steps=4", "train.save_every=2", "train.log_every=1",
            "pst.init=sparsegpt", "pst.final_sparsity=0.7", "train.distill.weight=0.5",
            "oneshot.calibration_blocks=6", "oneshot.block_columns=16", "train.export=true", *extra,
        ]  # fmt: skip
        return launch_ranks(command, tmp_path, env={"PST_DS_CACHE": str(tmp_path / "cache")})

    lean, whole = tmp_path / "lean", tmp_path / "whole"
    train(whole, "train.save_frozen=true")
    train(lean)
    tag = checkpoint.tag_for(4)
    base = checkpoint.read_manifest(lean / "checkpoints", tag)["base"]
    start = lean / base["start"]["folder"]
    assert base_model.fingerprint_change(base["start"]["files"], start) is None
    model_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    assert sum(f.stat().st_size for f in start.iterdir()) <= model_bytes
    for step in (2, 4):
        folder = lean / "checkpoints" / checkpoint.tag_for(step)
        states = torch.load(next(folder.glob("*model_states.pt")), weights_only=False)
        assert not states.get("frozen_param_fragments")  # neither the backbone nor the teacher's copy
    lean_bytes = sum(f.stat().st_size for f in (lean / "checkpoints" / tag).iterdir())
    whole_bytes = sum(f.stat().st_size for f in (whole / "checkpoints" / tag).iterdir())
    assert whole_bytes - lean_bytes > 1.5 * model_bytes  # the backbone and the teacher, each sharded

    # Resume from step 2: the rewritten backbone comes back from the start folder, the teacher from
    # the base model; the losses and the exported model are those of the whole checkpoints' run.
    shutil.rmtree(lean / "checkpoints" / tag)
    shutil.rmtree(lean / "export")
    (lean / "checkpoints" / "latest").write_text(checkpoint.tag_for(2))
    train(lean)
    expected = {r["step"]: r["loss"] for r in read_metrics(whole)[0]}
    resumed = {r["step"]: r["loss"] for r in read_metrics(lean)[0][-2:]}
    assert sorted(resumed) == [3, 4]
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], rel=1e-6), step
    reference = tensors(whole / "export")
    assert_same_tensors(tensors(lean / "export"), reference)

    # The whole run resumed lean (train.save_frozen may change on resume): the rewritten backbone
    # its checkpoint held is written once as its start folder, and its next checkpoint is lean.
    shutil.rmtree(whole / "checkpoints" / tag)
    shutil.rmtree(whole / "export")
    (whole / "checkpoints" / "latest").write_text(checkpoint.tag_for(2))
    train(whole)
    assert checkpoint.read_manifest(whole / "checkpoints", tag)["base"]["start"]["folder"] == "start"
    assert (whole / "start").is_dir()
    assert_same_tensors(tensors(whole / "export"), reference)
