"""The methods a run can train with, by name: one module each, one line each below.

``method_class(name)`` is how everything else finds a method; it never compares names.
"""

from __future__ import annotations

from .base import Calibration, Method
from .dense import Dense
from .lora import LoRA
from .magnitude import Magnitude
from .masked_lora import MaskedLoRA
from .movement import Movement
from .pst import PST
from .random import Random
from .smp import SMP
from .sparsegpt import SparseGPT
from .wanda import Wanda
from .zeros import Zeros

METHODS: dict[str, type[Method]] = {
    method.name: method
    for method in (PST, MaskedLoRA, Magnitude, Movement, SMP, LoRA, Dense, Wanda, SparseGPT, Random, Zeros)
}


def method_class(name: str) -> type[Method]:
    """The method registered as ``name`` (KeyError: validate the config first)."""
    return METHODS[name]


def names_with(*flags: str) -> list[str]:
    """The registered methods that have every one of ``flags`` set, in registry order."""
    return [name for name, method in METHODS.items() if all(getattr(method, flag) for flag in flags)]


__all__ = ["METHODS", "Calibration", "Method", "method_class", "names_with"]
