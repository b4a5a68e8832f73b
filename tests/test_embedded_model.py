"""The embedded default model: converted from its GGUF once, a plain HF model, PST-injectable."""

import torch
from transformers import AutoModelForCausalLM

from pst_ds import PSTConfig, inject_pst
from pst_ds.export import merge_pst_layers
from pst_ds.models import embedded_smollm2_dir


def test_smollm2_converts_to_a_plain_saveable_model(tmp_path):
    folder = embedded_smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)

    names = inject_pst(model, PSTConfig())
    assert len(names) == 30 * 7
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # (r_w + r_m + 1) * (out + in) per matrix, the paper's count.
    pruned = [model.get_submodule(n) for n in names]
    assert trainable == sum(17 * (m.out_features + m.in_features) for m in pruned) == 5_189_760

    merge_pst_layers(model)  # the export path: plain layers again, then a plain save
    model.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").stat().st_size > 500e6
