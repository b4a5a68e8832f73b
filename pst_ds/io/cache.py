"""Where pst-ds keeps what it derives once and reuses: the converted embedded model and
tokenised datasets.

``PST_DS_CACHE`` moves it (for example to an empty folder, to run as a fresh machine would);
the default is ``.cache/`` at the project root. Read at each call, so a process can set it
before it loads anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..paths import PROJECT_ROOT

CACHE_ENV = "PST_DS_CACHE"


def cache_dir() -> Path:
    """The cache folder (not created here)."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser().resolve() if configured else PROJECT_ROOT / ".cache"
