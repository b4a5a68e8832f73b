"""Data files beyond .txt: JSON lines, JSON, parquet and save_to_disk folders; chat and
prompt/completion records; completion-only labels after packing; one clear error per bad input.

In process, on the byte tokenizer (one token per byte), so that a reference built from the
characters says exactly which token must train."""

import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict
from transformers import ByT5Tokenizer

from pst_ds.config import ConfigError, DataConfig
from pst_ds.io.cache import CACHE_ENV
from pst_ds.io.data import (
    collate_blocks,
    load_calibration_blocks,
    load_eval_texts,
    load_text_blocks,
    packed_blocks,
)

# A minimal chat template: each turn as <role>content</s>; the generation prompt opens an assistant turn.
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHATS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue, as the sea."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."},
    ],
    [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes, gladly."}],
] * 6
PAIRS = [{"prompt": f"Question {i}: two and {i}?", "completion": f" {i + 2}."} for i in range(12)]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def tokenizer():
    tok = ByT5Tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def config(files=("unused.txt",), **fields) -> DataConfig:
    """A data section with 16-token blocks (packed_blocks reads the files it is given, not these)."""
    return DataConfig(train_files=[str(f) for f in files], block_size=16, **fields)


def unpacked(blocks, key):
    """The token stream the blocks were cut from (the byte tokenizer adds no BOS)."""
    return [t for block in blocks[key] for t in block]


def assert_packed(blocks, ids: list[int], labels: list[int]) -> None:
    """The blocks are the stream cut every 16 tokens, less the blocks with no trained token."""
    starts = range(0, len(ids) - 15, 16)
    kept = [i for i in starts if any(t != -100 for t in labels[i : i + 16])]
    assert 0 < len(kept) < len(starts)  # some blocks dropped, most kept
    assert blocks["input_ids"] == [ids[i : i + 16] for i in kept]
    assert blocks["labels"] == [labels[i : i + 16] for i in kept]


def byte_ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]  # ByT5: ids 0-2 are pad, </s>, unk


def test_chat_completion_only_labels_are_the_assistant_turns_after_packing(tmp_path, tokenizer):
    blocks = packed_blocks(
        [write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in CHATS])],
        config(loss_on="completion"),
        tokenizer,
    )
    # Reference: the rendering by hand, each character marked trained if it is an assistant turn
    # (its content and the </s> that ends it).
    text, trained = "", []
    for chat in CHATS:
        for turn in chat:
            opening, body = f"<{turn['role']}>", f"{turn['content']}</s>"
            text += opening + body
            trained += [False] * len(opening) + [turn["role"] == "assistant"] * len(body)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # "</s>" is one token: re-mark
    expected_ids, expected_labels, position = [], [], 0
    for token in ids:
        piece = tokenizer.convert_ids_to_tokens(token)
        keep = trained[position]
        position += len(piece) if token == tokenizer.eos_token_id else 1
        expected_ids.append(token)
        expected_labels.append(token if keep else -100)
    assert_packed(blocks, expected_ids, expected_labels)
    batch = collate_blocks([blocks.with_format("torch")[i] for i in range(2)])
    assert batch["labels"].tolist() == blocks["labels"][:2]


def test_prompt_completion_trains_the_completion_and_its_eos(tmp_path, tokenizer):
    blocks = packed_blocks(
        [write_jsonl(tmp_path / "p.jsonl", PAIRS)], config(loss_on="completion"), tokenizer
    )
    expected_ids, expected_labels = [], []
    for pair in PAIRS:
        prompt, completion = byte_ids(pair["prompt"]), byte_ids(pair["completion"]) + [1]  # + </s>
        expected_ids += prompt + completion
        expected_labels += [-100] * len(prompt) + completion
    assert_packed(blocks, expected_ids, expected_labels)


