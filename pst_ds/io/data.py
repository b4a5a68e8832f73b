"""Data: text files -> packed token blocks (causal LM); CSV files -> labelled examples."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from torch.utils.data import DataLoader, DistributedSampler, default_collate
from transformers import PreTrainedTokenizerBase

from ..config import ConfigError, DataConfig, resolve_path
from .cache import cache_dir


@dataclass
class Splits:
    train: Dataset
    validation: Dataset
    test: Dataset | None = None  # classification only
    labels: list[str] | None = None  # class names, classification only


def check_text_file(path: Path, chunk_bytes: int = 1 << 20) -> None:
    """Refuse a file that is empty (or only white space) or not UTF-8 text, naming where.

    One streaming pass with an incremental decoder: datasets would otherwise fail deep
    inside its reader with a traceback that names neither the file nor the byte.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False  # offset: bytes read before this chunk
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            pending = decoder.getstate()[0]  # an incomplete character held from the last chunk
            try:
                has_text = bool(decoder.decode(chunk, final=not chunk).strip()) or has_text
            except UnicodeDecodeError as err:
                raise ConfigError(
                    f"data file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                    f"offset {offset - len(pending) + err.start}); convert it, e.g. with iconv -t UTF-8"
                ) from None
            if not chunk:
                break
            offset += len(chunk)
    if not has_text:
        raise ConfigError(f"data file {path} is empty (no text to train on)")


def load_splits(config: DataConfig, task: str, tokenizer: PreTrainedTokenizerBase) -> Splits:
    for name in config.train_files:
        check_text_file(resolve_path(name))
    if task == "sequence_classification":
        return load_classification(config, tokenizer)
    return load_text_blocks(config, tokenizer)


def packed_blocks(files: list[str], block_size: int, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """Tokenise the files and pack the stream into blocks of ``block_size`` tokens, each starting
    with the tokenizer's BOS token when it has one. Cached by ``datasets`` under ``<cache>/datasets``."""
    lines = load_dataset(
        "text",
        data_files=[str(resolve_path(name)) for name in files],
        split="train",
        keep_linebreaks=True,
        cache_dir=str(cache_dir() / "datasets"),
    )
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = block_size - len(bos)

    def tokenize_and_pack(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        stream = [token for line in ids for token in line]
        usable = len(stream) - len(stream) % body
        return {"input_ids": [bos + stream[i : i + body] for i in range(0, usable, body)]}

    return lines.map(
        tokenize_and_pack,
        batched=True,
        batch_size=20_000,
        remove_columns=["text"],
        desc="tokenising",
    )


def load_text_blocks(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Splits:
    """Packed blocks of the training files; the validation split is the tail of the stream (not
    a random sample), so no text leaks from training into it."""
    blocks = packed_blocks(config.train_files, config.block_size, tokenizer)
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
        check_text_file(resolve_path(name))
        blocks = packed_blocks([name], config.block_size, tokenizer)
        if len(blocks) == 0:
            raise ConfigError(
                f"data.eval_files: {name} holds less than one block of {config.block_size} tokens"
            )
        tail = range(max(0, len(blocks) - config.max_validation_blocks), len(blocks))
        texts[Path(name).stem] = blocks.select(tail).with_format("torch")
    return texts


def load_classification(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Splits:
    """Labelled CSV rows, tokenised to ``block_size`` tokens (padded, truncated), split by seed.

    Class ids follow the sorted label names, so they do not depend on the row order.
    """
    files = [str(resolve_path(name)) for name in config.train_files]
    rows = load_dataset("csv", data_files=files, split="train", cache_dir=str(cache_dir() / "datasets"))
    for column in (config.text_column, config.label_column):
        if column not in rows.column_names:
            raise ConfigError(f"{files} have no column {column!r} (columns: {rows.column_names})")
    rows = rows.filter(lambda r: r[config.text_column] is not None and r[config.label_column] is not None)
    labels = sorted({str(v) for v in rows[config.label_column]})
    label_ids = {name: i for i, name in enumerate(labels)}

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(
            batch[config.text_column], truncation=True, padding="max_length", max_length=config.block_size
        )
        encoded["labels"] = [label_ids[str(v)] for v in batch[config.label_column]]
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
    """A causal-LM batch: the block is its own label (the model shifts it)."""
    input_ids = torch.stack([example["input_ids"] for example in examples])
    return {"input_ids": input_ids, "labels": input_ids}


def collate_for(task: str) -> Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    return default_collate if task == "sequence_classification" else collate_blocks


class TrainingBatches:
    """This rank's training micro-batches: shuffled by seed, reshuffled each epoch, and
    restartable at any position (a resumed run sees the batches an unbroken one would)."""

    def __init__(
        self, dataset: Dataset, micro_batch_size: int, rank: int, world_size: int, seed: int, task: str
    ) -> None:
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.loader = DataLoader(
            dataset,
            batch_size=micro_batch_size,
            sampler=self.sampler,
            collate_fn=collate_for(task),
            drop_last=True,
            # Its own generator: each iter() would otherwise draw from the global RNG, which a
            # resumed run restores at a different point than an uninterrupted one.
            generator=torch.Generator().manual_seed(seed),
        )

    def from_position(self, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from number ``skip`` (counted from the start of training) on, forever."""
        epoch, skip = divmod(skip, len(self.loader))
        while True:
            self.sampler.set_epoch(epoch)
            batches = iter(self.loader)
            for _ in range(skip):  # only on resume: fast-forward to the saved data position
                next(batches)
            skip = 0
            yield from batches
            epoch += 1
