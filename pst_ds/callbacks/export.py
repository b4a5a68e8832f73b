"""Export at the end of training: the pruned model as a plain HF folder (M * W' under the
original names, zeros in place, ``pst_sparsity.json``); rank 0 writes. From the live model, or
from the run's last checkpoint when it has pst-ds's checkpoints (``run_dir``): there the weights
are merged from the fp32 master copies, as ``launch/export.py`` does, even in a bf16 run."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn
from tqdm import tqdm
from transformers import TrainerCallback, TrainingArguments

from ..io.export import (
    DEFAULT_SHARD_BYTES,
    WRITE_ERRORS,
    export_checkpoint,
    no_progress_bars,
    stream_live,
    write_export,
)
from ..methods import Method
from ..train.checkpoint import free_mib
from ..train.distributed import first_problem
from ..train.run_checkpoints import TrainingError


def export_live(
    model: nn.Module,
    method: Method,
    layer_names: list[str],
    tokenizer: Any,
    out_dir: Path,
    origin: dict,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any] | None:
    """Write ``model`` pruned to ``out_dir``. Collective (ZeRO-3 gathers one module at a time):
    every rank calls it; rank 0 writes and returns the report (None elsewhere)."""
    write = not dist.is_initialized() or dist.get_rank() == 0
    with no_progress_bars():
        items = stream_live(model, write)
        if write:
            return write_export(
                items, model, method, layer_names, tokenizer, out_dir, origin, max_shard_bytes
            )
        for _ in items:  # the gathers are collective: every rank walks the model
            pass
    return None


class ExportCallback(TrainerCallback):
    """Exports a run that trained to its last step (not one stopped early) to ``out_dir``.
    ``report``: the export's totals and folder, once written (every rank)."""

    def __init__(
        self,
        out_dir: str | Path,
        method: Method,
        layer_names: list[str],
        tokenizer: Any = None,
        recovery: Callable[[], str] = lambda: "",
        run_dir: Path | None = None,
    ) -> None:
        self.out_dir, self.method, self.layer_names = Path(out_dir), method, layer_names
        self.run_dir = run_dir
        self.tokenizer, self.recovery = tokenizer, recovery
        self.report: dict[str, Any] | None = None

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step < state.max_steps:  # stopped early (preempted): nothing to export yet
            return
        model, tokenizer = kwargs["model"], self.tokenizer or kwargs.get("processing_class")
        began, total, problem = time.time(), None, None
        try:
            if self.run_dir is not None:  # the checkpoint the Trainer saved as it ended
                if state.is_world_process_zero:
                    total = export_checkpoint(self.run_dir, self.out_dir)["total"]
            else:
                origin = {"source": "live model", "step": state.global_step}
                report = export_live(model, self.method, self.layer_names, tokenizer, self.out_dir, origin)
                total = report and report["total"]
        except WRITE_ERRORS as err:
            problem = (
                f"cannot write the pruned model to {self.out_dir} ({type(err).__name__}: {err}; "
                f"{free_mib(self.out_dir):,.0f} MiB free there){self.recovery()}"
            )
        if dist.is_initialized():
            problem = first_problem(problem)  # every rank waits for rank 0's export, and stops alike
        if problem is not None:
            raise TrainingError(problem)
        if total is not None:
            tqdm.write(f"pst-ds: step {state.global_step}: exported in {time.time() - began:.1f} s")
        self.report = {"dir": str(self.out_dir), **(total or {})}
