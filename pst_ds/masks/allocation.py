"""Learned thresholds: the per-matrix (or per-row) counts that the global schedule allows.

Each pruned group g (a matrix, or a row with ``pst.mask_scope=row``) has a trained logit
theta_g. Its keep fraction is rho_g = sigmoid(theta_g + c), with one shift c for the whole
model found by bisection so that sum_g n_g rho_g = K, the count the cubic schedule keeps.
The integer counts round n_g rho_g by largest remainders, so the model prunes exactly the
scheduled count at every step (exact by construction, not a penalty), while the split among
matrices is whatever the logits have learned. All logits start at 0: uniform sparsity.

Gradient. Group g's mask is the top-k of S_g at round(n_g rho_g) kept entries. Keeping more
adds the entries just below its threshold t_g, so

    dL/drho_g ~ n_g * mean of dL/dM over the entries with |S - t_g| <= band * |t_g|

where dL/dM = G * W' is the straight-through gradient PST already computes. The layer gives
rho_g = sigmoid(theta_g + c) to its autograd Function, which returns this estimate as rho_g's
gradient; autograd gives dL/dtheta_g = rho_g (1 - rho_g) dL/drho_g. c is held constant within a
step: a shift common to all logits is absorbed into the next step's c, so only their
differences move weights between matrices.

Why this form: STR and LTP learn a threshold per layer against a sparsity penalty, so the
global sparsity only approaches its target; DeepSpeed's TopKBinarizer learns a keep ratio
through a sigmoid but its gradient (the sum of dL/dM over kept entries) says how much the kept
weights matter, not whether one more would help; BESA learns per-row sparsities under a
target penalty from layer reconstruction. Here the global count is exact at every step, and
the ratio's gradient is the marginal value of the boundary entries, measured where they are.
"""

from __future__ import annotations

import torch

_BISECTION_STEPS = 200


def allocate_kept(logits: torch.Tensor, sizes: torch.Tensor, kept_total: int) -> tuple[float, torch.Tensor]:
    """(shift c, kept count per group) with sum(kept) == kept_total exactly.

    ``logits`` and ``sizes`` are flat, one entry per group; kept_g ~ sizes_g * sigmoid(logits_g + c).
    """
    theta, n = logits.detach().double().cpu(), sizes.double().cpu()
    total = int(sizes.sum())
    if not 0 <= kept_total <= total:
        raise ValueError(f"cannot keep {kept_total} of {total} entries")
    lo, hi = -float(theta.max()) - 40.0, -float(theta.min()) + 40.0
    for _ in range(_BISECTION_STEPS):  # sum n sigmoid(theta + c) grows with c
        mid = (lo + hi) / 2
        if float((n * torch.sigmoid(theta + mid)).sum()) < kept_total:
            lo = mid
        else:
            hi = mid
    shift = (lo + hi) / 2
    real = n * torch.sigmoid(theta + shift)
    kept = real.floor().clamp(max=n)
    short = kept_total - int(kept.sum())
    # Largest remainders first (ties: lower index), never above a group's size.
    room = (real - kept).masked_fill(kept >= n, -1.0)
    order = torch.sort(room, descending=True, stable=True).indices
    kept[order[:short]] += 1
    return shift, kept.long()
