"""Data: local text files -> tokenised, packed fixed-length blocks, with a held-out tail."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset, load_dataset
from transformers import PreTrainedTokenizerBase

from .config import DataConfig, resolve_path
from .models import CACHE_DIR


@dataclass
class TextBlocks:
    train: Dataset  # column input_ids: lists of block_size token ids
    validation: Dataset


def load_text_blocks(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> TextBlocks:
    """Tokenise the files and pack the stream into blocks of ``config.block_size`` tokens.

    Each block starts with the tokenizer's BOS token when it has one. The validation split
    is the tail of the stream (not a random sample), so no text leaks from training into it.
    Results are cached by ``datasets`` under .cache/datasets.
    """
    files = [str(resolve_path(name)) for name in config.train_files]
    lines = load_dataset(
        "text",
        data_files=files,
        split="train",
        keep_linebreaks=True,
        cache_dir=str(CACHE_DIR / "datasets"),
    )
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = config.block_size - len(bos)

    def tokenize_and_pack(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        stream = [token for line in ids for token in line]
        usable = len(stream) - len(stream) % body
        return {"input_ids": [bos + stream[i : i + body] for i in range(0, usable, body)]}

    blocks = lines.map(
        tokenize_and_pack,
        batched=True,
        batch_size=20_000,
        remove_columns=["text"],
        desc="tokenising",
    )
    total = len(blocks)
    n_val = min(config.max_validation_blocks, max(1, int(total * config.validation_fraction)))
    n_train = total - n_val
    if config.max_train_tokens:
        n_train = min(n_train, max(1, config.max_train_tokens // config.block_size))
    if n_train < 1:
        raise ValueError(f"{files} hold only {total} blocks of {config.block_size} tokens")
    return TextBlocks(
        train=blocks.select(range(n_train)).with_format("torch"),
        validation=blocks.select(range(total - n_val, total)).with_format("torch"),
    )


def collate_blocks(examples: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.stack([example["input_ids"] for example in examples])
