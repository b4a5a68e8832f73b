"""The cost model (pst_ds/train/cost.py) against counts written out here, tools/estimate_step.py
end to end, and tools/gpu_check.sh's CPU dry run (the GPU machine's run, at toy sizes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pst_ds.experiment import load_experiment
from pst_ds.masks.kinds import LearnedThreshold
from pst_ds.train.cost import (
    DenseCost,
    Device,
    LayerShape,
    LoRACost,
    PSTCost,
    layer_seconds,
    model_shapes,
    step_seconds,
)

ROOT = Path(__file__).resolve().parent.parent
SHAPE = LayerShape(out=300, inp=200, tokens=50)
E, T = 300 * 200, 50


def total(cost, select=True):
    found = cost.passes(SHAPE, select)
    return sum(p.flops for p in found), sum(p.bytes for p in found)


def test_gemm_counts_of_each_method():
    gemm_flops = 2 * E * T
    assert total(DenseCost())[0] == 3 * gemm_flops  # y, dx and the weight's gradient
    # No weight gradient; the rank-8 factors' products, 2 r (o + i) T each, three each way.
    assert total(LoRACost())[0] == 2 * gemm_flops + 6 * 2 * 8 * (300 + 200) * T
    assert total(PSTCost())[0] > 3 * gemm_flops  # PST needs G = dy^T x for its factors


def test_a_split_low_precision_forward_costs_one_gemm_and_one_pass_more():
    low = LayerShape(out=300, inp=200, tokens=50, weight_bytes=2, act_bytes=2)
    plain, split = PSTCost().passes(low), PSTCost(split=True).passes(low)
    assert sum(p.flops for p in split) - sum(p.flops for p in plain) == 2 * E * T + 2 * E
    extra = sum(p.bytes for p in split) - sum(p.bytes for p in plain)
    # M * W' written in fp32 (4, not 2), the halves (read 4, write 2 + 2), the GEMM's operands
    assert extra == E * (4 - 2) + E * (4 + 2 * 2) + E * 2 + T * (300 + 200) * 2


def test_bits_move_fewer_bytes_than_selecting_again_and_selection_is_counted_once():
    bits, recompute = total(PSTCost())[1], total(PSTCost(saved_mask="recompute"))[1]
    # Recompute writes W' and S again (8 bytes an entry) and reads them back instead of W (8 - 4)
    # and its bits (1/8 byte); bits add their eighth of a byte written in the forward:
    # 8 + 8 - 4 + 4 (W read for W', S again) - 1/8 - 1/8.
    assert recompute - bits == pytest.approx(E * (8 + 8 - 4 + 4 - 0.125 - 0.125))
    assert total(PSTCost(), select=False)[1] < total(PSTCost())[1]
    # a learned threshold's gradient needs S itself: it saves no bits
    assert (
        total(PSTCost(LearnedThreshold()))[1] == total(PSTCost(LearnedThreshold(), saved_mask="recompute"))[1]
    )
    device = Device("test", 1e12, 1e10)
    one = step_seconds(device, PSTCost(), [SHAPE], micro_batches=1, checkpointing=False)
    four = step_seconds(device, PSTCost(), [SHAPE], micro_batches=4, checkpointing=False)
    assert four < 4 * one  # the step's selection, once
    checkpointed = step_seconds(device, PSTCost(), [SHAPE], micro_batches=1, checkpointing=True)
    forward_again = sum(
        device.seconds(p.flops, p.bytes) for p in PSTCost().passes(SHAPE, select=False) if p.forward
    )
    assert checkpointed == pytest.approx(one + forward_again)


def test_roofline_limits():
    compute_bound = Device("fast memory", 1e12, 1e18)
    memory_bound = Device("fast compute", 1e18, 1e9)
    # With free memory traffic PST costs its GEMMs (3 of them) plus the element-wise FLOPs.
    ratio = layer_seconds(compute_bound, PSTCost(), SHAPE) / layer_seconds(compute_bound, DenseCost(), SHAPE)
    assert 1.0 < ratio < 1.5
    ratio = layer_seconds(memory_bound, PSTCost(), SHAPE) / layer_seconds(memory_bound, DenseCost(), SHAPE)
    assert ratio > 3  # element-wise passes over the weight dominate
    dense_one = step_seconds(memory_bound, DenseCost(), [SHAPE], 1, False, world_size=1)
    dense_two = step_seconds(memory_bound, DenseCost(), [SHAPE], 1, False, world_size=2)
    assert dense_two < dense_one  # Adam on half the weights per rank


def test_model_shapes_of_a_config_are_its_linears():
    config = load_experiment(str(ROOT / "configs/experiments/tiny_llama.yaml"))
    pruned, rest = model_shapes(config, act_bytes=2)
    assert len(pruned) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks
    assert {(s.out, s.inp) for s in pruned} == {(64, 64), (32, 64), (128, 64), (64, 128)}
    assert all(s.tokens == config.train.micro_batch_size * config.data.block_size for s in pruned)
    assert len(rest) == 1 and rest[0].inp == 64 and rest[0].out >= 256  # the head (bytes and specials)


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", "tools/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "pst-ds: GPU check done" in done.stdout
    layers = json.loads((tmp_path / "layers/layers.json").read_text())
    assert layers["results"]["tiny"]["dtype"] == "fp32" and "pst" in layers["results"]["tiny"]["median_ms"]
    steps = json.loads((tmp_path / "zero3/steps.json").read_text())["results"]
    assert set(steps) == {"pst", "masked_lora", "lora", "dense"} and all(r["finite"] for r in steps.values())
    assert all(r["host_syncs_per_step"] is None for r in steps.values())  # counted on a GPU only
    assert len(steps["pst"]["losses"]) == 3
    assert (tmp_path / "estimate/estimate_step.md").exists()
