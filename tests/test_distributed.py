"""Real ranks through the deepspeed launcher on CPU: ZeRO-3 and ZeRO-2 in bf16, two nodes in fp32."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import DEEPSPEED, ROOT, ds_env, free_port, launch_ranks

from pst_ds.masks.select import num_pruned

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def write_ds_config(path: Path, stage: int, bf16: bool) -> Path:
    zero = {"stage": stage, "overlap_comm": False}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # so that every weight is really sharded
    path.write_text(
        json.dumps({"zero_optimization": zero, "bf16": {"enabled": bf16}, "gradient_clipping": 1.0})
    )
    return path


def tiny_overrides(tmp_path: Path, text: Path, steps: int) -> list[str]:
    return [
        f"train.output_dir={tmp_path / 'run'}",
        f"train.max_steps={steps}",
        f"data.train_files=[{text}]",
        "train.micro_batch_size=2",
        "data.block_size=32",
        "data.max_validation_blocks=8",
        "data.validation_fraction=0.05",
    ]


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_ppl" in r]


def probe_run(
    tmp_path: Path,
    report: Path,
    text: Path,
    extra: list[str],
    steps: int = 10,
    stage: int = 3,
    bf16: bool = False,
) -> None:
    """tests/dist_probe.py on 2 ranks with tiny_llama: trains, then writes what each rank holds."""
    ds_config = write_ds_config(tmp_path / "ds.json", stage, bf16=bf16)
    launch_ranks(
        [
            "tests/dist_probe.py",
            "--report",
            str(report),
            "--ds_config",
            str(ds_config),
            "--config",
            "configs/experiments/tiny_llama.yaml",
            *tiny_overrides(tmp_path, text, steps=steps),
            *extra,
        ],
        tmp_path,
        timeout=600,
    )


@pytest.mark.parametrize("stage", [3, 2])
def test_two_ranks_bf16(tmp_path, small_text, stage):
    report = tmp_path / "report"
    probe_run(tmp_path, report, small_text, ["train.lr=0.02"], steps=12, stage=stage, bf16=True)

    steps, evals = read_metrics(tmp_path / "run")
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert evals[-1]["eval_ppl"] < evals[0]["eval_ppl"]  # loss falls
    assert sum(r["loss"] for r in steps[-3:]) < sum(r["loss"] for r in steps[:3])
    assert steps[-1]["sparsity"] == pytest.approx(0.5)
    assert "mask_changed" not in steps[0]  # nothing to compare with at the first log
    changed = [r["mask_changed"] for r in steps[1:]]
    assert all(0 <= c <= 1 for c in changed) and max(changed) > 0  # the ramp moves the masks

    ranks = [json.loads((report / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # The memory model's stored bytes against what the engine holds (ZeRO pads a little).
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    predicted = summary["memory_estimate_bytes_rank0"]
    if stage == 3:
        assert predicted["parameters"] == summary["param_bytes_rank0"]
    assert predicted["optimizer"] == pytest.approx(summary["optimizer_state_bytes_rank0"], abs=12 * 2048)
    # Each rank counted its half of every mask, packed: the sum is the whole masks' count.
    assert changed == ranks[0]["mask_changed_reference"] == ranks[1]["mask_changed_reference"]
    for name, layer in ranks[0]["layers"].items():
        assert layer["mask_sha256"] == ranks[1]["layers"][name]["mask_sha256"], name
        assert layer["zeros"] == layer["pruned_state"] == num_pruned(layer["weight_full_numel"], 0.5) > 0
    # Optimizer state exists for the trainable factors only (the two ranks' shards sum to them).
    trainable, total = ranks[0]["trainable_numel"], ranks[0]["total_numel"]
    state = sum(r["optimizer_state_numel"] for r in ranks)
    assert trainable <= state <= trainable + 2 * 1024  # ZeRO pads partitions a little
    assert state < total / 2
    for r in ranks:
        assert r["frozen_with_grad"] == []
        for layer in r["layers"].values():
            if stage == 3:  # the frozen weight is sharded: each rank holds half, none whole
                assert layer["weight_local_numel"] == (layer["weight_full_numel"] + 1) // 2
                assert layer["weight_data_numel"] == 0
            else:
                assert layer["weight_data_numel"] == layer["weight_full_numel"]


def test_two_nodes_with_hostfile(tmp_path, small_text):
    """Two 'nodes' on this machine: a two-host hostfile and one launch per node."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    ds_config = write_ds_config(tmp_path / "ds.json", 3, bf16=False)
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                DEEPSPEED,
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                "launch/train.py",
                "--ds_config",
                str(ds_config),
                "--config",
                "configs/experiments/tiny_gpt2.yaml",
                *tiny_overrides(tmp_path, small_text, steps=6),
            ],
            cwd=ROOT,
            env=ds_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    steps, evals = read_metrics(tmp_path / "run")
    assert len(steps) == 6 and len(evals) == 2


