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
    hashed = []
    first = base_model.fingerprint(folder, hashed.append)
    assert len(hashed) == 1 and set(first) == {"model.safetensors", "config.json"}
    assert first["model.safetensors"]["bytes"] == 7000
    assert base_model.fingerprint(folder, hashed.append) == first and len(hashed) == 1  # cached
    assert base_model.fingerprint_change(first, folder) is None

    (folder / "model.safetensors").write_bytes(b"Weights" * 1000)  # same size, other bytes
    assert base_model.fingerprint_change(first, folder) == (
        f"{folder / 'model.safetensors'} is not the file it was (size or sha256)"
    )
    (folder / "model.safetensors").unlink()
    assert base_model.fingerprint_change(first, folder) == f"{folder / 'model.safetensors'} is missing"


@pytest.mark.parametrize(
    ("method", "init", "changes"),
    [
        ("pst", "magnitude", False),
        ("pst", "wanda", False),
        ("pst", "sparsegpt", True),  # the warm start writes new weights into W
        ("lora", "magnitude", False),
        ("wanda", "magnitude", False),
        ("sparsegpt", "magnitude", True),
        ("dense", "magnitude", True),
        ("magnitude", "magnitude", True),
        ("movement", "magnitude", True),
    ],
)
def test_methods_that_change_the_backbone_keep_saving_it(method, init, changes):
    importance = {"importance": "activation"} if init == "wanda" else {}  # as pst.init=wanda asks
    config = experiment_config(method=method, pst=PSTConfig.release(init=init, **importance))
    assert method_class(method)(config).changes_backbone() is changes


def tensors(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


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
    reference, written = tensors(whole / "export"), tensors(lean / "export")
    assert written.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(written[name], tensor), name

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
