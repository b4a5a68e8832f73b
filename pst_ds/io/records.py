"""What a list of data files holds: plain text, or records read with the place of each one.

    .txt                      lines of plain text (datasets' text loader reads them)
    .jsonl / .ndjson / .json  one JSON object per line (a .json may instead hold one array of them)
    .parquet                  rows
    a folder                  written by datasets.save_to_disk (its train split), or holding data files

A record is text ({text_field: "..."}), chat ({"messages": [{"role": ..., "content": ...}, ...]})
or prompt/completion ({"prompt": "...", "completion": "..."}). ``data.format=auto`` takes the
format from the fields of the first record; every record must then have them. Records are read
by one streaming pass into datasets' cache (bounded memory, once per file version); a record that
breaks its format stops the run, naming the file and line, before anything is written.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_from_disk
from datasets.exceptions import DatasetGenerationError

from ..config import ConfigError, DataConfig
from ..paths import resolve_path
from .cache import cache_dir

TEXT_SUFFIX = ".txt"
RECORD_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what datasets.save_to_disk writes
FORMAT_FIELDS = {"chat": ("messages",), "prompt_completion": ("prompt", "completion")}


@dataclass(frozen=True)
class Source:
    """One file (or save_to_disk folder) and how to read it: txt | jsonl | json | parquet | saved."""

    path: Path
    reader: str

    def version(self) -> list[tuple[str, int, int]]:
        """(name, bytes, mtime) of its files: a changed file is read and tokenised again."""
        files = sorted(p for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else [self.path]
        return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def sources(names: list[str], key: str) -> list[Source]:
    """The files ``names`` (a config list called ``key``) stand for, folders expanded.

    Plain text and records do not mix in one list: text lines have no record boundaries."""
    found = [source for name in names for source in _sources_of(resolve_path(name), key)]
    kinds = {source.reader == "txt" for source in found}
    if len(kinds) > 1:
        text = next(s.path.name for s in found if s.reader == "txt")
        record = next(s.path.name for s in found if s.reader != "txt")
        raise ConfigError(
            f"{key} mixes plain text ({text}) and records ({record}): give the text as JSON lines "
            f'with a "text" field, or list only one kind'
        )
    return found


def _sources_of(path: Path, key: str) -> list[Source]:
    if path.is_dir():
        if any((path / marker).is_file() for marker in SAVED_MARKERS):
            return [Source(path, "saved")]
        if not any(path.iterdir()):
            raise ConfigError(f"{key}: folder {path} is empty")
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix in (TEXT_SUFFIX, *RECORD_SUFFIXES)
        )
        if not files:
            raise ConfigError(
                f"{key}: folder {path} holds no data files ({TEXT_SUFFIX}, {', '.join(RECORD_SUFFIXES)}) "
                "and was not written by datasets.save_to_disk"
            )
        return [s for f in files for s in _sources_of(f, key)]
    if path.suffix == TEXT_SUFFIX:
        check_text_file(path)
        return [Source(path, "txt")]
    if path.suffix in RECORD_SUFFIXES:
        return [Source(path, RECORD_SUFFIXES[path.suffix])]
    raise ConfigError(
        f"{key}: {path} is not a data file this reads ({TEXT_SUFFIX}, {', '.join(RECORD_SUFFIXES)}, "
        "or a folder of them or from datasets.save_to_disk)"
    )


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


# ---------------------------------------------------------------------------- raw records
def raw_records(source: Source) -> Iterator[tuple[str, Any]]:
    """(where, record) of every record of ``source``, where naming its file and line or row."""
    if source.reader == "jsonl":
        yield from _json_lines(source.path)
    elif source.reader == "json":
        with open(source.path, encoding="utf-8", errors="replace") as handle:
            head = handle.read(4096).lstrip()
        yield from _json_array(source.path) if head.startswith("[") else _json_lines(source.path)
    elif source.reader == "parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(source.path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield f"{source.path}, row {row}", record
    else:  # saved
        for row, record in enumerate(_saved_split(source.path), 1):
            yield f"{source.path}, row {row}", record


def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        line_number = 0
        while True:
            try:
                line = handle.readline()
            except UnicodeDecodeError:
                raise ConfigError(f"{path}, line {line_number + 1} is not UTF-8 text") from None
            if not line:
                return
            line_number += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                where = f"{path}, line {line_number}"
                raise ConfigError(f"{where} is not JSON: {err.msg} (column {err.colno})") from None
            yield f"{path}, line {line_number}", record


def _json_array(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f", line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise ConfigError(f"{path}{where} is not JSON: {getattr(err, 'msg', err)}") from None
    for index, record in enumerate(records):
        yield f"{path}, record {index + 1}", record


def _saved_split(path: Path) -> Dataset:
    saved = load_from_disk(str(path))
    if isinstance(saved, DatasetDict):
        if "train" in saved:
            return saved["train"]
        if len(saved) != 1:
            splits = ", ".join(saved)
            raise ConfigError(f"{path} holds the splits {splits} and no train split: save one split")
        return next(iter(saved.values()))
    return saved


# ---------------------------------------------------------------------------- formats
def record_format(source: Source, config: DataConfig) -> str:
    """data.format, or the format the first record's fields say (auto)."""
    first = next(islice(raw_records(source), 1), None)
    if first is None:
        raise ConfigError(f"{source.path} holds no records")
    where, record = first
    if config.format != "auto":
        return config.format
    if not isinstance(record, dict):
        raise ConfigError(f"{where} is not a JSON object")
    for name, fields in FORMAT_FIELDS.items():
        if all(f in record for f in fields):
            return name
    if config.text_field in record:
        return "text"
    raise ConfigError(
        f"{where}: a record needs messages, prompt and completion, or {config.text_field!r} "
        f"(data.text_field); it has {', '.join(map(repr, record)) or 'no fields'}"
    )


