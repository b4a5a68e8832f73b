"""One-shot pruning from calibration data: Wanda (Sun et al. 2024) and SparseGPT (Frantar &
Alistarh 2023), on the layers, mask kinds and engine that training uses.

The methods write what the layer's own importance needs for its first mask to be theirs:

    wanda      the input norms ||x_j|| (``input_sq``): with S = a |W| the mask is Wanda's
               |W_ij| ||x_j||, compared within the mask kind's groups (rows for the paper)
    sparsegpt  the pruned and OBS-updated weight W (oneshot/sparsegpt.py): its zeros are the mask,
               so S = |W| selects exactly them

then put the final sparsity in force (methods/wanda.py and methods/sparsegpt.py say which).
``method: wanda | sparsegpt`` stops there (and exports); ``pst.init`` trains on from it. With
``oneshot.sequential`` (the papers' way) the layers are taken block by block, each calibrated
on the outputs of the blocks pruned before it: one
whole forward captures the first block's inputs, then each block runs alone (about three
forwards' cost in all), and only one block's statistics are held at a time.

Under ZeRO-3 each rank runs its share of the calibration batches (every rank the same number
of forwards, a spare one contributing nothing); the statistics are all-reduced, so every rank
computes the same result, and the weights are written from rank 0's (``modifier_rank``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..layers.base import SparseLinear
from ..layers.importance import InputStatistics, fold_step

if TYPE_CHECKING:
    from ..methods.base import Calibration


def block_of(name: str) -> str:
    """The repeated block a layer belongs to (``model.layers.3`` for ``model.layers.3.mlp.up_proj``)."""
    match = re.match(r"(.*?\.\d+)\.", name)
    return match.group(1) if match else name


def in_blocks(names: Iterable[str], sequential: bool) -> list[list[str]]:
    """Layer names grouped by block in model order (one group of all when not sequential)."""
    names = list(names)
    if not sequential:
        return [names]
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(block_of(name), []).append(name)
    return list(groups.values())


class CalibrationInputs:
    """Forward pre-hooks that gather one group's statistics: x_j^2 sums where the layer keeps input
    norms, and X^T X for sparsegpt. ``active`` False: a spare forward that must not count."""

    def __init__(self, layers: dict[str, SparseLinear], hessians: bool) -> None:
        self.active, self.layers, self.want_hessians = True, layers, hessians
        self.stats = {name: InputStatistics() for name in layers}
        self.hessians: dict[str, torch.Tensor] = {}
        self.handles = [
            layer.register_forward_pre_hook(self._hook(name, hessians)) for name, layer in layers.items()
        ]

    def _hook(self, name: str, hessians: bool) -> Callable:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            if not self.active:
                return
            self.stats[name].observe(args[0])
            if hessians:
                flat = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                gram = flat.t() @ flat
                self.hessians[name] = gram if name not in self.hessians else self.hessians[name] + gram

        return hook

    def remove(self) -> None:
        """Unhook; a rank that saw no active batch contributes zeros to the all-reduces."""
        for handle in self.handles:
            handle.remove()
        for name, stats in self.stats.items():
            if stats.square_sum is None:
                in_features = self.layers[name].in_features
                stats.square_sum = torch.zeros(in_features, device=self.layers[name].pruned.device)
                if self.want_hessians:
                    self.hessians[name] = torch.zeros(
                        in_features, in_features, device=stats.square_sum.device
                    )

    def hessian(self, name: str) -> torch.Tensor:
        """X^T X / tokens over every rank's share (collective; before the norms are folded, which
        resets the token counts)."""
        gram = self.hessians[name]
        tokens = torch.tensor([float(self.stats[name].tokens)], dtype=gram.dtype, device=gram.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(gram)
            dist.all_reduce(tokens)
        return gram / tokens


def capture_block_inputs(block: nn.Module, run: Callable[[], None]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) each call of ``block`` gets while ``run()`` runs, without a cache: the
    papers' way to feed one block at a time (hidden states, masks and position embeddings)."""
    captured = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = {k: None if k == "past_key_values" else v for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), kwargs))

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return captured


