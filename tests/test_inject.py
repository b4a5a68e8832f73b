"""Injection into tiny GPT-2, Llama and BERT models."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from pst_ds import ConfigError, PSTConfig, PSTLinear, inject_pst, iter_pst_layers, set_sparsity

FACTOR_NAMES = ("U", "V", "A", "B", "R", "C")  # PST's trained factors

EXPECTED = {
    "tiny_gpt2": [
        f"transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ],
    "tiny_llama": [
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_injection_replaces_block_linears_only(name, tiny_model):
    model = tiny_model(name)
    before = dict(model.named_parameters())
    input_ids = torch.randint(0, 200, (2, 16))
    dense_logits = model(input_ids).logits

    replaced = inject_pst(model, PSTConfig.release())

    assert sorted(replaced) == sorted(EXPECTED[name])
    assert sorted(n for n, _ in iter_pst_layers(model)) == sorted(EXPECTED[name])
    after = dict(model.named_parameters())
    # Original names and Parameter objects survive; only factors are added.
    for key, param in before.items():
        assert after[key] is param
    added = set(after) - set(before)
    assert added == {f"{layer}.{f}" for layer in replaced for f in FACTOR_NAMES}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == added
    # Embeddings and heads are untouched.
    assert not isinstance(model.get_output_embeddings(), PSTLinear)
    assert not model.get_input_embeddings().weight.requires_grad
    # At sparsity 0 with V = B = R = C = 0 the model computes exactly what it did before.
    torch.testing.assert_close(model(input_ids).logits, dense_logits)
    set_sparsity(model, 0.5)
    assert all(layer.sparsity == 0.5 for _, layer in iter_pst_layers(model))
    assert not torch.allclose(model(input_ids).logits, dense_logits)


def test_bert_defaults_skip_pooler_and_train_the_head():
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    replaced = inject_pst(model, PSTConfig.release(trainable_modules=["classifier"]))
    assert len(replaced) == 2 * 6
    assert not any("pooler" in name for name in replaced)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(n.startswith("classifier.") or n.rsplit(".", 1)[1] in FACTOR_NAMES for n in trainable)


def test_patterns_that_match_nothing_are_errors(tiny_model):
    with pytest.raises(ConfigError, match="q_projection"):
        inject_pst(tiny_model("tiny_llama"), PSTConfig.release(target_modules=["q_proj", "q_projection"]))
    with pytest.raises(ConfigError, match="matches no Linear"):
        inject_pst(tiny_model("tiny_llama"), PSTConfig.release(target_modules=["embed_tokens"]))
    with pytest.raises(ConfigError, match="classifier"):
        inject_pst(tiny_model("tiny_gpt2"), PSTConfig.release(trainable_modules=["classifier"]))


def test_set_sparsity_rejects_out_of_range(tiny_model):
    model = tiny_model("tiny_gpt2")
    inject_pst(model, PSTConfig.release())
    with pytest.raises(ValueError):
        set_sparsity(model, 1.0)
