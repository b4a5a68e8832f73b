"""launch/train.py with a disk that fills up: torch.save (what DeepSpeed's checkpoint engine
writes with) raises ENOSPC for any path under the checkpoint tag $FULL_AT after the first
$FULL_AFTER writes there (default 0: from the first), on the rank $FULL_ON_RANK only if set (a
node's own disk), else on every rank.

    FULL_AT=step00000004 [deepspeed --num_gpus 2] python tests/save_fault_probe.py [launch/train.py arguments]
"""

import errno
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch import train  # noqa: E402

full_at, on_rank, real_save = os.environ["FULL_AT"], os.environ.get("FULL_ON_RANK"), torch.save
writes_left = [int(os.environ.get("FULL_AFTER", "0"))]


def disk_full_under_tag(obj, path, *args, **kwargs):
    if full_at in str(path) and on_rank in (None, os.environ.get("RANK", "0")):
        if writes_left[0] == 0:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        writes_left[0] -= 1
    return real_save(obj, path, *args, **kwargs)


torch.save = disk_full_under_tag
sys.exit(train.main(sys.argv[1:]))
