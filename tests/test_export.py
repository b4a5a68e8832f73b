"""Export from a 2-rank ZeRO-3 checkpoint; check the folder in a process that never imports pst_ds."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from helpers import launch_ranks
from reference_export import merge_layers
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_distributed import read_metrics, write_ds_config

from launch import export as export_cli
from pst_ds.experiment import load_experiment
from pst_ds.io import checkpoint_tensors
from pst_ds.io.data import load_text_blocks
from pst_ds.io.export import export_checkpoint
from pst_ds.io.models import load_tokenizer
from pst_ds.layers.inject import build_model
from pst_ds.masks.kinds import described_kind
from pst_ds.masks.select import num_pruned
from pst_ds.methods import method_class
from pst_ds.train.checkpoint import latest_tag

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

CLEAN_CHECK = r"""
import json, math, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
folder, blocks_file = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
blocks = torch.load(blocks_file)
with torch.no_grad():
    loss = sum(model(input_ids=blocks[i:i + 4], labels=blocks[i:i + 4]).loss.item() * len(blocks[i:i + 4])
               for i in range(0, len(blocks), 4)) / len(blocks)
tensors = load_file(f"{folder}/model.safetensors")
torch.save({k: v != 0 for k, v in tensors.items() if v.dim() == 2}, sys.argv[3])
print(json.dumps({"ppl": math.exp(loss), "pst_imported": "pst_ds" in sys.modules,
                  "keys": sorted(tensors),
                  "zeros": {k: int((v == 0).sum()) for k, v in tensors.items()},
                  "numel": {k: v.numel() for k, v in tensors.items()}}))
"""

OVERRIDES = [
    "train.max_steps=8",
    "train.micro_batch_size=2",
    "data.block_size=32",
    "data.max_validation_blocks=8",
    "data.validation_fraction=0.05",
    "pst.final_sparsity=0.7",
]


KINDS = {  # id: (overrides, the share pruned)
    "topk": ([], 0.7),
    "topk_row": (["pst.mask_scope=row", "pst.importance=activation"], 0.7),
    "threshold": (["pst.mask=threshold", "train.threshold_lr=0.2"], 0.7),
    "nm": (["pst.mask=nm", "pst.final_sparsity=0.5"], 0.5),
    "vnm": (["pst.mask=vnm", "pst.mask_v=8", "pst.mask_m=5", "pst.final_sparsity=0.6"], None),
}


def whole_model_export(config, run, out) -> None:
    """Export as it was done before it streamed: the whole model built and loaded from
    DeepSpeed's consolidated fp32 state dict, merged, saved by save_pretrained."""
    tokenizer = load_tokenizer(config.model)
    model, _ = build_model(method_class(config.method)(config), tokenizer, None)
    root = run / "checkpoints"
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=latest_tag(root)))
    with torch.no_grad():
        merge_layers(model)
    model.save_pretrained(out)


