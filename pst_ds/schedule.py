"""The cubic sparsity schedule of the PST release (Zhu & Gupta's, as fractions of total steps)."""

from __future__ import annotations

from .config import PRUNING_METHODS, PSTConfig


def cubic_sparsity(
    step: int,
    total_steps: int,
    initial: float,
    final: float,
    initial_warmup: float,
    final_warmup: float,
) -> float:
    """Sparsity in force after ``step`` optimizer steps out of ``total_steps``.

    Held at ``initial`` for the first ``initial_warmup`` fraction of steps, at ``final``
    for the last ``final_warmup`` fraction, and cubic in between:
    s = final + (initial - final) * (1 - (t - iw*T) / (T - (iw + fw)*T))^3.
    """
    warm_start = initial_warmup * total_steps
    ramp_end = total_steps - final_warmup * total_steps
    if step <= warm_start:
        return initial
    if step > ramp_end:
        return final
    progress = (step - warm_start) / (ramp_end - warm_start)
    return final + (initial - final) * (1.0 - progress) ** 3


def scheduled_sparsity(method: str, config: PSTConfig, step: int, total_steps: int) -> float:
    """The sparsity in force after ``step`` optimizer steps: 0 for methods that do not prune."""
    if method not in PRUNING_METHODS:
        return 0.0
    return cubic_sparsity(
        step,
        total_steps,
        config.initial_sparsity,
        config.final_sparsity,
        config.initial_warmup,
        config.final_warmup,
    )
