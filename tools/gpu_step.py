"""A short ZeRO run of a random-init model on random tokens, once per method, for tools/gpu_check.sh:
no data files, tokenizer or ``datasets`` (a GPU machine without a registry has none of them).

    deepspeed --num_gpus 1 tools/gpu_step.py --config configs/experiments/llama_1b.yaml \
        --ds_config configs/zero3_bf16.json --methods pst masked_lora lora dense --steps 6 \
        --out runs/gpu_check/bf16

The model is the config's ``model.random`` architecture at ``--vocab`` tokens; PST runs at the
config's final sparsity from the first step (the step's cost, not its schedule), with the
sparsity controller starting each step as training does. Prints, per method, the median step
time after --warmup steps, tokens/s, peak memory, and on a GPU the host syncs in the steps'
forwards and backwards after warm-up (``torch.cuda.set_sync_debug_mode``: DeepSpeed's own
included), as a markdown table and JSON under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pst_ds.config import ConfigError  # noqa: E402
from pst_ds.experiment import load_experiment  # noqa: E402
from pst_ds.layers.inject import inject, iter_pst_layers  # noqa: E402
from pst_ds.layers.step import StepRecord  # noqa: E402
from pst_ds.methods import method_class  # noqa: E402
from pst_ds.train.distributed import leave_process_group  # noqa: E402
from pst_ds.train.engine import load_ds_config  # noqa: E402
from pst_ds.train.schedule import SparsityController  # noqa: E402


@contextlib.contextmanager
def _host_syncs_counted(counting: bool) -> Iterator[list]:
    """The sync warnings of ``torch.cuda.set_sync_debug_mode`` raised within (none off a GPU)."""
    if not (counting and torch.cuda.is_available()):
        yield []
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")
    caught[:] = [w for w in caught if "synchroniz" in str(w.message)]


def run_method(args: argparse.Namespace, name: str, ds_config: dict) -> dict:
    config = load_experiment(args.config, [f"method={name}", *args.overrides])
    method = method_class(name)(config)
    architecture = dict(config.model.random or {})
    hf_config = AutoConfig.for_model(architecture.pop("model_type"), vocab_size=args.vocab, **architecture)
    micro, accumulation = config.train.micro_batch_size, config.train.gradient_accumulation_steps
    engine_config = {
        **ds_config,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
    }
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    torch.manual_seed(config.train.seed)
    with deepspeed.zero.Init(config_dict_or_path=engine_config, enabled=stage == 3):
        model = AutoModelForCausalLM.from_config(hf_config)
    inject(model, method)
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = dict(iter_pst_layers(model))
    controller = SparsityController(method, args.steps, layers) if layers else None
    if controller is not None:
        controller.put_in_force(layers, config.pst.final_sparsity)
        controller.board.publish(StepRecord(0))  # one selection per optimizer step, as in training
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=engine_config)
    generator = torch.Generator().manual_seed(0)
    times, losses, syncs = [], [], 0
    for step in range(args.steps):
        start = time.perf_counter()
        for _ in range(accumulation):
            ids = torch.randint(0, args.vocab, (micro, config.data.block_size), generator=generator)
            ids = ids.to(engine.device)
            with _host_syncs_counted(step >= args.warmup) as caught:
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss)
            syncs += len(caught)
            engine.step()
            losses.append(loss.detach())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    losses = [loss.item() for loss in losses]
    step_s = statistics.median(times[args.warmup :] or times)
    tokens = micro * accumulation * config.data.block_size * engine.world_size
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    del engine, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {
        "median_step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "peak_memory_gib": peak / 2**30,
        "losses": losses,
        "host_syncs_per_step": syncs / max(args.steps - args.warmup, 1)
        if torch.cuda.is_available()
        else None,
        "finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/experiments/llama_1b.yaml")
    parser.add_argument("--ds_config", default="configs/zero3_bf16.json")
    parser.add_argument("--methods", nargs="+", default=["pst", "masked_lora", "lora", "dense"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--vocab", type=int, default=49152, help="the random model's vocabulary (SmolLM2's)")
    parser.add_argument("--out", default="runs/gpu_check/steps")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the launcher's
    parser.add_argument("overrides", nargs="*", help="experiment overrides, key=value")
    args = parser.parse_args(argv)
    deepspeed.init_distributed()
    try:
        ds_config = load_ds_config(args.ds_config)
        results = {name: run_method(args, name, ds_config) for name in args.methods}
    except ConfigError as err:
        print(f"pst-ds: error: {err}", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lines = [
        f"{Path(args.config).stem}, {Path(args.ds_config).stem}, {device}",
        "",
        "| method | median step | tokens/s | peak GiB | losses finite | host syncs / step |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        syncs = "-" if r["host_syncs_per_step"] is None else f"{r['host_syncs_per_step']:.0f}"
        lines.append(
            f"| {name} | {r['median_step_s']:.3f} s | {r['tokens_per_s']:.0f} | {r['peak_memory_gib']:.1f} "
            f"| {r['finite']} | {syncs} |"
        )
    if "pst" in results and "lora" in results and "dense" in results:
        pst, lora, dense = results["pst"], results["lora"], results["dense"]
        lines.append(
            f"\npst tokens/s x lora: {pst['tokens_per_s'] / lora['tokens_per_s']:.2f}; "
            f"pst step x dense: {pst['median_step_s'] / dense['median_step_s']:.2f}"
        )
    if (
        torch.distributed.is_initialized()
        and torch.distributed.get_rank() == 0
        or not torch.distributed.is_initialized()
    ):
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "steps.json").write_text(
            json.dumps({"args": vars(args), "device": device, "results": results}, indent=1)
        )
        (out / "steps.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    leave_process_group()
    return 0 if all(r["finite"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
