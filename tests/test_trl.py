"""TRL's SFTTrainer with pst-ds's callback and optimizer (what the README tells a TRL user to pass):
on 2 CPU ranks under ZeRO-3 with prompt/completion chat records and TRL's own completion-only
loss, the model trains and its export is exactly sparse; in this process, with gradient
accumulation, its loss is launch/train.py's on the same blocks. trl is a dev extra."""

import json

import pytest
import torch
from helpers import TINY_RUN, launch_ranks
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from pst_ds.config import ModelConfig
from pst_ds.io.models import load_tokenizer


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny random Llama with the embedded SmolLM2 tokenizer (it has a chat template)."""
    folder = tmp_path_factory.mktemp("tiny_chat_llama")
    tokenizer = load_tokenizer(ModelConfig(source="smollm2"))
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method", ["pst", "masked_lora"])
def test_trl_sft_trainer_prunes_with_the_callback(tmp_path, chat_model_dir, method):
    command = [
        "tests/trl_probe.py",
        "--model", str(chat_model_dir), "--out", str(tmp_path), "--method", method,
    ]  # fmt: skip
    launch_ranks(command, tmp_path)
    probe = json.loads((tmp_path / "probe.json").read_text())
    losses = probe["losses"]
    assert len(losses) == 6 and all(loss == loss for loss in losses)
    assert losses[-1] < losses[0]  # it trains
    assert probe["prompt_share"] > 0.1  # TRL's completion-only loss: the prompt's labels are -100
    assert probe["config"]["pst"]["factor_scale"] == "weight"  # a bare PSTConfig: the library's defaults
    report = json.loads((tmp_path / "pruned" / "pst_sparsity.json").read_text())
    tensors = {k: v for f in (tmp_path / "pruned").glob("*.safetensors") for k, v in load_file(f).items()}
    assert len(report["layers"]) == 14
    for name, layer in report["layers"].items():
        weight = tensors[f"{name}.weight"]
        assert layer["pattern_verified"] and int((weight == 0).sum()) == weight.numel() // 2, name


def test_trl_with_accumulation_and_completion_only_loss_trains_launch_train_loss(tmp_path, small_text):
    """TRL's SFTTrainer (its own completion-only loss) with the callback and optimizer, micro-batch
    1 × accumulation 2, on the blocks launch/train.py packs from the same records: the same loss
    at every step as launch/train.py's run (one rank, in this process; both per labelled token)."""
    from helpers import tiny_run
    from test_per_token_loss import completion_records
    from trl import SFTConfig, SFTTrainer

    from pst_ds.experiment import load_experiment
    from pst_ds.integrations.hf import prepare
    from pst_ds.io.data import load_splits
    from pst_ds.io.models import load_model
    from pst_ds.train.distributed import leave_process_group

    data = completion_records(tmp_path / "pairs.jsonl")
    settings = [
        f"data.train_files=[{data}]", "data.loss_on=completion", "train.max_steps=4", "train.log_every=1",
        "train.micro_batch_size=1", "train.gradient_accumulation_steps=2", "train.export=false",
        "train.warmup_steps=0", "train.weight_decay=0",
    ]  # fmt: skip
    run = tiny_run(tmp_path / "own", small_text, settings)
    try:
        run.train()
    finally:
        leave_process_group()
    records = [json.loads(line) for line in (tmp_path / "own" / "metrics.jsonl").open()]
    own = [r["loss"] for r in records if "loss" in r]

    config = load_experiment("configs/experiments/tiny_llama.yaml", [*TINY_RUN, *settings])
    tokenizer = load_tokenizer(config.model)
    blocks = load_splits(config.data, "causal_lm", tokenizer).train  # input_ids and labels, packed
    torch.manual_seed(config.train.seed)  # as launch/train.py does before it builds the model
    model = load_model(config.model, tokenizer)
    pst = prepare(model, config)
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"), use_cpu=True, per_device_train_batch_size=1,
        gradient_accumulation_steps=2, max_steps=4, learning_rate=config.train.lr, lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=config.train.seed,
        data_seed=config.train.seed,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_drop_last=True,
        max_length=config.data.block_size, completion_only_loss=True, bf16=False,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=blocks.with_format(None), processing_class=tokenizer,
        callbacks=[pst.callback], optimizer_cls_and_kwargs=pst.optimizer(args),
    )  # fmt: skip
    trainer.train()
    trl = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len({int((blocks[i]["labels"] != -100).sum()) for i in range(8)}) > 1  # the rules would differ
    assert len(own) == len(trl) == 4
    assert trl[0] == pytest.approx(own[0], abs=1e-6)  # the same first step: the same loss
    assert trl == pytest.approx(own, abs=1e-4)  # and the same training after it
