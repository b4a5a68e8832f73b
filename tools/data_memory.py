"""Peak memory of tokenising a large JSON-lines corpus into the cache, at two corpus sizes.

    python tools/data_memory.py [--sizes_mb 100 1000] [--out docs/data_memory]

Writes chat records (data/chat/austen_chat.jsonl, repeated with numbered turns) up to each
size into a temporary folder, then runs tools/prepare_data.py on it in a fresh process with an
empty cache (the embedded model's tokenizer, data.loss_on=completion) and reads its peak
resident memory, and its peak anonymous memory: resident memory less the pages of datasets'
memory-mapped cache files, which grow with the corpus but are clean pages the kernel takes back
when it needs them. Bounded memory means the anonymous peak does not grow with the corpus: the
ratios of the largest size's peaks to the smallest's are printed beside the sizes' ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data/chat/austen_chat.jsonl"
sys.path.insert(0, str(ROOT))
from pst_ds.io.models import embedded_smollm2_dir  # noqa: E402


def write_corpus(path: Path, size_bytes: int) -> int:
    """Chat records up to ``size_bytes``; returns how many."""
    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    written = count = 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size_bytes:
            record = records[count % len(records)]
            turns = [{**turn, "content": f"({count}) {turn['content']}"} for turn in record["messages"]]
            line = json.dumps({"messages": turns}, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode())
            count += 1
    return count


def measure(size_mb: int, work: Path) -> dict:
    corpus = work / f"corpus_{size_mb}mb.jsonl"
    records = write_corpus(corpus, size_mb * 2**20)
    cache = work / f"cache_{size_mb}"
    model = embedded_smollm2_dir()  # converted once in the usual cache; the data cache starts empty
    shutil.copytree(model, cache / "models" / model.name)
    result = work / f"result_{size_mb}.json"
    command = [
        sys.executable, str(ROOT / "tools/prepare_data.py"), "--out", str(result),
        f"data.train_files=[{corpus}]", "data.loss_on=completion", "data.eval_files=[]",
    ]  # fmt: skip
    env = {**os.environ, "PST_DS_CACHE": str(cache)}
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    figures = json.loads(result.read_text())
    corpus.unlink()
    shutil.rmtree(cache)
    return {"size_mb": size_mb, "records": records, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes_mb", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--out", default="docs/data_memory", help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as work:
        rows = [measure(size, Path(work)) for size in args.sizes_mb]
    first, last = rows[0], rows[-1]
    lines = [
        "| corpus | records | train blocks | seconds | peak RSS (MiB) | peak anonymous (MiB) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['size_mb']:,} MB | {r['records']:,} | {r['splits']['train']['blocks']:,} | "
            f"{r['seconds']} | {r['peak_rss_bytes'] / 2**20:,.0f} | "
            f"{r['peak_anonymous_bytes'] / 2**20:,.0f} |"
            for r in rows
        ),
        "",
        f"Corpus {last['size_mb'] / first['size_mb']:.1f}x larger; peak RSS "
        f"{last['peak_rss_bytes'] / first['peak_rss_bytes']:.2f}x, peak anonymous memory "
        f"{last['peak_anonymous_bytes'] / first['peak_anonymous_bytes']:.2f}x.",
    ]
    print("\n".join(lines))
    Path(f"{args.out}.json").write_text(json.dumps(rows, indent=1))
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
