"""Data formats: object encodings, format detection, field mapping, mixing and splitting."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from instructune_jobs.config import TrainConfig
from instructune_jobs.data.formats import (
    detect_format,
    parse_object_bytes,
    row_to_conversation,
    rows_to_conversations,
)
from instructune_jobs.data.pipeline import load_examples, mix_sources, split_validation
from instructune_jobs.data.types import LocatedRow
from instructune_jobs.storage import LocalObjectReader, MemoryObjectReader
from instructune_jobs.synthetic import extraction_rows, general_rows, rows_to_bytes

pytestmark = pytest.mark.unit

ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
DOLLY = {
    "instruction": "Summarise.",
    "context": "A long text.",
    "response": "Short.",
    "category": "summarization",
}
MESSAGES = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye!"},
    ]
}
PROMPT_COMPLETION = {"prompt": "Capital of France?", "completion": "Paris"}


def jsonl(*rows: dict[str, Any]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def located(*rows: dict[str, Any]) -> list[LocatedRow]:
    return [LocatedRow("mem://x.jsonl", number, row) for number, row in enumerate(rows, start=1)]


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.parquet", "a.json", "a.ndjson"])
def test_every_supported_encoding_yields_the_same_rows(name: str) -> None:
    rows = [ALPACA, {**ALPACA, "output": "6"}]
    data = json.dumps(rows).encode() if name.endswith(".json") else rows_to_bytes(rows, name)
    parsed, invalid = parse_object_bytes(data, name)
    assert invalid == []
    assert [r.row for r in parsed] == rows
    assert [r.line for r in parsed] == [1, 2]


def test_gzip_is_recognised_by_content_even_without_suffix() -> None:
    parsed, invalid = parse_object_bytes(gzip.compress(jsonl(ALPACA)), "shard-0000")
    assert invalid == [] and parsed[0].row == ALPACA


def test_corrupt_gzip_is_reported_for_the_whole_object() -> None:
    parsed, invalid = parse_object_bytes(b"\x1f\x8bnot really gzip", "a.jsonl.gz")
    assert parsed == [] and invalid[0].line == 0 and "gzip" in invalid[0].reason


@pytest.mark.parametrize(
    ("row", "expected"),
    [(ALPACA, "alpaca"), (DOLLY, "dolly"), (MESSAGES, "messages"), (PROMPT_COMPLETION, "prompt-completion")],
)
def test_auto_detection_recognises_each_format(row: dict[str, Any], expected: str) -> None:
    assert detect_format([row]) == expected


def test_auto_detection_follows_the_majority_not_one_odd_row() -> None:
    assert detect_format([PROMPT_COMPLETION, ALPACA, ALPACA, {"unrelated": 1}]) == "alpaca"


def test_auto_detection_uses_the_field_mapping() -> None:
    row = {"question": "Why?", "answer": "Because."}
    assert detect_format([row], {"instruction": "question", "output": "answer"}) == "alpaca"


def test_undetectable_rows_are_all_reported_with_the_keys_seen() -> None:
    conversations, invalid, fmt = rows_to_conversations(located({"a": 1}, {"b": 2}))
    assert conversations == [] and fmt is None
    assert [row.line for row in invalid] == [1, 2]
    assert "cannot detect the format" in invalid[0].reason and "'a'" in invalid[0].reason


def test_alpaca_input_follows_the_instruction_in_the_user_turn() -> None:
    assert row_to_conversation(ALPACA, "alpaca") == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    no_input = row_to_conversation({**ALPACA, "input": ""}, "alpaca")
    assert no_input[0]["content"] == "Add the numbers."


def test_dolly_context_follows_the_instruction_and_extra_columns_are_ignored() -> None:
    assert row_to_conversation(DOLLY, "dolly") == [
        {"role": "user", "content": "Summarise.\n\nA long text."},
        {"role": "assistant", "content": "Short."},
    ]


def test_prompt_completion_becomes_one_exchange() -> None:
    assert row_to_conversation(PROMPT_COMPLETION, "prompt-completion") == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]


def test_messages_keep_every_turn() -> None:
    assert row_to_conversation(MESSAGES, "messages") == MESSAGES["messages"]


def test_sharegpt_style_messages_are_read_through_the_field_mapping() -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "Be nice."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
        ]
    }
    mapping = {"messages": "conversations", "role": "from", "content": "value"}
    assert row_to_conversation(row, "messages", mapping) == [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_field_mapping_renames_alpaca_columns() -> None:
    row = {"question": "Why?", "answer": "Because."}
    conversation = row_to_conversation(row, "alpaca", {"instruction": "question", "output": "answer"})
    assert conversation == [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]


def test_system_prompt_comes_first_and_a_rows_own_system_wins() -> None:
    with_spec = row_to_conversation(ALPACA, "alpaca", system_prompt="Be terse.")
    assert with_spec[0] == {"role": "system", "content": "Be terse."}
    with_own = row_to_conversation({**ALPACA, "system": "Row system."}, "alpaca", system_prompt="Be terse.")
    assert with_own[0] == {"role": "system", "content": "Row system."}
    messages_with_system = {"messages": [{"role": "system", "content": "Own."}, *MESSAGES["messages"]]}
    assert (
        row_to_conversation(messages_with_system, "messages", system_prompt="Spec.")[0]["content"] == "Own."
    )
    assert row_to_conversation(MESSAGES, "messages", system_prompt="Spec.")[0]["content"] == "Spec."


def test_mixing_follows_the_weights_without_repeating_rows() -> None:
    task = [f"task-{i}" for i in range(1000)]
    general = [f"general-{i}" for i in range(50_000)]
    mixed = mix_sources([task, general], [0.8, 0.2], seed=1)
    counts = Counter(item.split("-")[0] for item in mixed)
    assert counts == {"task": 1000, "general": 250}
    assert len(set(mixed)) == len(mixed)


def test_mixing_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    sources = [list(range(100)), list(range(100, 400))]
    assert mix_sources(sources, [1, 1], seed=3) == mix_sources(sources, [1, 1], seed=3)
    assert mix_sources(sources, [1, 1], seed=3) != mix_sources(sources, [1, 1], seed=4)


def test_a_single_source_is_used_whole() -> None:
    assert sorted(mix_sources([list(range(37))], [0.3], seed=0)) == list(range(37))


def test_validation_split_is_seeded_disjoint_and_sized_by_fraction() -> None:
    items = list(range(1000))
    train, validation = split_validation(items, 0.05, seed=9)
    assert len(validation) == 50 and len(train) == 950
    assert set(train).isdisjoint(validation) and sorted(train + validation) == items
    assert split_validation(items, 0.05, seed=9) == (train, validation)
    assert split_validation(items, 0.05, seed=10)[1] != validation
    assert len(split_validation(items[:5], 0.01, seed=0)[1]) == 1  # never an empty validation set by rounding


def config(train: list[dict[str, Any]], **dataset: Any) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "base_model": {"uri": "/models/tiny"},
            "dataset": {"train": train, **dataset},
            "training": {"max_seq_length": 256, "seed": 5, "batch_size_per_device": 4},
        }
    )


def test_load_examples_reads_a_prefix_of_mixed_formats_and_records_etags(tokenizer: Any) -> None:
    objects = {
        "s3://data/task/part-0.jsonl": rows_to_bytes(extraction_rows(30, seed=1), "part-0.jsonl"),
        "s3://data/task/part-1.jsonl.gz": rows_to_bytes(extraction_rows(30, seed=2), "part-1.jsonl.gz"),
        "s3://data/task/_SUCCESS": b"",
        "s3://data/dolly.parquet": rows_to_bytes(
            [{**DOLLY, "instruction": f"{DOLLY['instruction']} ({i})"} for i in range(20)], "dolly.parquet"
        ),
    }
    cfg = config(
        [{"uri": "s3://data/task/", "weight": 0.75}, {"uri": "s3://data/dolly.parquet", "weight": 0.25}],
        validation={"fraction": 0.1},
    )
    prepared = load_examples(cfg, tokenizer, MemoryObjectReader(objects))
    stats = prepared.stats
    assert stats.rows == 80 and stats.invalid_rows == 0
    assert stats.formats == {
        "s3://data/task/part-0.jsonl": "alpaca",
        "s3://data/task/part-1.jsonl.gz": "alpaca",
        "s3://data/dolly.parquet": "dolly",
    }
    assert stats.etags == {
        uri: hashlib.md5(data).hexdigest() for uri, data in objects.items() if "_SUCCESS" not in uri
    }
    # 60 task rows at 0.75 allow 20 dolly rows at 0.25: 80 mixed, 8 held out for validation
    assert (stats.train_examples, stats.validation_examples) == (72, 8)
    assert len(prepared.train) == 72 and prepared.packed_train is not None
    assert stats.tokens == sum(len(example) for example in prepared.train)
    assert 0 < stats.target_tokens < stats.tokens
    assert len(stats.template_hash) == 64


def test_load_examples_is_deterministic(tokenizer: Any) -> None:
    objects = {"s3://dat/a.jsonl": rows_to_bytes(general_rows(40), "a.jsonl")}
    cfg = config([{"uri": "s3://dat/a.jsonl"}])
    first = load_examples(cfg, tokenizer, MemoryObjectReader(objects))
    second = load_examples(cfg, tokenizer, MemoryObjectReader(objects))
    assert first.train == second.train and first.validation == second.validation
    assert first.packed_train == second.packed_train


def test_validation_uri_replaces_the_fraction(tokenizer: Any) -> None:
    objects = {
        "s3://dat/train.jsonl": rows_to_bytes(general_rows(40), "train.jsonl"),
        "s3://dat/val.jsonl": rows_to_bytes(general_rows(7, seed=3), "val.jsonl"),
    }
    # general_rows repeats a few prompts, within and across seeds: the audits would drop them here.
    cfg = config(
        [{"uri": "s3://dat/train.jsonl"}],
        validation={"uri": "s3://dat/val.jsonl", "fraction": 0.3},
        audit={"deduplicate": False, "decontaminate": False},
    )
    prepared = load_examples(cfg, tokenizer, MemoryObjectReader(objects))
    assert (prepared.stats.train_examples, prepared.stats.validation_examples) == (40, 7)
    assert "s3://dat/val.jsonl" in prepared.stats.etags


def test_local_reader_lists_data_files_under_a_directory(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_bytes(jsonl(ALPACA))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.parquet").write_bytes(rows_to_bytes([ALPACA], "a.parquet"))
    (tmp_path / "README.md").write_text("not data")
    refs = LocalObjectReader().list_objects(f"file://{tmp_path}")
    assert [Path(ref.uri).name for ref in refs] == ["b.jsonl", "a.parquet"]
    assert refs[0].etag == hashlib.md5(jsonl(ALPACA)).hexdigest()


def test_memory_reader_treats_a_non_object_uri_as_a_prefix() -> None:
    reader = MemoryObjectReader({"s3://b/p/x.jsonl": b"", "s3://b/p2/y.jsonl": b"", "s3://b/p/z.txt": b""})
    assert [ref.uri for ref in reader.list_objects("s3://b/p")] == ["s3://b/p/x.jsonl"]


class FakeS3:
    """Just enough of a boto3 S3 client for the reader: list_objects_v2 pages and get_object."""

    def __init__(self, objects: dict[str, bytes]):
        self.objects = objects  # "bucket/key" -> bytes

    def get_paginator(self, name: str) -> FakeS3:
        assert name == "list_objects_v2"
        return self

    def paginate(self, Bucket: str, Prefix: str) -> list[dict[str, Any]]:  # boto3 names its arguments so
        keys = sorted(k.split("/", 1)[1] for k in self.objects if k.startswith(f"{Bucket}/{Prefix}"))
        contents = [
            {
                "Key": key,
                "ETag": f'"{hashlib.md5(self.objects[f"{Bucket}/{key}"]).hexdigest()}"',
                "Size": len(self.objects[f"{Bucket}/{key}"]),
            }
            for key in keys
        ]
        return [{"Contents": contents[:2]}, {"Contents": contents[2:]}]  # two pages

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        import io

        return {"Body": io.BytesIO(self.objects[f"{Bucket}/{Key}"])}


def test_s3_reader_lists_an_object_or_every_data_shard_under_a_prefix() -> None:
    from instructune_jobs.storage import S3ObjectReader

    fake = FakeS3(
        {
            "data/train.jsonl": jsonl(ALPACA),
            "data/train.jsonl.bak": b"old",
            "data/shards/part-2.jsonl.gz": gzip.compress(jsonl(ALPACA)),
            "data/shards/part-1.parquet": rows_to_bytes([ALPACA], "x.parquet"),
            "data/shards/_SUCCESS": b"",
            "data/shards/part-0.jsonl": jsonl(ALPACA),
            "data/shards-other/part-9.jsonl": jsonl(ALPACA),
        }
    )
    reader = S3ObjectReader(fake)
    (single,) = reader.list_objects("s3://data/train.jsonl")
    assert single.uri == "s3://data/train.jsonl" and single.etag == hashlib.md5(jsonl(ALPACA)).hexdigest()
    shards = [ref.uri for ref in reader.list_objects("s3://data/shards")]
    assert shards == [
        "s3://data/shards/part-0.jsonl",
        "s3://data/shards/part-1.parquet",
        "s3://data/shards/part-2.jsonl.gz",
    ]
    assert reader.list_objects("s3://data/shards/") == reader.list_objects("s3://data/shards")
    assert reader.read_object(single) == jsonl(ALPACA)


def test_s3_client_takes_its_endpoint_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("boto3")
    from instructune_jobs.storage import s3_client_from_env

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("INSTRUCTUNE_S3_ENDPOINT", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "minio")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "minio123")
    assert s3_client_from_env().meta.endpoint_url == "http://127.0.0.1:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.example:9000")
    assert s3_client_from_env().meta.endpoint_url == "http://minio.example:9000"


def test_data_stats_report_as_the_status_data_block() -> None:
    from instructune_jobs.data.pipeline import DataStats

    stats = DataStats(
        rows=10,
        invalid_rows=1,
        tokens=500,
        padding_fraction=0.0041234567,
        template_hash="ab",
        duplicates=2,
        contaminated=1,
        pii_rows=3,
    )
    assert stats.to_status() == {
        "rows": 10,
        "invalidRows": 1,
        "duplicateRows": 2,
        "contaminatedRows": 1,
        "piiRows": 3,
        "tokens": 500,
        "paddingFraction": 0.004123,
        "templateHash": "ab",
    }


def test_synthetic_extraction_rows_are_deterministic_valid_alpaca_with_schema_conformant_answers() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from instructune_jobs.synthetic import EXTRACTION_KEYS, EXTRACTION_SCHEMA

    rows = extraction_rows(50, seed=3)
    assert rows == extraction_rows(50, seed=3) and rows != extraction_rows(50, seed=4)
    conversations, invalid, fmt = rows_to_conversations(located(*rows))
    assert fmt == "alpaca" and invalid == [] and len(conversations) == 50
    for row in rows:
        answer = json.loads(row["output"])
        jsonschema.validate(answer, EXTRACTION_SCHEMA)
        assert tuple(answer) == EXTRACTION_KEYS and answer["party"] in row["input"]


def test_held_out_extraction_rows_are_worded_differently_from_training_rows() -> None:
    train, heldout = extraction_rows(400, seed=0), extraction_rows(400, seed=0, split="heldout")
    assert {r["instruction"] for r in train}.isdisjoint({r["instruction"] for r in heldout})

    def wording(row: dict[str, str]) -> str:
        """The clause without its values: the party, and every word with digits or a month or currency."""
        clause = row["input"].replace(json.loads(row["output"])["party"], "")
        values = re.compile(
            r"\d|^(January|February|March|April|May|June|July|August|September|October"
            r"|November|December|USD|dollars)[,.]?$"
        )
        return " ".join(word for word in clause.split() if not values.search(word))

    train_wordings, heldout_wordings = {wording(r) for r in train}, {wording(r) for r in heldout}
    assert len(train_wordings) == 8 and len(heldout_wordings) == 5
    assert train_wordings.isdisjoint(heldout_wordings)


def test_general_rows_are_valid_alpaca() -> None:
    rows = general_rows(100, seed=1)
    _, invalid, fmt = rows_to_conversations(located(*rows))
    assert fmt == "alpaca" and invalid == []
    assert len({r["instruction"] for r in rows}) > 20
