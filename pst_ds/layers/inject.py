"""Module injection: replace the targeted linears of a loaded model by a method's layers.

Works on a model whose weights ZeRO-3 has already partitioned (shapes come from
``ds_shape``); the factors it creates become ZeRO parameters at ``deepspeed.initialize``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from ..config import (
    DEFAULT_TARGET_MODULES,
    ConfigError,
    LoRAConfig,
    PSTConfig,
    name_matches,
)
from ..experiment import experiment_config
from ..io.models import load_model
from ..methods import Method, method_class
from .base import LayerSite, SparseLinear, WrappedLinear, dense_teacher
from .step import StepBoard


def _matching(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and name_matches(n, patterns)]


def linear_names(model: nn.Module, most: int = 12) -> str:
    """The model's Linear / Conv1D module names, block numbers as N, for an error message."""
    names = sorted(
        {
            re.sub(r"\.\d+(?=\.|$)", ".N", n)
            for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D))
        }
    )
    shown = ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
    return shown or "none"


def _check_every_pattern_matches(model: nn.Module, patterns: list[str], what: str) -> None:
    for pattern in patterns:
        if not _matching(model, [pattern]):
            raise ConfigError(
                f"{what} pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"its linear layers: {linear_names(model)}"
            )


def target_layers(model: nn.Module, config: PSTConfig) -> list[tuple[str, nn.Module]]:
    """The Linear / Conv1D modules ``config.target_modules`` names (each pattern a user wrote must
    match something, so that a typo cannot silently prune less)."""
    # The defaults cover several families, so only their union must match.
    if config.target_modules != DEFAULT_TARGET_MODULES:
        _check_every_pattern_matches(model, config.target_modules, "pst.target_modules")
    _check_every_pattern_matches(model, config.trainable_modules, "pst.trainable_modules")
    targets = [
        (name, module)
        for name, module in _matching(model, config.target_modules)
        if isinstance(module, (nn.Linear, Conv1D))
    ]
    if not targets:
        raise ConfigError(
            f"pst.target_modules matches no Linear/Conv1D layer of {type(model).__name__}; its linear "
            f"layers: {linear_names(model)} (name the ones to prune in pst.target_modules)"
        )
    return targets


def _check_factor_ranks(targets: list[tuple[str, nn.Module]], method: Method) -> None:
    """A factor rank above a matrix's smaller side adds nothing a full-rank update lacks, and its
    factors outgrow the weight: refused (under ZeRO-3 the shapes are ``ds_shape``)."""
    sides = [(min(getattr(m.weight, "ds_shape", m.weight.shape)), name) for name, m in targets]
    smallest, name = min(sides)
    for key, rank in method.factor_ranks().items():
        if rank > smallest:
            raise ConfigError(
                f"{key}={rank} is larger than {name}'s smaller side ({smallest}); a factor rank must be at "
                f"most min(out, in) of every pruned matrix: lower {key}"
            )


def inject(model: nn.Module, method: Method) -> list[str]:
    """Replace every targeted Linear/Conv1D by ``method``'s layer; return the targets' names.

    Freezes every other parameter, then makes the method's own parameters (the factors, or a
    baseline's weights and scores) and those of modules matching ``pst.trainable_modules``
    trainable. A method that injects nothing (dense) trains the whole model.
    """
    targets = target_layers(model, method.pst)
    _check_factor_ranks(targets, method)
    if not method.injects:
        model.requires_grad_(True)
        return [name for name, _ in targets]
    model.requires_grad_(False)
    # The factors' initial values are a function of train.seed alone: the same on every rank and
    # whichever loop injects (launch/train.py, an HF Trainer's prepare), whatever drew before.
    board = StepBoard()  # one per model: its controller publishes each step's record there
    with torch.random.fork_rng():
        torch.manual_seed(method.config.train.seed)
        for name, module in targets:
            # the teacher copies the weight before the warm start rewrites it
            teacher = dense_teacher(module) if method.keeps_dense_teacher() else None
            layer = method.build_layer(module, LayerSite(name, board, teacher))
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, layer)
    for _, module in _matching(model, method.pst.trainable_modules):
        module.requires_grad_(True)
    return [name for name, _ in targets]


def inject_pst(
    model: nn.Module, config: PSTConfig, method: str = "pst", lora: LoRAConfig | None = None
) -> list[str]:
    """The library's entry point: inject ``method``'s layers (PST by default) with ``config``
    after ``from_pretrained``. Returns the targeted layers' names."""
    experiment = experiment_config(method=method, pst=config, lora=lora or LoRAConfig())
    return inject(model, method_class(method)(experiment))


def build_model(
    method: Method, tokenizer: PreTrainedTokenizerBase, labels: list[str] | None, meta: bool = False
) -> tuple[nn.Module, list[str]]:
    """The model with ``method``'s layers injected, and the targeted layers' names: what
    training builds (partitioned under a live ZeRO-3 config), export and the memory model build
    again (on the meta device)."""
    loaded = load_model(method.config.model, tokenizer, labels, meta=meta)
    return loaded, inject(loaded, method)


def head_parameters(model: nn.Module, config: PSTConfig) -> list[nn.Parameter]:
    """The parameters of the modules matching ``config.trainable_modules`` (e.g. a task head)."""
    return [p for _, module in _matching(model, config.trainable_modules) for p in module.parameters()]


def iter_injected(model: nn.Module) -> Iterator[tuple[str, WrappedLinear]]:
    """Every injected layer (pruned or not, LoRA's too) with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, WrappedLinear):
            yield name, module


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
