"""The methods a run can train with, by name: one module each, one import line each below.

A ``Method`` subclass with a ``name`` registers itself (methods/base.py); ``method_class(name)``
is how everything else finds one. Nothing compares method names.
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

METHODS: dict[str, type[Method]] = Method.registry
method_class = Method.named
names_with = Method.names_with


__all__ = ["METHODS", "Calibration", "Method", "method_class", "names_with"]
__all__ += ["Dense", "LoRA", "Magnitude", "MaskedLoRA", "Movement", "PST", "Random", "SMP", "SparseGPT"]
__all__ += ["Wanda", "Zeros"]
