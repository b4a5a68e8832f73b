"""method=masked_lora (a LoRA trained under a frozen one-shot mask) and pst.init=zeros (a model
that is already sparse): the layer against an independent reference, the mask that never moves,
the zeros that survive export, PST moving a read mask at the same count, and bad input."""

import json
import subprocess

import pytest
import torch
from conftest import ROOT
from helpers import half_kept, launch_ranks
from safetensors.torch import load_file, save_file
from test_cli_errors import one_error_line
from test_distributed import read_metrics, write_ds_config
from test_train_in_process import tiny_trainer
from torch import nn
from transformers import TrainerCallback
from transformers.pytorch_utils import Conv1D

from pst_ds.config import ConfigError, LoRAConfig, PSTConfig
from pst_ds.experiment import load_experiment
from pst_ds.layers.masked_lora import MaskedLoRALinear
from pst_ds.layers.pst import PSTLinear
from pst_ds.layers.step import StepRecord
from pst_ds.layers.update import lora_update
from pst_ds.train.distributed import leave_process_group

TINY = "configs/experiments/tiny_llama.yaml"


@pytest.mark.parametrize("held", ["evaluated", "bits", "zeros"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mask", ["topk", "nm"])
def test_the_layer_is_a_masked_merged_lora(base_kind, mask, compiled, held):
    """y, dx, dA and dB against plain autograd on M * (W + s B A), with M the top-k of |W|: selected
    afresh (no step record: evaluation), or in a training step from its held form, packed bits or
    (W pruned already, as SparseGPT's start leaves it) W's own zeros, where nothing is held."""
    torch.manual_seed(0)
    base = nn.Linear(24, 16) if base_kind == "linear" else Conv1D(16, 24)
    base.requires_grad_(False)
    if held == "zeros":  # the layer's own mask, written into W as zeros
        pruner = MaskedLoRALinear(base, PSTConfig(mask=mask, final_sparsity=0.5), LoRAConfig(rank=4))
        pruner.sparsity = 0.5
        base.weight.data.copy_(pruner.to_base_layout(pruner.oriented_weight() * pruner.mask()))
    config = PSTConfig(mask=mask, final_sparsity=0.5, compile=compiled)
    layer = MaskedLoRALinear(base, config, LoRAConfig(rank=4, alpha=8))
    layer.sparsity = 0.5
    if held != "evaluated":
        layer.board.publish(StepRecord(0))  # a training step: the frozen mask is held
    with torch.no_grad():
        layer.U.normal_()
    x = torch.randn(3, 5, 24, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)

    weight = (base.weight.t() if base_kind == "conv1d" else base.weight).float()
    if mask == "topk":  # an independent mask: the 50% largest |W| of the matrix
        keep = weight.abs() > weight.abs().reshape(-1).kthvalue(weight.numel() // 2).values
    else:  # 2 of every 4 consecutive inputs, by |W|
        groups = weight.abs().reshape(16, -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, -1).indices, True)
        keep = keep.reshape(16, 24)
    A, B = (p.detach().clone().requires_grad_() for p in (layer.V, layer.U))
    x_ref = x.detach().clone().requires_grad_()
    expected = torch.nn.functional.linear(x_ref, keep * (weight + 2.0 * B @ A), base.bias)
    expected.backward(grad)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.V.grad, A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.U.grad, B.grad, rtol=1e-4, atol=1e-5)
    assert base.weight.grad is None  # W frozen
    if held != "evaluated":
        form = layer.held_mask()
        assert form is None if held == "zeros" else form.dtype == torch.uint8 and form.shape == (16, 3)


@pytest.mark.parametrize("mask", ["topk", "nm"])
def test_pst_and_masked_lora_differ_only_in_whether_the_mask_learns(mask):
    """The same W, update and input through PST's layer and masked LoRA's: the same mask (W's own
    zeros, far below every kept |W'|), so the same y and dx; the update's gradients differ by the
    straight-through term through S = |W'| alone: dU - dU' = s (|W'| * G) V^T, dV - dV' = s U^T (|W'| * G)."""
    torch.manual_seed(0)
    out_f, in_f = 16, 24
    keep = half_kept(out_f, in_f, mask)
    base = nn.Linear(in_f, out_f).requires_grad_(False)
    base.weight.copy_(keep * torch.randn(out_f, in_f).sign() * (1 + torch.rand(out_f, in_f)))
    config = PSTConfig(mask=mask, final_sparsity=0.5, importance="magnitude", init="magnitude")
    lora = LoRAConfig(rank=4, alpha=8)
    pst, masked = PSTLinear(base, config, update=lora_update(lora)), MaskedLoRALinear(base, config, lora)
    with torch.no_grad():
        masked.U.copy_(0.05 * torch.randn_like(masked.U))
        masked.V.copy_(0.05 * torch.randn_like(masked.V))
        pst.U.copy_(masked.U), pst.V.copy_(masked.V)
    x, grad = torch.randn(3, 5, in_f), torch.randn(3, 5, out_f)
    results = []
    for layer in (pst, masked):
        layer.sparsity = 0.5
        x_in = x.clone().requires_grad_()
        y = layer(x_in)
        y.backward(grad)
        results.append((y.detach(), x_in.grad, layer.U.grad, layer.V.grad))
    torch.testing.assert_close(pst.mask(), keep)
    torch.testing.assert_close(masked.mask(), keep)
    (y_p, dx_p, dU_p, dV_p), (y_m, dx_m, dU_m, dV_m) = results
    torch.testing.assert_close(y_p, y_m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx_p, dx_m, rtol=1e-6, atol=1e-6)
    s, U, V = 2.0, masked.U.detach(), masked.V.detach()
    G = grad.reshape(-1, out_f).t() @ x.reshape(-1, in_f)
    through_scores = (base.weight + s * U @ V).abs() * G  # dS * sign(W') = G * W' * sign(W')
    torch.testing.assert_close(dU_p - dU_m, s * through_scores @ V.t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dV_p - dV_m, s * U.t() @ through_scores, rtol=1e-5, atol=1e-6)
    assert not hasattr(masked, "A") and {p for p in masked.parameters() if p.requires_grad} == {
        masked.U,
        masked.V,
    }


def run_tiny(tmp_path, overrides: list[str], small_text) -> tuple[dict, list[dict], dict]:
    """An in-process tiny run: (its summary, each step's masks, the export's report)."""
    trainer = tiny_trainer(
        [
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=4",
            f"data.train_files=[{small_text}]",
            "data.block_size=32",
            "train.lr=0.02",
            "train.export=true",
            "oneshot.calibration_blocks=4",
            "oneshot.block_columns=16",
            *overrides,
        ]
    )
    masks = []

    class Noted(TrainerCallback):  # after the sparsity callback: the masks each step's forward uses
        def on_step_begin(self, args, state, control, **kwargs):
            masks.append({name: layer.mask().clone() for name, layer in trainer.layers.items()})

        def on_train_end(self, args, state, control, **kwargs):  # and those the run ends with
            masks.append({name: layer.mask().clone() for name, layer in trainer.layers.items()})

    trainer.trainer.add_callback(Noted())
    try:
        summary = trainer.train()
    finally:
        leave_process_group()
    report = json.loads((tmp_path / "run" / "export" / "pst_sparsity.json").read_text())
    return summary, masks, report


def exported_zeros(folder) -> dict[str, torch.Tensor]:
    tensors = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    return {k.removesuffix(".weight"): v == 0 for k, v in tensors.items() if v.dim() == 2}


@pytest.mark.parametrize(
    "start", [["pst.init=sparsegpt", "pst.final_sparsity=0.7", "train.distill.weight=0.5"],
              ["pst.init=wanda", "pst.importance=activation", "pst.mask=nm", "pst.final_sparsity=0.5"]],
    ids=["sparsegpt_distilled", "wanda_2of4"],
)  # fmt: skip
def test_the_start_mask_never_moves_and_the_export_keeps_it(tmp_path, small_text, start):
    summary, masks, report = run_tiny(tmp_path, ["method=masked_lora", *start], small_text)
    assert len(masks) == 5  # the start's, then after each of the 4 steps
    for step_masks in masks[1:]:
        for name, mask in step_masks.items():
            assert torch.equal(mask, masks[0][name]), name
    assert summary["eval_ppl_after"] < summary["eval_after_warm_start"]["validation"]  # it trains
    zeros = exported_zeros(tmp_path / "run" / "export")
    for name, mask in masks[0].items():
        assert torch.equal(zeros[name], ~mask), name  # exactly the start's mask, nothing more
        assert report["layers"][name]["pattern_verified"]
    assert report["method"] == "masked_lora"


def with_zeros(tiny_model_dir, folder, zeroed):
    """A copy of tiny_llama's folder in ``folder`` whose targeted weights are ``zeroed(weight)``."""
    folder.mkdir()
    for path in tiny_model_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and ("proj" in name):
            tensors[name] = zeroed(tensor)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def magnitude_half(weight):
    cut = weight.abs().reshape(-1).kthvalue(weight.numel() // 2).values
    return torch.where(weight.abs() > cut, weight, 0.0)


def every_hundredth(weight):
    return weight.reshape(-1).index_fill(0, torch.arange(0, weight.numel(), 100), 0.0).reshape(weight.shape)


@pytest.fixture
def sparse_model_dir(tmp_path, tiny_model_dir):
    """tiny_llama's folder with half of every targeted weight zeroed by magnitude (a model pruned
    elsewhere), and a copy kept dense."""
    return with_zeros(tiny_model_dir, tmp_path / "sparse", magnitude_half)


def from_folder(folder) -> list[str]:
    return ["model.source=path", f"model.path={folder}", "model.random=null", "model.tokenizer=null"]


def test_masked_lora_from_a_sparse_model_keeps_every_zero(tmp_path, small_text, sparse_model_dir):
    summary, masks, report = run_tiny(
        tmp_path, ["method=masked_lora", "pst.init=zeros", *from_folder(sparse_model_dir)], small_text
    )
    given = exported_zeros(sparse_model_dir)
    exported = exported_zeros(tmp_path / "run" / "export")
    for name in masks[0]:
        assert torch.equal(exported[name], given[name]), name  # the same zeros, no others
        for step_masks in masks:
            assert torch.equal(step_masks[name], ~given[name]), name
    assert summary["final_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert summary["eval_ppl_after"] < summary["eval_ppl_before"]  # before: the sparse model as given


def test_pst_from_a_sparse_model_moves_the_mask_at_its_count(tmp_path, small_text, sparse_model_dir):
    _, masks, report = run_tiny(
        tmp_path,
        ["method=pst", "pst.init=zeros", "train.lr=0.05", *from_folder(sparse_model_dir)],
        small_text,
    )
    given = exported_zeros(sparse_model_dir)
    for name in masks[0]:
        assert torch.equal(masks[0][name], ~given[name]), name  # the first step's mask: its zeros
        assert int((~masks[-1][name]).sum()) == int(given[name].sum()) == report["layers"][name]["zeros"]
    moved = sum(int((masks[-1][n] != masks[0][n]).sum()) for n in masks[0])
    assert moved > 0  # PST learns the mask on from there


@pytest.mark.slow
def test_a_dense_model_is_refused_as_a_zeros_start(tmp_path, python, tiny_model_dir):
    """Found once the model is built, inside the process group: one line, exit 2, nothing written."""
    out = tmp_path / "out"
    result = subprocess.run(
        [python, "launch/train.py", "--config", TINY, f"train.output_dir={out}", "method=masked_lora",
         "pst.init=zeros", *from_folder(tiny_model_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "the model is not sparse" in one_error_line(result.stderr)
    assert "Traceback" not in result.stderr and not out.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=masked_lora", "pst.init=wanda", "pst.importance=activation", "pst.init_schedule=ramp"],
         "freezes the start's mask"),
        (["method=pst", "pst.init=zeros", "pst.mask=threshold"], "pst.init=zeros holds each layer's own"),
        (["method=movement", "pst.init=zeros"], "pst.init=zeros warm-starts"),
    ],
)  # fmt: skip
def test_settings_a_frozen_or_read_mask_cannot_take(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(TINY, overrides)


def launch_two_zero3_ranks(tmp_path, run, overrides: list[str]) -> None:
    ds_config = write_ds_config(tmp_path / "ds.json", 3, bf16=False)
    launch_ranks(
        ["launch/train.py", "--ds_config", str(ds_config), "--config", TINY, f"train.output_dir={run}",
         "train.export=true",
         "train.max_steps=4", "train.micro_batch_size=2", "data.block_size=32",
         "data.max_validation_blocks=4", "oneshot.calibration_blocks=4", "oneshot.block_columns=16",
         *overrides],
        tmp_path, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.distributed
def test_masked_lora_then_zeros_starts_on_two_zero3_ranks(tmp_path, small_text):
    """Masked LoRA from Wanda's 2:4 mask under ZeRO-3 (the backbone sharded): the mask never moves
    (mask_changed 0 at every step) and the export passes the 2:4 check. Its export is then a sparse
    model: masked LoRA from its zeros keeps every one of them with checkpoints that hold only the
    adapters, and PST from them ends at the same count with its pattern checked."""
    text = f"data.train_files=[{small_text}]"
    first = tmp_path / "masked"
    launch_two_zero3_ranks(
        tmp_path, first, [text, "method=masked_lora", "pst.init=wanda", "pst.importance=activation",
                          "pst.mask=nm", "pst.final_sparsity=0.5"],
    )  # fmt: skip
    steps, _ = read_metrics(first)
    changed = [r["mask_changed"] for r in steps if "mask_changed" in r]
    assert len(changed) == 3 and changed == [0.0, 0.0, 0.0]  # noted from the second logged step on
    report = json.loads((first / "export" / "pst_sparsity.json").read_text())
    given = exported_zeros(first / "export")
    for name, layer in report["layers"].items():
        assert layer["pattern_verified"] and layer["sparsity"] == 0.5, name

    sparse = [
        "model.source=path",
        f"model.path={first / 'export'}",
        "model.random=null",
        "model.tokenizer=null",
    ]
    second = tmp_path / "from_zeros"
    launch_two_zero3_ranks(tmp_path, second, [text, "method=masked_lora", "pst.init=zeros", *sparse])
    kept = exported_zeros(second / "export")
    for name in given:
        assert torch.equal(kept[name], given[name]), name  # every zero kept, no new one
    manifest = json.loads(next((second / "checkpoints").glob("*/COMPLETE")).read_text())
    assert manifest["base"] is not None  # read back from the model's folder: only the adapters saved

    third = tmp_path / "pst_from_zeros"
    launch_two_zero3_ranks(tmp_path, third, [text, "method=pst", "pst.init=zeros", "pst.mask=nm",
                                             "pst.final_sparsity=0.5", *sparse])  # fmt: skip
    report = json.loads((third / "export" / "pst_sparsity.json").read_text())
    for name, layer in report["layers"].items():
        assert layer["pattern_verified"] and layer["zeros"] == int(given[name].sum()), name


def test_the_frozen_mask_is_selected_once_and_again_only_for_a_new_state():
    """Training steps (each with the controller's unchanged count put in force again) read the one
    selection; a new count, or input norms written by a warm start, select again."""
    torch.manual_seed(0)
    config = PSTConfig(final_sparsity=0.5, init="wanda", importance="activation")
    layer = MaskedLoRALinear(nn.Linear(32, 16).requires_grad_(False), config, LoRAConfig(rank=4))
    calls, select = [0], layer.mask_kind.select

    def counting(*args, **kwargs):
        calls[0] += 1
        return select(*args, **kwargs)

    layer.mask_kind.select = counting
    layer.train()
    x = torch.randn(4, 32)
    for step in range(3):
        layer.put_in_force(layer.mask_kind.pruned_count(16, 32, 0.5))
        layer.board.publish(StepRecord(step))
        layer(x).sum().backward()
    assert calls[0] == 1
    first = layer.mask()
    layer.input_sq.copy_(torch.rand(32) * 2)  # a warm start's input norms
    layer(x).sum().backward()
    assert calls[0] == 3  # the new selection, and mask() above
    assert not torch.equal(layer.mask(), first)
    layer.put_in_force(layer.mask_kind.pruned_count(16, 32, 0.25))
    layer(x).sum().backward()
    assert calls[0] == 5 and layer.sparsity == pytest.approx(0.25)
    with torch.no_grad():  # an evaluation selects afresh, whatever is held
        layer(x)
    assert calls[0] == 6


def test_a_zeros_start_far_from_the_configured_sparsity_is_refused(tmp_path, small_text, tiny_model_dir):
    """A dense model with a few exact zeros (a quantized one's) would train at ~0% while
    pst.final_sparsity says 0.5: one line naming the model's own sparsity."""
    folder = with_zeros(tiny_model_dir, tmp_path / "few_zeros", every_hundredth)  # 1% of each matrix
    said = r"own zeros, 1\.\d\d% of its targeted weights, but pst.final_sparsity=0.5: "
    said += r"set pst.final_sparsity=0\.01"
    with pytest.raises(ConfigError, match=said):
        run_tiny(tmp_path, ["method=masked_lora", "pst.init=zeros", *from_folder(folder)], small_text)
    assert not (tmp_path / "run").exists()  # refused before anything was written