def assert_same_export(folder, reference) -> None:
    """The same weights (all shards together) and the same config files, tensor by tensor."""

    def weights(path):
        return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}

    streamed, expected = weights(folder), weights(reference)
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert streamed[name].dtype == tensor.dtype and torch.equal(streamed[name], tensor), name
    for name in ("config.json", "generation_config.json"):
        assert json.loads((folder / name).read_text()) == json.loads((reference / name).read_text()), name


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_from_two_rank_zero3(tmp_path, small_text, kind, monkeypatch, capsys):
    run = tmp_path / "run"
    kind_overrides, share = KINDS[kind]
    overrides = OVERRIDES + kind_overrides + [f"data.train_files=[{small_text}]"]
    ds_config = write_ds_config(tmp_path / "ds.json", 3, bf16=False)
    launch_ranks(
        [
            "launch/train.py",
            "--ds_config",
            str(ds_config),
            "--config",
            "configs/experiments/tiny_llama.yaml",
            f"train.output_dir={run}",
            "train.export=true",
            *overrides,
        ],
        tmp_path,
        timeout=600,
    )
    _, evals = read_metrics(run)
    framework_ppl = evals[-1]["eval_ppl"]

    # The CLI gives the same folder as the end-of-training export.
    cli = tmp_path / "cli_export"
    folders = [run / "export", cli]
    subprocess.run(
        [sys.executable, "launch/export.py", "--run", str(run), "--out", str(cli)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )

    config = load_experiment("configs/experiments/tiny_llama.yaml", overrides)
    if kind == "topk":  # streamed, in one shard or many: the files of today's whole-model export
        reference = tmp_path / "reference_export"
        whole_model_export(config, run, reference)
        assert_same_export(run / "export", reference)
        sharded = tmp_path / "sharded_export"
        export_checkpoint(run, sharded, max_shard_bytes=20_000)
        index = json.loads((sharded / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 5
        assert_same_export(sharded, reference)
        layer = "model.layers.1.mlp.down_proj"
        report_tool = [sys.executable, "tools/sparsity_report.py", str(sharded), "--layer", layer]
        subprocess.run(report_tool, cwd=ROOT, check=True, capture_output=True, timeout=300)
        assert "| **total** (14 matrices)" in (sharded / "sparsity_report.md").read_text()

        # A disk that fills under safetensors' own write: one error line, no shard left behind.
        def disk_full(*args, **kwargs):
            raise SafetensorError("No space left on device (os error 28)")

        monkeypatch.setattr(checkpoint_tensors, "save_file", disk_full)
        full = tmp_path / "full_disk_export"
        assert export_cli.main(["--run", str(run), "--out", str(full)]) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pst-ds: error:")]
        said = f"cannot write the pruned model to {full} (SafetensorError: No space"
        assert len(errors) == 1 and said in errors[0]
        assert not list(full.glob("*.safetensors")) and not list(full.glob("shard-*"))
        monkeypatch.undo()
    blocks = load_text_blocks(config.data, load_tokenizer(config.model)).validation
    blocks_file = tmp_path / "blocks.pt"
    torch.save(torch.stack([b["input_ids"] for b in blocks]), blocks_file)

    checks = []
    for folder in folders:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                CLEAN_CHECK,
                str(folder),
                str(blocks_file),
                str(tmp_path / f"{folder.name}_kept.pt"),
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        checks.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert checks[0] == checks[1]  # the end-of-training export and the CLI's, file for file
    check = checks[0]
    assert not check["pst_imported"]
    assert abs(check["ppl"] - framework_ppl) / framework_ppl < 1e-4

    report = json.loads((run / "export" / "pst_sparsity.json").read_text())
    assert len(report["layers"]) == 14 and report["mask"]["kind"] == kind.removesuffix("_row")
    kept = torch.load(tmp_path / "export_kept.pt")
    mask_kind = described_kind(report["mask"])
    total_zeros = total_numel = 0
    for name, layer in report["layers"].items():
        key = f"{name}.weight"
        rows, cols = layer["shape"]  # (out, in): Llama's layers are nn.Linear
        assert check["zeros"][key] == layer["zeros"] == layer["mask_pruned"], name  # the recorded mask
        # the kind's own pattern check, on the weights a process without pst_ds read back
        pruned = (
            mask_kind.pruned_count(rows, cols, share) if mask_kind.per_row else torch.tensor(layer["zeros"])
        )
        assert layer["pattern_verified"] and mask_kind.pattern_problem(kept[key], pruned) is None, name
        if kind == "topk_row":  # the same count in every row
            assert layer["zeros"] == rows * num_pruned(cols, share), name
        elif kind in ("topk", "nm"):
            assert layer["zeros"] == num_pruned(check["numel"][key], share), name
        total_zeros, total_numel = total_zeros + layer["zeros"], total_numel + check["numel"][key]
    if kind == "threshold":  # the global count is the schedule's; the split is learned
        assert total_zeros == num_pruned(total_numel, 0.7)
        shares = [layer["sparsity"] for layer in report["layers"].values()]
        assert max(shares) - min(shares) > 0.01
    if kind == "vnm":  # 2 of 5 kept in every row: 64 inputs = 12 groups + 4, 128 = 25 groups + 3
        assert all(
            layer["zeros"] == layer["shape"][0] * (layer["shape"][1] - (layer["shape"][1] // 5 * 2 + 2))
            for layer in report["layers"].values()
        )
    assert report["sparsity_in_force"] == pytest.approx(total_zeros / total_numel)
    # The report tool recounts the zeros from the weights, checks the pattern, draws the figure.
    shown = folders[-1]
    result = subprocess.run(
        [sys.executable, "tools/sparsity_report.py", str(shown), "--layer", "model.layers.1.mlp.down_proj"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = (shown / "sparsity_report.md").read_text()
    assert f"mask: kind={report['mask']['kind']}" in table
    pattern = "ok" if kind in ("nm", "vnm") else "-"
    for name, layer in report["layers"].items():
        shape = f"{layer['shape'][0]}×{layer['shape'][1]}"
        assert f"| {name} | {shape} | {layer['zeros']:,} | {layer['sparsity']:.4f} | {pattern} |" in table
    assert (shown / "sparsity_report.png").stat().st_size > 10_000
