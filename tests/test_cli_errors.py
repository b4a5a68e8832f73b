"""Bad input to launch/train.py: one clear error line, a non-zero exit, no output written."""

import json
import re
import shutil
import subprocess

import pytest
from conftest import ROOT
from helpers import launch_ranks

from launch import evaluate as evaluate_script
from launch import export as export_script
from launch import train

TINY = "configs/experiments/tiny_llama.yaml"


def write(path, text):
    path.write_text(text)
    return str(path)


# Found before the process group exists: run in this process (launch/train.py's main).
CASES = {
    "unknown key": ([], ["train.max_stepz=3"], "unknown config key train.max_stepz"),
    "mistyped value": ([], ["train.micro_batch_size=two"], "train.micro_batch_size must be int"),
    "sparsity out of range": ([], ["pst.final_sparsity=1.2"], "pst.final_sparsity must be in [0, 1)"),
    "missing data file": ([], ["data.train_files=[no/such.txt]"], "data file not found: no/such.txt"),
    "missing ds config": (["--ds_config", "configs/nope.json"], [], "DeepSpeed config not found"),
    "fp16 on cpu": (["--ds_config", "configs/zero3_fp16.json"], [], "fp16 needs a GPU"),
}


def train_main(capsys, args: list[str]) -> tuple[int, str]:
    """launch/train.py's main in this process: (exit status, what it wrote to stderr)."""
    status = train.main(args)
    return status, capsys.readouterr().err


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("pst-ds: error:")]
    assert len(errors) == 1, stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_cleanly(tmp_path, capsys, case):
    args, overrides, message = CASES[case]
    out = tmp_path / "out"
    status, stderr = train_main(capsys, ["--config", TINY, *args, f"train.output_dir={out}", *overrides])
    assert status == 2, stderr[-2000:]
    assert message in one_error_line(stderr)
    assert not out.exists()


@pytest.mark.slow
def test_a_pattern_that_matches_nothing_stops_the_launched_run(tmp_path, python):
    """Found once the model is built, inside the process group: the script still exits 2 with one line."""
    out = tmp_path / "out"
    cmd = [
        python,
        "launch/train.py",
        "--config",
        TINY,
        f"train.output_dir={out}",
        "pst.target_modules=[qq_proj]",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "'qq_proj' matches no module" in one_error_line(result.stderr)
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_unknown_key_in_yaml_file(tmp_path, capsys):
    config = write(tmp_path / "exp.yaml", "train:\n  max_steps: 2\n  learning_rate: 0.1\n")
    status, stderr = train_main(capsys, ["--config", config])
    assert status == 2
    assert "unknown config key train.learning_rate" in one_error_line(stderr)


def test_ds_config_may_not_set_what_the_experiment_owns(tmp_path, capsys):
    ds = write(tmp_path / "ds.json", json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 2}}))
    status, stderr = train_main(capsys, ["--config", TINY, "--ds_config", ds])
    assert status == 2
    assert "'train_batch_size'" in stderr and "train.micro_batch_size" in stderr


CHAT = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Good day."}]


def austen_bytes(n: int) -> bytes:
    return (ROOT / "data/austen/austen_6_novels.txt").read_bytes()[:n]


