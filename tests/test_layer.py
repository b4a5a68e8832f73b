"""PSTLinear against an independent computation of the formulas in method.md."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from pst_ds import PSTConfig, PSTLinear, cubic_sparsity
from pst_ds.layers.settling import count_changed, pack_bits, rank_slice
from pst_ds.layers.step import StepRecord
from pst_ds.masks.kinds import StraightThroughMask, TopK
from pst_ds.masks.select import NonFiniteScoresError, keep_from, num_pruned, select_pruned


def select_threshold(scores, sparsity):
    """The threshold that prunes int(numel * sparsity) entries (the layer's rule)."""
    return select_pruned(scores, num_pruned(scores.numel(), sparsity))


def topk_mask(scores, sparsity):
    """Bool mask that drops exactly int(numel * sparsity) entries with the smallest scores."""
    threshold = select_threshold(scores, sparsity)
    return keep_from(scores, threshold.value, threshold.first_kept_tie)


def pst_reference(W, U, V, A, B, R, C, x, g, mask_fn, a1, a2, beta, scale=1.0):
    """Forward and closed-form STE gradients of PST, written out from method.md, for the mask
    ``mask_fn(S)`` and S = scale * |W'| + ... (scale: activation importance's column scale).

    W is (out, in); the loss is L = sum(y * g). Returns (y, M, S, dS, grads).
    """
    Wp = W + beta * U @ V
    S = scale * Wp.abs() + a1 * A @ B + a2 * (R[:, None] + C[None, :])
    M = mask_fn(S).float()
    y = x @ (M * Wp).T
    G = g.T @ x  # dL/dW_hat
    dS = G * Wp  # straight-through: dL/dS = dL/dM = G * W'
    dWp = M * G + scale * torch.sign(Wp) * dS  # through W_hat = M * W' and S = scale |W'| + ...
    grads = {
        "U": beta * dWp @ V.T,
        "V": beta * U.T @ dWp,
        "A": a1 * dS @ B.T,
        "B": a1 * A.T @ dS,
        "R": a2 * dS.sum(1),
        "C": a2 * dS.sum(0),
    }
    return y, M, S, dS, grads


def stable_topk(S, s):
    """Keep mask from a full stable argsort (ties pruned lowest flat index first), a different
    route from the layer's selection."""
    M = torch.ones(S.numel(), dtype=torch.bool)
    M[torch.argsort(S.reshape(-1), stable=True)[: int(S.numel() * s)]] = False
    return M.reshape(S.shape)


def reference(W, U, V, A, B, R, C, x, g, s, a1, a2, beta):
    """PST at per-matrix top-k of sparsity ``s``: (y, M, grads)."""
    y, M, _, _, grads = pst_reference(W, U, V, A, B, R, C, x, g, lambda S: stable_topk(S, s), a1, a2, beta)
    return y, M, grads


def unit_of(W: torch.Tensor, factor_scale: str) -> float:
    """pst.factor_scale's unit: mean |W| as bf16 holds it (a saved buffer's dtype may be bf16), or 1."""
    return float(W.double().abs().mean().to(torch.bfloat16)) if factor_scale == "weight" else 1.0


@pytest.mark.parametrize("factor_scale", ["weight", "one"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75])
def test_forward_and_factor_gradients_match_reference(kind, sparsity, compiled, factor_scale):
    torch.manual_seed(0)
    cfg = PSTConfig.release(
        weight_rank=4,
        mask_rank=3,
        alpha1=0.7,
        alpha2=1.3,
        beta=0.5,
        compile=compiled,
        factor_scale=factor_scale,
    )
    out_f, in_f = 24, 40
    base = nn.Linear(in_f, out_f, bias=False) if kind == "linear" else Conv1D(out_f, in_f)
    if kind == "conv1d":
        nn.init.zeros_(base.bias)
    layer = PSTLinear(base, cfg)
    assert layer.weight is base.weight  # the original Parameter object is kept
    with torch.no_grad():  # non-zero everywhere, so every term of S and W' matters
        for name in ("V", "B", "R", "C"):
            getattr(layer, name).normal_(0, 0.1)
    layer.sparsity = sparsity
    x, g = torch.randn(9, in_f), torch.randn(9, out_f)

    (layer(x) * g).sum().backward()

    W = base.weight.detach().T if kind == "conv1d" else base.weight.detach()
    factors = {n: getattr(layer, n).detach() for n in ("U", "V", "A", "B", "R", "C")}
    u = unit_of(W, factor_scale)  # the learned terms are in units of u
    y_ref, m_ref, grads = reference(
        W, **factors, x=x, g=g, s=sparsity, a1=u * cfg.alpha1, a2=u * cfg.alpha2, beta=u * cfg.beta
    )
    torch.testing.assert_close(layer(x), y_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.mask(), m_ref.bool())
    for name, expected in grads.items():
        torch.testing.assert_close(
            getattr(layer, name).grad,
            expected,
            rtol=1e-4,
            atol=1e-5,
            msg=lambda m, n=name: f"grad of {n}: {m}",
        )
    merged = layer.merged_weight()
    assert merged.shape == base.weight.shape
    expected_merged = m_ref * (W + u * cfg.beta * factors["U"] @ factors["V"])
    torch.testing.assert_close(merged, expected_merged.T if kind == "conv1d" else expected_merged)


@pytest.mark.parametrize("factor_scale", ["weight", "one"])
def test_weight_units_make_the_same_factors_act_alike_on_weights_of_any_scale(factor_scale):
    """pst.factor_scale=weight: a layer whose weights are 4x larger, with the same factors, keeps
    the same mask and gives 4x the output. In absolute units (one) the same factors move the
    smaller weights' mask further, so the masks differ."""
    torch.manual_seed(3)
    base, scaled = nn.Linear(48, 32, bias=False), nn.Linear(48, 32, bias=False)
    with torch.no_grad():
        scaled.weight.copy_(4 * base.weight)
    cfg = PSTConfig.release(
        weight_rank=4, mask_rank=3, alpha1=0.1, alpha2=0.1, beta=0.1, factor_scale=factor_scale, compile=False
    )
    small, large = PSTLinear(base, cfg), PSTLinear(scaled, cfg)
    with torch.no_grad():
        for name in ("U", "V", "A", "B", "R", "C"):
            getattr(small, name).normal_(0, 1.0)
            getattr(large, name).copy_(getattr(small, name))
    for layer in (small, large):
        layer.sparsity = 0.5
    x = torch.randn(5, 48)
    if factor_scale == "weight":
        assert torch.equal(small.mask(), large.mask())
        torch.testing.assert_close(large(x), 4 * small(x), rtol=1e-5, atol=1e-5)
    else:
        assert (small.mask() != large.mask()).sum() > 50


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("shape", [(40, 24), (512, 512)], ids=["kthvalue", "bracketed"])
def test_tied_scores_give_the_reference_mask_and_gradients(shape, compiled):
    """Scores that tie at the threshold: forward and backward must keep the same tied entries."""
    torch.manual_seed(2)
    out_f, in_f = shape
    base = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():  # 33 distinct magnitudes, and V = B = R = C = 0: S = |W| ties everywhere
        base.weight.copy_((base.weight * 32 / base.weight.abs().max()).round())
    layer = PSTLinear(base, PSTConfig.release(weight_rank=4, mask_rank=3, compile=compiled))
    layer.sparsity = 0.5
    x, g = torch.randn(7, in_f), torch.randn(7, out_f)

    y = layer(x)
    (y * g).sum().backward()

    factors = {n: getattr(layer, n).detach() for n in ("U", "V", "A", "B", "R", "C")}
    y_ref, m_ref, grads = reference(
        base.weight.detach(), **factors, x=x, g=g, s=0.5, a1=1.0, a2=1.0, beta=1.0
    )
    assert torch.equal(layer.mask(), m_ref.bool())
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    for name in ("U", "A", "R", "C"):  # V and B get gradients from U and A, which are random
        torch.testing.assert_close(getattr(layer, name).grad, grads[name], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9, 0.97])
