"""PST on a pretrained encoder for sequence classification (the paper's NLU setting)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT
from helpers import ds_env

from pst_ds.experiment import load_experiment
from pst_ds.io.data import load_classification
from pst_ds.io.models import load_tokenizer

CONFIG = "configs/experiments/minilm_rotten_tomatoes.yaml"


def test_split_is_reproducible_and_disjoint():
    config = load_experiment(CONFIG)
    tokenizer = load_tokenizer(config.model)
    first, second = (load_classification(config.data, tokenizer) for _ in range(2))
    assert first.labels == ["fresh", "rotten"]
    for name in ("train", "validation", "test"):
        assert getattr(first, name)[:]["input_ids"].tolist() == getattr(second, name)[:]["input_ids"].tolist()
    train = {tuple(x) for x in first.train[:]["input_ids"].tolist()}
    test = {tuple(x) for x in first.test[:]["input_ids"].tolist()}
    assert len(train & test) < 0.02 * len(test)  # only duplicate snippets in the CSV itself


@pytest.mark.slow
@pytest.mark.e2e
def test_short_run_learns_above_the_majority_class(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "launch/train.py",
        "--ds_config",
        "configs/zero2.json",
        "--config",
        CONFIG,
        f"train.output_dir={out}",
        "train.max_steps=60",
        "train.micro_batch_size=32",
        "data.max_train_examples=2000",
        "data.max_validation_blocks=200",
        "train.log_every=5",
        "train.export=true",
    ]
    result = subprocess.run(
        cmd, cwd=ROOT, env={**ds_env(), "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_accuracy" in r]
    config = load_experiment(CONFIG, ["data.max_validation_blocks=200"])
    labels = load_classification(config.data, load_tokenizer(config.model)).validation[:]["labels"]
    majority = max(labels.float().mean().item(), 1 - labels.float().mean().item())
    assert evals[-1]["sparsity"] == 0.5
    assert evals[-1]["eval_accuracy"] > majority + 0.05, (evals, majority)
    # The head was trained and exported; the export evaluates to the same accuracy.
    evaluated = subprocess.run(
        [
            sys.executable,
            "launch/evaluate.py",
            "--model",
            str(out / "export"),
            "--config",
            CONFIG,
            "data.max_validation_blocks=200",
            "--out",
            str(tmp_path / "eval.json"),
        ],
        cwd=ROOT,
        env=ds_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert (
        abs(json.loads((tmp_path / "eval.json").read_text())["accuracy"] - evals[-1]["eval_accuracy"])
        <= 1 / 200
    )
