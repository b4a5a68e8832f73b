"""The README's set-up commands, run as a new user runs them: from an empty cache.

The first command once crashed on every fresh machine while the suite passed, because each
machine that ran the suite had a warm .cache/. These tests run that command as the README
writes it (through the deepspeed launcher, ZeRO-3) with the cache pointed at an empty folder,
only shortened with train.max_steps and sent to a temporary output folder.
"""

import json
import re
import subprocess

import pytest
import torch
from conftest import ROOT
from helpers import ds_env, free_port
from transformers import AutoModelForCausalLM

from pst_ds.io.cache import CACHE_ENV
from pst_ds.masks.select import num_pruned

STEPS = 2
# Shortened like the steps: two blocks per evaluated text and per calibration, not 16 and 8.
SHORTER = "data.max_validation_blocks=2 oneshot.calibration_blocks=2"


def setup_commands() -> list[str]:
    """The bash blocks of the README's set-up section, in order."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, re.S)


def test_readme_has_the_two_commands_and_ci_runs_the_second():
    train, tests = setup_commands()
    assert train.startswith("bash tools/install.sh && ") and "deepspeed launch/train.py" in train
    assert "--ds_config configs/zero3.json" in train
    assert tests.startswith("bash tools/install.sh && ") and "pytest" in tests
    assert tests in (ROOT / ".ci/run").read_text()


def run_first_command(tmp_path, ranks: int, extra: str = "") -> tuple[subprocess.CompletedProcess, str]:
    train, _ = setup_commands()
    launcher = ".venv/bin/deepspeed"
    assert train.count(launcher) == 1
    options = f"--master_port {free_port()}" + (f" --num_gpus {ranks}" if ranks > 1 else "")
    command = train.replace(launcher, f"{launcher} {options}")
    if ranks > 1:  # the README's 2 threads are for one rank on this 2-core machine
        command = command.replace("OMP_NUM_THREADS=2", "OMP_NUM_THREADS=1")
    command += f" train.max_steps={STEPS} train.output_dir={tmp_path / 'run'} {SHORTER} {extra}"
    env = {
        **ds_env(),
        CACHE_ENV: str(tmp_path / "cache"),  # empty: the model is converted, the text tokenised
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),  # and the kernels compiled afresh
    }
    env.pop("OMP_NUM_THREADS")
    result = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command}\n{output[-5000:]}"
    return result, output


def check_finished_run(tmp_path, output: str) -> None:
    run, cache = tmp_path / "run", tmp_path / "cache"
    # The one-time conversion happened once, into the cache the variable names, and completely.
    assert output.count("pst-ds: converting") == 1
    assert [p.name for p in (cache / "models").iterdir() if p.is_dir()] == ["smollm2-135m-instruct-v2"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_ppl" in r]
    assert [r["step"] for r in evals] == [0, 0, STEPS]  # before, after the Wanda warm start, at the end
    assert 1 < evals[-1]["eval_ppl"] < 1e4
    # The out-of-domain text is evaluated at the same three points.
    assert [r["step"] for r in records if "eval_mobydick_excerpt_ppl" in r] == [0, 0, STEPS]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    # It ends with the pruned model exported, and says where and how to evaluate it.
    export = run / "export"
    assert f"pst-ds: pruned model in {export}" in output
    assert f"launch/evaluate.py --model {export}" in output
    report = json.loads((export / "pst_sparsity.json").read_text())
    assert report["step"] == STEPS and report["total"]["layers"] == 210


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("ranks", [1, 2])
def test_first_command_from_an_empty_cache(tmp_path, ranks):
    # On two ranks, the README's chat data with the loss on the assistant's turns: JSON lines
    # read, rendered with the chat template and tokenised into the empty cache too.
    chat = "data.train_files=[data/chat/austen_chat.jsonl] data.loss_on=completion" if ranks == 2 else ""
    _, output = run_first_command(tmp_path, ranks, chat)
    check_finished_run(tmp_path, output)
    if ranks == 2:
        return  # both ranks raced for the conversion (counted once above); the rest is as for 1
    # The export is the trained model: plain transformers, the exact zero count per matrix,
    # and the perplexity training logged at its end, through the printed evaluate command.
    export = tmp_path / "run" / "export"
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    report = json.loads((export / "pst_sparsity.json").read_text())
    for name, layer in report["layers"].items():
        weight = model.get_submodule(name).weight
        assert int((weight == 0).sum()) == layer["zeros"] == num_pruned(weight.numel(), 0.5), name
    evaluate = re.search(r"pst-ds: evaluate it: (.+)", output).group(1)
    env = {**ds_env(), CACHE_ENV: str(tmp_path / "cache")}
    result = subprocess.run(
        [*evaluate.split(), "--out", str(tmp_path / "eval.json"), *SHORTER.split()[:1]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "eval_ppl" in r][-1]
    assert json.loads((tmp_path / "eval.json").read_text())["perplexity"] == pytest.approx(
        logged["eval_ppl"], rel=1e-3
    )

    # Run again, as the README allows: nothing left to train, the export is still there.
    _, again = run_first_command(tmp_path, ranks)
    assert f"already trained to step {STEPS}" in again and "pst-ds: converting" not in again
    assert f"pst-ds: pruned model in {export}" in again
