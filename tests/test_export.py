"""Export from a 2-rank ZeRO-3 checkpoint; check the folder in a process that never imports pst_ds."""

import json
import subprocess
import sys

import torch
from conftest import ROOT
from test_distributed import DEEPSPEED, ds_env, free_port, read_metrics, write_ds_config

from pst_ds.config import load_experiment
from pst_ds.data import load_text_blocks
from pst_ds.masks import num_pruned
from pst_ds.models import load_tokenizer

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


def test_export_from_two_rank_zero3(tmp_path, small_text):
    run = tmp_path / "run"
    overrides = OVERRIDES + [f"data.train_files=[{small_text}]"]
    ds_config = write_ds_config(tmp_path / "ds.json", 3, bf16=False)
    result = subprocess.run(
        [
            DEEPSPEED,
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "launch/train.py",
            "--ds_config",
            str(ds_config),
            "--config",
            "configs/experiments/tiny_llama.yaml",
            f"train.output_dir={run}",
            "train.export=true",
            *overrides,
        ],
        cwd=ROOT,
        env=ds_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _, evals = read_metrics(run)
    framework_ppl = evals[-1]["eval_ppl"]

    # The CLI gives the same folder as the end-of-training export.
    cli = tmp_path / "cli_export"
    subprocess.run(
        [sys.executable, "launch/export.py", "--run", str(run), "--out", str(cli)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )

    config = load_experiment("configs/experiments/tiny_llama.yaml", overrides)
    blocks = load_text_blocks(config.data, load_tokenizer(config.model)).validation
    blocks_file = tmp_path / "blocks.pt"
    torch.save(torch.stack([b["input_ids"] for b in blocks]), blocks_file)

    checks = []
    for folder in (run / "export", cli):
        out = subprocess.run(
            [sys.executable, "-c", CLEAN_CHECK, str(folder), str(blocks_file)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        checks.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert checks[0] == checks[1]
    check = checks[0]
    assert not check["pst_imported"]
    assert abs(check["ppl"] - framework_ppl) / framework_ppl < 1e-4

    report = json.loads((run / "export" / "pst_sparsity.json").read_text())
    assert len(report["layers"]) == 14 and report["scheduled_sparsity"] == 0.7
    for name, layer in report["layers"].items():
        key = f"{name}.weight"
        assert check["zeros"][key] == layer["zeros"] == num_pruned(check["numel"][key], 0.7), name
    # Plain names only: no factor survives, and nothing but the model's own tensors is there.
    assert not [k for k in check["keys"] if k.rsplit(".", 1)[-1] in ("U", "V", "A", "B", "R", "C")]
    assert all(k.endswith((".weight", ".bias")) for k in check["keys"])

    # The report tool recounts the zeros from the weights and draws the figure.
    result = subprocess.run(
        [sys.executable, "tools/sparsity_report.py", str(cli), "--layer", "model.layers.1.mlp.down_proj"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = (cli / "sparsity_report.md").read_text()
    for name, layer in report["layers"].items():
        assert f"| {name} | {layer['shape'][0]}×{layer['shape'][1]} | {layer['zeros']:,} |" in table
    assert (cli / "sparsity_report.png").stat().st_size > 10_000