def normalized(where: str, record: Any, fmt: str, text_field: str) -> dict[str, Any]:
    """The record in its format's one schema, or a ConfigError naming what is missing and where."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where} is not a JSON object")
    fields = FORMAT_FIELDS.get(fmt, (text_field,))
    for name in fields:
        if record.get(name) is None:
            raise ConfigError(f"{where}: no field {name!r} (the records are {fmt.replace('_', '/')})")
    if fmt == "text":
        return {"text": _string(where, text_field, record[text_field])}
    if fmt == "prompt_completion":
        return {name: _string(where, name, record[name]) for name in fields}
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of turns")
    turns = []
    for turn in messages:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ConfigError(f"{where}: every turn in 'messages' needs a 'role' and a 'content'")
        turns.append({name: _string(where, name, turn[name]) for name in ("role", "content")})
    return {"messages": turns}


def _string(where: str, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _generate(sources: list[tuple[str, str]], fmt: str, text_field: str, versions: Any) -> Iterator[dict]:
    """datasets' generator: every record of every source, checked and normalised.
    ``versions`` is unused here; it is part of datasets' cache key (a changed file reads again)."""
    for path, reader in sources:
        for where, record in raw_records(Source(Path(path), reader)):
            yield normalized(where, record, fmt, text_field)


def load_records(found: list[Source], config: DataConfig) -> tuple[Dataset, str]:
    """(the records of ``found`` in datasets' cache, their format)."""
    fmt = record_format(found[0], config)
    kwargs = {
        "sources": [(str(s.path), s.reader) for s in found],
        "fmt": fmt,
        "text_field": config.text_field,
        "versions": [s.version() for s in found],
    }
    try:
        records = Dataset.from_generator(
            _generate, gen_kwargs=kwargs, cache_dir=str(cache_dir() / "datasets"), keep_in_memory=False
        )
    except DatasetGenerationError as err:  # datasets wraps what the generator raised
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise
    return records, fmt