def test_exact_zero_count_under_heavy_ties(dtype, sparsity):
    torch.manual_seed(1)
    base = nn.Linear(96, 80, bias=False)
    with torch.no_grad():  # few distinct magnitudes: most scores tie
        base.weight.copy_((base.weight * 8).round() / 8)
    layer = PSTLinear(base.to(dtype), PSTConfig.release())
    layer.sparsity = sparsity
    mask = layer.mask()
    assert (~mask).sum().item() == int(mask.numel() * sparsity)
    # V = B = R = C = 0: S = |W| exactly, whose stable full sort gives the same mask
    assert torch.equal(mask, stable_topk(base.weight.detach().float().abs(), sparsity))
    assert (layer.merged_weight()[~mask] == 0).all()


def test_ties_pruned_lowest_index_first():
    scores = torch.tensor([[1.0, 0.5, 0.5], [0.5, 2.0, 0.5]])
    mask = topk_mask(scores, 0.5)  # 3 of the four 0.5s go, in flat order
    assert mask.tolist() == [[True, False, False], [False, True, True]]


@pytest.mark.parametrize("shape", [(300, 170), (700, 600)], ids=["kthvalue", "bracketed"])
@pytest.mark.parametrize("distinct_values", [None, 5000])
def test_selection_matches_full_stable_sort(shape, distinct_values):
    """Both selection routes (whole-matrix kthvalue; sample bracket above 2^18 entries),
    with and without ties, against a stable argsort (ties pruned lowest index first)."""
    torch.manual_seed(2)
    scores = torch.randn(*shape)
    if distinct_values:  # heavy ties: every value repeats about numel / 5000 times
        scores = torch.randint(0, distinct_values, shape).float() / distinct_values
    for sparsity in (0.0, 0.01, 0.5, 0.9, 0.99):
        k = int(scores.numel() * sparsity)
        expected = torch.ones(scores.numel(), dtype=torch.bool)
        expected[scores.reshape(-1).argsort(stable=True)[:k]] = False
        assert torch.equal(topk_mask(scores, sparsity), expected.reshape(scores.shape))