def _hidden(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """A block's inputs with its hidden states replaced (passed first, or by name)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def chained(blocks: list[str]) -> bool:
    """True if the blocks are consecutive repeats of one stack (``model.layers.3``, ``.4``, ...),
    so that each one's output is the next one's input and they can run one at a time."""
    parsed = [re.fullmatch(r"(.*)\.(\d+)", block) for block in blocks]
    if not all(parsed):
        return False
    prefixes = {match.group(1) for match in parsed}
    indices = [int(match.group(2)) for match in parsed]
    return len(prefixes) == 1 and indices == list(range(indices[0], indices[0] + len(indices)))


def my_share(count: int) -> list[tuple[int, bool]]:
    """This rank's calibration batches as (index, counted): every rank runs the same number of
    forwards; a spare one (counted False) repeats batch 0 and must not count."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = [rank + r * world for r in range(math.ceil(count / world))]
    return [(index, index < count) for index in mine]


def prune_one_shot(
    calibration: Calibration,
    sequential: bool = True,
    name: str = "one-shot",
    prune_with_hessian: Callable[[SparseLinear, torch.Tensor], None] | None = None,
) -> None:
    """Prune ``calibration.layers`` (model order) to ``calibration.sparsity``, block by block.

    Each group's input norms are folded into its layers' ``input_sq`` (Wanda's score, and the
    activation importance PST trains on from there) and its mask state put in force; with
    ``prune_with_hessian`` each layer is then pruned at that count from its X^T X (SparseGPT's
    weight update).
    ``calibration.forward(batch)`` runs the whole model on one batch; it is called without
    autograd, in the caller's mode (eval), the same number of times on every rank. Each layer
    prunes the count that ``calibration.put_in_force`` writes for it (a sparsity profile may give
    every block its own). Sequentially, one whole forward captures the first block's inputs;
    then each block runs alone on them, is pruned, and runs again to give the next block its
    inputs. Collective."""
    layers, batches, forward = calibration.layers, calibration.batches, calibration.forward
    mine, active = zip(*my_share(len(batches)), strict=True)
    calibration.put_in_force(layers, 0.0)  # calibrate on the dense layers; each block is pruned once gathered
    groups = in_blocks(layers, sequential)
    blocks = [block_of(names[0]) for names in groups]
    direct = sequential and chained(blocks)

    def run_all() -> None:
        for index, counted in zip(mine, active, strict=True):
            forward(batches[index if counted else 0])

    with torch.no_grad():
        if direct:
            inputs = capture_block_inputs(calibration.model.get_submodule(blocks[0]), run_all)
        for g, names in enumerate(groups, 1):
            group = {name: layers[name] for name in names}
            inputs_seen = CalibrationInputs(group, hessians=prune_with_hessian is not None)
            if direct:
                block = calibration.model.get_submodule(blocks[g - 1])
                for (args, kwargs), counted in zip(inputs, active, strict=True):
                    inputs_seen.active = counted
                    block(*args, **kwargs)
            else:
                for index, counted in zip(mine, active, strict=True):
                    inputs_seen.active = counted
                    forward(batches[index if counted else 0])
            inputs_seen.remove()
            _prune_group(group, inputs_seen, calibration, prune_with_hessian)
            if direct and g < len(groups):  # the next block's inputs: this block's pruned outputs
                inputs = [
                    _with_hidden(args, kwargs, _hidden(block(*args, **kwargs))) for args, kwargs in inputs
                ]
            calibration.progress(f"{name}: block {g}/{len(groups)} pruned ({len(names)} layers)")


def _prune_group(
    group: dict[str, SparseLinear],
    inputs_seen: CalibrationInputs,
    calibration: Calibration,
    prune_with_hessian: Callable[[SparseLinear, torch.Tensor], None] | None,
) -> None:
    hessians = {name: inputs_seen.hessian(name) for name in group} if prune_with_hessian else {}
    with_norms = [(layer.input_sq, inputs_seen.stats[n]) for n, layer in group.items() if layer.input_stats]
    fold_step(with_norms, weight=1.0)  # input_sq = the calibration mean of x^2
    calibration.put_in_force(group, calibration.sparsity)
    for name, layer in group.items():
        if prune_with_hessian is not None:
            prune_with_hessian(layer, hessians[name])
