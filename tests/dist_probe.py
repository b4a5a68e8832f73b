"""Run under the deepspeed launcher by test_distributed.py: train, then report what each rank holds.

deepspeed --num_gpus 2 tests/dist_probe.py --ds_config X --config Y --report DIR [key=value ...]
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch.train import parse_args  # noqa: E402
from pst_ds.experiment import load_experiment  # noqa: E402
from pst_ds.integrations.run import build_run  # noqa: E402
from pst_ds.train.distributed import leave_process_group  # noqa: E402
from pst_ds.train.engine import load_ds_config  # noqa: E402


def optimizer_state_numel(engine) -> int:
    """Elements of the exp_avg buffers the torch optimizer behind the engine holds."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sum(state["exp_avg"].numel() for state in inner.state.values())


def optimizer_state_by_lr(engine) -> dict[str, int]:
    """exp_avg elements per parameter group, keyed by the group's base learning rate. ZeRO-3
    keeps one flat fp32 partition per sub-group and only lends it to the group during step."""
    zero, inner = engine.optimizer, engine.optimizer.optimizer
    by_lr: dict[str, int] = {}
    for index, flat in enumerate(getattr(zero, "fp32_partitioned_groups_flat", [])):  # ZeRO-3 only
        group = inner.param_groups[zero.sub_group_to_group_id[index]]
        key = f"{group['initial_lr']:g}"
        numel = inner.state[flat]["exp_avg"].numel() if flat in inner.state else 0
        by_lr[key] = by_lr.get(key, 0) + numel
    return by_lr


def record_mask_changes(layers: dict) -> dict[str, list[int]]:
    """Per layer, the entries changed between noted masks, counted the independent way (a whole
    bool copy of every mask on the host), to check the trainer's sliced, packed count."""
    changes: dict[str, list[int]] = {name: [] for name in layers}
    previous: dict = {}

    def wrap(name, note):
        def noting(mask):
            if name in previous:
                changes[name].append(int((mask.cpu() != previous[name]).sum()))
            previous[name] = mask.cpu().clone()
            note(mask)

        return noting

    for name, layer in layers.items():
        layer.settling.note = wrap(name, layer.settling.note)
    return changes


def main() -> None:
    probe = argparse.ArgumentParser()
    probe.add_argument("--report", required=True)
    own, rest = probe.parse_known_args()
    args = parse_args(rest)
    trainer = build_run(load_experiment(args.config, args.overrides), load_ds_config(args.ds_config))
    changes = record_mask_changes(trainer.layers)
    trainer.train()
    engine, rank = trainer.engine, dist.get_rank()

    layers = {}
    for name, layer in trainer.layers.items():
        weight = layer.weight
        params = list(layer.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params):
            mask = layer.mask()
            dense = layer.oriented_weight().detach().float().clone()
            logit = layer.threshold_logit.tolist() if hasattr(layer, "threshold_logit") else None
            factors = [p.detach().float().reshape(-1) for p in params if p.requires_grad]
        input_sq = getattr(layer, "input_sq", None)
        teacher_mean_abs = None
        if layer.dense_teacher is not None:  # the original weight, before a warm start rewrote it
            with deepspeed.zero.GatheredParameters([layer.dense_teacher.weight]):
                teacher_mean_abs = float(layer.dense_teacher.weight.detach().float().abs().mean())
        layers[name] = {
            "threshold_logit": logit,
            "factors": torch.cat(factors).tolist() if factors else [],
            "pruned": layer.pruned.reshape(-1).tolist(),
            "input_sq": None if input_sq is None else input_sq.tolist(),
            "factor_unit": float(layer.factor_unit) if hasattr(layer, "factor_unit") else None,
            "teacher_mean_abs": teacher_mean_abs,
            "mask_sha256": hashlib.sha256(mask.numpy().tobytes()).hexdigest(),
            "weight_sha256": hashlib.sha256(dense.numpy().tobytes()).hexdigest(),
            "weight_zeros": int((dense == 0).sum()),
            "zeros": int((~mask).sum()),
            "pruned_state": int(layer.pruned.sum()),
            "weight_full_numel": int(getattr(weight, "ds_numel", weight.numel())),
            "weight_local_numel": int(weight.ds_tensor.numel()) if hasattr(weight, "ds_tensor") else None,
            "weight_data_numel": int(weight.data.numel()),
            "weight_has_grad": weight.grad is not None,
        }
    report = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "trainable_numel": trainer.records.facts["trainable_params"],
        "total_numel": sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters()),
        "optimizer_state_numel": optimizer_state_numel(engine),
        "optimizer_state_by_lr": optimizer_state_by_lr(engine),
        "global_sparsity": trainer.controller.global_sparsity(),
        "mask_changed_reference": [
            sum(counts) / trainer.records.facts["sparsified_params"]
            for counts in zip(*changes.values(), strict=True)
        ],
        "frozen_with_grad": [
            n for n, p in engine.module.named_parameters() if not p.requires_grad and p.grad is not None
        ],
        "layers": layers,
    }
    Path(own.report).mkdir(parents=True, exist_ok=True)
    (Path(own.report) / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    leave_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
