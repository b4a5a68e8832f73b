"""Smoke runs of tools/bench.py on tiny inputs: the JSON it writes has every field."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "tools/bench.py"), *args], check=True, cwd=ROOT)


def test_layer_bench_reports_every_formulation(tmp_path):
    run_bench("layers", "--shapes", "tiny", "--repeats", "2", "--out", str(tmp_path))
    report = json.loads((tmp_path / "layers.json").read_text())
    tiny = report["results"]["tiny"]
    kinds = {"pst_row", "pst_threshold", "pst_nm_2_4", "pst_vnm_64_2_5", "pst_activation", "pst_revivable"}
    names = {"dense", "lora", "masked_lora", "pst", "pst_eager", "pst_recompute", "pst_sort_autograd", *kinds}
    assert set(tiny["median_ms"]) == names and set(tiny["ratio_to_dense"]) == names
    assert all(len(v) == 2 for v in tiny["all_ms"].values())
    # Medians and ratios recomputed here from the raw repeats the bench saved.
    dense = statistics.median(tiny["all_ms"]["dense"])
    for name in names:
        median = statistics.median(tiny["all_ms"][name])
        assert tiny["median_ms"][name] == pytest.approx(median)
        assert tiny["ratio_to_dense"][name] == pytest.approx(median / dense)
    table = (tmp_path / "layers.md").read_text()
    assert "| tiny (64x48, 16) |" in table
    assert f"{tiny['median_ms']['pst']:.1f} ({tiny['ratio_to_dense']['pst']:.2f}x)" in table


def test_layer_bench_times_only_what_it_is_asked(tmp_path):
    run_bench("layers", "--shapes", "tiny", "--repeats", "1", "--only", "pst_nm_2_4", "--out", str(tmp_path))
    report = json.loads((tmp_path / "layers.json").read_text())
    assert set(report["results"]["tiny"]["median_ms"]) == {"dense", "pst_nm_2_4"}
    bad = subprocess.run(
        [sys.executable, str(ROOT / "tools/bench.py"), "layers", "--shapes", "tiny", "--only", "pst_2of4"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith(
        "pst-ds: error: --only names no layer pst_2of4"
    )


def test_method_bench_reads_each_run(tmp_path):
    run_bench(
        "methods",
        "--methods",
        "pst",
        "pst_distill",
        "dense",
        "--num_gpus",
        "1",
        "--steps",
        "3",
        "--warmup_steps",
        "1",
        "--config",
        "configs/experiments/tiny_llama.yaml",
        "--out",
        str(tmp_path),
    )
    results = json.loads((tmp_path / "methods.json").read_text())["results"]
    fields = {
        "trainable_params",
        "optimizer_state_bytes_per_rank",
        "peak_memory_bytes_per_rank",
        "param_bytes_per_rank",
        "median_step_s",
        "tokens_per_s",
        "ratio_to_pst",
    }
    assert set(results) == {"pst", "pst_distill", "dense"} and all(set(r) == fields for r in results.values())
    assert results["pst_distill"]["trainable_params"] == results["pst"]["trainable_params"]  # no 2nd model
    pst, dense = results["pst"], results["dense"]
    for method, result in results.items():  # the figures against each run's own summary.json
        summary = json.loads((tmp_path / "runs" / method / "summary.json").read_text())
        median = statistics.median(summary["step_times_s"][1:])  # --warmup_steps 1
        assert result["median_step_s"] == pytest.approx(median)
        assert result["tokens_per_s"] == pytest.approx(summary["tokens_per_step"] / median)
        assert result["trainable_params"] == summary["trainable_params"]
    for field in ("median_step_s", "trainable_params", "optimizer_state_bytes_per_rank"):
        assert dense["ratio_to_pst"][field] == pytest.approx(dense[field] / pst[field])
    assert dense["trainable_params"] > pst["trainable_params"] > 0
    # Adam keeps two moments (plus ZeRO's fp32 master copy) of every trainable parameter.
    assert dense["optimizer_state_bytes_per_rank"] >= 8 * dense["trainable_params"]
    assert dense["optimizer_state_bytes_per_rank"] > pst["optimizer_state_bytes_per_rank"]


def test_pass_bench_times_every_pass_of_the_layer(tmp_path):
    run_bench("passes", "--shapes", "tiny", "--repeats", "2", "--out", str(tmp_path))
    report = json.loads((tmp_path / "passes.json").read_text())["results"]["tiny"]
    gemms = [name for name in report["median_ms"] if name.startswith("GEMM")]
    assert len(gemms) == 3 and report["dense_gemms_ms"] == pytest.approx(
        sum(report["median_ms"][n] for n in gemms)
    )
    assert {"W -> W', S", "selection (topk)", "G, W, bits -> M*W', dS, dW'"} <= set(report["median_ms"])
    assert "| all PST passes |" in (tmp_path / "passes.md").read_text()
