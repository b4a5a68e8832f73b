"""pst-ds: parameter-efficient sparse training (PST) of language models on DeepSpeed."""

import os

# Nothing is ever fetched from a hub: models and data are local or shipped by packages.
# Set before transformers and datasets are imported, which read these once.
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")

from .config import ConfigError, ExperimentConfig, PSTConfig, load_experiment
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
