"""Row validation: every bad row is reported with its object, line and reason; the policy decides."""

from __future__ import annotations

import json
from typing import Any

import pytest

from instructune_jobs.config import InvalidRowsPolicy, TrainConfig
from instructune_jobs.data.formats import parse_jsonl_bytes, rows_to_conversations
from instructune_jobs.data.pipeline import DataValidationError, enforce_invalid_rows_policy, load_examples
from instructune_jobs.data.tokenize import tokenize_conversations
from instructune_jobs.data.types import InvalidRow, LocatedRow, SourcedConversation
from instructune_jobs.storage import MemoryObjectReader

pytestmark = pytest.mark.unit

GOOD = json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi!"}).encode()


def reasons_by_line(invalid: list[InvalidRow]) -> dict[int, str]:
    return {row.line: row.reason for row in invalid}


def test_bom_at_file_start_is_stripped_and_the_row_loads() -> None:
    rows, invalid = parse_jsonl_bytes(b"\xef\xbb\xbf" + GOOD + b"\n" + GOOD, "a.jsonl")
    assert invalid == [] and len(rows) == 2 and rows[0].row["output"] == "Hi!"


def test_crlf_line_ends_are_tolerated() -> None:
    rows, invalid = parse_jsonl_bytes(GOOD + b"\r\n" + GOOD + b"\r\n", "a.jsonl")
    assert invalid == [] and [r.line for r in rows] == [1, 2]


def test_blank_lines_are_skipped_but_still_counted_for_line_numbers() -> None:
    rows, invalid = parse_jsonl_bytes(GOOD + b"\n\n   \n" + GOOD + b"\n", "a.jsonl")
    assert invalid == [] and [r.line for r in rows] == [1, 4]


def test_invalid_utf8_is_reported_with_its_line_and_other_lines_survive() -> None:
    bad = b'{"instruction": "caf\xe9", "output": "x"}'
    rows, invalid = parse_jsonl_bytes(GOOD + b"\n" + bad + b"\n" + GOOD, "s3://b/a.jsonl")
    assert [r.line for r in rows] == [1, 3]
    assert invalid == [InvalidRow("s3://b/a.jsonl", 2, "invalid UTF-8 at byte 20")]


def test_invalid_json_is_reported_with_its_line() -> None:
    rows, invalid = parse_jsonl_bytes(GOOD + b"\n" + b'{"instruction": "x",' + b"\n", "a.jsonl")
    assert len(rows) == 1
    assert invalid[0].line == 2 and invalid[0].reason.startswith("invalid JSON")


def test_a_bom_in_the_middle_of_a_file_is_not_tolerated() -> None:
    _, invalid = parse_jsonl_bytes(GOOD + b"\n\xef\xbb\xbf" + GOOD, "a.jsonl")
    assert invalid[0].line == 2 and "invalid JSON" in invalid[0].reason


def test_a_row_that_is_not_an_object_is_reported() -> None:
    _, invalid = parse_jsonl_bytes(b'["a", "b"]\n42\n', "a.jsonl")
    assert reasons_by_line(invalid) == {
        1: "row is a JSON array, not an object",
        2: "row is a JSON number, not an object",
    }


def located(*rows: dict[str, Any]) -> list[LocatedRow]:
    return [LocatedRow("a.jsonl", number, row) for number, row in enumerate(rows, start=1)]


def test_missing_wrong_type_and_empty_fields_are_each_reported_with_their_line() -> None:
    rows = located(
        {"instruction": "ok", "output": "fine"},
        {"instruction": "no output here", "input": "", "output": None},
        {"instruction": "number output", "output": 42},
        {"instruction": "empty output", "output": "   "},
        {"instruction": ["not", "a", "string"], "output": "x"},
        {"instruction": "", "output": "x"},
        {"instruction": "input of wrong type", "input": {"a": 1}, "output": "x"},
    )
    conversations, invalid, fmt = rows_to_conversations(rows, "alpaca")
    assert fmt == "alpaca" and [c.line for c in conversations] == [1]
    assert reasons_by_line(invalid) == {
        2: "missing field 'output'",
        3: "field 'output' must be a string, got number",
        4: "empty response in field 'output'",
        5: "field 'instruction' must be a string, got array",
        6: "empty field 'instruction'",
        7: "field 'input' must be a string, got object",
    }


def test_missing_field_names_the_mapped_column() -> None:
    _, invalid, _ = rows_to_conversations(
        located({"question": "q"}), "alpaca", {"instruction": "question", "output": "answer"}
    )
    assert invalid[0].reason == "missing field 'answer'"


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([], "field 'messages' must be a non-empty array of messages"),
        ("hello", "field 'messages' must be a non-empty array of messages"),
        (["hi"], "message 1 must be an object, got string"),
        ([{"role": "robot", "content": "x"}], "message 1: unknown role 'robot'"),
        ([{"role": "user", "content": 3}], "message 1: 'content' must be a string, got number"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}],
            "empty response in message 2",
        ),
        ([{"role": "user", "content": "q"}], "conversation must end with an assistant message"),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "a"},
            ],
            "message 2: a system message may only come first",
        ),
    ],
)
def test_malformed_conversations_are_reported_with_a_reason(messages: Any, reason: str) -> None:
    _, invalid, _ = rows_to_conversations(located({"messages": messages}), "messages")
    assert [(row.line, row.reason) for row in invalid] == [(1, reason)]