# Bad input files: (file name, its bytes, the expected message). tiny_llama reads bytes, 64 per block.
BAD_FILES = {
    "empty file": ("empty.txt", b"", "is empty"),
    "only white space": ("blank.txt", b"\n  \n\t\n", "is empty"),
    "not UTF-8": (
        "latin1.txt",
        austen_bytes(5000) + "café".encode("latin-1"),
        "is not UTF-8 text (byte 0xe9 at offset 5003)",
    ),
    "one block, kept for validation": ("short.txt", austen_bytes(100), "all needed for validation"),
    "a JSON line that is not JSON": (
        "cut.jsonl",
        b'{"text": "a"}\n{"text": ',
        "cut.jsonl, line 2 is not JSON",
    ),
    "a record without the field": (
        "chat.jsonl",
        (json.dumps({"messages": CHAT}) + "\n" + json.dumps({"prompt": "p", "completion": "c"})).encode(),
        "chat.jsonl, line 2: no field 'messages'",
    ),
    "chat records, a tokenizer without a chat template": (
        "chat.jsonl",
        json.dumps({"messages": CHAT}).encode(),
        "but the model's tokenizer has no chat template",
    ),
    "an empty folder": ("data_folder", None, "data_folder is empty"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_training_file_fails_cleanly(tmp_path, python, case):
    name, content, message = BAD_FILES[case]
    if content is None:
        (tmp_path / name).mkdir()
    else:
        (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    cmd = [python, "launch/train.py", "--config", TINY, f"train.output_dir={out}"]
    result = subprocess.run(
        [*cmd, f"data.train_files=[{tmp_path / name}]"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("pst-ds: error:")]
    assert len(errors) == 1 and message in errors[0] and name in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_output_dir_that_is_a_file(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    for out in (taken, taken / "run"):
        status, stderr = train_main(capsys, ["--config", TINY, f"train.output_dir={out}"])
        assert status == 2, stderr[-2000:]
        assert f"pst-ds: error: train.output_dir {out}: {taken} exists and is not a folder" in stderr
        assert taken.read_text() == "not a folder"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "case, content, message",
    [
        # 3 blocks of 64 bytes: 1 for validation, 2 to train, fewer than 2 ranks × micro-batches of 4.
        (
            "too little text for two ranks",
            austen_bytes(200),
            "too little training data: 2 blocks of 64 tokens for 2 rank(s)",
        ),
        # Found by rank 0 while the other rank waits: every rank must still stop the same way.
        (
            "not UTF-8, found on rank 0 first",
            b"\xff" + austen_bytes(50_000),
            "is not UTF-8 text (byte 0xff at offset 0)",
        ),
    ],
)
def test_two_ranks_stop_alike_on_bad_data(tmp_path, case, content, message):
    text = tmp_path / "text.txt"
    text.write_bytes(content)
    out = tmp_path / "out"
    cmd = ["launch/train.py", "--config", TINY, f"train.output_dir={out}", f"data.train_files=[{text}]"]
    result = launch_ranks(cmd, tmp_path, timeout=300, expect=2)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "pst-ds: error:" in line]
    assert len(errors) == 1 and message in errors[0], output[-3000:]
    assert "Traceback" not in output
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "lr, message",
    [
        # Factors of ~1e37: |W'| + A B + R + C overflows in some entries of the first PST layer.
        (
            "3e37",
            r"0 NaN and \d+ infinite values among 4,096 importance scores in layer "
            r"model\.layers\.0\.self_attn\.q_proj at step 2",
        ),
        # Factors of ~1e30: the scores stay finite, the activations overflow, the loss is NaN.
        ("1e30", r"the loss at step 2 is nan: training diverged"),
    ],
)
def test_diverging_training_stops_with_a_clear_error(tmp_path, python, lr, message):
    cmd = [
        python,
        "launch/train.py",
        "--config",
        TINY,
        f"train.output_dir={tmp_path / 'run'}",
        f"train.lr={lr}",
    ]
    result = subprocess.run(
        [*cmd, "train.max_steps=5"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "pst-ds: error:" in line]
    assert len(errors) == 1 and re.search(message, errors[0]), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "export").exists()


def test_an_override_that_is_not_yaml(tmp_path, capsys):
    out = tmp_path / "out"
    status, stderr = train_main(
        capsys, ["--config", TINY, f"train.output_dir={out}", "data.train_files=[a.txt"]
    )
    assert status == 2 and not out.exists()
    assert "override 'data.train_files=[a.txt': the value is not valid YAML" in one_error_line(stderr)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"zero_optimization": {"stage": 7}}, "(DeepSpeedZeroConfig): stage: Input should be 0, 1, 2, 3"),
        ({"bf16": {"enabled": "maybe"}}, "(DeepSpeedBF16Config): enabled: Input should be a valid boolean"),
    ],
)
def test_a_deepspeed_value_deepspeed_rejects(tmp_path, capsys, section, message):
    ds = write(tmp_path / "ds.json", json.dumps(section))
    out = tmp_path / "out"
    status, stderr = train_main(capsys, ["--config", TINY, "--ds_config", ds, f"train.output_dir={out}"])
    assert status == 2 and not out.exists()
    assert f"the DeepSpeed config is not valid {message}" in one_error_line(stderr)