def test_initial_factors_make_it_magnitude_pruning():
    torch.manual_seed(3)
    base = nn.Linear(30, 20)
    layer = PSTLinear(base, PSTConfig.release(weight_rank=8, mask_rank=8))
    assert layer.U.std() > 0.5 and layer.A.std() > 0.5  # N(0, 1)
    for name in ("V", "B", "R", "C"):
        assert not getattr(layer, name).any()
    layer.sparsity = 0.6
    expected = torch.ones(600, dtype=torch.bool)
    expected[base.weight.detach().abs().reshape(-1).argsort()[:360]] = False
    assert torch.equal(layer.mask(), expected.reshape(20, 30))


def test_schedule_corners():
    args = dict(total_steps=100, initial=0.0, final=0.9, initial_warmup=0.1, final_warmup=0.3)
    assert cubic_sparsity(0, **args) == 0.0
    assert cubic_sparsity(10, **args) == 0.0  # end of the dense warm-up
    assert 0.0 < cubic_sparsity(11, **args) < 0.9
    assert cubic_sparsity(40, **args) == pytest.approx(0.9 - 0.9 * 0.5**3)  # half-way
    assert cubic_sparsity(70, **args) == pytest.approx(0.9)  # end of the ramp
    assert cubic_sparsity(71, **args) == 0.9 and cubic_sparsity(100, **args) == 0.9
    values = [cubic_sparsity(t, **args) for t in range(101)]
    assert values == sorted(values)


