"""Bytes -> rows -> chat conversations: the file formats, the row formats, field mapping and
row validation. Pure functions; each bad row is reported with where it came from and why."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from instructune_jobs.data.collector import collector_paused
from instructune_jobs.data.types import Conversation, Format, InvalidRow, LocatedRow, Row, SourcedConversation

_BOM = b"\xef\xbb\xbf"
_GZIP_MAGIC = b"\x1f\x8b"
# Role names other datasets use (ShareGPT, Gemini) for the three roles chat templates know.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
_ROLES = frozenset({"system", "user", "assistant"})


@collector_paused()
def parse_object_bytes(data: bytes, object_name: str) -> tuple[list[LocatedRow], list[InvalidRow]]:
    """Rows of one object, by its suffix: JSONL (optionally gzipped), a JSON array, or Parquet."""
    name = object_name.lower()
    if name.endswith(".gz") or data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            return [], [InvalidRow(object_name, 0, f"cannot decompress gzip: {err}")]
        name = name.removesuffix(".gz")
    if name.endswith(".parquet"):
        return parse_parquet_bytes(data, object_name)
    if name.endswith(".json") and data.removeprefix(_BOM).lstrip()[:1] == b"[":
        return parse_json_array_bytes(data, object_name)
    return parse_jsonl_bytes(data, object_name)


def parse_jsonl_bytes(data: bytes, object_name: str) -> tuple[list[LocatedRow], list[InvalidRow]]:
    """One JSON object per line. A UTF-8 BOM at the start of the file and CRLF line ends are
    tolerated (editors on Windows write both); blank lines are skipped. Each bad line is reported
    with its 1-based line number, and the other lines still load."""
    rows: list[LocatedRow] = []
    invalid: list[InvalidRow] = []
    # Splitting the bytes (not decoded text) keeps one line's bad UTF-8 from spoiling the others;
    # 0x0A never occurs inside a multi-byte UTF-8 sequence, so this split is safe.
    for line_number, raw in enumerate(data.removeprefix(_BOM).split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            invalid.append(InvalidRow(object_name, line_number, f"invalid UTF-8 at byte {err.start}"))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            invalid.append(
                InvalidRow(object_name, line_number, f"invalid JSON: {err.msg} (column {err.colno})")
            )
            continue
        if not isinstance(value, dict):
            invalid.append(
                InvalidRow(object_name, line_number, f"row is a JSON {_json_type(value)}, not an object")
            )
            continue
        rows.append(LocatedRow(object_name, line_number, value))
    return rows, invalid


def parse_json_array_bytes(data: bytes, object_name: str) -> tuple[list[LocatedRow], list[InvalidRow]]:
    """A JSON array of objects (how the original Alpaca data ships); items numbered from 1."""
    try:
        values = json.loads(data.removeprefix(_BOM).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return [], [InvalidRow(object_name, 0, f"unreadable JSON array: {err}")]
    if not isinstance(values, list):
        return [], [InvalidRow(object_name, 0, f"top-level JSON is a {_json_type(values)}, not an array")]
    rows: list[LocatedRow] = []
    invalid: list[InvalidRow] = []
    for number, value in enumerate(values, start=1):
        if isinstance(value, dict):
            rows.append(LocatedRow(object_name, number, value))
        else:
            invalid.append(
                InvalidRow(object_name, number, f"item is a JSON {_json_type(value)}, not an object")
            )
    return rows, invalid


def parse_parquet_bytes(data: bytes, object_name: str) -> tuple[list[LocatedRow], list[InvalidRow]]:
    """Parquet rows numbered from 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        return [], [InvalidRow(object_name, 0, f"unreadable Parquet: {err}")]
    return [LocatedRow(object_name, number, row) for number, row in enumerate(table.to_pylist(), start=1)], []


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


class RowError(ValueError):
    """Why one row cannot become a conversation."""


def _column(field_name: str, mapping: Mapping[str, str]) -> str:
    return mapping.get(field_name, field_name)


def detect_row_format(row: Row, field_mapping: Mapping[str, str] | None = None) -> Format | None:
    mapping = field_mapping or {}

    def has(name: str) -> bool:
        return _column(name, mapping) in row

    if has("messages"):
        return "messages"
    if has("prompt") and has("completion"):
        return "prompt-completion"
    if has("instruction") and has("output"):
        return "alpaca"
    if has("instruction") and has("response"):
        return "dolly"
    return None


def detect_format(
    rows: Iterable[Row], field_mapping: Mapping[str, str] | None = None, sample_size: int = 100
) -> Format:
    """The format most of the first `sample_size` rows look like (one malformed row must not
    decide the format of a whole object)."""
    votes: Counter[Format] = Counter()
    keys_seen: set[str] = set()
    for index, row in enumerate(rows):
        if index >= sample_size:
            break
        keys_seen.update(row)
        detected = detect_row_format(row, field_mapping)
        if detected is not None:
            votes[detected] += 1
    if not votes:
        raise RowError(
            "cannot detect the format (alpaca: instruction/output, dolly: instruction/response, "
            f"messages, prompt/completion); keys seen: {sorted(keys_seen)[:20]}"
        )
    return votes.most_common(1)[0][0]