def test_learned_thresholds_and_input_norms_on_two_zero3_ranks_resume_exactly(tmp_path, small_text):
    """pst.mask=threshold with activation importance, ZeRO-3 (every parameter sharded), 2 ranks:
    the logits live in the optimizer state, move, agree on both ranks, keep the global count
    exact; the input norms agree too; a resume from step 5 gives the same losses and logits
    (with the factors in weight units: each layer's unit comes back from the checkpoint)."""
    extra = [
        "pst.mask=threshold",
        "pst.importance=activation",
        "pst.factor_scale=weight",
        "pst.initial_warmup=0.2",
        "train.threshold_lr=0.1",
        "train.lr=0.02",
        "train.save_every=5",
    ]
    probe_run(tmp_path, tmp_path / "first", small_text, extra)
    steps, _ = read_metrics(tmp_path / "run")
    losses = {r["step"]: r["loss"] for r in steps}
    first = [json.loads((tmp_path / "first" / f"rank{i}.json").read_text()) for i in range(2)]

    layers = first[0]["layers"]
    numel = sum(layer["weight_full_numel"] for layer in layers.values())
    assert sum(layer["zeros"] for layer in layers.values()) == num_pruned(numel, 0.5)  # global count exact
    shares = [layer["zeros"] / layer["weight_full_numel"] for layer in layers.values()]
    assert max(shares) - min(shares) > 0.01  # not uniform any more
    assert any(abs(layer["threshold_logit"][0]) > 0.05 for layer in layers.values())  # they trained
    for name, layer in layers.items():
        other = first[1]["layers"][name]
        for key in ("mask_sha256", "threshold_logit", "pruned", "input_sq"):
            assert layer[key] == other[key], (name, key)
        assert layer["zeros"] == layer["pruned_state"]
        assert layer["input_sq"] != [1.0] * len(layer["input_sq"])  # gathered from the inputs
    # The logits' group (lr 0.1) has Adam state on the ranks: one value per matrix in all.
    logits_state = sum(r["optimizer_state_by_lr"]["0.1"] for r in first)
    assert len(layers) <= logits_state <= len(layers) + 2 * 1024  # ZeRO pads partitions a little

    # Per-matrix sparsities are in TensorBoard, one curve per matrix.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    curves = {name: events.Scalars(f"layer_sparsity/{name}") for name in layers}
    assert all([e.step for e in curve] == list(range(1, 11)) for curve in curves.values())
    last = [curve[-1].value for curve in curves.values()]  # in force during step 10
    assert max(last) - min(last) > 0.01

    # Resume from step 5: drop the step-10 checkpoint and run again.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step00000010")
    probe_run(tmp_path, tmp_path / "second", small_text, extra)
    steps, _ = read_metrics(tmp_path / "run")
    resumed = {r["step"]: r["loss"] for r in steps[-5:]}
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    for step, loss in resumed.items():
        assert loss == pytest.approx(losses[step], rel=1e-6), step
    second = json.loads((tmp_path / "second" / "rank0.json").read_text())["layers"]
    for name, layer in layers.items():
        assert second[name]["threshold_logit"] == pytest.approx(layer["threshold_logit"], rel=1e-6), name
        assert second[name]["input_sq"] == pytest.approx(layer["input_sq"], rel=1e-6), name
        assert second[name]["mask_sha256"] == layer["mask_sha256"], name


def test_one_shot_warm_start_and_distillation_on_two_zero3_ranks(tmp_path, small_text):
    """SparseGPT alone (weights rewritten from rank 0, statistics all-reduced), then a Wanda warm
    start with distillation (after SparseGPT's start: the next test)."""
    sparsegpt = ["method=sparsegpt", "oneshot.calibration_blocks=6", "oneshot.block_columns=16"]
    probe_run(tmp_path, tmp_path / "sgpt", small_text, sparsegpt, steps=3)
    ranks = [json.loads((tmp_path / "sgpt" / f"rank{i}.json").read_text()) for i in range(2)]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 0 and summary["trainable_params"] == 0  # one-shot: nothing trains
    assert summary["eval_ppl_after"] != pytest.approx(summary["eval_ppl_before"], rel=1e-4)  # pruned
    for name, layer in ranks[0]["layers"].items():
        assert layer["weight_sha256"] == ranks[1]["layers"][name]["weight_sha256"], name  # same weights
        assert layer["mask_sha256"] == ranks[1]["layers"][name]["mask_sha256"], name
        assert (
            layer["weight_zeros"]
            == layer["zeros"]
            == layer["pruned_state"]
            == layer["weight_full_numel"] // 2
        )

    shutil.rmtree(tmp_path / "run")
    warm = [
        "pst.init=wanda",
        "pst.importance=activation",
        "train.distill.weight=0.5",
        "train.distill.temperature=2",
        "data.eval_files=[data/mobydick/mobydick_excerpt.txt]",  # out of domain, beside validation
    ]
    probe_run(tmp_path, tmp_path / "warm", small_text, warm, steps=4)
    ranks = [json.loads((tmp_path / "warm" / f"rank{i}.json").read_text()) for i in range(2)]
    steps, evals = read_metrics(tmp_path / "run")
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(r["sparsity"] == 0.5 for r in steps)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_after_warm_start"]["validation"] != pytest.approx(
        summary["eval_ppl_before"], rel=1e-4
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    moby = [r["eval_mobydick_excerpt_ppl"] for r in records if "eval_mobydick_excerpt_ppl" in r]
    assert len(moby) == 3 and moby[-1] == pytest.approx(summary["eval_texts_after"]["mobydick_excerpt"])
    assert moby[0] == pytest.approx(summary["eval_texts_before"]["mobydick_excerpt"]) and moby[0] != moby[1]
    for name, layer in ranks[0]["layers"].items():
        other = ranks[1]["layers"][name]
        assert layer["mask_sha256"] == other["mask_sha256"] and layer["input_sq"] == other["input_sq"], name
        assert layer["input_sq"] != [1.0] * len(layer["input_sq"])  # from the calibration


