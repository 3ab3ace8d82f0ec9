"""The data step runs once per attempt: its output survives a round trip through the .npz file
unchanged, is reused only when nothing that decides it changed, and refused data says why."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from instructune_jobs.artifacts import ArtifactLayout
from instructune_jobs.config import TrainConfig
from instructune_jobs.data.pipeline import load_examples
from instructune_jobs.prepare import (
    InvalidDataError,
    code_versions,
    decode_prepared,
    encode_prepared,
    prepare_data,
    prepared_key,
    read_prepared,
)
from instructune_jobs.storage import MemoryObjectReader, Storage

pytestmark = pytest.mark.unit


def jsonl(rows: list[dict[str, str]]) -> bytes:
    return "\n".join(json.dumps(row) for row in rows).encode()


ALPACA = [
    {
        "instruction": f"Extract the amount from clause {i}.",
        "input": f"Pay {i * 7} EUR.",
        "output": f"{i * 7}",
    }
    for i in range(40)
]
CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"Count to {i}."},
            {"role": "assistant", "content": " ".join(str(n) for n in range(i))},
            {"role": "user", "content": "Again, backwards."},
            {"role": "assistant", "content": " ".join(str(n) for n in reversed(range(i)))},
        ]
    }
    for i in range(1, 25)
]
OBJECTS = {"s3://data/alpaca.jsonl": jsonl(ALPACA), "s3://data/chats.jsonl": jsonl(CHATS)}


MIXED = {
    "train": [{"uri": "s3://data/alpaca.jsonl", "weight": 2}, {"uri": "s3://data/chats.jsonl"}],
    "validation": {"fraction": 0.1},
}


def config(model_dir: Path, dataset: dict[str, Any] = MIXED, **training: Any) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "base_model": {"uri": str(model_dir)},
            "dataset": dataset,
            "training": {"max_seq_length": 96, **training},
        }
    )


def as_lists(items: Sequence[Any]) -> list[tuple[list[int], ...]]:
    """Each item's sequences as lists (read back, the token sequences are numpy views)."""
    return [tuple(list(map(int, getattr(item, f.name))) for f in fields(item)) for item in items]


@pytest.mark.parametrize("packing", [True, False])
def test_prepared_data_survives_the_file_round_trip_unchanged(
    tiny_model_dir: Path, tokenizer: Any, packing: bool
) -> None:
    prepared = load_examples(config(tiny_model_dir, packing=packing), tokenizer, MemoryObjectReader(OBJECTS))
    assert prepared.train and prepared.validation
    assert (prepared.packed_train is not None) == packing

    restored = decode_prepared(encode_prepared(prepared))

    assert as_lists(restored.training_items) == as_lists(prepared.training_items)
    assert restored.validation == prepared.validation
    assert (restored.chat_template, restored.stats, restored.invalid) == (
        prepared.chat_template,
        prepared.stats,
        prepared.invalid,
    )
    # A packed run's examples travel in their packs only: training reads nothing else.
    assert as_lists(restored.train) == ([] if packing else as_lists(prepared.train))


def test_prepared_data_without_a_validation_split_survives_the_round_trip(
    tiny_model_dir: Path, tokenizer: Any
) -> None:
    cfg = config(tiny_model_dir, {**MIXED, "validation": {"fraction": 0.0}})
    prepared = load_examples(cfg, tokenizer, MemoryObjectReader(OBJECTS))
    assert prepared.validation == []

    restored = decode_prepared(encode_prepared(prepared))

    assert restored.validation == [] and as_lists(restored.training_items) == as_lists(
        prepared.training_items
    )


def test_the_file_holds_no_pickles(tiny_model_dir: Path, tokenizer: Any) -> None:
    import io

    import numpy as np

    prepared = load_examples(config(tiny_model_dir), tokenizer, MemoryObjectReader(OBJECTS))
    with np.load(io.BytesIO(encode_prepared(prepared)), allow_pickle=False) as arrays:
        assert all(arrays[name].dtype != object for name in arrays.files)


