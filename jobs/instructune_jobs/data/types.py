"""The values the data step passes between its stages, from a located row to a packed sequence."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

IGNORE_INDEX = -100
Row = dict[str, Any]
Message = dict[str, str]
Conversation = list[Message]
Format = Literal["alpaca", "dolly", "messages", "prompt-completion"]


@dataclass(frozen=True)
class InvalidRow:
    """One rejected row: the object it came from, its 1-based line (JSONL) or row/item number
    (Parquet, JSON array; 0 when the whole object is unreadable) and why."""

    object: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.object}:{self.line}: {self.reason}"


_TOO_LONG = re.compile(r"^row has (\d+) tokens, longer than max_seq_length \d+$")


def too_long_reason(tokens: int, max_seq_length: int) -> str:
    """Why a row longer than max_seq_length is refused (the data step never truncates a row)."""
    return f"row has {tokens} tokens, longer than max_seq_length {max_seq_length}"


def too_long_tokens(reason: str) -> int | None:
    """The row's length when `reason` is too_long_reason's, else None: what a data report reads
    back from the rows the tokenizer refused."""
    match = _TOO_LONG.match(reason)
    return int(match.group(1)) if match else None


class TemplateError(ValueError):
    """No usable chat template, or one whose assistant turns cannot be located."""


@dataclass(frozen=True)
class LocatedRow:
    object: str
    line: int
    row: Row


@dataclass(frozen=True)
class SourcedConversation:
    object: str
    line: int
    messages: Conversation


@dataclass(frozen=True, slots=True)
class TokenizedExample:
    """One conversation's tokens; labels are IGNORE_INDEX everywhere but on assistant tokens."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True, slots=True)
class PackedSequence:
    """Several examples laid end to end; position_ids restart at 0 at every example's start,
    which is how attention (and `block_diagonal_causal_mask`) keeps the examples apart.

    Built with lists; read back from prepared data (prepare.py) the three token sequences are
    int32 numpy views. Consumers only take len(), index and copy them into numpy rows."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    example_lengths: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)
