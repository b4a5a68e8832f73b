"""What a method is: its capabilities, the layer it injects and its hooks in a run's life.

A method (pst, a baseline, a one-shot pruner) is one subclass of ``Method`` in its own module,
imported by one line in ``methods/__init__.py``; a subclass with a ``name`` registers itself.
The experiment's settling, the injector, the controller, the trainer, export and the memory
model ask the class (its flags and hooks); none of them compares method names.
Modelled on llm-compressor's Modifiers and PEFT's tuner registry.

    capabilities    class flags: prunes, trains, calibrates, frozen_backbone, ...
    check           its cross-section rules, run when the experiment config is validated
    layer_config    the PST section its layers are built from (a one-shot method fixes its own)
    build_layer     the layer that replaces one targeted Linear / Conv1D (None: keep it)
    warm_start      its first mask from calibration data (calibrating methods; pst.init)
    memory terms    transient_weight_copies: fp32 weight-sized buffers alive in backward
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..config import OneShotConfig, PSTConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    from transformers.pytorch_utils import Conv1D

    from ..config import ExperimentConfig
    from ..layers.base import LayerSite, SparseLinear


@dataclass
class Calibration:
    """What a calibrating method needs to prune a model once, from the run that hosts it."""

    model: nn.Module
    layers: dict[str, SparseLinear]  # model order
    batches: list[dict[str, torch.Tensor]]
    forward: Callable[[dict[str, torch.Tensor]], object]  # the whole model on one batch
    sparsity: float
    put_in_force: Callable[[dict[str, SparseLinear], float], None]  # the controller's writer
    progress: Callable[[str], None] = lambda _: None


class Method:
    """One way to train (or prune once) the targeted layers. Subclasses set ``name`` and the
    flags that differ, and implement ``build_layer``."""

    name: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Method]]] = {}  # every named subclass, in import order
    prunes: ClassVar[bool] = True  # its layers carry a mask (SparseLinear) on the schedule
    trains: ClassVar[bool] = True  # takes optimizer steps (False: train.max_steps is not used)
    calibrates: ClassVar[bool] = False  # prunes once from calibration data; can be a pst.init
    reads_zeros: ClassVar[bool] = False  # its mask is the model's own zeros; can be a pst.init
    scores_by_input_norms: ClassVar[bool] = False  # its mask is top-k of |W| * ||x||: as pst.init,
    # a layer keeps it in force only with input norms in its score (pst.importance=activation)
    starts_training: ClassVar[bool] = False  # pst.init's cold start: S = |W| on the cubic schedule
    frozen_backbone: ClassVar[bool] = True  # W never changes (the distillation teacher is W itself)
    rewrites_backbone: ClassVar[bool] = False  # as a warm start, writes new weights into W
    warm_startable: ClassVar[bool] = False  # may start from a calibrating method's mask (pst.init)
    learns_scores: ClassVar[bool] = False  # trains a score per weight: importance is its own
    learns_thresholds: ClassVar[bool] = False  # may use a learned mask kind (pst.mask=threshold)
    injects: ClassVar[bool] = True  # replaces the targeted layers (dense trains them as they are)
    transient_weight_copies: ClassVar[int] = 0  # memory model: fp32 weight-sized buffers in backward

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            Method.registry[cls.name] = cls

    @staticmethod
    def named(name: str) -> type[Method]:
        """The method registered as ``name`` (KeyError: settle the config first)."""
        return Method.registry[name]

    @staticmethod
    def names_with(*flags: str) -> list[str]:
        """The registered methods that have every one of ``flags`` set, in registry order."""
        return [n for n, method in Method.registry.items() if all(getattr(method, f) for f in flags)]

    def mask_bytes_kept(self, numel: int) -> int:
        """Memory model: bytes a pruned layer of ``numel`` weights keeps from forward to backward
        beside its input (PST's mask bits)."""
        return 0

    def mask_bytes_held(self, numel: int) -> int:
        """Memory model: bytes a pruned layer of ``numel`` weights holds for the whole run
        (masked LoRA's frozen mask bits)."""
        return 0

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.pst = self.layer_config(config.pst)

    # ------------------------------------------------------------------ config
    @classmethod
    def layer_config(cls, pst: PSTConfig) -> PSTConfig:
        """The PST section this method's layers use (a one-shot method fixes its own start; a
        method that learns a score per weight has no |W| for activation importance to scale)."""
        return pst.replaced(importance="magnitude") if cls.learns_scores else pst

    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        """Refuse what this method cannot do with the rest of ``config`` (ConfigError)."""
        names_with = Method.names_with
        pst = cls.layer_config(config.pst)
        init = Method.named(pst.init)
        if init.calibrates or init.reads_zeros:
            if not (cls.warm_startable or init is cls):
                starts = ", ".join(names_with("warm_startable"))
                raise ConfigError(f"pst.init={init.name} warm-starts {starts}, not {cls.name}")
            init.check_as_warm_start(pst)
        distill = config.train.distill
        if distill.weight > 0:
            if not cls.frozen_backbone:
                frozen = ", ".join(names_with("frozen_backbone", "trains"))
                raise ConfigError(
                    f"train.distill takes the teacher from the frozen dense backbone: methods {frozen}, "
                    f"not method={cls.name}"
                )
            if pst.trainable_modules:  # the teacher would share the student's trained head
                raise ConfigError(
                    "train.distill's teacher is the frozen dense model, but pst.trainable_modules "
                    f"({', '.join(pst.trainable_modules)}) train in the model it shares: a new head has "
                    "no teacher; set train.distill.weight=0 or train no extra modules"
                )
        if pst.sparsity_profile != "uniform":
            if not init.calibrates:
                raise ConfigError(
                    f"pst.sparsity_profile={pst.sparsity_profile} sets each block's sparsity from "
                    "calibration data: set a pst.init that calibrates "
                    f"({', '.join(names_with('calibrates'))})"
                )
            if pst.kind().grouped:
                raise ConfigError(
                    f"pst.sparsity_profile={pst.sparsity_profile} gives each block its own sparsity; "
                    f"pst.mask={pst.mask}'s pattern fixes it for every layer"
                )
        if pst.kind().learned and not cls.learns_thresholds:
            raise ConfigError(f"pst.mask={pst.mask} learns PST's thresholds; method={cls.name} has none")

    @classmethod
    def check_as_warm_start(cls, pst: PSTConfig) -> None:
        """Refuse a PST section this calibrating method cannot start (ConfigError)."""

    # ------------------------------------------------------------------ layers
    def build_layer(self, base: nn.Linear | Conv1D, site: LayerSite) -> nn.Module | None:
        """The layer that replaces ``base``, the module called ``name`` (None: leave it in place)."""
        raise NotImplementedError

    @classmethod
    def counts_at_start(
        cls, layers: dict[str, SparseLinear], pst: PSTConfig
    ) -> dict[str, torch.Tensor] | None:
        """As pst.init: each layer's own mask state for the whole run, whatever the schedule says
        (None, the default: the schedule's count)."""
        return None

    def own_counts(self, layers: dict[str, SparseLinear]) -> dict[str, torch.Tensor] | None:
        """Each layer's own mask state from this run's start (pst.init's counts_at_start)."""
        return Method.named(self.pst.init).counts_at_start(layers, self.pst) if layers else None

    def warm_start_method(self) -> type[Method] | None:
        """The calibrating method whose mask this run starts from (pst.init), if any."""
        init = Method.named(self.pst.init)
        return init if init.calibrates else None

    def holds_final_sparsity(self) -> bool:
        """True: the final sparsity is in force from the first step (a one-shot start held there,
        the model's own zeros, or no training at all); False: the cubic schedule ramps to it
        (pst.init_schedule=ramp starts it from the one-shot mask at pst.initial_sparsity)."""
        started = self.warm_start_method() is not None or self.starts_from_zeros()
        return (started and self.pst.init_schedule == "hold") or not self.trains

    def starts_from_zeros(self) -> bool:
        """True when each layer's mask state is its weight's own zeros (pst.init=zeros), not the
        schedule's count (oneshot/zeros.py)."""
        return Method.named(self.pst.init).reads_zeros

    def factor_ranks(self) -> dict[str, int]:
        """The config keys of its low-rank factors' ranks, with their values (none by default):
        each must fit every targeted matrix."""
        return {}

    def keeps_dense_teacher(self) -> bool:
        """True when distillation's teacher needs a copy of the original weights: the warm start
        rewrites them (pst.init=sparsegpt). One more frozen weight, sharded under ZeRO-3."""
        init = self.warm_start_method()
        distills = self.trains and self.config.train.distill.weight > 0
        return distills and init is not None and init.rewrites_backbone

    def writes_start_folder(self) -> bool:
        """True when the warm start writes new weights into the backbone once (pst.init=sparsegpt)
        and training leaves them: the run writes them once, as its start folder, and checkpoints
        refer to it (io/start_weights.py)."""
        init = self.warm_start_method()
        return self.frozen_backbone and init is not None and init.rewrites_backbone

    # ------------------------------------------------------------------ lifecycle
    def warm_start(self, calibration: Calibration) -> None:
        """Prune once from calibration data (calibrating methods override ``calibrate``)."""
        init = self.warm_start_method()
        if init is not None:
            init.calibrate(calibration, self.config.oneshot)

    @classmethod
    def calibrate(cls, calibration: Calibration, oneshot: OneShotConfig) -> None:
        """Prune ``calibration.layers`` once (calibrating methods only)."""
        raise NotImplementedError(f"{cls.name} does not prune from calibration data")
