"""The base model a checkpoint builds on, when the checkpoint does not hold it.

A run whose backbone never changes (PST and the other frozen-backbone methods, on a model read
from a folder) checkpoints only what trains: resume and export read the frozen weights back
from the model's own folder. The checkpoint records that folder's fingerprint (each file's size
and sha256), so a base that has changed since is refused instead of being silently combined with
factors trained on another one. Hashing a large model takes minutes: a fingerprint is cached
(``<cache>/fingerprints.json``) by each file's path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..config import ConfigError
from .cache import cache_dir

FINGERPRINTS = "fingerprints.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # the files BaseTensors reads tensors from


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _cache_file() -> Path:
    return cache_dir() / FINGERPRINTS


def _read_cache() -> dict[str, Any]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or one cut short: hashing again is always safe


def _write_cache(cache: dict[str, Any]) -> None:
    """Atomically, and never fatal: the cache only saves time."""
    path = _cache_file()
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(cache, indent=1))
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)


def defines_the_model(path: Path) -> bool:
    """Whether a file of a model folder holds what a checkpoint builds on: the weights, their
    index, the architecture (config.json). A README, the tokenizer or a chat template does not:
    editing one must not block a resume."""
    return path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json") or path.name == "config.json"


def fingerprint(folder: Path, progress: Callable[[str], None] = lambda _: None) -> dict[str, dict[str, Any]]:
    """{file name: {bytes, sha256}} for every file directly in ``folder`` that defines the model;
    ``progress`` hears once when files must be hashed (not in the cache, or changed since)."""
    cache = _read_cache()
    files = {
        str(p.resolve()): p.stat() for p in sorted(folder.iterdir()) if p.is_file() and defines_the_model(p)
    }
    stale = [
        key
        for key, stat in files.items()
        if key not in cache
        or (cache[key]["bytes"], cache[key]["mtime_ns"]) != (stat.st_size, stat.st_mtime_ns)
    ]
    if stale:
        size = sum(files[key].st_size for key in stale) / 2**20
        progress(f"pst-ds: fingerprinting the base model in {folder} ({size:,.0f} MiB; once, then cached)")
        for key in stale:
            stat = files[key]
            cache[key] = {
                "bytes": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "sha256": file_sha256(Path(key)),
            }
        _write_cache(cache)
    return {Path(key).name: {"bytes": cache[key]["bytes"], "sha256": cache[key]["sha256"]} for key in files}


def fingerprint_change(recorded: dict[str, Any], folder: Path) -> str | None:
    """What differs between the fingerprint ``recorded`` and ``folder`` now (the first file
    that does), or None when it is the same model."""
    if not folder.is_dir():
        return f"{folder} is not there any more"
    now = fingerprint(folder)
    for name in sorted(set(recorded) | set(now)):
        if name not in now:
            return f"{folder / name} is missing"
        if name not in recorded:
            return f"{folder / name} was not there"
        if now[name] != recorded[name]:
            return f"{folder / name} is not the file it was (size or sha256)"
    return None


@dataclass(frozen=True)
class BaseRecord:
    """Where a checkpoint's left-out tensors come from: the base model folder, the dtype the run
    held them in, and the run's start folder when a warm start rewrote the backbone."""

    folder: Path
    dtype: torch.dtype
    start: Path | None = None


class BaseTensors:
    """Tensors of a Hugging Face model folder (safetensors or PyTorch ``.bin`` files) by their
    names in the model, as the run held them: loaded in fp32 (as training loads models), then
    rounded through ``dtype`` (the engine's, bf16 say) as DeepSpeed had cast the frozen weights.
    ``start``: a run's start folder (io/start_weights.py), whose tensors replace the folder's."""

    def __init__(
        self,
        folder: Path,
        base_model_prefix: str,
        dtype: torch.dtype = torch.float32,
        start: Path | None = None,
    ) -> None:
        self.folder, self.prefix, self.dtype = folder, f"{base_model_prefix}.", dtype
        self.where: dict[str, Path] = {}
        for source in (folder, start) if start is not None else (folder,):
            for path in sorted(source.iterdir()):
                if path.suffix in WEIGHT_SUFFIXES and path.is_file():
                    self.where.update(dict.fromkeys(self._keys(path), path))
        self._loaded: dict[Path, Any] = {}

    @staticmethod
    def _keys(path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        return list(torch.load(path, map_location="cpu", mmap=True, weights_only=True))

    def key(self, name: str) -> str | None:
        """The name in the files of the model's tensor ``name`` (files saved from the bare base
        model leave out its prefix, e.g. GPT-2's ``transformer.``), or None if they lack it."""
        for candidate in (name, name.removeprefix(self.prefix)):
            if candidate in self.where:
                return candidate
        return None

    def get(self, name: str) -> torch.Tensor:
        key = self.key(name)
        if key is None:
            raise ConfigError(f"{name} is in neither the checkpoint nor the base model in {self.folder}")
        path = self.where[key]
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                tensor = handle.get_tensor(key)
        else:
            if path not in self._loaded:
                self._loaded = {path: torch.load(path, map_location="cpu", mmap=True, weights_only=True)}
            tensor = self._loaded[path][key]
        return tensor.float().to(self.dtype).float() if tensor.is_floating_point() else tensor