def test_distillation_after_a_sparsegpt_start_on_two_zero3_ranks(tmp_path, small_text):
    """The teacher's copy of the original weights is built partitioned and filled from rank 0
    just before SparseGPT rewrites them: both ranks train on the same masks and weights."""
    extra = ["pst.init=sparsegpt", "train.distill.weight=0.5", "oneshot.calibration_blocks=6",
             "oneshot.block_columns=16", "pst.final_sparsity=0.5", "pst.factor_scale=weight"]  # fmt: skip
    probe_run(tmp_path, tmp_path / "taught", small_text, extra, steps=3)
    ranks = [json.loads((tmp_path / "taught" / f"rank{i}.json").read_text()) for i in range(2)]
    steps, _ = read_metrics(tmp_path / "run")
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in steps)
    for name, layer in ranks[0]["layers"].items():
        other = ranks[1]["layers"][name]
        assert (
            layer["mask_sha256"] == other["mask_sha256"] and layer["weight_sha256"] == other["weight_sha256"]
        )
        assert layer["weight_zeros"] >= layer["pruned_state"] > 0, name  # SparseGPT's zeros in W
        # PST's unit (pst.factor_scale=weight) is the original weights' mean |W|, the same on both
        # ranks from the whole (gathered) weight, not the mean of what SparseGPT wrote
        assert (
            layer["factor_unit"] == other["factor_unit"] == pytest.approx(layer["teacher_mean_abs"], rel=1e-6)
        )


def test_owl_profile_is_the_same_on_two_zero3_ranks(tmp_path, small_text):
    """OWL's block sparsities from sharded weights and all-reduced norms: both ranks put the same
    per-layer counts and masks in force, each block at its own sparsity, the blocks' mean the target."""
    owl = ["method=sparsegpt", "pst.sparsity_profile=owl", "pst.owl_m=3", "oneshot.calibration_blocks=6",
           "oneshot.block_columns=16", "pst.final_sparsity=0.6"]  # fmt: skip
    probe_run(tmp_path, tmp_path / "owl", small_text, owl, steps=1)
    ranks = [json.loads((tmp_path / "owl" / f"rank{i}.json").read_text()) for i in range(2)]
    by_block: dict[str, set[float]] = {}
    for name, layer in ranks[0]["layers"].items():
        other = ranks[1]["layers"][name]
        assert layer["mask_sha256"] == other["mask_sha256"] and layer["pruned_state"] == other["pruned_state"]
        assert layer["weight_zeros"] == layer["zeros"] == layer["pruned_state"], (
            name
        )  # SparseGPT at its count
        block = name.split(".mlp")[0].split(".self_attn")[0]
        by_block.setdefault(block, set()).add(round(layer["pruned_state"] / layer["weight_full_numel"], 2))
    sparsities = [next(iter(s)) for s in by_block.values()]
    assert all(len(s) == 1 for s in by_block.values())  # one sparsity per block
    assert len(set(sparsities)) > 1 and sum(sparsities) / len(sparsities) == pytest.approx(0.6, abs=0.01)


def test_gradient_checkpointing_trains_alike_on_two_zero3_ranks(tmp_path, small_text):
    """The non-reentrant recomputation under ZeRO-3 (frozen weights partitioned, gathered again in
    backward): the same losses, factors and input norms as without it, step for step."""
    runs = {}
    for checkpointing in ("false", "true"):
        out = tmp_path / checkpointing
        out.mkdir()
        extra = [
            f"train.gradient_checkpointing={checkpointing}",
            "pst.importance=activation",
            "train.lr=0.02",
        ]
        probe_run(out, out / "report", small_text, extra, steps=6)
        steps, _ = read_metrics(out / "run")
        runs[checkpointing] = (steps, json.loads((out / "report" / "rank0.json").read_text()))
    (plain_steps, plain), (steps, checkpointed) = runs["false"], runs["true"]
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in plain_steps], rel=1e-6)
    for name, layer in checkpointed["layers"].items():
        reference = plain["layers"][name]
        assert layer["factors"] == pytest.approx(reference["factors"], rel=1e-5, abs=1e-6), name
        assert layer["input_sq"] == pytest.approx(reference["input_sq"], rel=1e-6), name
        assert layer["mask_sha256"] == reference["mask_sha256"], name
