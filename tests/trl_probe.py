"""Run under the deepspeed launcher by test_trl.py: TRL's SFTTrainer, unchanged, on prompt/completion
chat records with its own completion-only loss, given pst-ds's callback and optimizer as the
README tells a TRL user to; then the pruned model saved from the live model.

    deepspeed --num_gpus 2 tests/trl_probe.py --model DIR --out DIR --method pst|masked_lora
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pst_ds import PSTConfig  # noqa: E402
from pst_ds.experiment import experiment_config  # noqa: E402
from pst_ds.integrations.hf import accelerator_config, deepspeed_config, prepare, save_pruned  # noqa: E402
from pst_ds.train.distributed import leave_process_group  # noqa: E402


def records(count: int) -> Dataset:
    """Prompt/completion chat records: the user's turn is the prompt, the assistant's the completion."""
    lines = (ROOT / "data/chat/austen_chat.jsonl").read_text().splitlines()[:count]
    chats = [json.loads(line)["messages"] for line in lines]
    return Dataset.from_list([{"prompt": chat[:-1], "completion": chat[-1:]} for chat in chats])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", default="pst")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--local_rank", type=int, default=-1)
    args_in = parser.parse_args()
    out = Path(args_in.out)
    args = SFTConfig(  # before the model: under ZeRO-3 it then loads partitioned
        output_dir=str(out / "trl"),
        deepspeed=deepspeed_config("configs/zero3.json"),
        accelerator_config=accelerator_config(),
        per_device_train_batch_size=2,
        max_steps=args_in.steps,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        max_length=96,
        completion_only_loss=True,
        bf16=False,  # TRL defaults to bf16; configs/zero3.json trains in fp32 (CPU ranks)
        seed=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(args_in.model)
    model = AutoModelForCausalLM.from_pretrained(args_in.model, dtype=torch.float32)
    sparsity = PSTConfig(final_sparsity=0.5)  # a bare PST section: the library's defaults
    pst = prepare(
        model, sparsity if args_in.method == "pst" else experiment_config(method=args_in.method, pst=sparsity)
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=records(64),
        processing_class=tokenizer,
        callbacks=[pst.callback],
        optimizer_cls_and_kwargs=pst.optimizer(args),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    save_pruned(pst, out / "pruned", tokenizer)
    if dist.get_rank() == 0:
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        masked = float((batch["labels"] == -100).float().mean())
        config = pst.config.to_dict()
        (out / "probe.json").write_text(
            json.dumps({"losses": losses, "prompt_share": masked, "config": config})
        )
    leave_process_group()


if __name__ == "__main__":
    main()