def _required_text(row: Row, field_name: str, mapping: Mapping[str, str], *, response: bool = False) -> str:
    column = _column(field_name, mapping)
    value = row.get(column)
    if value is None:
        raise RowError(f"missing field '{column}'")
    if not isinstance(value, str):
        raise RowError(f"field '{column}' must be a string, got {_json_type(value)}")
    if not value.strip():
        raise RowError(f"empty response in field '{column}'" if response else f"empty field '{column}'")
    return value


def _optional_text(row: Row, field_name: str, mapping: Mapping[str, str]) -> str:
    column = _column(field_name, mapping)
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"field '{column}' must be a string, got {_json_type(value)}")
    return value


def _user_turn(instruction: str, extra: str) -> str:
    # The Alpaca/Dolly convention: the input (or context) follows the instruction.
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _with_system(messages: Conversation, system: str | None) -> Conversation:
    return [{"role": "system", "content": system}, *messages] if system else messages


def _messages_to_conversation(
    row: Row, mapping: Mapping[str, str], system_prompt: str | None
) -> Conversation:
    column = _column("messages", mapping)
    turns = row.get(column)
    if turns is None:
        raise RowError(f"missing field '{column}'")
    if not isinstance(turns, list) or not turns:
        raise RowError(f"field '{column}' must be a non-empty array of messages")
    role_key, content_key = _column("role", mapping), _column("content", mapping)
    conversation: Conversation = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise RowError(f"message {number} must be an object, got {_json_type(turn)}")
        role, content = turn.get(role_key), turn.get(content_key)
        if not isinstance(role, str):
            raise RowError(f"message {number}: '{role_key}' must be a string, got {_json_type(role)}")
        role = _ROLE_ALIASES.get(role, role)
        if role not in _ROLES:
            raise RowError(f"message {number}: unknown role '{role}'")
        if role == "system" and number != 1:
            raise RowError(f"message {number}: a system message may only come first")
        if not isinstance(content, str):
            raise RowError(f"message {number}: '{content_key}' must be a string, got {_json_type(content)}")
        if role == "assistant" and not content.strip():
            raise RowError(f"empty response in message {number}")
        conversation.append({"role": role, "content": content})
    if conversation[-1]["role"] != "assistant":
        raise RowError("conversation must end with an assistant message")
    if conversation[0]["role"] != "system":
        conversation = _with_system(conversation, system_prompt)
    return conversation


def row_to_conversation(
    row: Row, fmt: Format, field_mapping: Mapping[str, str] | None = None, system_prompt: str | None = None
) -> Conversation:
    """One row as a chat conversation; raises RowError saying what is wrong with the row.
    A row's own `system` field wins over the spec's system prompt."""
    mapping = field_mapping or {}
    if fmt == "messages":
        return _messages_to_conversation(row, mapping, system_prompt)
    system = _optional_text(row, "system", mapping) or system_prompt
    if fmt == "alpaca":
        user = _user_turn(_required_text(row, "instruction", mapping), _optional_text(row, "input", mapping))
        answer = _required_text(row, "output", mapping, response=True)
    elif fmt == "dolly":
        user = _user_turn(
            _required_text(row, "instruction", mapping), _optional_text(row, "context", mapping)
        )
        answer = _required_text(row, "response", mapping, response=True)
    elif fmt == "prompt-completion":
        user = _required_text(row, "prompt", mapping)
        answer = _required_text(row, "completion", mapping, response=True)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return _with_system([{"role": "user", "content": user}, {"role": "assistant", "content": answer}], system)


@collector_paused()
def rows_to_conversations(
    rows: Sequence[LocatedRow],
    fmt: Format | Literal["auto"] = "auto",
    field_mapping: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
) -> tuple[list[SourcedConversation], list[InvalidRow], Format | None]:
    """Conversations of the valid rows, a report of the invalid ones, and the format used
    (None when there were no rows). `auto` is decided per call (i.e. per object)."""
    if not rows:
        return [], [], None
    if fmt == "auto":
        try:
            fmt = detect_format((located.row for located in rows), field_mapping)
        except RowError as err:
            return [], [InvalidRow(r.object, r.line, str(err)) for r in rows], None
    conversations: list[SourcedConversation] = []
    invalid: list[InvalidRow] = []
    for located in rows:
        try:
            messages = row_to_conversation(located.row, fmt, field_mapping, system_prompt)
        except RowError as err:
            invalid.append(InvalidRow(located.object, located.line, str(err)))
            continue
        conversations.append(SourcedConversation(located.object, located.line, messages))
    return conversations, invalid, fmt
