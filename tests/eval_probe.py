"""Run under the deepspeed launcher by test_per_token_loss.py: evaluate one seeded tiny_llama on
completion-only records split over the ranks; rank 0 writes the result.

    deepspeed --num_gpus 2 tests/eval_probe.py DATA.jsonl OUT.json BATCH_SIZE
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pst_ds.experiment import load_experiment  # noqa: E402
from pst_ds.io.data import load_splits  # noqa: E402
from pst_ds.io.evaluate import evaluate_model  # noqa: E402
from pst_ds.io.models import load_model, load_tokenizer  # noqa: E402
from pst_ds.train.distributed import init_distributed, leave_process_group  # noqa: E402


def evaluated(data: str, batch_size: int) -> dict:
    """tiny_llama (seed 0) on ``data``'s validation split, over however many ranks there are."""
    config = load_experiment("configs/experiments/tiny_llama.yaml", [f"data.train_files=[{data}]",
                                                                     "data.loss_on=completion"])  # fmt: skip
    tokenizer = load_tokenizer(config.model)
    dataset = load_splits(config.data, "causal_lm", tokenizer).validation
    torch.manual_seed(0)
    model = load_model(config.model, tokenizer).eval()
    return evaluate_model(model, dataset, "causal_lm", batch_size)


if __name__ == "__main__":
    data, out, batch = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    batch = int(batch)
    init_distributed()  # gloo on CPU ranks, without building DeepSpeed's shared-memory op
    result = evaluated(data, batch)
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    leave_process_group()