def test_the_key_changes_with_what_decides_the_tokens_and_only_with_that(tiny_model_dir: Path) -> None:
    cfg, etags, versions = config(tiny_model_dir), {"s3://data/alpaca.jsonl": "e1"}, code_versions()
    key = prepared_key(cfg, "sha256:base", etags, versions)

    same = [
        prepared_key(config(tiny_model_dir, learning_rate=1e-3), "sha256:base", etags, versions),
        prepared_key(config(tiny_model_dir, max_steps=7), "sha256:base", etags, versions),
    ]
    changed = [
        prepared_key(cfg, "sha256:base", {"s3://data/alpaca.jsonl": "e2"}, versions),
        prepared_key(cfg, "sha256:other-tokenizer", etags, versions),
        prepared_key(config(tiny_model_dir, max_seq_length=128), "sha256:base", etags, versions),
        prepared_key(config(tiny_model_dir, packing=False), "sha256:base", etags, versions),
        prepared_key(config(tiny_model_dir, seed=1), "sha256:base", etags, versions),
        prepared_key(cfg, "sha256:base", etags, {**versions, "transformers": "0.0.1"}),
    ]

    assert same == [key, key]
    assert key not in changed and len(set(changed)) == len(changed)


def test_a_second_attempt_reuses_the_prepared_data_and_changed_data_does_not(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg, layout, storage = config(tiny_model_dir), ArtifactLayout(str(tmp_path / "root")), Storage()

    first = prepare_data(cfg, layout, storage, MemoryObjectReader(OBJECTS))
    again = prepare_data(cfg, layout, storage, MemoryObjectReader(OBJECTS))
    edited = {**OBJECTS, "s3://data/alpaca.jsonl": jsonl(ALPACA[:-1])}
    after_edit = prepare_data(cfg, layout, storage, MemoryObjectReader(edited))

    assert not first.reused and again == type(first)(first.uri, reused=True)
    assert not after_edit.reused and after_edit.uri != first.uri
    # only the data of the latest inputs is kept
    assert [o.uri for o in storage.list(str(tmp_path / "root" / "data"))] == [after_edit.uri]
    assert read_prepared(after_edit.uri, storage).stats.rows == len(ALPACA) - 1 + len(CHATS)


def test_refused_data_raises_invalid_data_with_the_row_and_writes_nothing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = config(
        tiny_model_dir, {"train": [{"uri": "s3://data/alpaca.jsonl"}], "invalid_rows": {"policy": "fail"}}
    )
    broken = {"s3://data/alpaca.jsonl": jsonl([*ALPACA[:3], {"instruction": "x", "output": ""}])}

    layout = ArtifactLayout(str(tmp_path / "root"))
    with pytest.raises(InvalidDataError, match=r"s3://data/alpaca.jsonl:4: empty response"):
        prepare_data(cfg, layout, Storage(), MemoryObjectReader(broken))

    # No prepared data, only the report of what was refused.
    assert [p.name for p in (tmp_path / "root" / "data").iterdir()] == ["invalid-rows.jsonl"]
    assert json.loads(Path(layout.invalid_rows).read_text()) == {
        "object": "s3://data/alpaca.jsonl",
        "line": 4,
        "reason": "empty response in field 'output'",
    }


def test_skipped_rows_are_listed_in_a_report_and_the_report_goes_when_they_do(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = config(
        tiny_model_dir,
        {
            "train": [{"uri": "s3://data/alpaca.jsonl"}],
            "invalid_rows": {"policy": "skip", "max_fraction": 0.1},
        },
    )
    layout, storage = ArtifactLayout(str(tmp_path / "root")), Storage()
    rows = [*ALPACA[:20], {"instruction": "x"}, *ALPACA[20:], {"instruction": "y", "output": ""}]

    prepare_data(cfg, layout, storage, MemoryObjectReader({"s3://data/alpaca.jsonl": jsonl(rows)}))
    report = [json.loads(line) for line in Path(layout.invalid_rows).read_text().splitlines()]
    prepare_data(cfg, layout, storage, MemoryObjectReader(OBJECTS))

    assert [(r["line"], r["reason"]) for r in report] == [
        (21, "missing field 'output'"),
        (42, "empty response in field 'output'"),
    ]
    assert not Path(layout.invalid_rows).exists()


@pytest.mark.parametrize("packing", [True, False])
def test_batches_from_read_back_data_equal_batches_from_the_data_step(
    tiny_model_dir: Path, tokenizer: Any, packing: bool
) -> None:
    import torch

    from instructune_jobs.data.collate import PackedCollator, PaddingCollator

    prepared = load_examples(config(tiny_model_dir, packing=packing), tokenizer, MemoryObjectReader(OBJECTS))
    restored = decode_prepared(encode_prepared(prepared))
    collate: Any = (
        PackedCollator(tokenizer.pad_token_id) if packing else PaddingCollator(tokenizer.pad_token_id)
    )

    for start in range(0, len(prepared.training_items), 4):
        expected = collate(prepared.training_items[start : start + 4])
        got = collate(restored.training_items[start : start + 4])
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[name], got[name]) for name in expected)
