"""The files a config names: where a relative path is taken from, whether a model folder is
whole, whether a path can be written. Checked when a run starts, never when a config is built
(a saved config must rebuild after its data has moved)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import ExperimentConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def check_files(config: ExperimentConfig) -> None:
    """Refuse a run whose model folder or data files are missing. Called when a run starts, not
    when a config is built: a saved config must rebuild after its data has moved."""
    if config.model.source == "path":
        problem = model_folder_problem(resolve_path(config.model.path))
        if problem is not None:
            raise ConfigError(f"model.path {config.model.path!r} {problem}")
    tokenizer = config.model.tokenizer
    if config.model.source == "random" and tokenizer not in (None, "byte", "smollm2"):
        problem = model_folder_problem(resolve_path(tokenizer), weights=False)
        if problem is not None:
            raise ConfigError(f"model.tokenizer {tokenizer!r} {problem}")
    for name in config.data.train_files + config.data.eval_files + config.oneshot.calibration_files:
        if not resolve_path(name).exists():
            raise ConfigError(f"data file not found: {name}")


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def model_folder_problem(folder: Path, weights: bool = True) -> str | None:
    """What keeps ``folder`` from being a Hugging Face model folder (with its weights unless not
    ``weights``, and its tokenizer), said as the end of a sentence; None when nothing does."""
    if not folder.is_dir():
        return "is not a folder"
    if weights and not (folder / "config.json").is_file():
        return "is not a Hugging Face model folder: it has no config.json (save one with save_pretrained)"
    if weights and not any((folder / name).is_file() for name in WEIGHT_FILES):
        return f"has no weights: none of {', '.join(WEIGHT_FILES)} (save them with model.save_pretrained)"
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return (
            f"has no tokenizer: none of {', '.join(TOKENIZER_FILES)} (save it beside the model with "
            "tokenizer.save_pretrained)"
        )
    return None


def check_writable(path: Path, what: str, folder: bool = False) -> None:
    """Refuse ``path`` (the ``what`` a user set) if a file (or with ``folder``, a folder) cannot be
    written there: something of the other kind is in the way, or its folder is not writable."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing == path and not folder and path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give a file name")
    if not existing.is_dir() and (existing != path or folder):
        raise ConfigError(f"{what} {path}: {existing} exists and is not a folder")
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
        raise ConfigError(f"{what} {path}: {existing} is not writable")


def resolve_path(name: str) -> Path:
    """A relative path is taken from the current directory, else from the project root."""
    path = Path(name)
    if path.is_absolute() or path.exists():
        return path
    return PROJECT_ROOT / path
