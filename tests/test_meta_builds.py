"""Meta means meta: a build for the memory model, export or the cost model allocates no weight,
even at the 8B shape with a start that rewrites the backbone and a teacher that copies it."""

import json
import subprocess
import sys

from conftest import ROOT


def test_8b_meta_builds_stay_under_1_gib_of_host_memory():
    overrides = ["pst.init=auto", "pst.final_sparsity=0.7", "train.distill.weight=auto"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests/meta_probe.py"), "configs/experiments/llama3_8b.yaml", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["init"] == "sparsegpt" and report["teacher"]  # the path that copies every weight
    assert report["pruned_layers"] == 32 * 7
    assert report["real_numel"] == {"memory_model": 0, "export": 0}
    assert report["estimate_bytes"]["parameters"] > 7e9 * 2 / 8  # the whole 8B shape was counted
    assert report["max_rss_bytes"] < 2**30
