"""No host sync in a training step: the forwards, backwards and the sparsity controller's per-step
work never wait for the device. On this CPU-only suite a dispatch mode stands in for a GPU's sync
debug mode: it follows every tensor computed from the model's parameters, buffers and inputs, and
records each op that would make the host read such a tensor (``item``, ``bool``, ``int``, a
data-dependent shape as in ``nonzero``). Exact top-k of a whole matrix keeps its selection's reads,
once per layer and step (a threshold with a deterministic tie-break needs the count below it); every
other path has none."""

import contextlib
import traceback

import pytest
import torch
from conftest import pst_method
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from pst_ds.config import DistillConfig, PSTConfig
from pst_ds.layers.inject import inject, iter_pst_layers
from pst_ds.train.distill import distilled
from pst_ds.train.schedule import SparsityController

# The ops that make the host wait for a device tensor's value or for a data-dependent size.
SYNCING = {
    torch.ops.aten._local_scalar_dense.default,  # item(), bool(), int(), float()
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten._unique2.default,
}


def _bool_index(func, args) -> bool:
    """``x[mask]``: its size is the mask's count, read from the device."""
    index = args[1] if func is torch.ops.aten.index.Tensor else ()
    return any(i is not None and i.dtype == torch.bool for i in index)


class HostSyncs(TorchDispatchMode):
    """Records each syncing op (with its stack) whose input was computed from ``device`` tensors."""

    def __init__(self, device: list[torch.Tensor]) -> None:
        super().__init__()
        self.derived = WeakIdKeyDictionary({t: True for t in device})
        self.syncs: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = any(t in self.derived for t in inputs)
        if on_device and (func in SYNCING or _bool_index(func, args)):
            self.syncs.append((str(func), "".join(traceback.format_stack(limit=16))))
        out = func(*args, **kwargs)
        if on_device:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.derived[t] = True
        return out


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Kernels compiled while the dispatch mode ran are guarded on it: dropped afterwards, so later
    tests in this worker compile afresh (a fullgraph compile of the same function failed on them)."""
    yield
    torch._dynamo.reset()


CASES = {
    "pst_nm": ("pst", {"mask": "nm", "final_sparsity": 0.5}),
    "pst_vnm": ("pst", {"mask": "vnm", "mask_v": 8, "mask_m": 4, "final_sparsity": 0.5}),
    "masked_lora_topk": ("masked_lora", {"final_sparsity": 0.5, "init": "wanda"}),  # input norms
    "masked_lora_nm": ("masked_lora", {"mask": "nm", "final_sparsity": 0.5}),
    "pst_topk": ("pst", {"final_sparsity": 0.5}),
    "pst_row": ("pst", {"final_sparsity": 0.5, "mask_scope": "row"}),
}


@pytest.mark.parametrize(
    ("case", "variant"),
    [*((case, "plain") for case in CASES), ("pst_nm", "checkpointed"), ("masked_lora_topk", "checkpointed"),
     ("pst_nm", "distilled")],
    ids=[*CASES, "pst_nm-checkpointed", "masked_lora_topk-checkpointed", "pst_nm-distilled"],
)  # fmt: skip
def test_a_step_never_waits_for_the_device(tiny_model, case, variant):
    """Steps 2 and 3 of a run (2 micro-batches each, activation importance where the method takes
    it, the controller's work between): no syncing op, or for top-k only inside its selection."""
    name, knobs = CASES[case]
    model = tiny_model("tiny_llama")
    method = pst_method(PSTConfig(**{"init": "magnitude", "initial_sparsity": 0.5, **knobs}), name)
    inject(model, method)
    if variant == "checkpointed":
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    layers = dict(iter_pst_layers(model))
    controller = SparsityController(method, 10, layers)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    torch.manual_seed(0)
    batches = [torch.randint(0, 256, (2, 24)) for _ in range(2)]

    def step(number: int, mode: HostSyncs | None = None) -> None:
        with mode or contextlib.nullcontext():
            controller.apply(number, logged=False)
            for ids in batches:
                if variant == "distilled":  # the teacher pass and the KL, per token of both micro-batches
                    batch = {"input_ids": ids, "labels": ids}
                    distilled(model, batch, DistillConfig(weight=0.5), torch.tensor(92))[0].backward()
                else:
                    model(input_ids=ids, labels=ids).loss.backward()
            controller.end_step(number)
        optimizer.step()  # the optimizer's own work is torch's, not pst-ds's
        optimizer.zero_grad()

    step(0)  # the first step: masked LoRA's one selection of its frozen mask
    device = [*model.parameters(), *model.buffers(), *batches]
    for number in (1, 2):
        mode = HostSyncs(device)
        step(number, mode)
        if name == "pst" and knobs.get("mask") is None:  # exact top-k: in its selection only
            assert mode.syncs, "the selection's reads went unseen: the detector is blind"
            outside = [
                stack for _, stack in mode.syncs if "in select\n" not in stack and "_select" not in stack
            ]
            assert not outside, outside[0]
        else:
            assert not mode.syncs, (
                f"{len(mode.syncs)} host syncs, the first: {mode.syncs[0][0]}\n{mode.syncs[0][1]}"
            )
