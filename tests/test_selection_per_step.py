"""One selection per optimizer step: every micro-batch of a gradient-accumulation step, every
recomputed forward of gradient checkpointing and every backward use the mask the step's first
forward selected, and it is the mask a fresh selection gives; after the next step it is made again,
even when the loop steps its optimizer without publishing the next step's record."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pst_ds import PSTConfig, PSTLinear
from pst_ds.layers.step import StepRecord

KINDS = {
    "topk": {},
    "row": {"mask_scope": "row"},
    "threshold": {"mask": "threshold"},
    "nm": {"mask": "nm", "final_sparsity": 0.5},
    "vnm": {"mask": "vnm", "mask_v": 8, "mask_m": 5, "final_sparsity": 0.6},
}


class NotedLinear(PSTLinear):
    """Notes the mask of every forward (a layer notes only a logged step's first)."""

    track_mask = True


def layer_of(kind: str, compiled: bool = False, noted: bool = False) -> PSTLinear:
    torch.manual_seed(0)
    config = PSTConfig.release(weight_rank=4, mask_rank=4, compile=compiled, **KINDS[kind])
    layer = (NotedLinear if noted else PSTLinear)(nn.Linear(80, 96).requires_grad_(False), config)
    layer.sparsity = 0.6 if kind == "vnm" else 0.5
    with torch.no_grad():
        for name in ("V", "B", "R", "C"):
            getattr(layer, name).normal_(0, 0.05)
    return layer


def counted_selections(layer: PSTLinear) -> list[int]:
    """A counter of the selections the layer's mask kind makes."""
    calls, select = [0], layer.mask_kind.select

    def counting(*args, **kwargs):
        calls[0] += 1
        return select(*args, **kwargs)

    layer.mask_kind.select = counting
    return calls


@pytest.mark.parametrize("publishes", [True, False], ids=["published", "loop-forgets"])
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_one_selection_per_step_gives_every_micro_batch_the_fresh_mask(kind, checkpointed, publishes):
    held, fresh = layer_of(kind, noted=True), layer_of(kind, noted=True)
    held.board.publish(StepRecord(0))  # as the sparsity controller does before the first step
    calls = counted_selections(held)
    fresh_calls = counted_selections(fresh)
    held.train(), fresh.train()
    torch.manual_seed(1)
    inputs = [torch.randn(2, 7, 80, requires_grad=True) for _ in range(4)]  # accumulation 4
    optimizers = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=5.0) for m in (held, fresh)
    ]
    masks_by_step = []
    for step in range(2):
        if publishes:  # the controller's record of this step (a loop that forgets it publishes none)
            held.board.publish(StepRecord(step))
        recorded = []
        for x in inputs:
            outputs = []
            for layer in (held, fresh):
                record = []
                layer.note_mask = record.append  # the mask each forward applies
                forward = (
                    (lambda v, m=layer: checkpoint(m, v, use_reentrant=False)) if checkpointed else layer
                )
                y = forward(x)
                y.square().sum().backward()
                outputs.append((y.detach(), record[0]))
            (y_held, m_held), (y_fresh, m_fresh) = outputs
            assert torch.equal(m_held, m_fresh) and torch.equal(y_held, y_fresh)
            recorded.append(m_held)
        # One selection in the step, against one per forward (and recompute) without holding it.
        assert calls[0] == step + 1
        assert fresh_calls[0] == (step + 1) * len(inputs) * (2 if checkpointed else 1) + step
        assert torch.equal(recorded[0], fresh.mask())  # and its mask is the one in force
        for name in ("U", "V", "A", "B", "R", "C"):  # the same gradients, bit for bit
            torch.testing.assert_close(getattr(held, name).grad, getattr(fresh, name).grad, rtol=0, atol=0)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        masks_by_step.append(recorded[0])
    assert not torch.equal(masks_by_step[0], masks_by_step[1])  # the step moved the mask: selected again


def test_evaluation_and_no_grad_forwards_never_take_the_held_selection():
    layer = layer_of("topk")
    layer.board.publish(StepRecord(0))
    calls = counted_selections(layer)
    x = torch.randn(3, 80)
    layer.train()
    layer(x).sum().backward()
    assert calls[0] == 1
    with torch.no_grad():
        layer.U.add_(1.0)  # changed outside a step (a warm start): no held selection may answer
        expected = layer.mask()
        layer(x)
    layer.eval()
    layer(x)
    assert calls[0] == 4
    layer.put_in_force(layer.pruned_count)  # a new state in force drops the held selection
    layer.train()
    layer.board.publish(StepRecord(0, logged=True))  # the same step: only the new count selects again
    record = []
    layer.note_mask = record.append
    layer(x)
    assert calls[0] == 5 and torch.equal(record[0], expected)
