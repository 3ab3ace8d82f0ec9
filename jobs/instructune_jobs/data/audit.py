"""Data audits before tokenizing: duplicates, evaluation contamination, personal data.

Pure functions over conversations (no I/O); pipeline.load_examples runs `audit_conversations` on
every training source and writes nothing itself: the findings travel with the prepared data and
prepare.py writes them to `<root>/data/audit.jsonl`.

- duplicates: a conversation equal to one already kept, after case folding and whitespace
  collapsing, is dropped (the first one stays). Duplicates over-weight their rows and, split
  across training and validation, make the validation loss lie.
- contamination: a training conversation whose user turns equal (normalised) the prompt of an
  evaluation dataset, the general probe or the validation source is dropped: a gate must not pass
  on answers the model memorised.
- personal data: e-mail addresses, phone numbers in international or separated national form,
  payment card numbers (Luhn-checked), IBANs (mod-97-checked) and US social security numbers.
  `report` lists them, `redact` replaces each with a placeholder such as `[EMAIL]`, `drop` drops
  the row. The spec's system prompt is not audited (it is the platform's, not the data's).
  Detectors favour precision: card issuer prefixes with the Luhn check, and the IBAN check, keep
  order numbers, IDs, timestamps, amounts and dates out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from instructune_jobs.data.types import Conversation, SourcedConversation

PiiPolicy = Literal["off", "report", "redact", "drop"]

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# +CC and 7-14 more digits with optional separators, or a (NNN) NNN-NNNN / NNN-NNN-NNNN number.
_PHONE = re.compile(
    r"(?<![\w+.])(?:\+\d{1,3}[ .-]?(?:\(?\d{1,4}\)?[ .-]?){1,4}\d{2,4}"
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w.])"
)
# Card numbers as they are written: 13-19 digits in one run, in groups of four, or Amex 4-6-5.
_CARD = re.compile(
    r"(?<![\d-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{5})(?![\d-])"
)
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
# Issuer prefixes of the card networks (Visa, Mastercard, Amex, Discover, Diners, JCB, UnionPay,
# Maestro): with the Luhn check they keep IDs and millisecond timestamps (which pass Luhn one time
# in ten) out.
_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[47]|6(?:011|5|4[4-9]|2)|3(?:0[0-5]|[68])|35|5[06-8]|6")
_SSN = re.compile(r"(?<!\d)(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?!\d)")
# Eight digits with at most two other characters between each: every number detector needs
# that much, and most text has nothing like it.
_MANY_DIGITS = re.compile(r"\d(?:\D{0,2}\d){7}")
PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "iban": "[IBAN]", "ssn": "[SSN]"}


Action = Literal["dropped", "redacted", "reported"]
_PII_ACTIONS: dict[str, Action] = {"drop": "dropped", "redact": "redacted", "report": "reported"}


@dataclass(frozen=True)
class AuditFinding:
    """One audited row: the object and line it came from, what was found, what was done."""

    object: str
    line: int
    kind: Literal["duplicate", "contamination", "pii"]
    detail: str  # which PII kinds, or what the row duplicates
    action: Action


@dataclass
class AuditCounts:
    duplicates: int = 0
    contaminated: int = 0
    pii_rows: int = 0


def _luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _valid_iban_end(candidate: str) -> int:
    """The length of the longest prefix of candidate, ending at a group, that is a valid IBAN (0
    if none): the pattern may have taken a word after it ("BE68 5390 0754 7034 EUR")."""
    end = len(candidate)
    while end >= 15:
        if _iban_valid(candidate[:end]):
            return end
        end = candidate.rfind(" ", 0, end)
    return 0


def _iban_valid(text: str) -> bool:
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of every personal-data match, left to right, never overlapping."""
    found: list[tuple[str, int, int]] = []
    if "@" in text:
        for match in _EMAIL.finditer(text):
            found.append(("email", match.start(), match.end()))
    if _MANY_DIGITS.search(text) is None:
        return found
    for match in _IBAN.finditer(text):
        end = _valid_iban_end(match.group())
        if end:
            found.append(("iban", match.start(), match.start() + end))
    for match in _CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and _CARD_PREFIX.match(digits) and _luhn_valid(digits):
            found.append(("card", match.start(), match.end()))
    for match in _SSN.finditer(text):
        found.append(("ssn", match.start(), match.end()))
    for match in _PHONE.finditer(text):
        if len(re.sub(r"\D", "", match.group())) >= 8:  # "+1 2" is arithmetic, not a number to call
            found.append(("phone", match.start(), match.end()))
    return _leftmost_longest(found)


