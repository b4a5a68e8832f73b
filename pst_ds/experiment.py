"""An experiment config settled by its method: the config is data (config.py); the method's
rules (which names exist, what ``auto`` stands for, what it refuses) are the method's to say.

    read        config_reading.read_experiment: YAML + overrides, each value typed and in range
    settle      method and pst.init name registered methods; pst.init=auto and
                train.distill.weight=auto become what measured best (methods/starts.py);
                the method checks the rest (Method.check)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import ExperimentConfig, registered
from .config_reading import build_section, read_experiment
from .methods import Method
from .methods.starts import AUTO, best_distill_weight, best_start


def settle(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` with its names checked, its ``auto`` values resolved and its method's rules
    applied (ConfigError on the first thing refused)."""
    registered("method", config.method, Method.registry)
    starts = [n for n, m in Method.registry.items() if m.starts_training or m.calibrates or m.reads_zeros]
    registered("pst.init", config.pst.init, [*starts, AUTO])
    method = Method.named(config.method)
    if config.pst.init == AUTO:
        start = best_start(config.pst, method.warm_startable or method.calibrates)
        config = dataclasses.replace(config, pst=config.pst.replaced(init=start))
    if config.train.distill.weight == AUTO:
        distill = dataclasses.replace(config.train.distill, weight=best_distill_weight(config.pst, method))
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, distill=distill))
    method.check(config)
    return config


def experiment_config(**sections: Any) -> ExperimentConfig:
    """An ExperimentConfig from its sections (as ``ExperimentConfig(...)`` takes them), settled."""
    return settle(ExperimentConfig(**sections))


def experiment_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """An experiment from a plain dict (a saved config.yaml's), validated and settled."""
    return settle(build_section(ExperimentConfig, data, ""))


def load_experiment(path: str | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read an experiment YAML (or start from the defaults), apply overrides, validate, settle."""
    return settle(read_experiment(path, overrides))
