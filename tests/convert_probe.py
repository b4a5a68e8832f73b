"""Run by test_embedded_model.py under the deepspeed launcher with 2 ranks: rank 1 alone asks for
the embedded model, from an empty cache, inside a live ZeRO-3 HfDeepSpeedConfig; rank 0 waits.

Both traps at once: inside a job transformers saves files on global rank 0 only, and it
partitions every model it builds while a ZeRO-3 config lives.
"""

import deepspeed
import torch.distributed as dist
from transformers.integrations import HfDeepSpeedConfig

from pst_ds.io.models import embedded_smollm2_dir
from pst_ds.train.distributed import init_distributed, leave_process_group

if __name__ == "__main__":
    init_distributed()
    if dist.get_rank() == 1:
        live = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
        assert deepspeed.__version__ and live.is_zero3()
        print("probe: converted into", embedded_smollm2_dir(), flush=True)
    leave_process_group()