def test_mask_changes_are_counted_between_noted_forwards():
    torch.manual_seed(4)
    layer = PSTLinear(nn.Linear(20, 10), PSTConfig.release())
    x = torch.randn(3, 20)
    layer.sparsity = 0.3
    layer.board.publish(StepRecord(0, logged=True))
    layer(x)
    assert layer.settling.changes is None and not layer.track_mask  # first note: nothing to compare
    first = layer.mask()
    layer.sparsity = 0.5
    layer(x)  # the step's mask was noted: this one is not
    layer.board.publish(StepRecord(1, logged=False))
    layer(x)  # not a logged step
    assert layer.settling.changes is None
    layer.board.publish(StepRecord(2, logged=True))
    layer(x)
    assert layer.settling.changes == int((layer.mask() != first).sum()) == 40


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_backward_keeps_only_the_input_and_small_tensors(compiled):
    """Saved-tensor accounting: besides the layer's own parameters, PST saves the input and
    O(out + in) numbers for backward; the autograd formulation saves weight-sized tensors."""
    torch.manual_seed(5)
    out_f, in_f, tokens = 96, 80, 7
    layer = PSTLinear(nn.Linear(in_f, out_f), PSTConfig.release(compile=compiled))
    layer.sparsity = 0.5
    x = torch.randn(tokens, in_f)
    params = {p.data_ptr() for p in layer.parameters()}

    def saved_bytes(forward):
        seen = []

        def pack(t):
            if t.data_ptr() not in params:
                seen.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward().sum().backward()
        return sum(seen)

    budget = x.numel() * 4 + 8 * (out_f + in_f) * 4  # the input, plus a few O(out + in) vectors
    assert saved_bytes(lambda: layer(x)) <= budget

    def autograd_formulation():  # the release's: W', S and the mask kept by autograd
        updated = layer.weight + layer.hyper.beta * layer.U @ layer.V
        scores = updated.abs() + layer.A @ layer.B + layer.R[:, None] + layer.C[None, :]
        return nn.functional.linear(
            x, StraightThroughMask.apply(scores, TopK(), layer.pruned) * updated, layer.bias
        )

    assert saved_bytes(autograd_formulation) > 2 * out_f * in_f * 4


@pytest.mark.parametrize(
    "bad, counts", [(float("nan"), "1 NaN and 0 infinite"), (float("inf"), "0 NaN and 1 infinite")]
)
@pytest.mark.parametrize("numel", [1000, 1 << 19])  # both selection routes
def test_non_finite_scores_are_refused(bad, counts, numel):
    scores = torch.rand(numel)
    scores[numel // 3] = bad
    with pytest.raises(NonFiniteScoresError, match=f"{counts} values among {numel:,} importance scores"):
        select_threshold(scores, 0.5)
    with pytest.raises(NonFiniteScoresError):  # also while dense (warm-up): it means the run diverged
        select_threshold(scores, 0.0)


def test_finite_scores_whose_sum_overflows_are_accepted():
    scores = torch.tensor([3e38, 3e38, 1.0, 2.0])  # sum is inf in fp32, every entry is finite
    assert torch.isinf(scores.sum())
    assert topk_mask(scores, 0.5).tolist() == [True, True, False, False]


def test_pst_layer_names_no_layer_but_refuses_nan_factors():
    layer = PSTLinear(
        nn.Linear(16, 8), PSTConfig.release(final_sparsity=0.5, initial_sparsity=0.5, compile=False)
    )
    with torch.no_grad():
        layer.C[3] = float("nan")  # one column of S
    with pytest.raises(NonFiniteScoresError, match="8 NaN"):
        layer(torch.randn(2, 16))


def test_packed_mask_changes_count_like_bool_masks():
    generator = torch.Generator().manual_seed(6)
    for numel in (1, 7, 8, 9, 1000, 4099):
        first = torch.rand(numel, generator=generator) < 0.5
        second = first ^ (torch.rand(numel, generator=generator) < 0.1)
        assert count_changed(pack_bits(second), pack_bits(first)) == int((first != second).sum())
        assert pack_bits(first).numel() == -(-numel // 8)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_rank_slices_split_every_entry_once(world_size):
    for numel in (1, 5, 64, 1001):
        covered = torch.zeros(numel, dtype=torch.int64)
        for rank in range(world_size):
            covered[rank_slice(numel, rank, world_size)] += 1
        assert bool((covered == 1).all())
