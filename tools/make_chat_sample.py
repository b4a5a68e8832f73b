"""Write data/chat/austen_chat.jsonl: chat records made from Austen's paragraphs (public domain).

    python tools/make_chat_sample.py

Each record asks the assistant to continue a paragraph from its first sentence; the answer is
the rest of the paragraph. Deterministic: every 12th paragraph of at least three sentences.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data/austen/austen_6_novels.txt"
TARGET = ROOT / "data/chat/austen_chat.jsonl"


def paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def main() -> None:
    records = []
    for paragraph in paragraphs(SOURCE.read_text(encoding="utf-8"))[::12]:
        sentences = re.split(r"(?<!Mr\.)(?<!Mrs\.)(?<!Dr\.)(?<!St\.)(?<=[.!?])\s+", paragraph)
        if len(sentences) < 3 or len(paragraph) > 2000:
            continue
        first, rest = sentences[0], " ".join(sentences[1:])
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"Continue this passage in Jane Austen's style:\n\n{first}"},
                    {"role": "assistant", "content": rest},
                ]
            }
        )
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(records)} records to {TARGET}")


if __name__ == "__main__":
    main()
