"""Module injection: replace the targeted linears of a loaded model by PSTLinear layers.

Works on a model whose weights ZeRO-3 has already partitioned (shapes come from
``ds_shape``); the factors it creates become ZeRO parameters at ``deepspeed.initialize``.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import DEFAULT_TARGET_MODULES, ConfigError, PSTConfig, name_matches
from .layer import PSTLinear

FACTOR_NAMES = ("U", "V", "A", "B", "R", "C")


def _matching(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and name_matches(n, patterns)]


def _check_every_pattern_matches(model: nn.Module, patterns: list[str], what: str) -> None:
    for pattern in patterns:
        if not _matching(model, [pattern]):
            raise ConfigError(f"{what} pattern {pattern!r} matches no module of {type(model).__name__}")


def inject_pst(model: nn.Module, config: PSTConfig) -> list[str]:
    """Replace every Linear/Conv1D whose name matches ``config.target_modules`` by a PSTLinear.

    Freezes every other parameter, then makes the factors and the parameters of modules
    matching ``config.trainable_modules`` trainable. Returns the replaced layers' names.
    """
    # The defaults cover several families, so only their union must match; a user's own
    # patterns must each match something, so that a typo cannot silently prune less.
    if config.target_modules != DEFAULT_TARGET_MODULES:
        _check_every_pattern_matches(model, config.target_modules, "pst.target_modules")
    _check_every_pattern_matches(model, config.trainable_modules, "pst.trainable_modules")
    targets = [
        (name, module)
        for name, module in _matching(model, config.target_modules)
        if isinstance(module, (nn.Linear, Conv1D))
    ]
    if not targets:
        raise ConfigError(f"pst.target_modules matches no Linear/Conv1D layer of {type(model).__name__}")

    model.requires_grad_(False)
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, PSTLinear(module, config))
    for _, module in _matching(model, config.trainable_modules):
        module.requires_grad_(True)
    return [name for name, _ in targets]


def iter_pst_layers(model: nn.Module) -> Iterator[tuple[str, PSTLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, PSTLinear):
            yield name, module


def set_sparsity(model: nn.Module, sparsity: float) -> None:
    """Set the sparsity in force in every PST layer of ``model``."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    for _, layer in iter_pst_layers(model):
        layer.sparsity = sparsity
