"""TRL's SFTTrainer with pst-ds's callback and optimizer (what the README tells a TRL user to pass),
on 2 CPU ranks under ZeRO-3: prompt/completion chat records, TRL's own completion-only loss; the
model trains and its export is exactly sparse. trl is a dev extra."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import DEEPSPEED, free_port
from test_hf_trainer import run_ranks
from transformers import AutoConfig, AutoModelForCausalLM

from pst_ds.config import ModelConfig
from pst_ds.io.models import load_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


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


@pytest.mark.parametrize("method", ["pst", "masked_lora"])
def test_trl_sft_trainer_prunes_with_the_callback(tmp_path, chat_model_dir, method):
    command = [
        DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "tests/trl_probe.py",
        "--model", str(chat_model_dir), "--out", str(tmp_path), "--method", method,
    ]  # fmt: skip
    run_ranks(command, tmp_path / "extensions", timeout=900)
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
