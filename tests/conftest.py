import os
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from pst_ds.config import PSTConfig
from pst_ds.experiment import experiment_config, load_experiment
from pst_ds.io.models import LAUNCHER_VARIABLES, load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # launch/ and tools/ scripts, imported by the in-process tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def launcher_variables_restored():
    """An in-process run sets RANK, MASTER_PORT, ... for its one-process rendezvous; a script a
    later test starts must not inherit them (it would try to listen on that port too). And a
    Trainer's accelerate state (with or without DeepSpeed) is not the next test's."""
    before = {key: os.environ.get(key) for key in LAUNCHER_VARIABLES}
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> Path:
    """The first 60 kB of Austen: enough for tiny models, quick to tokenise bytewise."""
    path = tmp_path_factory.mktemp("data") / "austen_head.txt"
    with open(ROOT / "data/austen/austen_6_novels.txt", encoding="utf-8") as src:
        path.write_text(src.read(60_000), encoding="utf-8")
    return path


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture
def tiny_model():
    """Build a project tiny model by config name (tiny_llama, tiny_gpt2), seeded, in eval mode."""

    def build(name: str):
        config = load_experiment(f"configs/experiments/{name}.yaml")
        torch.manual_seed(0)
        return load_model(config.model, load_tokenizer(config.model)).eval()  # no dropout

    return build


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """tiny_llama (seeded) saved as a plain HF folder with its byte tokenizer: a model read from
    a folder (model.source=path), whose checkpoints leave the frozen backbone out."""
    from transformers import AutoConfig, AutoModelForCausalLM, ByT5Tokenizer

    folder = tmp_path_factory.mktemp("tiny_llama_folder")
    tokenizer = ByT5Tokenizer()
    random = load_experiment("configs/experiments/tiny_llama.yaml").model.random
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(
        AutoConfig.for_model(vocab_size=len(tokenizer), **random)
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pst_method(config: PSTConfig, name: str = "pst"):
    """The method ``name`` (PST by default) built around a bare PST section, as a run builds it."""
    from pst_ds.config import DistillConfig, TrainConfig
    from pst_ds.methods import method_class

    no_teacher = TrainConfig(distill=DistillConfig(weight=0.0))  # the release's: these tests need none
    return method_class(name)(experiment_config(method=name, pst=config, train=no_teacher))
