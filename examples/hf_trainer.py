"""Prune a causal LM with PST from a plain transformers.Trainer script, under DeepSpeed ZeRO-3.

    deepspeed --num_gpus 2 examples/hf_trainer.py --output_dir runs/hf --max_steps 4

Every TrainingArguments flag works; --model, --data and --pst_config choose the rest. The three
lines marked "PST" are what turns a Trainer script into a PST run.
"""

import dataclasses

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments

from pst_ds.config import ModelConfig
from pst_ds.integrations.hf import PSTTrainer, accelerator_config, deepspeed_config, prepare, save_pruned
from pst_ds.io.data import collate_blocks, load_splits
from pst_ds.io.models import model_dir


@dataclasses.dataclass
class Arguments:
    model: str = "smollm2"  # the embedded SmolLM2-135M-Instruct, or a local HF folder
    data: str = "data/austen/austen_6_novels.txt"  # .txt, .jsonl/.json, .parquet or a folder
    pst_config: str = "configs/experiments/default.yaml"  # the method: sparsity, mask, warm start


def main() -> None:
    parser = HfArgumentParser((Arguments, TrainingArguments))
    parser.set_defaults(
        deepspeed=deepspeed_config("configs/zero3.json"), accelerator_config=accelerator_config()
    )
    parser.set_defaults(per_device_train_batch_size=2)
    parser.set_defaults(learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none")
    ours, args = parser.parse_args_into_dataclasses()  # first: under ZeRO-3 the model loads partitioned
    path = model_dir(ModelConfig()) if ours.model == "smollm2" else ours.model
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    pst = prepare(model, ours.pst_config)  # PST: inject the layers

    data_config = dataclasses.replace(pst.config.data, train_files=[ours.data])
    with args.main_process_first():  # one rank tokenises into the cache, the others read it
        data = load_splits(data_config, "causal_lm", tokenizer)
    features = pst.callbacks(args.output_dir, evaluate={"validation": data.validation}, export=False)
    trainer = PSTTrainer(  # PST: a Trainer that drives the sparsity schedule
        pst, model=model, args=args, train_dataset=data.train, data_collator=collate_blocks,
        processing_class=tokenizer, callbacks=features,  # run lock, preemption, perplexities, records
    )  # fmt: skip
    trainer.train()
    save_pruned(trainer, f"{args.output_dir}/pruned")  # PST: the pruned model, a plain HF folder


if __name__ == "__main__":
    main()
