"""tools/quality.py on a tiny model: each row's JSON is saved as it finishes, a saved row is not
run again, and the table is assembled from the saved rows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent


def quality(*args: str) -> str:
    command = [
        sys.executable,
        str(ROOT / "tools/quality.py"),
        "--config",
        "configs/experiments/tiny_llama.yaml",
    ]
    return subprocess.run([*command, *args], check=True, cwd=ROOT, capture_output=True, text=True).stdout


def test_rows_are_saved_resumed_and_tabled(tmp_path):
    out = str(tmp_path)
    quality(
        "--rows", "wanda", "pst_release", "masked_lora", "--sparsities", "0.5", "--steps", "2", "--out", out
    )
    rows = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "rows").glob("*.json")}
    assert set(rows) == {"wanda-0.5", "pst_release-0.5", "masked_lora-0.5"}
    wanda, pst = rows["wanda-0.5"], rows["pst_release-0.5"]
    assert (wanda["steps"], wanda["trainable_params"]) == (0, 0) and pst["steps"] == 2
    for row in rows.values():  # what each run's own summary says
        summary = json.loads((tmp_path / "runs" / f"{row['row']}-0.5" / "summary.json").read_text())
        assert row["after"] == summary["eval_ppl_after"] and row["sparsity"] == summary["final_sparsity"]
        assert "pst.final_sparsity=0.5" in row["command"]
    saved = {p: p.stat().st_mtime_ns for p in (tmp_path / "rows").glob("*.json")}
    table = quality(
        "--rows", "wanda", "--sparsities", "0.5", "--steps", "2", "--out", out
    )  # saved: not rerun
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "rows").glob("*.json")} == saved
    assert not (tmp_path / "logs" / "wanda-0.5.log").stat().st_mtime_ns > max(saved.values())
    lines = table.splitlines()
    assert lines[2].startswith("| dense, no training |")
    assert f"| Wanda, one-shot | 0.5 | 0 | {wanda['after']:.2f} |" in table
    assert (tmp_path / "quality_causal_lm.md").read_text() == table.removesuffix("\n")  # print adds one
    # Each trained row over the better one-shot of its column, validation first, text by text.
    assert "Over the better one-shot (Wanda, SparseGPT) of each column:" in table
    assert f"| PST, release settings | 0.5 | 2 | {pst['after'] / wanda['after']:.2f} |" in table
    assert set(pst["texts_after"]) == {"mobydick_excerpt", "reviews", "gpl3"}  # judged beyond Austen
    # At equal time: each trained row's median step (the first left out) over masked LoRA's.
    summary = json.loads((tmp_path / "runs" / "pst_release-0.5" / "summary.json").read_text())
    assert pst["step_s"] == summary["step_times_s"][1]  # 2 steps: the second alone
    ratio = pst["step_s"] / rows["masked_lora-0.5"]["step_s"]
    assert f"| PST, release settings | 0.5 | {pst['step_s']:.2f} s | {ratio:.2f} | {2 / ratio:.1f} |" in table
