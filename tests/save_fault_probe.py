"""launch/train.py with a disk that fills up: torch.save (what DeepSpeed's checkpoint engine
writes with) raises ENOSPC for any path under the checkpoint tag given first.

    python tests/save_fault_probe.py TAG [launch/train.py arguments]
"""

import errno
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch import train  # noqa: E402

full_at, real_save = sys.argv[1], torch.save


def disk_full_under_tag(obj, path, *args, **kwargs):
    if full_at in str(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return real_save(obj, path, *args, **kwargs)


torch.save = disk_full_under_tag
sys.exit(train.main(sys.argv[2:]))
