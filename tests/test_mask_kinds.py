"""Mask kinds, learned thresholds and activation importance against plain-torch references.

The references below never call pst_ds's selection: they sort with a stable argsort and loop
over groups and blocks, so a shared mistake cannot pass on both sides.
"""

import pytest
import torch
from conftest import pst_method
from test_layer import pst_reference
from torch import nn

from pst_ds import PSTConfig, PSTLinear
from pst_ds.config import ConfigError
from pst_ds.experiment import load_experiment
from pst_ds.layers.importance import InputStatistics, fold_step
from pst_ds.layers.inject import inject_pst, iter_pst_layers
from pst_ds.layers.step import StepRecord
from pst_ds.masks.allocation import allocate_kept
from pst_ds.masks.kinds import NM, VNM, TopK
from pst_ds.masks.select import num_pruned
from pst_ds.train.schedule import SparsityController, cubic_sparsity

# ---------------------------------------------------------------- references


def ref_prune_lowest(scores_1d: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask dropping the k smallest, ties: lower index dropped first (stable sort)."""
    keep = torch.ones(scores_1d.numel(), dtype=torch.bool)
    keep[torch.argsort(scores_1d, stable=True)[:k]] = False
    return keep


def ref_rows(S: torch.Tensor, counts: list[int]) -> torch.Tensor:
    return torch.stack([ref_prune_lowest(S[r], counts[r]) for r in range(S.shape[0])])


def ref_nm(S: torch.Tensor, n: int, m: int) -> torch.Tensor:
    keep = torch.zeros_like(S, dtype=torch.bool)
    for r in range(S.shape[0]):
        for start in range(0, S.shape[1], m):
            group = S[r, start : start + m]
            keep[r, start : start + m] = ref_prune_lowest(group, max(0, group.numel() - n))
    return keep


def ref_vnm(S: torch.Tensor, v: int, m: int) -> torch.Tensor:
    keep = torch.zeros_like(S, dtype=torch.bool)
    for top in range(0, S.shape[0], v):
        for start in range(0, S.shape[1], m):
            block = S[top : top + v, start : start + m]
            chosen = ref_prune_lowest(block.sum(0), max(0, block.shape[1] - 4)).nonzero().reshape(-1)
            for r in range(block.shape[0]):
                inside = ref_prune_lowest(block[r, chosen], max(0, chosen.numel() - 2))
                keep[top + r, start + chosen[inside]] = True
    return keep


def make_layer(out_f, in_f, seed=0, **knobs):
    torch.manual_seed(seed)
    layer = PSTLinear(
        nn.Linear(in_f, out_f, bias=False), PSTConfig.release(weight_rank=3, mask_rank=2, **knobs)
    )
    with torch.no_grad():
        for name in ("V", "B", "R", "C"):
            getattr(layer, name).normal_(0, 0.05)
    return layer


def check_against_reference(layer, mask_fn, scale=None, x_rows=5):
    out_f, in_f = layer.out_features, layer.in_features
    x, g = torch.randn(x_rows, in_f), torch.randn(x_rows, out_f)
    (layer(x) * g).sum().backward()
    factors = {n: getattr(layer, n).detach() for n in ("U", "V", "A", "B", "R", "C")}
    h = layer.hyper
    a = torch.ones(in_f) if scale is None else scale
    y_ref, m_ref, S, dS, grads = pst_reference(
        layer.weight.detach(),
        **factors,
        x=x,
        g=g,
        mask_fn=mask_fn,
        a1=h.alpha1,
        a2=h.alpha2,
        beta=h.beta,
        scale=a,
    )
    m_ref = m_ref.bool()
    torch.testing.assert_close(layer(x), y_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.mask(), m_ref)
    for name, expected in grads.items():
        torch.testing.assert_close(getattr(layer, name).grad, expected, rtol=1e-4, atol=1e-5, msg=name)
    merged = layer.merged_weight()
    assert torch.equal(merged == 0, ~m_ref | (merged == 0))  # pruned entries are zero
    return m_ref, S, dS


# ---------------------------------------------------------------- the kinds


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_row_scope_prunes_the_same_count_in_every_row(compiled):
    layer = make_layer(12, 20, mask_scope="row", compile=compiled)
    layer.sparsity = 0.4
    assert layer.pruned.tolist() == [8] * 12
    mask, _, _ = check_against_reference(layer, lambda S: ref_rows(S, [8] * 12))
    assert ((~mask).sum(1) == 8).all()


def test_row_scope_with_ties_and_uneven_counts():
    scores = (torch.randint(0, 4, (6, 10)).float() / 4).requires_grad_(False)  # heavy ties
    counts = torch.tensor([0, 1, 5, 9, 10, 3])
    kind = TopK("row")
    mask = kind.select(scores, counts).mask(scores)
    assert torch.equal(mask, ref_rows(scores, counts.tolist()))
    assert kind.pattern_problem(mask, counts) is None
    broken = mask.clone()
    broken[2, (~mask[2]).nonzero()[0]] = True
    assert kind.pattern_problem(broken, counts) == "row 2 prunes 4, 5 recorded"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("n, m, in_f", [(2, 4, 24), (4, 8, 40), (2, 4, 22), (1, 3, 10)])
def test_n_of_m_against_reference(compiled, n, m, in_f):
    layer = make_layer(8, in_f, mask="nm", mask_n=n, mask_m=m, final_sparsity=1 - n / m, compile=compiled)
    layer.sparsity = 0.0  # the dense warm-up: nothing pruned
    assert int(layer.pruned) == 0 and bool(layer.mask().all())
    layer.sparsity = 1 - n / m
    mask, _, _ = check_against_reference(layer, lambda S: ref_nm(S, n, m))
    full = in_f // m * m
    assert (mask[:, :full].reshape(8, -1, m).sum(-1) == n).all()  # every full group keeps exactly n
    assert int(layer.pruned) == (~mask).sum() and layer.mask_kind.pattern_problem(mask, layer.pruned) is None


def test_n_of_m_ties_keep_the_later_position():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 3.0, 2.0, 2.0, 0.0]])
    mask = NM(2, 4).select(scores, torch.tensor(4)).mask(scores)
    assert mask.tolist() == [[False, False, True, True, True, False, True, False]]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("v, m, out_f, in_f", [(4, 5, 8, 20), (4, 8, 12, 24), (3, 5, 10, 23)])
def test_vnm_against_reference(compiled, v, m, out_f, in_f):
    layer = make_layer(
        out_f, in_f, mask="vnm", mask_v=v, mask_m=m, final_sparsity=1 - 2 / m, compile=compiled
    )
    layer.sparsity = 1 - 2 / m
    mask, _, _ = check_against_reference(layer, lambda S: ref_vnm(S, v, m))
    full = in_f // m * m
    assert (mask[:, :full].reshape(out_f, -1, m).sum(-1) == 2).all()  # 2 kept of every M per row
    for top in range(0, out_f, v):  # each V x M block uses at most 4 columns
        used = mask[top : top + v].any(0)[:full].reshape(-1, m).sum(-1)
        assert (used <= 4).all()
    assert layer.mask_kind.pattern_problem(mask, layer.pruned) is None


def ref_ramp(S: torch.Tensor, pattern: torch.Tensor, k: int) -> torch.Tensor:
    """The pattern's kept entries, and of the others all but the k smallest (stable sort)."""
    outside = torch.where(pattern, torch.inf, S).reshape(-1)
    keep = torch.ones(S.numel(), dtype=torch.bool)
    keep[torch.argsort(outside, stable=True)[:k]] = False
    return keep.view(S.shape) | pattern


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kind", ["nm", "vnm"])
def test_a_schedule_ramps_into_the_pattern_through_the_smallest_scores(compiled, kind):
    """Below the pattern's share the pattern's kept entries stay and only the smallest of the
    rest go, exactly as many as the schedule says; at its share, the pattern itself."""
    out_f, in_f, m = 8, 20, 5 if kind == "vnm" else 4
    knobs = {"mask_v": 4, "mask_m": 5} if kind == "vnm" else {}
    layer = make_layer(out_f, in_f, mask=kind, final_sparsity=1 - 2 / m, compile=compiled, **knobs)
    pattern = (lambda S: ref_vnm(S, 4, 5)) if kind == "vnm" else (lambda S: ref_nm(S, 2, 4))
    for sparsity in (0.05, 0.2, 0.35, 1 - 2 / m):
        layer.sparsity = sparsity
        k = min(int(out_f * in_f * sparsity), out_f * (in_f - in_f // m * 2))
        assert int(layer.pruned) == k
        mask, _, _ = check_against_reference(layer, lambda S, k=k: ref_ramp(S, pattern(S), k))
        assert int((~mask).sum()) == k and layer.mask_kind.pattern_problem(mask, layer.pruned) is None
        layer.zero_grad()
    assert torch.equal(mask, pattern(layer.scores_and_weight()[0].detach()))  # at its share: the pattern


def test_pattern_checks_catch_a_broken_pattern():
    scores = torch.rand(8, 10)
    nm = NM(2, 4)
    mask = nm.select(scores, nm.pruned_count(8, 10, 0.5)).mask(scores)
    mask[3, 0:4] = True
    assert "row 3, inputs 0-3 keep 4" in nm.pattern_problem(mask, nm.pruned_count(8, 10, 0.5))
    vnm = VNM(4, 5)
    pruned = vnm.pruned_count(8, 10, 0.6)
    mask = vnm.select(scores, pruned).mask(scores)
    mask[0, :5] = False
    mask[0, 0], mask[1, 1], mask[2, 2], mask[3, 3], mask[0, 4] = True, True, True, True, True
    assert vnm.pattern_problem(mask, pruned) is not None


def test_pattern_kinds_refuse_a_sparsity_they_cannot_give():
    with pytest.raises(ConfigError, match="set pst.final_sparsity=0.5"):
        PSTConfig.release(mask="nm", final_sparsity=0.7)
    with pytest.raises(ConfigError, match="set pst.final_sparsity=0.6"):
        PSTConfig.release(mask="vnm", mask_m=5, final_sparsity=0.5)
    with pytest.raises(ConfigError, match="mask_n < mask_m"):
        PSTConfig.release(mask="nm", mask_n=4, mask_m=4, final_sparsity=0.0)
    with pytest.raises(ConfigError, match="pst.mask must be one of"):
        PSTConfig.release(mask="random")


# ---------------------------------------------------------------- activation importance


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_activation_importance_scales_magnitude_by_input_norms(compiled):
    layer = make_layer(10, 16, importance="activation", compile=compiled)
    with torch.no_grad():
        layer.input_sq.copy_(torch.rand(16) * 4 + 0.1)
    layer.sparsity = 0.5
    norms = layer.input_sq.sqrt()
    scale = norms / norms.mean()
    check_against_reference(layer, lambda S: ref_prune_lowest(S.reshape(-1), 80).reshape(S.shape), scale)


def test_input_statistics_are_a_running_mean_of_squares():
    buffer = torch.ones(6)
    stats = InputStatistics()
    batches = [torch.randn(2, 5, 6) for _ in range(4)]
    for step in range(2):  # two steps of two micro-batches each
        for x in batches[2 * step : 2 * step + 2]:
            stats.observe(x)
        fold_step([(buffer, stats)], weight=1.0 / (step + 1))
    expected = torch.cat([x.reshape(-1, 6) for x in batches]).pow(2).mean(0)
    torch.testing.assert_close(buffer, expected)
    assert stats.square_sum is None and stats.tokens == 0


def test_activation_statistics_are_gathered_in_warmup_only(tiny_model):
    model = tiny_model("tiny_llama")
    config = PSTConfig.release(importance="activation", final_sparsity=0.5, initial_warmup=0.2)
    inject_pst(model, config)
    layers = dict(iter_pst_layers(model))
    controller = SparsityController(pst_method(config), 10, layers)
    model.train()
    seen = []
    for step in range(4):
        controller.apply(step)
        before = next(iter(layers.values())).input_sq.clone()
        model(input_ids=torch.randint(0, 200, (2, 16)))
        controller.end_step(step)
        seen.append(not torch.equal(before, next(iter(layers.values())).input_sq))
    assert seen == [True, True, True, False]  # steps 0-2 run at the initial sparsity (2 <= 0.2 * 10)
    for layer in layers.values():
        assert layer.input_sq.shape == (layer.in_features,)  # O(in): nothing weight-sized


# ---------------------------------------------------------------- learned thresholds


def test_allocation_is_exact_and_follows_the_logits():
    torch.manual_seed(0)
    sizes = torch.tensor([1000, 30, 4096, 7, 512])
    logits = torch.tensor([0.5, -1.0, 0.0, 2.0, -0.3])
    for kept_total in (0, 1, 2000, 5000, int(sizes.sum()) - 1, int(sizes.sum())):
        shift, kept = allocate_kept(logits, sizes, kept_total)
        assert int(kept.sum()) == kept_total
        assert (kept >= 0).all() and (kept <= sizes).all()
    shift, kept = allocate_kept(logits, sizes, 2800)
    fractions = kept / sizes
    big = [0, 2, 4]  # large groups: rounding is negligible, so the order is the logits'
    assert fractions[0] > fractions[2] > fractions[4]
    expected = sizes * torch.sigmoid(logits + shift)
    assert (kept[big] - expected[big]).abs().max() <= 1
    _, uniform = allocate_kept(torch.zeros(5), sizes, int(sizes.sum()) // 2)
    assert ((uniform / sizes - 0.5).abs() <= 1 / sizes).all()


@pytest.mark.parametrize("scope", ["matrix", "row"])
def test_controller_keeps_the_global_count_exact_at_every_step(tiny_model, scope):
    model = tiny_model("tiny_gpt2")
    config = PSTConfig.release(mask="threshold", mask_scope=scope, final_sparsity=0.7)
    inject_pst(model, config)
    layers = dict(iter_pst_layers(model))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():
            layer.threshold_logit.normal_(0, 1.0)
    controller = SparsityController(pst_method(config), 20, layers)
    total = sum(layer.out_features * layer.in_features for layer in layers.values())
    for step in range(21):
        controller.apply(step)
        pruned = sum(int(layer.pruned.sum()) for layer in layers.values())
        assert pruned == num_pruned(total, cubic_sparsity(step, 20, 0.0, 0.7, 0.1, 0.3)), step
    if scope == "row":  # the logits moved weights between rows (and matrices)
        shares = torch.cat([layer.pruned / layer.in_features for layer in layers.values()])
    else:
        shares = torch.tensor(list(controller.layer_sparsities().values()))
    assert shares.max() - shares.min() > 0.1


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("scope", ["matrix", "row"])
def test_threshold_gradient_is_the_band_mean_of_the_mask_gradient(compiled, scope):
    layer = make_layer(10, 30, mask="threshold", mask_scope=scope, threshold_band=0.2, compile=compiled)
    with torch.no_grad():
        layer.threshold_logit.normal_(0, 0.5)
    layer.board.publish(StepRecord(0, threshold_shifts={layer.layer_name: 0.3}))
    counts = torch.randint(5, 25, (10,)) if scope == "row" else torch.tensor(140)
    layer.put_in_force(counts)
    if scope == "row":
        mask_fn = lambda S: ref_rows(S, counts.tolist())  # noqa: E731
    else:
        mask_fn = lambda S: ref_prune_lowest(S.reshape(-1), 140).reshape(S.shape)  # noqa: E731
    _, S, dS = check_against_reference(layer, mask_fn)
    rho = torch.sigmoid(layer.threshold_logit.detach() + 0.3)
    if scope == "row":
        t = torch.stack([S[r].sort().values[counts[r] - 1] for r in range(10)])[:, None]
        near = (S - t).abs() <= 0.2 * t.abs()
        d_rho = 30 * (dS * near).sum(1) / near.sum(1).clamp(min=1)
    else:
        t = S.reshape(-1).sort().values[139]
        near = (S - t).abs() <= 0.2 * t.abs()
        d_rho = (300 * (dS * near).sum() / near.sum()).reshape(1)
    assert near.sum() > 0
    torch.testing.assert_close(layer.threshold_logit.grad, d_rho * rho * (1 - rho), rtol=1e-4, atol=1e-6)


def test_threshold_needs_pst_and_learned_scores_take_no_activation_importance():

    from pst_ds.methods import method_class

    with pytest.raises(ConfigError, match="method=magnitude has none"):
        load_experiment("configs/experiments/tiny_llama.yaml", ["method=magnitude", "pst.mask=threshold"])
    config = load_experiment(
        "configs/experiments/tiny_llama.yaml", ["method=movement", "pst.importance=activation"]
    )
    assert method_class("movement")(config).pst.importance == "magnitude"  # its scores are its own


@pytest.mark.parametrize("n, m, cols", [(2, 4, 24), (2, 4, 22), (2, 5, 23), (1, 3, 10)])
def test_fused_group_masks_are_the_eager_masks(n, m, cols):
    """nm and vnm masks as torch.compile fuses them (entries read by column index) are the eager
    masks exactly, ties and a narrower last group included."""
    from pst_ds.masks.kinds import VNM, keep_vnm
    from pst_ds.masks.select import keep_n_of_m

    torch.manual_seed(0)
    scores = torch.randint(0, 4, (19, cols)).float()  # many ties
    fused = torch.compile(keep_n_of_m, dynamic=True, fullgraph=True)
    assert torch.equal(fused(scores, n, m), keep_n_of_m(scores, n, m))
    if m >= 4:
        columns = VNM(v=8, m=m)._pattern(scores).args[0]
        fused_vnm = torch.compile(keep_vnm, dynamic=True, fullgraph=True)
        assert torch.equal(fused_vnm(scores, columns, 8, m), keep_vnm(scores, columns, 8, m))
