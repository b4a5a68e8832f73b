"""Bad input to launch/train.py: one clear error line, a non-zero exit, no output written."""

import json
import subprocess

import pytest
from conftest import ROOT

TINY = "configs/experiments/tiny_llama.yaml"


def write(path, text):
    path.write_text(text)
    return str(path)


CASES = {
    "unknown key": ([], ["train.max_stepz=3"], "unknown config key train.max_stepz"),
    "mistyped value": ([], ["train.micro_batch_size=two"], "train.micro_batch_size must be int"),
    "sparsity out of range": ([], ["pst.final_sparsity=1.2"], "pst.final_sparsity must be in [0, 1)"),
    "pattern matches nothing": ([], ["pst.target_modules=[qq_proj]"], "'qq_proj' matches no module"),
    "missing data file": ([], ["data.train_files=[no/such.txt]"], "data file not found: no/such.txt"),
    "missing ds config": (["--ds_config", "configs/nope.json"], [], "DeepSpeed config not found"),
    "fp16 on cpu": (["--ds_config", "configs/zero3_fp16.json"], [], "fp16 needs a GPU"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_cleanly(tmp_path, python, case):
    args, overrides, message = CASES[case]
    out = tmp_path / "out"
    cmd = [python, "launch/train.py", "--config", TINY, *args, f"train.output_dir={out}", *overrides]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("pst-ds: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not out.exists()


def test_unknown_key_in_yaml_file(tmp_path, python):
    config = write(tmp_path / "exp.yaml", "train:\n  max_steps: 2\n  learning_rate: 0.1\n")
    result = subprocess.run(
        [python, "launch/train.py", "--config", config], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert "unknown config key train.learning_rate" in result.stderr


def test_ds_config_may_not_set_what_the_experiment_owns(tmp_path, python):
    ds = write(tmp_path / "ds.json", json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 2}}))
    result = subprocess.run(
        [python, "launch/train.py", "--config", TINY, "--ds_config", ds],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "'train_batch_size'" in result.stderr and "train.micro_batch_size" in result.stderr