MODEL_FOLDERS = {  # the files of a saved model kept, and what is said of the folder
    "no weights": (["config.json", "tokenizer_config.json"], "has no weights: none of model.safetensors"),
    "no tokenizer": (["config.json", "model.safetensors"], "has no tokenizer: none of tokenizer.json"),
    "not a model": ([], "is not a Hugging Face model folder: it has no config.json"),
}


def broken_model(tmp_path, tiny_model_dir, case):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in MODEL_FOLDERS[case][0]:
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    return folder


@pytest.mark.parametrize("case", sorted(MODEL_FOLDERS))
def test_a_model_folder_that_is_not_whole(tmp_path, capsys, tiny_model_dir, case):
    folder, message = broken_model(tmp_path, tiny_model_dir, case), MODEL_FOLDERS[case][1]
    out = tmp_path / "out"
    args = ["--config", TINY, f"train.output_dir={out}", "model.source=path", f"model.path={folder}"]
    status, stderr = train_main(capsys, args)
    assert status == 2 and not out.exists()
    assert f"model.path '{folder}' {message}" in one_error_line(stderr)
    status = evaluate_script.main(["--model", str(folder), "--config", TINY])  # in this process
    assert status == 2
    assert f"--model {folder} {message}" in one_error_line(capsys.readouterr().err)


def test_export_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert export_script.main(["--run", str(tmp_path)]) == 2  # in this process
    said = one_error_line(capsys.readouterr().err)
    assert f"{tmp_path} is not a pst-ds training run (it has no config.json)" in said


@pytest.mark.slow  # launch/train.py in its own process (it leaves a process group with os._exit)
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["pst.weight_rank=1000"],
            "pst.weight_rank=1000 is larger than model.layers.0.self_attn.k_proj's smaller side (32)",
        ),
        (
            ["method=lora", "lora.rank=33"],
            "lora.rank=33 is larger than model.layers.0.self_attn.k_proj's smaller side (32)",
        ),
    ],
)
def test_a_factor_rank_larger_than_a_matrix(tmp_path, python, overrides, message):
    """Found once the model is built (in the process group): still one line and exit 2."""
    out = tmp_path / "out"
    command = [python, "launch/train.py", "--config", TINY, f"train.output_dir={out}", *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in one_error_line(result.stderr)
    assert not out.exists()


@pytest.mark.slow
def test_resuming_under_another_zero_stage_is_one_error(tmp_path, python, small_text):
    """DeepSpeed's ZeRO-2 and ZeRO-3 checkpoints hold different files: resuming one under the
    other is refused with one line, not DeepSpeed's AssertionError from its loader."""

    def run(ds_config: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [python, "launch/train.py", "--ds_config", ds_config, "--config", TINY,
             f"train.output_dir={tmp_path / 'run'}", f"data.train_files=[{small_text}]", "data.block_size=32",
             "train.max_steps=2", "train.save_every=2", "train.export=false", "pst.compile=false"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    assert run("configs/zero2.json").returncode == 0
    again = run("configs/zero3.json")
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert "it was saved under ZeRO stage 2, this run's --ds_config uses stage 3" in one_error_line(
        again.stderr
    )


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["cut short", "not safetensors"])
def test_a_damaged_weights_file_is_one_error(tmp_path, tiny_model_dir, python, damage):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100] if damage == "cut short" else b"not weights" * 100)
    out = tmp_path / "out"
    result = subprocess.run(
        [python, "launch/train.py", "--config", TINY, f"train.output_dir={out}", "model.source=path",
         f"model.path={folder}", "data.block_size=32"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    error = one_error_line(result.stderr)
    assert f"model.path '{folder}': its weights cannot be read (SafetensorError" in error
    assert not out.exists()  # the run lock's folder goes with the refused run
