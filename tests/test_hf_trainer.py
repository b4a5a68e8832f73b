"""A plain HF Trainer with pst-ds's callback and optimizer (what a user's script or TRL passes)
against launch/train.py's run (PSTTrainer): 2 CPU ranks under ZeRO-3 through the deepspeed
launcher, the same settings (seed, LR schedule, data), the same loss (per token).

Both loops draw the same permutation of the training blocks from the seed and the epoch, but
deal it out differently: pst-ds's rank r takes every world-th block, the Trainer (accelerate)
every world-th micro-batch. With one block per micro-batch the two coincide, so each rank sees
the same block at every step in both loops; with more, the same blocks meet in another order
and sums round differently (docs/reference.md#hf-trainer)."""

import json
from pathlib import Path

import pytest
import torch
from helpers import DEEPSPEED, free_port, launch_ranks, run_launcher
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

STEPS = 10
SETTINGS = [f"train.max_steps={STEPS}", "train.micro_batch_size=1"]
# One start, the one with the most parts: Wanda's warm start from calibration, activation
# importance, then the schedule held (the cubic ramp from dense is the in-process tests' default).
START = ["pst.init=wanda", "pst.importance=activation"]


ACCELERATE = str(Path(DEEPSPEED).with_name("accelerate"))
LAUNCHERS = {
    "deepspeed": [DEEPSPEED, "--num_gpus", "2", "--master_port"],
    "accelerate": [ACCELERATE, "launch", "--use_deepspeed", "--zero_stage", "3", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--main_process_port"],
}  # fmt: skip


def probe(tmp_path, path: str, extra: list[str], launcher: str = "deepspeed") -> list[dict]:
    command = [
        *LAUNCHERS[launcher], str(free_port()), "tests/hf_trainer_probe.py",
        "--path", path, "--ds_config", "configs/zero3.json",
        "--config", "configs/experiments/tiny_llama.yaml", "--out", str(tmp_path), *SETTINGS, *extra,
    ]  # fmt: skip
    run_launcher(command, tmp_path / f"{path}_extensions")
    return torch.load(tmp_path / f"{path}.pt")


def assert_same_run(own: list[dict], hf: list[dict]) -> None:
    """The same masks at every step, and losses within 1e-5."""
    assert len(own) == len(hf) == STEPS
    for step, (a, b) in enumerate(zip(own, hf, strict=True), 1):
        assert a["masks"].keys() == b["masks"].keys() and len(a["masks"]) == 14
        for name in a["masks"]:
            assert torch.equal(a["masks"][name], b["masks"][name]), f"step {step}: {name}"
        assert abs(a["loss"] - b["loss"]) < 1e-5, (step, a["loss"], b["loss"])


def tensors(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
@pytest.mark.distributed
def test_the_trainer_path_equals_pst_ds_own_loop(tmp_path):
    own = probe(tmp_path, "own", [*START, "train.export=true"])
    hf = probe(tmp_path, "hf", START)
    assert_same_run(own, hf)
    kept = [sum(int(m.sum()) for m in step["masks"].values()) for step in own]
    numel = sum(m.numel() for m in own[0]["masks"].values())
    assert kept[-1] == numel // 2  # 50% in force at the end
    assert own[-1]["loss"] < own[0]["loss"]

    # save_pruned from the live model and from the Trainer's checkpoint folder both write what
    # launch/train.py's export writes, tensor by tensor; and it loads with plain transformers.
    reference = tensors(tmp_path / "own" / "export")
    for folder in ("pruned", "pruned_from_checkpoint"):
        written = tensors(tmp_path / folder)
        assert written.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(written[name], tensor), f"{folder}: {name}"
        report = json.loads((tmp_path / folder / "pst_sparsity.json").read_text())
        assert report["total"]["zeros"] == numel // 2 and len(report["layers"]) == 14
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    for name, layer in report["layers"].items():
        assert int((model.get_submodule(name).weight == 0).sum()) == layer["zeros"]
    # The same Trainer run, started by accelerate's launcher.
    assert_same_run(own, probe(tmp_path / "accelerate", "hf", START, "accelerate"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.e2e
def test_the_example_script_prunes_the_embedded_model(tmp_path):
    """examples/hf_trainer.py as the README runs it: its defaults are the embedded model, Austen
    and configs/zero3.json; it ends with a plain HF folder whose zeros are the recorded counts."""
    out = tmp_path / "run"
    command = ["examples/hf_trainer.py", "--output_dir", str(out), "--max_steps", "2"]
    result = launch_ranks(command, tmp_path, timeout=1200)
    assert "wanda: block 30/30 pruned" in result.stdout  # the default config's warm start ran
    report = json.loads((out / "pruned" / "pst_sparsity.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out / "pruned")
    assert len(report["layers"]) == 210 and report["total"]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    for name, layer in report["layers"].items():
        weight = model.get_submodule(name).weight
        assert int((weight == 0).sum()) == layer["zeros"] == weight.numel() // 2, name