def test_rows_longer_than_max_seq_length_are_reported_with_their_line(tokenizer: Any) -> None:
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    long = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "Hello"}]
    conversations = [SourcedConversation("a.jsonl", 1, short), SourcedConversation("a.jsonl", 2, long)]
    examples, invalid = tokenize_conversations(conversations, tokenizer, None, max_seq_length=64)
    assert len(examples) == 1 and len(invalid) == 1
    assert invalid[0].line == 2
    assert invalid[0].reason.startswith("row has ") and "longer than max_seq_length 64" in invalid[0].reason


def test_skip_policy_tolerates_up_to_max_fraction() -> None:
    invalid = [InvalidRow("a", 1, "bad")]
    enforce_invalid_rows_policy(invalid, 100, InvalidRowsPolicy(policy="skip", max_fraction=0.01))
    with pytest.raises(DataValidationError, match=r"2 of 100 rows are invalid \(2.00%\)") as caught:
        enforce_invalid_rows_policy(invalid * 2, 100, InvalidRowsPolicy(policy="skip", max_fraction=0.01))
    assert caught.value.total_rows == 100 and len(caught.value.invalid_rows) == 2
    assert "a:1: bad" in str(caught.value)


def test_fail_policy_fails_on_the_first_bad_row() -> None:
    invalid = [InvalidRow("a", 7, "first"), InvalidRow("a", 9, "second")]
    with pytest.raises(DataValidationError, match="a:7: first") as caught:
        enforce_invalid_rows_policy(invalid, 1000, InvalidRowsPolicy(policy="fail", max_fraction=1.0))
    assert caught.value.invalid_rows == invalid[:1]


def mixed_object(bad_lines: int, good_lines: int) -> bytes:
    good = [GOOD] * good_lines
    bad = [b'{"instruction": "x", "output": ""}'] * bad_lines
    return b"\n".join(good + bad) + b"\n"


def cfg_with_policy(policy: str, max_fraction: float) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "base_model": {"uri": "/models/tiny"},
            "dataset": {
                "train": [{"uri": "s3://data/a.jsonl"}],
                "invalid_rows": {"policy": policy, "max_fraction": max_fraction},
                "audit": {"deduplicate": False},  # the good rows are one row repeated
            },
            "training": {"max_seq_length": 128},
        }
    )


def test_data_step_skips_invalid_rows_within_the_fraction_and_reports_them(tokenizer: Any) -> None:
    reader = MemoryObjectReader({"s3://data/a.jsonl": mixed_object(bad_lines=1, good_lines=99)})
    prepared = load_examples(cfg_with_policy("skip", 0.02), tokenizer, reader)
    assert prepared.stats.rows == 100 and prepared.stats.invalid_rows == 1
    assert prepared.invalid == [InvalidRow("s3://data/a.jsonl", 100, "empty response in field 'output'")]
    assert prepared.stats.train_examples + prepared.stats.validation_examples == 99


def test_data_step_refuses_data_above_the_fraction(tokenizer: Any) -> None:
    reader = MemoryObjectReader({"s3://data/a.jsonl": mixed_object(bad_lines=5, good_lines=95)})
    with pytest.raises(DataValidationError, match="5 of 100 rows are invalid"):
        load_examples(cfg_with_policy("skip", 0.02), tokenizer, reader)


def test_data_step_with_fail_policy_names_the_first_bad_row(tokenizer: Any) -> None:
    reader = MemoryObjectReader({"s3://data/a.jsonl": mixed_object(bad_lines=2, good_lines=10)})
    with pytest.raises(DataValidationError, match=r"s3://data/a.jsonl:11: empty response"):
        load_examples(cfg_with_policy("fail", 1.0), tokenizer, reader)


def test_a_source_without_valid_rows_is_refused(tokenizer: Any) -> None:
    reader = MemoryObjectReader({"s3://data/a.jsonl": mixed_object(bad_lines=3, good_lines=0)})
    with pytest.raises(DataValidationError, match="has no valid rows"):
        load_examples(cfg_with_policy("skip", 1.0), tokenizer, reader)


def test_a_uri_without_data_objects_is_refused(tokenizer: Any) -> None:
    with pytest.raises(DataValidationError, match="no data objects"):
        load_examples(cfg_with_policy("skip", 0.0), tokenizer, MemoryObjectReader({}))
