"""Run output on rank 0: a progress bar, TensorBoard events and metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..io.evaluate import perplexity


class RunLogger:
    """Writes nothing on ranks other than 0, so callers need not branch."""

    def __init__(
        self, output_dir: Path, total_steps: int, enabled: bool, resumed: bool = False, label: str = "pst"
    ) -> None:
        self.enabled = enabled
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run continues its records; a fresh one replaces an earlier run's.
        self.metrics = (output_dir / "metrics.jsonl").open("a" if resumed else "w")
        self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        self.bar = tqdm(total=total_steps, desc=label, unit="step", dynamic_ncols=True)

    def info(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def _record(self, section: str, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl; its numbers also go to TensorBoard under ``section/``."""
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(f"{section}/{key.removeprefix('eval_')}", value, record["step"])

    def log_step(
        self,
        step: int,
        loss: float,
        lr: float,
        sparsity: float,
        tokens_per_s: float,
        mask_changed: float | None = None,
    ) -> None:
        if not self.enabled:
            return
        record = {"step": step, "loss": loss, "lr": lr, "sparsity": sparsity, "tokens_per_s": tokens_per_s}
        if mask_changed is not None:  # share of mask entries changed since the previous log
            record["mask_changed"] = mask_changed
        self._record("train", record)
        self.bar.set_postfix(loss=f"{loss:.4f}", sparsity=f"{sparsity:.3f}", tok_s=f"{tokens_per_s:.0f}")

    def log_layers(self, step: int, sparsities: dict[str, float]) -> None:
        """Per-matrix sparsities (TensorBoard only: one curve per matrix)."""
        if self.enabled:
            for name, sparsity in sparsities.items():
                self.writer.add_scalar(f"layer_sparsity/{name}", sparsity, step)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def log_eval(self, step: int, loss: float, sparsity: float, accuracy: float | None = None) -> float:
        """Record an evaluation; returns the perplexity exp(loss)."""
        ppl = perplexity(loss)
        if self.enabled:
            record = {"step": step, "eval_loss": loss, "eval_ppl": ppl, "sparsity": sparsity}
            shown = f"perplexity {ppl:.3f}"
            if accuracy is not None:
                record["eval_accuracy"] = accuracy
                shown = f"accuracy {accuracy:.4f}"
            self._record("eval", record)
            self.info(f"step {step}: validation {shown} at sparsity {sparsity:.3f}")
        return ppl

    def log_eval_text(self, step: int, name: str, loss: float) -> float:
        """Record the perplexity of one of data.eval_files (key eval_<name>_ppl); returns it."""
        ppl = perplexity(loss)
        if self.enabled:
            self._record("eval", {"step": step, f"eval_{name}_loss": loss, f"eval_{name}_ppl": ppl})
            self.info(f"step {step}: {name} perplexity {ppl:.3f}")
        return ppl

    def end_progress(self) -> None:
        """Close the progress bar, so that what follows prints below it (idempotent)."""
        if self.enabled:
            self.bar.close()

    def close(self) -> None:
        """Flush and close everything (idempotent)."""
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.metrics.close()
