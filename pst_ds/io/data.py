"""Data: text and records (io/records.py) -> packed token blocks (causal LM); CSV -> labelled examples."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_dataset
from torch.utils.data import default_collate
from transformers import PreTrainedTokenizerBase

from ..config import ConfigError, DataConfig
from ..paths import resolve_path
from .cache import cache_dir
from .records import Source, check_text_file, load_records, sources


@dataclass
class Splits:
    train: Dataset
    validation: Dataset
    test: Dataset | None = None  # classification only
    labels: list[str] | None = None  # class names, classification only


def load_splits(config: DataConfig, task: str, tokenizer: PreTrainedTokenizerBase) -> Splits:
    if task == "sequence_classification":
        return load_classification(config, tokenizer)
    return load_text_blocks(config, tokenizer)


def packed_blocks(
    names: list[str], config: DataConfig, tokenizer: PreTrainedTokenizerBase, key: str = "data.train_files"
) -> Dataset:
    """The files ``names`` tokenised and packed into blocks of ``config.block_size`` tokens, each
    starting with the tokenizer's BOS token when it has one. Cached under ``<cache>/datasets``.

    Packing: examples follow each other in one token stream (a record's text or completion ends
    with EOS), cut into blocks regardless of where examples end, so a block may hold the end of
    one example and the start of the next and attend across them; every token trains. With
    ``loss_on=completion`` the blocks carry labels: -100 on every token that is not an assistant
    turn or a completion (a block with none is dropped). Each batch of records packs alone: its
    last partial block is dropped.
    """
    found = sources(names, key)
    if found[0].reader == "txt":
        if config.loss_on == "completion":
            raise ConfigError(
                f"data.loss_on=completion needs chat or prompt/completion records; {found[0].path} "
                "is plain text, where every token would train: give records, or set data.loss_on=all"
            )
        return _pack(_text_lines(found), config, tokenizer, "lines")
    records, fmt = load_records(found, config)
    if fmt == "text" and config.loss_on == "completion":
        raise ConfigError(
            f"data.loss_on=completion needs chat or prompt/completion records; {found[0].path} holds text"
        )
    if fmt == "chat" and tokenizer.chat_template is None:
        raise ConfigError(
            f"{found[0].path} holds chat records (messages), but the model's tokenizer has no chat "
            "template to render them: give prompt/completion or text records, or a tokenizer with one"
        )
    return _pack(records, config, tokenizer, fmt)


def _text_lines(found: list[Source]) -> Dataset:
    return load_dataset(
        "text",
        data_files=[str(s.path) for s in found],
        split="train",
        keep_linebreaks=True,
        cache_dir=str(cache_dir() / "datasets"),
    )


def _pack(records: Dataset, config: DataConfig, tokenizer: PreTrainedTokenizerBase, fmt: str) -> Dataset:
    """Tokenise ``records`` (format ``fmt``; "lines": a .txt file's lines, no EOS between them)
    and pack them into blocks (see ``packed_blocks``)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = config.block_size - len(bos)
    labelled = config.loss_on == "completion"
    # A record's text or completion ends with EOS; a chat template ends its turns itself.
    ends = fmt in ("text", "prompt_completion") and tokenizer.eos_token_id is not None
    eos = [tokenizer.eos_token_id] if ends else []

    def tokenize_and_pack(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        pieces = [segments(row, fmt, tokenizer, labelled) for row in rows]
        texts = [text for record in pieces for text, _ in record]
        ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        stream, trained = [], []
        for record in pieces:
            for _, is_trained in record:
                tokens = next(ids)
                stream += tokens
                trained += [is_trained] * len(tokens)
            stream += eos
            trained += [True] * len(eos)
        usable = len(stream) - len(stream) % body
        blocks = {"input_ids": [bos + stream[i : i + body] for i in range(0, usable, body)]}
        if labelled:
            labels = [t if keep else -100 for t, keep in zip(stream, trained, strict=True)]
            blocks["labels"] = [[-100] * len(bos) + labels[i : i + body] for i in range(0, usable, body)]
            kept = [i for i, block in enumerate(blocks["labels"]) if any(t != -100 for t in block)]
            blocks = {name: [column[i] for i in kept] for name, column in blocks.items()}
        return blocks

    return records.map(
        tokenize_and_pack,
        batched=True,
        batch_size=PACK_BATCH[fmt == "lines"],
        remove_columns=records.column_names,
        desc="tokenising",
    )


# Records packed together per map batch: a .txt file's lines are short; records may be long.
PACK_BATCH = {True: 20_000, False: 1_000}


def segments(
    record: dict[str, Any], fmt: str, tokenizer: PreTrainedTokenizerBase, completion_only: bool
) -> list[tuple[str, bool]]:
    """The record's text as (piece, trains) pairs, in order: with ``completion_only`` a piece
    trains if it is an assistant turn or a completion; otherwise the whole text trains."""
    if fmt in ("lines", "text"):
        return [(record["text"], True)]
    if fmt == "prompt_completion":
        return [(record["prompt"], not completion_only), (record["completion"], True)]
    messages = record["messages"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    if not completion_only:
        return [(rendered, True)]
    pieces, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not rendered.startswith(upto) or start < done or start > len(upto):
            raise ConfigError(
                "the tokenizer's chat template does not render a conversation turn by turn (an earlier "
                "turn changes when a later one follows), so the assistant's tokens cannot be told "
                "apart: set data.loss_on=all"
            )
        pieces += [(rendered[done:start], False), (rendered[start : len(upto)], True)]
        done = len(upto)
    pieces.append((rendered[done:], False))
    return [(text, trains) for text, trains in pieces if text]


def load_text_blocks(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Splits:
    """Packed blocks of the training files; the validation split is the tail of the stream (not
    a random sample), so no text leaks from training into it."""
    blocks = packed_blocks(config.train_files, config, tokenizer)
    total = len(blocks)
    n_val = min(config.max_validation_blocks, max(1, int(total * config.validation_fraction)))
    n_train = total - n_val
    if config.max_train_tokens:
        n_train = min(n_train, max(1, config.max_train_tokens // config.block_size))
    if n_train < 1:
        raise ConfigError(
            f"data.train_files ({', '.join(config.train_files)}) hold {total} block(s) of "
            f"{config.block_size} tokens, all needed for validation: add text or lower data.block_size"
        )
    return Splits(
        train=blocks.select(range(n_train)).with_format("torch"),
        validation=blocks.select(range(total - n_val, total)).with_format("torch"),
    )


def load_eval_texts(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Dataset]:
    """Each of ``data.eval_files`` by its file name: its last max_validation_blocks blocks."""
    texts = {}
    for name in config.eval_files:
        plain = sources([name], "data.eval_files")[0].reader == "txt"  # plain text: every token counts
        section = _every_token(config) if plain else config
        blocks = packed_blocks([name], section, tokenizer, "data.eval_files")
        if len(blocks) == 0:
            raise ConfigError(
                f"data.eval_files: {name} holds less than one block of {config.block_size} tokens"
            )
        tail = range(max(0, len(blocks) - config.max_validation_blocks), len(blocks))
        texts[Path(name).stem] = blocks.select(tail).with_format("torch")
    return texts


def _every_token(config: DataConfig) -> DataConfig:
    return dataclasses.replace(config, loss_on="all")


def load_calibration_blocks(
    names: list[str], config: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> Dataset:
    """oneshot.calibration_files packed as training data is (every token counts)."""
    blocks = packed_blocks(names, _every_token(config), tokenizer, "oneshot.calibration_files")
    if len(blocks) == 0:
        raise ConfigError(f"oneshot.calibration_files hold less than one block of {config.block_size} tokens")
    return blocks.with_format("torch")


def load_classification(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Splits:
    """Labelled CSV rows, tokenised to ``block_size`` tokens (padded, truncated), split by seed.

    Class ids follow the sorted label names, so they do not depend on the row order.
    """
    files = [str(resolve_path(name)) for name in config.train_files]
    for name in files:
        check_text_file(Path(name))
    rows = load_dataset("csv", data_files=files, split="train", cache_dir=str(cache_dir() / "datasets"))
    for column in (config.text_field, config.label_field):
        if column not in rows.column_names:
            raise ConfigError(f"{files} have no column {column!r} (columns: {rows.column_names})")
    rows = rows.filter(lambda r: r[config.text_field] is not None and r[config.label_field] is not None)
    labels = sorted({str(v) for v in rows[config.label_field]})
    label_ids = {name: i for i, name in enumerate(labels)}

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(
            batch[config.text_field], truncation=True, padding="max_length", max_length=config.block_size
        )
        encoded["labels"] = [label_ids[str(v)] for v in batch[config.label_field]]
        return encoded

    examples = rows.map(encode, batched=True, remove_columns=rows.column_names, desc="tokenising")
    held_out = config.validation_fraction + config.test_fraction
    first = examples.train_test_split(test_size=held_out, seed=config.split_seed)
    second = first["test"].train_test_split(test_size=config.test_fraction / held_out, seed=config.split_seed)
    train, validation, test = first["train"], second["train"], second["test"]
    if config.max_train_examples:
        train = train.select(range(min(len(train), config.max_train_examples)))
    validation = validation.select(range(min(len(validation), config.max_validation_blocks)))
    return Splits(
        train=train.with_format("torch"),
        validation=validation.with_format("torch"),
        test=test.with_format("torch"),
        labels=labels,
    )


def collate_blocks(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A causal-LM batch: the block is its own label (the model shifts it), unless it carries
    labels (completion-only loss)."""
    input_ids = torch.stack([example["input_ids"] for example in examples])
    if "labels" not in examples[0]:
        return {"input_ids": input_ids, "labels": input_ids}
    return {"input_ids": input_ids, "labels": torch.stack([example["labels"] for example in examples])}


def labelled_positions(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The logits' positions a loss counts: a causal LM's position i predicts label i + 1 (its
    last position predicts nothing), a classifier's row its own label (-100: not counted)."""
    if logits.dim() == 2:  # (batch, classes): one label per row, nothing shifts
        return labels != -100
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=-100) != -100


def collate_for(task: str) -> Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    return default_collate if task == "sequence_classification" else collate_blocks


def calibration_batches(
    dataset: Dataset, count: int, seed: int, batch_size: int, collate: Callable[[list], dict]
) -> list[dict[str, torch.Tensor]]:
    """``count`` examples of ``dataset`` drawn by ``seed`` (a warm start's calibration data, the
    same in pst-ds's loop and in an HF Trainer's), collated in batches of ``batch_size``. A
    stream (no length: an IterableDataset) gives its first ``count`` examples."""
    if not hasattr(dataset, "__len__"):
        examples = list(itertools.islice(iter(dataset), count))
        return [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
    count = min(count, len(dataset))
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    examples = [dataset[int(i)] for i in chosen[:count]]
    return [collate(examples[i : i + batch_size]) for i in range(0, count, batch_size)]
