"""pst-ds: parameter-efficient sparse training (PST) of language models on DeepSpeed."""

from .config import ConfigError, ExperimentConfig, PSTConfig
from .experiment import load_experiment
from .layers.inject import inject_pst, iter_pst_layers, set_sparsity
from .layers.pst import PSTLinear
from .train.schedule import cubic_sparsity

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "PSTConfig",
    "PSTLinear",
    "cubic_sparsity",
    "inject_pst",
    "iter_pst_layers",
    "load_experiment",
    "set_sparsity",
]
