"""Run under the deepspeed launcher by test_hf_trainer.py: one short PST run as launch/train.py
builds it from the experiment config (--path own) or as a user's script builds a plain Trainer
with pst-ds's callback and optimizer (--path hf), with the same settings; rank 0 saves each
step's loss, time and every layer's mask (the one the next step's forward uses).

    deepspeed --num_gpus 2 tests/hf_trainer_probe.py --path own|hf --ds_config X --config Y \
        --out DIR [key=value ...]
"""

import argparse
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pst_ds.experiment import load_experiment  # noqa: E402
from pst_ds.integrations.hf import (  # noqa: E402
    accelerator_config,
    deepspeed_config,
    prepare,
    save_pruned,
)
from pst_ds.integrations.run import build_run  # noqa: E402
from pst_ds.io.data import collate_blocks, load_splits  # noqa: E402
from pst_ds.io.models import load_model, load_tokenizer  # noqa: E402
from pst_ds.train.distributed import leave_process_group  # noqa: E402
from pst_ds.train.engine import load_ds_config  # noqa: E402


def masks(layers: dict) -> dict[str, torch.Tensor]:
    """Every layer's whole mask (collective under ZeRO-3)."""
    whole = {}
    for name, layer in layers.items():
        with deepspeed.zero.GatheredParameters(list(layer.parameters(recurse=False))):
            whole[name] = layer.mask().cpu()
    return whole


class Record:
    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.start = time.time()

    def add(self, layers: dict, loss: float | None) -> None:
        seconds = time.time() - self.start  # the step (and its logging), not the masks' gathering
        self.steps.append({"loss": loss, "masks": masks(layers), "seconds": seconds})
        self.start = time.time()

    def save(self, path: Path) -> None:
        if dist.get_rank() == 0:
            torch.save(self.steps, path)


def recorder(layers: dict, record: Record) -> TrainerCallback:
    class Recorder(TrainerCallback):  # on every rank; after the PST callback's step end
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:  # a step's log (logging_steps=1), not the summary at the end
                record.add(layers, logs["loss"])

    return Recorder()


def run_own(config, ds_config: dict, record: Record) -> None:
    """launch/train.py's run, built from the experiment config."""
    run = build_run(config, ds_config)
    run.trainer.add_callback(recorder(run.layers, record))
    record.start = time.time()
    run.train()


def run_hf(config, ds_config: dict, record: Record, out: Path) -> None:
    train = config.train
    args = TrainingArguments(  # the experiment's settings, as launch/train.py would take them
        output_dir=str(out / "hf"),
        deepspeed=deepspeed_config(ds_config),
        per_device_train_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.lr,
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        max_steps=train.max_steps,
        seed=train.seed,
        logging_steps=1,
        save_strategy="steps",  # one HF checkpoint, at the end
        save_steps=train.max_steps,
        report_to="none",
        disable_tqdm=True,
        accelerator_config=accelerator_config(),  # on CPU: every rank its share of the data
    )
    torch.manual_seed(train.seed)  # as pst-ds's loop does before it builds a random-init model
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, tokenizer)
    pst = prepare(model, config)
    with args.main_process_first():
        data = load_splits(config.data, "causal_lm", tokenizer)

    trainer = Trainer(  # a plain Trainer, as a user's own script (and TRL) passes pst-ds's parts
        model=model,
        args=args,
        train_dataset=data.train,
        data_collator=collate_blocks,
        callbacks=[pst.callback],
        optimizer_cls_and_kwargs=pst.optimizer(args),
    )
    trainer.add_callback(recorder(pst.layers, record))
    record.start = time.time()
    trainer.train()
    save_pruned(trainer, out / "pruned")  # from the live model, every rank
    if dist.get_rank() == 0:  # and from the Trainer's checkpoint folder, on one process
        save_pruned(out / "hf" / f"checkpoint-{train.max_steps}", out / "pruned_from_checkpoint")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--path", choices=["own", "hf"], required=True)
    parser.add_argument("--ds_config", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    config = load_experiment(args.config, args.overrides + [f"train.output_dir={out / 'own'}"])
    record = Record()
    if args.path == "own":
        run_own(config, load_ds_config(args.ds_config), record)
    else:
        run_hf(config, load_ds_config(args.ds_config), record, out)
    record.save(out / f"{args.path}.pt")
    leave_process_group()


if __name__ == "__main__":
    main()
