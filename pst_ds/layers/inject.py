"""Module injection: replace the targeted linears of a loaded model by PST (or baseline) layers.

Works on a model whose weights ZeRO-3 has already partitioned (shapes come from
``ds_shape``); the factors it creates become ZeRO parameters at ``deepspeed.initialize``.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from ..config import DEFAULT_TARGET_MODULES, ConfigError, LoRAConfig, ModelConfig, PSTConfig, name_matches
from ..io.models import load_model
from .base import SparseLinear
from .baselines import LoRALinear, MagnitudeLinear, MovementLinear
from .pst import PSTLinear

FACTOR_NAMES = ("U", "V", "A", "B", "R", "C")


def _matching(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and name_matches(n, patterns)]


def _check_every_pattern_matches(model: nn.Module, patterns: list[str], what: str) -> None:
    for pattern in patterns:
        if not _matching(model, [pattern]):
            raise ConfigError(f"{what} pattern {pattern!r} matches no module of {type(model).__name__}")


def _layer_factory(method: str, config: PSTConfig, lora: LoRAConfig):
    return {
        "pst": lambda base: PSTLinear(base, config),
        # One-shot methods: PST's layer carries their mask and weights (pst.init) and is exported
        # like every method; its factors stay at their init, where the update U V is 0.
        "wanda": lambda base: PSTLinear(base, config),
        "sparsegpt": lambda base: PSTLinear(base, config),
        "magnitude": lambda base: MagnitudeLinear(base, config),
        "movement": lambda base: MovementLinear(base, config, train_weight=True),
        "smp": lambda base: MovementLinear(base, config, train_weight=False),
        "lora": lambda base: LoRALinear(base, lora),
    }[method]


def inject_pst(
    model: nn.Module, config: PSTConfig, method: str = "pst", lora: LoRAConfig | None = None
) -> list[str]:
    """Replace every Linear/Conv1D whose name matches ``config.target_modules`` by ``method``'s layer.

    Freezes every other parameter, then makes the method's own parameters (the factors, or a
    baseline's weights and scores) and those of modules matching ``config.trainable_modules``
    trainable. ``dense`` replaces nothing and trains the whole model. Returns the targeted
    layers' names.
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
    if method == "dense":
        model.requires_grad_(True)
        return [name for name, _ in targets]

    model.requires_grad_(False)
    make = _layer_factory(method, config, lora or LoRAConfig())
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, make(module))
    for _, module in _matching(model, config.trainable_modules):
        module.requires_grad_(True)
    return [name for name, _ in targets]


def build_model(
    model: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    labels: list[str] | None,
    pst: PSTConfig,
    method: str,
    lora: LoRAConfig,
) -> tuple[nn.Module, list[str]]:
    """The model with ``method``'s layers injected, and the targeted layers' names: what
    training builds (partitioned under a live ZeRO-3 config) and export builds again."""
    loaded = load_model(model, tokenizer, labels)
    return loaded, inject_pst(loaded, pst, method, lora)


def head_parameters(model: nn.Module, config: PSTConfig) -> list[nn.Parameter]:
    """The parameters of the modules matching ``config.trainable_modules`` (e.g. a task head)."""
    return [p for _, module in _matching(model, config.trainable_modules) for p in module.parameters()]


def iter_pst_layers(model: nn.Module) -> Iterator[tuple[str, SparseLinear]]:
    """Every pruned layer (PST or a pruning baseline) with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            yield name, module


def set_sparsity(model: nn.Module, sparsity: float) -> None:
    """Set the sparsity in force in every pruned layer of ``model``."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    for _, layer in iter_pst_layers(model):
        layer.sparsity = sparsity
