"""Audits before tokenizing: personal data found (and nothing else), duplicates and evaluation
prompts dropped, every finding named by object and line, and the data step's counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from instructune_jobs.config import TrainConfig
from instructune_jobs.data.audit import audit_conversations, find_pii, prompt_key, redact
from instructune_jobs.data.pipeline import load_examples
from instructune_jobs.data.types import SourcedConversation
from instructune_jobs.storage import MemoryObjectReader

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("write to jane.doe+billing@example.co.uk today", "email"),
        ("call +1 (415) 555-0132 after six", "phone"),
        ("call +44 20 7946 0958", "phone"),
        ("Call me at +33 6 12 34 56 78", "phone"),
        ("office: 415-555-0132", "phone"),
        ("card 4111 1111 1111 1111 exp 12/29", "card"),
        ("card 4111-1111-1111-1111", "card"),
        ("card 378282246310005 (amex)", "card"),
        ("IBAN DE89 3704 0044 0532 0130 00 please", "iban"),
        ("IBAN GB82WEST12345698765432", "iban"),
        ("Pay to BE68539007547034 EUR 100", "iban"),
        ("SSN 123-45-6789 on file", "ssn"),
    ],
)
def test_personal_data_of_each_kind_is_found(text: str, kind: str) -> None:
    assert [found[0] for found in find_pii(text)] == [kind]


@pytest.mark.parametrize(
    "text",
    [
        "pay 7,313 dollars by 2022-02-25",
        "invoice 2024-000123 of 1,250,000.00 EUR",
        "order 4111 1111 1111 1112 is not a card (Luhn fails)",
        "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
        "what is 12+7? and 3 +4 5",
        "DE89 3704 0044 0532 0130 01 has a wrong check",
        "version 1.2.3 released on 2024.05.06",
        "SSN-like 000-12-3456 and 666-12-3456 are never issued",
        '{"created_at": 1700000000004, "user": 42}',  # passes Luhn, no card network's prefix
        "order 1234567890123452 shipped",  # Luhn-valid 16 digits, no card network's prefix
        "host 192.168.100.1000 is down",
    ],
)
def test_amounts_dates_counts_and_failed_checksums_are_not_personal_data(text: str) -> None:
    assert find_pii(text) == []


def test_redaction_replaces_each_match_with_its_placeholder() -> None:
    text = "Mail ana@example.org or call +34 912 345 678; card 4111 1111 1111 1111."
    assert redact(text, find_pii(text)) == "Mail [EMAIL] or call [PHONE]; card [CARD]."


def test_an_iban_followed_by_a_word_is_redacted_without_the_word() -> None:
    text = "Transfer to BE68 5390 0754 7034 EUR 100 by Friday."
    assert redact(text, find_pii(text)) == "Transfer to [IBAN] EUR 100 by Friday."


def test_the_spec_system_prompt_is_not_audited_but_the_data_is() -> None:
    system = "You are the help desk. Escalate to support@acme.com or +1 (415) 555-0100."

    def row(line: int, answer: str) -> SourcedConversation:
        return SourcedConversation(
            "s3://data/a.jsonl",
            line,
            [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Question {line}"},
                {"role": "assistant", "content": answer},
            ],
        )

    kept, findings, _ = audit_conversations(
        [row(1, "Reset it in settings."), row(2, "Mail me at eve@example.net.")],
        deduplicate=True,
        reference_prompts=set(),
        pii="drop",
        seen={},
        system_prompt=system,
    )
    assert [c.line for c in kept] == [1] and kept[0].messages[0]["content"] == system
    assert [(f.line, f.detail) for f in findings] == [(2, "email")]


def conv(line: int, user: str, answer: str, obj: str = "s3://d/a.jsonl") -> SourcedConversation:
    return SourcedConversation(
        obj, line, [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    )


def test_duplicates_are_dropped_across_sources_and_name_the_row_they_repeat() -> None:
    seen: dict[str, str] = {}
    first, _, _ = audit_conversations(
        [conv(1, "Say hi", "Hi"), conv(2, "say  HI", "hi")],
        deduplicate=True,
        reference_prompts=set(),
        pii="off",
        seen=seen,
    )
    second, findings, counts = audit_conversations(
        [conv(1, "Say hi ", "Hi", "s3://d/b.jsonl"), conv(2, "Say bye", "Bye", "s3://d/b.jsonl")],
        deduplicate=True,
        reference_prompts=set(),
        pii="off",
        seen=seen,
    )
    assert [c.line for c in first] == [1] and [c.line for c in second] == [2]
    assert counts.duplicates == 1
    assert [(f.object, f.line, f.kind, f.detail) for f in findings] == [
        ("s3://d/b.jsonl", 1, "duplicate", "of s3://d/a.jsonl:1")
    ]


def test_rows_asking_an_evaluation_prompt_are_dropped() -> None:
    references = {prompt_key(conv(0, "What is the capital of France?", "x").messages)}
    kept, findings, counts = audit_conversations(
        [conv(1, "what is the capital of  France?", "Paris"), conv(2, "What is 2+2?", "4")],
        deduplicate=True,
        reference_prompts=references,
        pii="off",
        seen={},
    )
    assert [c.line for c in kept] == [2] and counts.contaminated == 1
    assert (findings[0].line, findings[0].kind, findings[0].action) == (1, "contamination", "dropped")


@pytest.mark.parametrize(
    ("policy", "kept_text", "action"),
    [
        ("redact", "Contact [EMAIL].", "redacted"),
        ("report", "Contact bob@example.com.", "reported"),
        ("drop", None, "dropped"),
    ],
)
def test_the_pii_policy_decides_what_happens_to_the_row(
    policy: Any, kept_text: str | None, action: str
) -> None:
    kept, findings, counts = audit_conversations(
        [conv(7, "Who handles refunds?", "Contact bob@example.com.")],
        deduplicate=True,
        reference_prompts=set(),
        pii=policy,
        seen={},
    )
    assert [c.messages[-1]["content"] for c in kept] == ([kept_text] if kept_text else [])
    assert counts.pii_rows == 1
    assert [(f.line, f.kind, f.detail, f.action) for f in findings] == [(7, "pii", "email", action)]


def test_the_data_step_audits_every_source_and_counts_what_it_did(tokenizer: Any, tmp_path: Path) -> None:
    rows = [
        {"instruction": "Summarise the refund policy.", "output": "Refunds within 30 days."},
        {"instruction": "summarise the refund policy. ", "output": "refunds within 30 days."},
        {"instruction": "Who do I email?", "output": "Write to help@example.com."},
        {"instruction": "What is the capital of Peru?", "output": "Lima."},
        *({"instruction": f"Add {i} and {i}.", "output": str(2 * i)} for i in range(20)),
    ]
    heldout = [{"instruction": "What is the capital of Peru?", "output": "Lima"}]
    objects = {
        "s3://data/train.jsonl": "\n".join(json.dumps(r) for r in rows).encode(),
        "s3://data/heldout.jsonl": json.dumps(heldout[0]).encode(),
    }
    cfg = TrainConfig.model_validate(
        {
            "base_model": {"uri": "/models/tiny"},
            "dataset": {"train": [{"uri": "s3://data/train.jsonl"}], "validation": {"fraction": 0.0}},
            "training": {"max_seq_length": 128},
            "evaluation": {"datasets": [{"name": "heldout", "uri": "s3://data/heldout.jsonl"}]},
        }
    )

    prepared = load_examples(cfg, tokenizer, MemoryObjectReader(objects))

    stats = prepared.stats
    assert (stats.duplicates, stats.contaminated, stats.pii_rows) == (1, 1, 1)
    assert stats.train_examples == len(rows) - 2  # the duplicate and the evaluation prompt
    assert stats.reference_etags.keys() == {"s3://data/heldout.jsonl"}
    assert sorted((f.line, f.kind, f.action) for f in prepared.audit) == [
        (2, "duplicate", "dropped"),
        (3, "pii", "redacted"),
        (4, "contamination", "dropped"),
    ]
    texts = [tokenizer.decode(example.input_ids) for example in prepared.train]
    assert any("[EMAIL]" in text for text in texts) and not any("help@example.com" in t for t in texts)


def test_a_source_the_audits_empty_is_refused_saying_so_and_keeps_the_findings(tokenizer: Any) -> None:
    from instructune_jobs.data.pipeline import DataValidationError

    general = [{"instruction": f"Spell {w}.", "output": " ".join(w)} for w in ("cat", "dog", "sun")]
    body = "\n".join(json.dumps(r) for r in general).encode()
    objects = {"s3://data/general.jsonl": body, "s3://data/probe.jsonl": body}
    cfg = TrainConfig.model_validate(
        {
            "base_model": {"uri": "/models/tiny"},
            # the general set doubles as the forgetting probe: decontamination leaves nothing
            "dataset": {"train": [{"uri": "s3://data/general.jsonl"}], "validation": {"fraction": 0.0}},
            "training": {"max_seq_length": 128},
            "evaluation": {"general_probe": {"uri": "s3://data/probe.jsonl"}},
        }
    )

    with pytest.raises(DataValidationError, match="has no valid rows \\(3 dropped by the audits") as refused:
        load_examples(cfg, tokenizer, MemoryObjectReader(objects))

    assert [(f.line, f.kind) for f in refused.value.audit] == [
        (1, "contamination"),
        (2, "contamination"),
        (3, "contamination"),
    ]
