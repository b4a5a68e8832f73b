"""Experiment configs: YAML loading, overrides and validation."""

import pytest

from pst_ds import ConfigError, PSTConfig, load_experiment
from pst_ds.config import DEFAULT_TARGET_MODULES
from pst_ds.paths import PROJECT_ROOT, check_files


def test_defaults_are_the_measured_best_and_the_release_is_kept_by_name():
    cfg, default = PSTConfig(), load_experiment("configs/experiments/default.yaml").pst
    for name in ("alpha1", "alpha2", "beta", "factor_scale", "importance", "init_schedule"):
        assert getattr(cfg, name) == getattr(default, name), name  # the default experiment's
    assert cfg.init == "auto" and load_experiment(None).train.distill.weight == 0.5  # auto, resolved
    release = PSTConfig.release()
    assert (release.weight_rank, release.mask_rank) == (8, 8)
    assert (release.alpha1, release.alpha2, release.beta) == (1.0, 1.0, 1.0)
    assert (release.factor_scale, release.importance, release.init) == ("one", "magnitude", "magnitude")
    assert (release.initial_sparsity, release.final_sparsity) == (0.0, 0.9)
    assert (release.initial_warmup, release.final_warmup) == (0.1, 0.3)
    assert release.target_modules == DEFAULT_TARGET_MODULES


@pytest.mark.parametrize("path", sorted((PROJECT_ROOT / "configs/experiments").glob("*.yaml")))
def test_shipped_experiment_configs_validate(path):
    load_experiment(str(path))


def test_overrides_reach_nested_fields():
    cfg = load_experiment(
        "configs/experiments/tiny_llama.yaml",
        ["train.max_steps=7", "pst.final_sparsity=0.7", "train.lr=1e-4", "pst.target_modules=[q_proj]"],
    )
    assert cfg.train.max_steps == 7 and cfg.pst.final_sparsity == 0.7
    assert cfg.train.lr == 1e-4 and cfg.pst.target_modules == ["q_proj"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_step=3", r"unknown config key train.max_step \(did you mean train.max_steps\?\)"),
        ("trian.lr=1", "unknown config key trian"),
        ("train.max_steps=abc", "train.max_steps must be int"),
        ("train.max_steps=2.5", "train.max_steps must be int"),
        ("pst.final_sparsity=1.0", r"pst.final_sparsity must be in \[0, 1\)"),
        ("pst.initial_sparsity=-0.1", r"pst.initial_sparsity must be in \[0, 1\)"),
        ("pst.initial_warmup=0.8", "initial_warmup \\+ pst.final_warmup"),
        ("pst.target_modules=['(']", "invalid module pattern"),
        ("model.source=hub", "model.source must be one of"),
        ("train", "not of the form key=value"),
    ],
)
def test_bad_values_get_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment("configs/experiments/tiny_llama.yaml", [override])


def test_files_are_checked_when_a_run_starts_not_when_a_config_is_built(tmp_path):
    """A saved config.json must rebuild after its data has moved; a run still refuses it."""
    config = load_experiment("configs/experiments/tiny_llama.yaml", ["data.train_files=[nope.txt]"])
    with pytest.raises(ConfigError, match="data file not found: nope.txt"):
        check_files(config)
    moved = load_experiment(None, ["model.source=path", f"model.path={tmp_path / 'gone'}"])
    with pytest.raises(ConfigError, match="is not a folder"):
        check_files(moved)
    check_files(load_experiment("configs/experiments/tiny_llama.yaml"))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_experiment("configs/experiments/missing.yaml")
