"""A plain ``transformers.Trainer`` (not PSTTrainer, no DeepSpeed) with pst-ds's callbacks gets
every run feature: a SIGUSR1 during training saves the Trainer's own checkpoint and stops; the
Trainer resumed from it ends with the losses, masks and export of an unbroken run; the run lock
refuses a second run into the folder; perplexities before and after, metrics.jsonl and
summary.json are written; OWL's profile survives the resume."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from pst_ds.config import ConfigError
from pst_ds.experiment import load_experiment
from pst_ds.integrations.hf import prepare
from pst_ds.io.data import collate_blocks, load_splits
from pst_ds.io.models import load_model, load_tokenizer

STEPS = 6
OVERRIDES = [
    "pst.compile=false",
    "data.block_size=32",
    "pst.init=wanda",
    "pst.importance=activation",
    "pst.sparsity_profile=owl",
    "pst.owl_m=3",
    "pst.final_sparsity=0.6",
    "oneshot.calibration_blocks=4",
]


class SignalAt(TrainerCallback):
    """Sends this process SIGUSR1 as step ``step`` ends (a scheduler's notice)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def run(folder, small_text, signal_at: int | None = None, resume: bool = False, stream: bool = False):
    """One Trainer run into ``folder``: (the PSTRun, the Trainer, its callbacks). ``stream``: the
    training set as an IterableDataset (no length, as a streaming dataset)."""
    config = load_experiment(
        "configs/experiments/tiny_llama.yaml", [*OVERRIDES, f"data.train_files=[{small_text}]"]
    )
    torch.manual_seed(0)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, tokenizer)
    pst = prepare(model, config)
    data = load_splits(config.data, "causal_lm", tokenizer)
    args = TrainingArguments(
        output_dir=str(folder), use_cpu=True, report_to="none", max_steps=STEPS, learning_rate=0.01,
        per_device_train_batch_size=2, logging_steps=1, save_strategy="steps", save_steps=100,
        disable_tqdm=True, seed=0, dataloader_drop_last=True,
    )  # fmt: skip
    callbacks = pst.callbacks(folder, evaluate={"validation": data.validation}, tokenizer=tokenizer)
    early = [SignalAt(signal_at)] if signal_at else []
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Stream(data.train) if stream else data.train,
        data_collator=collate_blocks,
        callbacks=[*early, *callbacks],
        optimizer_cls_and_kwargs=pst.optimizer(args),
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    return pst, trainer, callbacks


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __iter__(self):
        return iter(self.dataset)


def test_the_warm_start_calibrates_on_a_streaming_dataset(tmp_path, small_text):
    pst, trainer, _ = run(tmp_path / "run", small_text, stream=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert trainer.state.global_step == STEPS and summary["export"]["sparsity"] == pytest.approx(
        0.6, abs=0.01
    )
    assert len({round(s, 6) for s in pst.callback.profile.values()}) > 1  # OWL's, from the stream


def losses(folder) -> list[float]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def tensors(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_a_plain_trainer_with_the_callbacks_is_preempted_and_resumes_exactly(tmp_path, small_text):
    whole, _, _ = run(tmp_path / "whole", small_text)
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["eval_ppl_after"] < summary["eval_after_warm_start"]["validation"]  # it trained
    assert summary["eval_ppl_before"] < summary["eval_after_warm_start"]["validation"]  # dense before
    assert summary["export"]["sparsity"] == pytest.approx(0.6, abs=0.01)
    profile = whole.callback.profile
    assert len({round(s, 6) for s in profile.values()}) > 1  # OWL: the blocks differ

    folder = tmp_path / "broken"
    _, trainer, callbacks = run(folder, small_text, signal_at=3)
    preemption = callbacks[1]
    assert preemption.stopped == "SIGUSR1" and preemption.stopped_at == 3
    assert trainer.state.global_step == 3 and (folder / "checkpoint-3").is_dir()
    assert not (folder / "summary.json").exists() and not (folder / "export").exists()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers uninstalled

    resumed, _, _ = run(folder, small_text, resume=True)
    assert resumed.callback.profile == profile  # read back from the checkpoint, not found again
    assert losses(folder) == pytest.approx(losses(tmp_path / "whole"), rel=1e-6)
    assert len(losses(folder)) == STEPS
    a, b = tensors(tmp_path / "whole" / "export"), tensors(folder / "export")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_the_run_lock_refuses_a_second_trainer_into_the_same_folder(tmp_path, small_text):
    from pst_ds.callbacks.run_lock import RunLockCallback

    holder = RunLockCallback(tmp_path / "run")
    holder.acquire(rank_zero=True)
    try:
        with pytest.raises(ConfigError, match="is in use by the run of pid"):
            run(tmp_path / "run", small_text)
    finally:
        holder.close()