def test_loss_on_all_trains_every_token_with_no_labels_column(tmp_path, tokenizer):
    blocks = packed_blocks([write_jsonl(tmp_path / "p.jsonl", PAIRS)], config(), tokenizer)
    assert blocks.column_names == ["input_ids"]
    expected = [t for p in PAIRS for t in byte_ids(p["prompt"]) + byte_ids(p["completion"]) + [1]]
    assert unpacked(blocks, "input_ids") == expected[: len(expected) // 16 * 16]


def test_every_file_kind_gives_the_same_blocks(tmp_path, tokenizer):
    records = [{"text": f"Record number {i} says something."} for i in range(40)]
    reference = packed_blocks([write_jsonl(tmp_path / "r.jsonl", records)], config(), tokenizer)["input_ids"]
    (tmp_path / "r.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "r.parquet")
    Dataset.from_list(records).save_to_disk(tmp_path / "saved")
    DatasetDict({"train": Dataset.from_list(records)}).save_to_disk(tmp_path / "saved_dict")
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "a.jsonl", records[:25])
    write_jsonl(tmp_path / "folder" / "b.jsonl", records[25:])
    for name in ("r.json", "r.parquet", "saved", "saved_dict", "folder"):
        assert packed_blocks([tmp_path / name], config(), tokenizer)["input_ids"] == reference, name
    # A text field of another name, and a record with several formats settled by data.format.
    renamed = [{"body": r["text"], "prompt": "x"} for r in records]
    path = write_jsonl(tmp_path / "body.jsonl", renamed)
    assert packed_blocks([path], config(text_field="body"), tokenizer)["input_ids"] == reference


def test_a_changed_file_is_read_again(tmp_path, tokenizer):
    path = tmp_path / "r.jsonl"
    write_jsonl(path, [{"text": "a" * 40}])
    first = packed_blocks([path], config(), tokenizer)["input_ids"]
    write_jsonl(path, [{"text": "b" * 40}])
    assert packed_blocks([path], config(), tokenizer)["input_ids"] != first


def test_splits_and_calibration_files(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", [{"messages": c} for c in CHATS])
    splits = load_text_blocks(config([train], loss_on="completion", validation_fraction=0.2), tokenizer)
    assert "labels" in splits.validation.column_names and len(splits.train) > len(splits.validation) > 0
    calibration = load_calibration_blocks(
        [write_jsonl(tmp_path / "c.jsonl", PAIRS)], config([train]), tokenizer
    )
    assert calibration.column_names == ["input_ids"] and len(calibration) > 0


def bad(path, tokenizer, message, **fields):
    with pytest.raises(ConfigError) as err:
        packed_blocks([str(path)], config(**fields), tokenizer)
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_bad_records_name_the_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "cut off\n')
    bad(path, tokenizer, f"{path}, line 3 is not JSON")
    write_jsonl(path, [{"messages": CHATS[0]}, {"messages": CHATS[1]}, {"message": CHATS[1]}])
    bad(path, tokenizer, f"{path}, line 3: no field 'messages' (the records are chat)")
    write_jsonl(path, [{"prompt": "a", "completion": 3}])
    bad(path, tokenizer, f"{path}, line 1: field 'completion' must be a string")
    write_jsonl(path, [{"title": "no text"}])
    bad(path, tokenizer, "a record needs messages, prompt and completion, or 'text'")
    write_jsonl(path, [{"text": "plain"}])
    bad(
        path,
        tokenizer,
        "data.loss_on=completion needs chat or prompt/completion records",
        loss_on="completion",
    )
    plain = tmp_path / "plain.txt"  # a .txt file is text too: every token would train, unasked
    plain.write_text("Some text.\n" * 50)
    said = f"records; {plain} is plain text, where every token would train"
    bad(plain, tokenizer, said, loss_on="completion")


def test_plain_text_eval_files_count_every_token_beside_completion_training(tmp_path, tokenizer):
    plain = tmp_path / "far.txt"
    plain.write_text("Some text far from the training data.\n" * 200)
    section = config([write_jsonl(tmp_path / "p.jsonl", PAIRS * 20)], loss_on="completion")
    section = dataclasses.replace(section, eval_files=[str(plain)])
    texts = load_eval_texts(section, tokenizer)
    assert len(texts["far"]) > 0 and "labels" not in texts["far"].column_names


def test_chat_records_need_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHATS[0]}])
    bad(
        path, ByT5Tokenizer(), "holds chat records (messages), but the model's tokenizer has no chat template"
    )


def test_folders_and_lists_that_hold_no_usable_data(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    bad(tmp_path / "empty", tokenizer, f"folder {tmp_path / 'empty'} is empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("# not data")
    bad(tmp_path / "other", tokenizer, "holds no data files (.txt, .jsonl, .ndjson, .json, .parquet)")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    bad(tmp_path / "data.csv", tokenizer, "is not a data file this reads")
    (tmp_path / "a.txt").write_text("Some text.\n")
    with pytest.raises(ConfigError, match=r"mixes plain text \(a.txt\) and records \(p.jsonl\)"):
        packed_blocks([tmp_path / "a.txt", write_jsonl(tmp_path / "p.jsonl", PAIRS)], config(), tokenizer)


def test_loss_on_completion_with_text_format_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="needs chat or prompt/completion records"):
        DataConfig(format="text", loss_on="completion")


def test_prepare_data_tokenises_ahead_and_reports(tmp_path, capsys):
    from tools import prepare_data

    records = write_jsonl(
        tmp_path / "r.jsonl", [{"text": f"Line {i} of a record corpus."} for i in range(300)]
    )
    common = ["--config", "configs/experiments/tiny_llama.yaml", "data.max_train_tokens=0"]
    out = tmp_path / "figures.json"
    assert prepare_data.main([*common, "--out", str(out), f"data.train_files=[{records}]"]) == 0
    figures = json.loads(out.read_text())
    blocks = figures["splits"]["train"]["blocks"] + figures["splits"]["validation"]["blocks"]
    assert blocks == sum(len(f"Line {i} of a record corpus.") + 1 for i in range(300)) // 64  # bytes and EOS
    assert figures["peak_rss_bytes"] > 0 and "pst-ds: train:" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    assert prepare_data.main([*common, f"data.train_files=[{tmp_path / 'bad.jsonl'}]"]) == 2
    assert "bad.jsonl, line 1 is not JSON" in capsys.readouterr().err