def _leftmost_longest(found: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Of overlapping matches, the one that starts first (the longest of those starting together)."""
    kept: list[tuple[str, int, int]] = []
    for kind, start, end in sorted(found, key=lambda f: (f[1], -(f[2] - f[1]))):
        if not kept or start >= kept[-1][2]:
            kept.append((kind, start, end))
    return kept


def redact(text: str, found: Sequence[tuple[str, int, int]]) -> str:
    parts, at = [], 0
    for kind, start, end in found:
        parts += [text[at:start], PLACEHOLDERS[kind]]
        at = end
    return "".join([*parts, text[at:]])


def normalize(text: str) -> str:
    return " ".join(text.casefold().split())


def conversation_key(messages: Conversation) -> str:
    return "\x1e".join(f"{m['role']}\x1f{normalize(m['content'])}" for m in messages)


def prompt_key(messages: Conversation) -> str:
    """The user turns before the last answer: what an evaluation would ask."""
    last_answer = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return "\x1e".join(normalize(m["content"]) for m in messages[:last_answer] if m["role"] == "user")


def prompt_keys(conversations: Iterable[SourcedConversation]) -> set[str]:
    return {prompt_key(conv.messages) for conv in conversations}


def audit_conversations(
    conversations: Sequence[SourcedConversation],
    *,
    deduplicate: bool,
    reference_prompts: set[str],
    pii: PiiPolicy,
    seen: dict[str, str],
    system_prompt: str | None = None,
) -> tuple[list[SourcedConversation], list[AuditFinding], AuditCounts]:
    """The conversations to train on, every finding, and the counts. `seen` maps conversation
    keys already kept (from earlier sources too) to where they came from; it is updated."""
    kept: list[SourcedConversation] = []
    findings: list[AuditFinding] = []
    counts = AuditCounts()
    for conv in conversations:
        if reference_prompts and prompt_key(conv.messages) in reference_prompts:
            counts.contaminated += 1
            findings.append(
                AuditFinding(
                    conv.object, conv.line, "contamination", "prompt of an evaluation set", "dropped"
                )
            )
            continue
        if pii != "off":
            # The spec's system prompt is the platform's text, in every row, and rendered as it is
            # in evaluation and serving: only the data's own text is audited.
            matches = [
                [] if m["role"] == "system" and m["content"] == system_prompt else find_pii(m["content"])
                for m in conv.messages
            ]
            kinds = sorted({kind for found in matches for kind, _, _ in found})
            if kinds:
                counts.pii_rows += 1
                findings.append(
                    AuditFinding(conv.object, conv.line, "pii", ",".join(kinds), _PII_ACTIONS[pii])
                )
                if pii == "drop":
                    continue
                if pii == "redact":
                    messages = [
                        {**m, "content": redact(m["content"], found)}
                        for m, found in zip(conv.messages, matches, strict=True)
                    ]
                    conv = replace(conv, messages=messages)
        if deduplicate:
            key = conversation_key(conv.messages)
            first = seen.get(key)
            if first is not None:
                counts.duplicates += 1
                findings.append(AuditFinding(conv.object, conv.line, "duplicate", f"of {first}", "dropped"))
                continue
            seen[key] = f"{conv.object}:{conv.line}"
        kept.append(conv)
    return kept, findings, counts
