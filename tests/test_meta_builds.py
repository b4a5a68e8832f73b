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


def test_a_script_s_peak_memory_is_its_own_not_its_parent_s():
    """Measured by a child of a process holding 512 MiB, the peak counts the child's own
    allocation and not its parent's (Linux's ru_maxrss carries the parent's through exec)."""
    held = bytearray(512 * 2**20)
    held[::4096] = b"\1" * len(held[::4096])  # touch every page: resident
    child = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(ROOT / 'pst_ds/host_memory.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "before = m.peak_resident_bytes()\n"
        "own = bytearray(256 * 2**20); own[::4096] = b'\\1' * len(own[::4096])\n"
        "print(before, m.peak_resident_bytes())\n"
    )
    before, after = map(
        int,
        subprocess.run(
            [sys.executable, "-c", child], capture_output=True, text=True, check=True
        ).stdout.split(),
    )
    del held
    assert before < 128 * 2**20  # Python alone, not the parent's 512 MiB
    assert after - before >= 250 * 2**20  # the child's own 256 MiB is counted
