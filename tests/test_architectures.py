"""The default target patterns on random-init models of each family a user brings: the block
linears are found (Phi-3's fused ones too), nothing else is, and the injected model trains;
a model whose names match nothing gets an error that lists its linear layers."""

import re

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from pst_ds import ConfigError, PSTConfig, inject_pst, iter_pst_layers, set_sparsity
from pst_ds.config import TARGET_PRESETS

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128}
LLAMA_LIKE = {**SMALL, "intermediate_size": 96, "num_key_value_heads": 2}
IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
LLAMA_BLOCK = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
# model_type: (config fields, the block's linears by their name under the block)
ARCHITECTURES = {
    "llama": (LLAMA_LIKE, "model.layers", LLAMA_BLOCK),
    "mistral": (LLAMA_LIKE, "model.layers", LLAMA_BLOCK),
    "qwen2": (LLAMA_LIKE, "model.layers", LLAMA_BLOCK),
    "gemma": ({**LLAMA_LIKE, "head_dim": 16}, "model.layers", LLAMA_BLOCK),
    "phi3": (
        {**LLAMA_LIKE, **IDS},
        "model.layers",
        ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
    ),  # fmt: skip
    "gpt2": (
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128},
        "transformer.h",
        ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    ),  # fmt: skip
    "gpt_neox": (
        {**SMALL, "intermediate_size": 96},
        "gpt_neox.layers",
        ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    ),  # fmt: skip
    "falcon": (
        {**SMALL, "new_decoder_architecture": True, "num_kv_heads": 2},
        "transformer.h",
        ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    ),  # fmt: skip
    "opt": (
        {**SMALL, "ffn_dim": 96, "word_embed_proj_dim": 64},
        "model.decoder.layers",
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"],
    ),  # fmt: skip
    "bert": (
        {**SMALL, "intermediate_size": 96},
        "encoder.layer",
        [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ],
    ),  # fmt: skip
}


def build(model_type: str) -> nn.Module:
    fields, _, _ = ARCHITECTURES[model_type]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **fields)
    auto = AutoModel if model_type == "bert" else AutoModelForCausalLM
    return auto.from_config(config).eval()


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_default_targets_find_every_block_linear_and_nothing_else(model_type):
    model = build(model_type)
    _, blocks, linears = ARCHITECTURES[model_type]
    expected = sorted(f"{blocks}.{i}.{name}" for i in range(2) for name in linears)
    input_ids = torch.randint(3, 128, (2, 12))
    dense = model(input_ids).last_hidden_state if model_type == "bert" else model(input_ids).logits

    assert sorted(inject_pst(model, PSTConfig.release(compile=False))) == expected
    assert sorted(name for name, _ in iter_pst_layers(model)) == expected
    set_sparsity(model, 0.5)
    output = model(input_ids)
    pruned = output.last_hidden_state if model_type == "bert" else output.logits
    assert pruned.shape == dense.shape and torch.isfinite(pruned).all()
    pruned.float().square().mean().backward()
    for name, layer in iter_pst_layers(model):
        assert layer.U.grad is not None and int((~layer.mask()).sum()) == layer.mask().numel() // 2, name


def test_a_preset_stands_for_its_family_patterns():
    config = PSTConfig.release(target_modules=["preset:gpt_neox"])
    assert config.target_modules == TARGET_PRESETS["gpt_neox"]
    with pytest.raises(ConfigError, match="no preset 'neox'"):
        PSTConfig.release(target_modules=["preset:neox"])


class Custom(nn.Module):
    """A model of its own naming: no default pattern matches its linears."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"w_in": nn.Linear(8, 16), "w_out": nn.Linear(16, 8)}) for _ in range(3)
        )
        self.head = nn.Linear(8, 4)


def test_a_model_whose_linears_match_nothing_is_told_their_names():
    with pytest.raises(ConfigError) as err:
        inject_pst(Custom(), PSTConfig.release(compile=False))
    message = str(err.value)
    assert "matches no Linear/Conv1D layer of Custom" in message
    assert re.search(r"its linear layers: blocks\.N\.w_in, blocks\.N\.w_out, head \(", message), message
    # Named, they are found.
    names = inject_pst(
        Custom(), PSTConfig.release(compile=False, target_modules=[r"blocks\.\d+\.w_(in|out)"])
    )
    assert len(names) == 6
