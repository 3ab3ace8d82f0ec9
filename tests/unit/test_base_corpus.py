"""The tiny base's general corpus: rows the job's own data step accepts, deterministic, and free of
the quickstart's task (the base must not have seen extraction to JSON before it is tuned)."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from instructune_jobs.base_corpus import base_corpus_rows, copy_stage_rows
from instructune_jobs.data.formats import parse_object_bytes, rows_to_conversations
from instructune_jobs.synthetic import EXTRACTION_KEYS, extraction_rows, rows_to_bytes

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def corpus() -> list[dict[str, list[dict[str, str]]]]:
    return base_corpus_rows(3000, seed=0)


def test_every_corpus_row_is_a_valid_messages_row_for_the_job(
    corpus: list[dict[str, list[dict[str, str]]]],
) -> None:
    rows = corpus + copy_stage_rows(500, seed=0)
    located, unreadable = parse_object_bytes(rows_to_bytes(rows, "corpus.jsonl"), "corpus.jsonl")
    conversations, invalid, fmt = rows_to_conversations(located)
    assert (unreadable, invalid, fmt) == ([], [], "messages")
    assert len(conversations) == len(rows)
    assert all(c.messages[-1]["role"] == "assistant" for c in conversations)


def test_the_same_seed_gives_the_same_corpus_and_another_seed_another() -> None:
    assert base_corpus_rows(200, seed=3) == base_corpus_rows(200, seed=3)
    assert base_corpus_rows(200, seed=3) != base_corpus_rows(200, seed=4)
    assert copy_stage_rows(200, seed=1) == copy_stage_rows(200, seed=1)


def test_the_corpus_never_answers_with_json_nor_names_the_extraction_fields(
    corpus: list[dict[str, list[dict[str, str]]]],
) -> None:
    answers = [m["content"] for row in corpus for m in row["messages"] if m["role"] == "assistant"]
    assert not [a for a in answers if "{" in a or "}" in a]
    quoted_keys = [f'"{key}"' for key in EXTRACTION_KEYS]
    texts = [m["content"] for row in corpus for m in row["messages"]]
    assert not [t for t in texts if any(key in t for key in quoted_keys)]
    clauses = {row["input"] for row in extraction_rows(200, seed=1) + extraction_rows(50, 2, "heldout")}
    assert not [t for t in texts if any(clause in t for clause in clauses)]


def test_spans_are_asked_back_in_their_normal_forms(corpus: list[dict[str, list[dict[str, str]]]]) -> None:
    """Amounts come back as plain integers and dates as ISO dates, whatever form the text used."""
    amount_asks = ("plain whole number", "digits only", "as an integer", "as a whole number")
    date_asks = ("YYYY-MM-DD", "ISO format")
    seen = {"amount": 0, "date": 0}
    for row in corpus:
        messages = row["messages"]
        for question, answer in zip(messages[::2], messages[1::2], strict=True):
            if any(ask in question["content"] for ask in amount_asks):
                assert re.fullmatch(r"[1-9][0-9]*", answer["content"]), answer
                seen["amount"] += 1
            elif any(ask in question["content"] for ask in date_asks):
                dt.date.fromisoformat(answer["content"])
                seen["date"] += 1
    assert min(seen.values()) > 100, seen


def test_the_copy_stage_asks_back_exactly_what_it_shows() -> None:
    for row in copy_stage_rows(300, seed=0):
        question, answer = (m["content"] for m in row["messages"])
        assert question.endswith(f": {answer}")
