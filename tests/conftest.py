import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> Path:
    """The first 60 kB of Austen: enough for tiny models, quick to tokenise bytewise."""
    path = tmp_path_factory.mktemp("data") / "austen_head.txt"
    with open(ROOT / "data/austen/austen_6_novels.txt", encoding="utf-8") as src:
        path.write_text(src.read(60_000), encoding="utf-8")
    return path


@pytest.fixture
def python() -> str:
    return sys.executable
