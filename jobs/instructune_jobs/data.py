"""Training data: read from S3, validate, format, template, mask, pack.

Public API (finetune.py, evaluate.py and the serving builder use only these):

    load_examples(cfg, tokenizer, reader=None) -> PreparedData       the whole data step
    read_conversations(uri, ...) -> ConversationsRead                  one source, e.g. an eval set
    rows_to_conversations(rows, fmt, field_mapping, system_prompt)     rows -> chat conversations
    resolve_chat_template(tokenizer, chat_template) -> str             the template text in force
    template_hash(template_text) -> str                                sha256 of that text
    render_chat(tokenizer, conversation, chat_template, add_generation_prompt) -> str
    split_for_generation(conversation) -> (prompt conversation, reference answer)
    tokenize_conversations(conversations, tokenizer, chat_template, max_seq_length)
    pack_examples(examples, max_seq_length, seed=None) -> list[PackedSequence]
    packing_padding_fraction / dynamic_padding_fraction / fixed_padding_fraction
    PackedCollator / PaddingCollator                                   batches of torch tensors
    block_diagonal_causal_mask(position_ids, dtype) -> 4D additive mask

Everything from bytes to packed sequences is a pure function so it is unit-testable without S3;
the S3 part is a thin `ObjectReader`. torch is imported only by the collators and boto3 only by
the S3 reader, so validating data needs neither.

One template function (`render_chat`) renders conversations for training, evaluation and
serving alike: the template text it resolves is what serving is given, and `template_hash`
records which one was used.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import gzip
import hashlib
import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from instructune_jobs.audit import AuditFinding, audit_conversations, prompt_keys
from instructune_jobs.config import InvalidRowsPolicy, TrainConfig

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
Row = dict[str, Any]
Message = dict[str, str]
Conversation = list[Message]
Format = Literal["alpaca", "dolly", "messages", "prompt-completion"]

_BOM = b"\xef\xbb\xbf"
_GZIP_MAGIC = b"\x1f\x8b"
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".json.gz", ".parquet")
# Role names other datasets use (ShareGPT, Gemini) for the three roles chat templates know.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
_ROLES = frozenset({"system", "user", "assistant"})
_MAX_REPORTED_INVALID = 20
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Public result types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InvalidRow:
    """One rejected row: the object it came from, its 1-based line (JSONL) or row/item number
    (Parquet, JSON array; 0 when the whole object is unreadable) and why."""

    object: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.object}:{self.line}: {self.reason}"


class DataValidationError(ValueError):
    """The data step refused the data; `invalid_rows` says which rows and why."""

    def __init__(
        self,
        message: str,
        invalid_rows: Sequence[InvalidRow] = (),
        total_rows: int = 0,
        audit: Sequence[AuditFinding] = (),
    ):
        shown = "\n".join(f"  {row}" for row in invalid_rows[:_MAX_REPORTED_INVALID])
        more = len(invalid_rows) - _MAX_REPORTED_INVALID
        suffix = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{message}\n{shown}{suffix}" if shown else message)
        self.invalid_rows = list(invalid_rows)
        self.total_rows = total_rows
        self.audit = list(audit)  # what the audits found before the data was refused


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


@dataclass
class DataStats:
    rows: int = 0  # rows read, valid or not
    invalid_rows: int = 0
    train_examples: int = 0
    validation_examples: int = 0
    tokens: int = 0  # training tokens, prompt included
    target_tokens: int = 0  # training tokens that carry loss
    padding_fraction: float = 0.0  # of training batches as the training loader will build them
    template_hash: str = ""
    etags: dict[str, str] = field(default_factory=dict)  # object uri -> ETag, for lineage
    formats: dict[str, str] = field(default_factory=dict)  # object uri -> format read as
    invalid_samples: list[InvalidRow] = field(default_factory=list)
    duplicates: int = 0  # rows dropped as duplicates (audit.py)
    contaminated: int = 0  # rows dropped as prompts of an evaluation set
    pii_rows: int = 0  # rows with personal data (redacted, dropped or only reported)
    # evaluation sets, probe and validation source read for decontamination: uri -> ETag
    reference_etags: dict[str, str] = field(default_factory=dict)

    @property
    def audited_rows(self) -> int:
        return self.duplicates + self.contaminated + self.pii_rows

    def to_status(self) -> dict[str, Any]:
        """The tune's `status.data` (camelCase, as the CRD has it)."""
        return {
            "rows": self.rows,
            "invalidRows": self.invalid_rows,
            "duplicateRows": self.duplicates,
            "contaminatedRows": self.contaminated,
            "piiRows": self.pii_rows,
            "tokens": self.tokens,
            "paddingFraction": round(self.padding_fraction, 6),
            "templateHash": self.template_hash,
        }


@dataclass
class PreparedData:
    train: list[TokenizedExample]
    validation: list[TokenizedExample]
    # Set when training.packing is on: what the training loader should iterate over.
    packed_train: list[PackedSequence] | None
    chat_template: str  # the template text in force; serving must be given exactly this
    stats: DataStats
    invalid: list[InvalidRow]
    # What the audits found, row by row (not kept in prepared files: the counts are in stats).
    audit: list[AuditFinding] = field(default_factory=list)

    @property
    def training_items(self) -> Sequence[TokenizedExample] | Sequence[PackedSequence]:
        return self.packed_train if self.packed_train is not None else self.train


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off for the block (unless it already was), back on after.

    The data step builds a few long-lived objects per row (the row, its messages, lists of token
    ids and labels) and no reference cycles. Left on, the collector runs a full pass every few
    thousand rows that walks every list built so far and frees nothing: a sixth of this step's CPU
    time in bench/bench_data_pipeline.py. Blocks are kept to one object or one tokenizer chunk, so
    a cycle a user's chat template might make is still collected soon after."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------------
# Reading objects (the only I/O in this module)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectRef:
    uri: str
    etag: str
    size: int


class ObjectReader(Protocol):
    def list_objects(self, uri: str) -> list[ObjectRef]:
        """The data objects a uri names: the object itself, or every data object under a prefix."""
        ...

    def read_object(self, ref: ObjectRef) -> bytes: ...


def is_data_object(key: str) -> bool:
    return key.lower().endswith(DATA_SUFFIXES)


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3 uri: {uri}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def s3_client_from_env() -> Any:
    """boto3 S3 client for the endpoint in AWS_ENDPOINT_URL or INSTRUCTUNE_S3_ENDPOINT (MinIO and
    other S3-compatibles need path-style addressing); credentials come from the usual AWS_* env."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("INSTRUCTUNE_S3_ENDPOINT") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(
        s3={"addressing_style": "path"} if endpoint else {},
        retries={"max_attempts": 5, "mode": "standard"},
    )
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)


class LazyS3Client:
    """Holds the S3 client given, or one made from the environment on first use (so that
    constructing a reader never needs credentials)."""

    def __init__(self, client: Any | None = None):
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client_from_env()
        return self._client


class S3ObjectReader(LazyS3Client):
    def _list(self, bucket: str, prefix: str) -> list[ObjectRef]:
        refs = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                refs.append(ObjectRef(f"s3://{bucket}/{item['Key']}", item["ETag"].strip('"'), item["Size"]))
        return refs

    def list_objects(self, uri: str) -> list[ObjectRef]:
        bucket, key = split_s3_uri(uri)
        if key and not key.endswith("/"):
            # "s3://b/data.jsonl" is that object; "s3://b/data" is the prefix "data/".
            exact = [ref for ref in self._list(bucket, key) if ref.uri == uri]
            if exact:
                return exact
            key += "/"
        refs = [ref for ref in self._list(bucket, key) if is_data_object(ref.uri)]
        return sorted(refs, key=lambda ref: ref.uri)

    def read_object(self, ref: ObjectRef) -> bytes:
        bucket, key = split_s3_uri(ref.uri)
        body: bytes = self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return body


class LocalObjectReader:
    """Local files (file:///path or /path) for tests and the offline demo. The ETag is the MD5
    of the content, as S3 gives for single-part uploads."""

    def list_objects(self, uri: str) -> list[ObjectRef]:
        path = Path(uri.removeprefix("file://"))
        if path.is_file():
            paths = [path]
        elif path.is_dir():
            paths = sorted(p for p in path.rglob("*") if p.is_file() and is_data_object(p.name))
        else:
            raise FileNotFoundError(f"no such file or directory: {uri}")
        return [ObjectRef(str(p), hashlib.md5(p.read_bytes()).hexdigest(), p.stat().st_size) for p in paths]

    def read_object(self, ref: ObjectRef) -> bytes:
        return Path(ref.uri).read_bytes()


class MemoryObjectReader:
    """Objects held in memory ({uri: bytes}); a uri ending in "/" lists a prefix."""

    def __init__(self, objects: Mapping[str, bytes]):
        self.objects = dict(objects)

    def list_objects(self, uri: str) -> list[ObjectRef]:
        if uri in self.objects:
            names = [uri]
        else:
            prefix = uri if uri.endswith("/") else uri + "/"
            names = sorted(name for name in self.objects if name.startswith(prefix) and is_data_object(name))
        return [ObjectRef(n, hashlib.md5(self.objects[n]).hexdigest(), len(self.objects[n])) for n in names]

    def read_object(self, ref: ObjectRef) -> bytes:
        return self.objects[ref.uri]


class SchemeReader:
    """Dispatches s3:// to S3 and everything else to the local file system."""

    def __init__(self, s3: ObjectReader | None = None, local: ObjectReader | None = None):
        self.s3 = s3 or S3ObjectReader()
        self.local = local or LocalObjectReader()

    def _for(self, uri: str) -> ObjectReader:
        return self.s3 if uri.startswith("s3://") else self.local

    def list_objects(self, uri: str) -> list[ObjectRef]:
        return self._for(uri).list_objects(uri)

    def read_object(self, ref: ObjectRef) -> bytes:
        return self._for(ref.uri).read_object(ref)


# ---------------------------------------------------------------------------------------------
# Bytes -> rows
# ---------------------------------------------------------------------------------------------


@_collector_paused()
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


# ---------------------------------------------------------------------------------------------
# Rows -> conversations (formats, field mapping, row validation)
# ---------------------------------------------------------------------------------------------


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


@_collector_paused()
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


# ---------------------------------------------------------------------------------------------
# Chat template: one rendering for training, evaluation and serving
# ---------------------------------------------------------------------------------------------


def resolve_chat_template(tokenizer: Any, chat_template: str | None = None) -> str:
    """The template text in force: the spec's own, else the tokenizer's."""
    if chat_template:
        return chat_template
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # tokenizers may carry several named templates
        own = own.get("default")
    if not own:
        raise TemplateError("the base model's tokenizer has no chat template: set template.chatTemplate")
    return str(own)


def template_hash(template_text: str) -> str:
    return hashlib.sha256(template_text.encode("utf-8")).hexdigest()


def render_chat(
    tokenizer: Any,
    conversation: Conversation,
    chat_template: str | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as text, rendered by the tokenizer's jinja machinery with the template
    in force. Training, evaluation and serving all go through this function."""
    template = resolve_chat_template(tokenizer, chat_template)
    text = tokenizer.apply_chat_template(
        conversation, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return str(text)


def split_for_generation(conversation: Conversation) -> tuple[Conversation, str]:
    """The conversation up to its last assistant turn (the prompt) and that turn (the reference)."""
    if not conversation or conversation[-1]["role"] != "assistant":
        raise ValueError("conversation must end with an assistant message")
    return conversation[:-1], conversation[-1]["content"]


def has_generation_markers(template_text: str) -> bool:
    return "generation %}" in template_text and "endgeneration" in template_text


# ---------------------------------------------------------------------------------------------
# Tokenize with loss only on assistant tokens
# ---------------------------------------------------------------------------------------------


CharSpan = tuple[int, int]


def _assistant_span(full: str, before: str, through: str) -> CharSpan:
    """One assistant turn's span in `full`, from the renderings of the conversation before that turn
    (with a generation prompt) and through it."""
    if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
        raise TemplateError("template does not render a conversation prefix as a prefix of the whole")
    # Whitespace the template puts after the end-of-turn token is layout, not something the
    # model should learn to emit (generation stops at that token).
    return len(before), len(through.rstrip())


def assistant_char_spans(
    tokenizer: Any, conversation: Conversation, template: str
) -> tuple[str, list[CharSpan]]:
    """The rendered text and the character span of every assistant turn in it.

    The span of turn i starts where rendering turns [0, i) with a generation prompt ends and stops
    where rendering turns [0, i] ends (less trailing whitespace), so it holds the answer and the
    template's end-of-turn marker: the model must learn to stop. This needs a template whose rendering of a prefix of
    the conversation is a prefix of the full rendering; TemplateError says when it is not.
    """
    full = render_chat(tokenizer, conversation, template)
    spans: list[CharSpan] = []
    for index, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        try:
            before = render_chat(tokenizer, conversation[:index], template, add_generation_prompt=True)
            # the usual case, a final assistant turn, needs no extra rendering
            last = index == len(conversation) - 1
            through = full if last else render_chat(tokenizer, conversation[: index + 1], template)
        except Exception as err:  # jinja raises whatever the template author chose
            raise TemplateError(f"template cannot render a prefix of the conversation: {err}") from err
        spans.append(_assistant_span(full, before, through))
    return full, spans


def _render_all(
    tokenizer: Any, conversations: list[Conversation], template: str, add_generation_prompt: bool
) -> list[str]:
    """render_chat of each conversation, in one apply_chat_template call (which renders a batch
    one conversation at a time, exactly as it renders one)."""
    if not conversations:
        return []
    rendered = tokenizer.apply_chat_template(
        conversations, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return [str(text) for text in rendered]


def _spans_or_error(
    tokenizer: Any, conversation: Conversation, template: str
) -> tuple[str, list[CharSpan]] | TemplateError:
    try:
        return assistant_char_spans(tokenizer, conversation, template)
    except TemplateError as err:
        return err


def assistant_char_spans_batch(
    tokenizer: Any, conversations: Sequence[Conversation], template: str
) -> list[tuple[str, list[CharSpan]] | TemplateError]:
    """assistant_char_spans of each conversation, or the TemplateError it raises, from three
    apply_chat_template calls in all (the full conversations, the prefixes with a generation
    prompt, the prefixes through a non-final assistant turn) rather than two or more per
    conversation: each call's fixed cost is about a sixth of rendering one conversation."""
    befores: list[Conversation] = []
    throughs: list[Conversation] = []
    for conversation in conversations:
        for index, message in enumerate(conversation):
            if message["role"] == "assistant":
                befores.append(conversation[:index])
                if index < len(conversation) - 1:
                    throughs.append(conversation[: index + 1])
    # Inside a batch apply_chat_template renders an empty conversation it would refuse alone, and
    # one conversation the template cannot render fails the whole call: in both cases render one
    # conversation at a time, which says exactly which fail and why.
    if not (all(conversations) and all(befores)):
        return [_spans_or_error(tokenizer, conversation, template) for conversation in conversations]
    try:
        fulls = _render_all(tokenizer, list(conversations), template, False)
        rendered_befores = iter(_render_all(tokenizer, befores, template, True))
        rendered_throughs = iter(_render_all(tokenizer, throughs, template, False))
    except Exception:  # jinja raises whatever the template author chose
        return [_spans_or_error(tokenizer, conversation, template) for conversation in conversations]
    results: list[tuple[str, list[CharSpan]] | TemplateError] = []
    for conversation, full in zip(conversations, fulls, strict=True):
        spans: list[CharSpan] = []
        error: TemplateError | None = None
        for index, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            # consumed even after an error, to keep the renderings in step with the conversations
            before = next(rendered_befores)
            through = full if index == len(conversation) - 1 else next(rendered_throughs)
            if error is None:
                try:
                    spans.append(_assistant_span(full, before, through))
                except TemplateError as err:
                    error = err
        results.append(error or (full, spans))
    return results


class TokenStarts(Protocol):
    """The character offset where each token starts (never decreasing along the sequence)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> int: ...


class _EncodingStarts:
    """TokenStarts read from a Rust `Encoding` one token at a time: labelling bisects them, so it
    reads a few dozen per conversation, where `encoding.offsets` would build a Python tuple for every
    token (three times what reading the ids costs)."""

    __slots__ = ("_encoding", "_length")

    def __init__(self, encoding: Any, length: int):
        self._encoding = encoding
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int, /) -> int:
        start: int = self._encoding.token_to_chars(index)[0]
        return start


def labels_from_char_spans(
    input_ids: list[int], token_starts: TokenStarts, spans: Sequence[CharSpan]
) -> list[int]:
    """A token carries loss when it starts inside an assistant span. Token starts never decrease
    along the sequence, so each span is one slice found by bisection."""
    labels = [IGNORE_INDEX] * len(input_ids)
    for span_start, span_end in spans:
        first = bisect.bisect_left(token_starts, span_start)
        stop = bisect.bisect_left(token_starts, span_end, first)
        labels[first:stop] = input_ids[first:stop]
    return labels


@contextlib.contextmanager
def _plain_encoding(backend: Any) -> Iterator[Any]:
    """The Rust tokenizer with its padding and truncation switched off, restored on exit.

    Those are mutable state on the backend: any `tokenizer(..., padding=..., truncation=True)` call
    (an evaluation loop, a data collator, a `datasets` .map over the same tokenizer) leaves them set
    until the next `tokenizer(...)` call resets them, and `encode_batch` applies whatever is set. A
    padded encoding has (0, 0) offsets on its pad tokens, so the label spans come out empty and the
    row is rejected ("no assistant tokens"); a truncated one would slip a too-long row through."""
    padding, truncation = backend.padding, backend.truncation
    if padding is not None:
        backend.no_padding()
    if truncation is not None:
        backend.no_truncation()
    try:
        yield backend
    finally:
        if padding is not None:
            backend.enable_padding(**padding)
        if truncation is not None:
            backend.enable_truncation(**truncation)


def _rust_encodings(backend: Any, texts: list[str]) -> list[Any]:
    with _plain_encoding(backend) as plain:
        encodings: list[Any] = plain.encode_batch(texts, add_special_tokens=False)
    return encodings


def encode_with_offsets(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and character offsets of each text, without added special tokens (templates
    write their own), never padded or truncated (too-long rows are rejected, not cut). Goes
    straight to the Rust tokenizer when there is one: the same encoding as tokenizer(...) gives,
    without building a BatchEncoding (a third of the cost here)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [(encoding.ids, encoding.offsets) for encoding in _rust_encodings(backend, texts)]
    encoded = tokenizer(
        texts, add_special_tokens=False, return_offsets_mapping=True, padding=False, truncation=False
    )
    return [
        (list(ids), list(offsets))
        for ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]


def encode_with_token_starts(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], TokenStarts]]:
    """encode_with_offsets, with only where each token starts (all that labelling needs), read
    lazily from the Rust encoding when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encoded: list[tuple[list[int], TokenStarts]] = []
        for encoding in _rust_encodings(backend, texts):
            ids = encoding.ids
            encoded.append((ids, _EncodingStarts(encoding, len(ids))))
        return encoded
    return [
        (ids, [start for start, _end in offsets]) for ids, offsets in encode_with_offsets(tokenizer, texts)
    ]


def _tokenize_with_generation_markers(
    tokenizer: Any, conversation: Conversation, template: str
) -> TokenizedExample:
    """For templates that are not prefix-stable: their {% generation %} markers say which tokens
    are the assistant's."""
    encoded = tokenizer.apply_chat_template(
        conversation,
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    input_ids = list(encoded["input_ids"])
    mask = list(encoded["assistant_masks"])
    return TokenizedExample(
        input_ids, [tid if m else IGNORE_INDEX for tid, m in zip(input_ids, mask, strict=True)]
    )


def tokenize_conversations(
    conversations: Sequence[SourcedConversation],
    tokenizer: Any,
    chat_template: str | None = None,
    max_seq_length: int | None = None,
    batch_size: int = 1024,
) -> tuple[list[TokenizedExample], list[InvalidRow]]:
    """Tokenized examples (labels only on assistant tokens, every assistant turn of a multi-turn
    conversation included) and the rows rejected here: too long, or nothing left to learn."""
    template = resolve_chat_template(tokenizer, chat_template)
    markers = has_generation_markers(template)
    examples: list[TokenizedExample] = []
    invalid: list[InvalidRow] = []

    def accept(conv: SourcedConversation, example: TokenizedExample) -> None:
        if max_seq_length is not None and len(example) > max_seq_length:
            invalid.append(
                InvalidRow(
                    conv.object,
                    conv.line,
                    f"row has {len(example)} tokens, longer than max_seq_length {max_seq_length}",
                )
            )
        elif example.labels.count(IGNORE_INDEX) == len(example.labels):
            invalid.append(InvalidRow(conv.object, conv.line, "no assistant tokens to learn from"))
        else:
            examples.append(example)

    def tokenize_chunk(chunk: Sequence[SourcedConversation]) -> None:
        # Render in Python, then tokenize the whole chunk in one call: the Rust tokenizer
        # batches (and parallelises) far better than one call per row.
        located = assistant_char_spans_batch(tokenizer, [conv.messages for conv in chunk], template)
        rendered: list[tuple[SourcedConversation, str, list[CharSpan]]] = []
        for conv, result in zip(chunk, located, strict=True):
            if isinstance(result, TemplateError):
                if markers:
                    accept(conv, _tokenize_with_generation_markers(tokenizer, conv.messages, template))
                else:
                    invalid.append(InvalidRow(conv.object, conv.line, str(result)))
                continue
            rendered.append((conv, *result))
        if not rendered:
            return
        encodings = encode_with_token_starts(tokenizer, [text for _, text, _ in rendered])
        for (conv, _, spans), (ids, starts) in zip(rendered, encodings, strict=True):
            accept(conv, TokenizedExample(ids, labels_from_char_spans(ids, starts, spans)))

    for start in range(0, len(conversations), batch_size):
        with _collector_paused():
            tokenize_chunk(conversations[start : start + batch_size])
    return examples, invalid


# ---------------------------------------------------------------------------------------------
# Invalid-row policy, mixing, validation split
# ---------------------------------------------------------------------------------------------


def enforce_invalid_rows_policy(
    invalid: Sequence[InvalidRow], total_rows: int, policy: InvalidRowsPolicy
) -> None:
    """fail: any invalid row fails the step. skip: fail only when the invalid fraction is above
    max_fraction (a broken export should not silently train on what is left of it)."""
    if not invalid:
        return
    if policy.policy == "fail":
        raise DataValidationError("invalid row (invalidRows.policy is fail)", invalid[:1], total_rows)
    fraction = len(invalid) / max(total_rows, 1)
    if fraction > policy.max_fraction:
        raise DataValidationError(
            f"{len(invalid)} of {total_rows} rows are invalid ({fraction:.2%}), more than "
            f"invalidRows.maxFraction {policy.max_fraction:.2%}",
            invalid,
            total_rows,
        )


def mix_sources(sources: Sequence[Sequence[T]], weights: Sequence[float], seed: int) -> list[T]:
    """Mix sources so that source i makes up weights[i]/sum(weights) of the result, without
    repeating any row: the mix is as large as the scarcest source (relative to its weight) allows.
    A single source is used whole. The result is shuffled, deterministically for a seed."""
    if len(sources) != len(weights) or not sources:
        raise ValueError("one weight per source, at least one source")
    rng = random.Random(seed)
    total_weight = sum(weights)
    shares = [w / total_weight for w in weights]
    mix_size = min(len(items) / share for items, share in zip(sources, shares, strict=True))
    mixed: list[T] = []
    for items, share in zip(sources, shares, strict=True):
        count = min(len(items), round(mix_size * share))
        chosen = sorted(rng.sample(range(len(items)), count))
        mixed.extend(items[i] for i in chosen)
    rng.shuffle(mixed)
    return mixed


def split_validation(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, validation): a seeded `fraction` of items, at least one when fraction > 0 and
    there are two or more items."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    count = round(len(items) * fraction)
    if fraction > 0 and count == 0 and len(items) >= 2:
        count = 1
    held_out = set(order[:count])
    train = [item for i, item in enumerate(items) if i not in held_out]
    validation = [items[i] for i in sorted(held_out)]
    return train, validation


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: longest item first, each into the fullest bin it still fits in.
    Deterministic: ties are broken by item index, then by bin creation order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), kept sorted
    for item in order:
        length = lengths[item]
        if length > capacity:
            raise ValueError(f"item {item} has length {length} > capacity {capacity}")
        position = bisect.bisect_left(free, (length, -1))
        if position == len(free):
            bins.append([item])
            bisect.insort(free, (capacity - length, len(bins) - 1))
        else:
            space, bin_index = free.pop(position)
            bins[bin_index].append(item)
            bisect.insort(free, (space - length, bin_index))
    return bins


@_collector_paused()
def pack_examples(
    examples: Sequence[TokenizedExample], max_seq_length: int, seed: int | None = None
) -> list[PackedSequence]:
    """Examples packed into sequences of at most max_seq_length tokens (best-fit decreasing).

    position_ids restart at 0 for each example, and the first label of each example is ignored so
    that no token is ever trained to predict the next example. The packs come out in creation
    order, or shuffled when a seed is given."""
    bins = best_fit_decreasing([len(example) for example in examples], max_seq_length)
    # One shared list of positions: slicing it reuses its int objects instead of making new ones.
    positions = list(range(max_seq_length))
    packs = [_concatenate([examples[i] for i in items], positions) for items in bins]
    if seed is not None:
        random.Random(seed).shuffle(packs)
    return packs


def _concatenate(examples: Sequence[TokenizedExample], positions: list[int]) -> PackedSequence:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in examples:
        first = len(labels)
        input_ids += example.input_ids
        labels += example.labels
        if example.labels:
            labels[first] = IGNORE_INDEX
        position_ids += positions[: len(example)]
    return PackedSequence(input_ids, labels, position_ids, [len(example) for example in examples])


def packing_padding_fraction(packs: Sequence[PackedSequence], max_seq_length: int) -> float:
    """Padding share when every pack is padded to max_seq_length (the fixed-shape worst case)."""
    if not packs:
        return 0.0
    return 1.0 - sum(len(pack) for pack in packs) / (len(packs) * max_seq_length)


def dynamic_padding_fraction(lengths: Sequence[int], batch_size: int) -> float:
    """Padding share when consecutive batches are padded to their own longest sequence."""
    padded = sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size])
        for i in range(0, len(lengths), batch_size)
    )
    return 1.0 - sum(lengths) / padded if padded else 0.0


def fixed_padding_fraction(lengths: Sequence[int], max_seq_length: int) -> float:
    """Padding share when every sequence is padded to max_seq_length (padding="max_length")."""
    return 1.0 - sum(lengths) / (len(lengths) * max_seq_length) if lengths else 0.0


# ---------------------------------------------------------------------------------------------
# Collators
# ---------------------------------------------------------------------------------------------


def _round_up(length: int, multiple: int | None) -> int:
    return length if not multiple else -(-length // multiple) * multiple


def block_diagonal_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A (batch, 1, seq, seq) additive mask: 0 where token i may attend token j (same packed
    example, j <= i), the dtype's minimum elsewhere. Examples start where position_ids is 0.

    Additive (rather than boolean) because both the eager and the sdpa attention of transformers
    accept it as given; the minimum (not -inf) keeps a fully masked row from turning into NaN."""
    import torch

    dtype = dtype or torch.float32
    segments = torch.cumsum((position_ids == 0).to(torch.int64), dim=-1)  # (batch, seq)
    same_example = segments.unsqueeze(-1) == segments.unsqueeze(-2)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = same_example & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


@dataclass
class PaddingCollator:
    """Unpacked batches padded (on the right) to the batch's longest example."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        import numpy as np
        import torch

        length = _round_up(max(len(example) for example in batch), self.pad_to_multiple_of)
        # Rows filled in numpy, from lists or arrays alike (prepared data is read as arrays).
        input_ids = np.full((len(batch), length), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(batch), length), IGNORE_INDEX, dtype=np.int64)
        attention_mask = np.zeros((len(batch), length), dtype=np.int64)
        for row, example in enumerate(batch):
            size = len(example)
            input_ids[row, :size] = example.input_ids
            labels[row, :size] = example.labels
            attention_mask[row, :size] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(attention_mask),
        }


@dataclass
class PackedCollator:
    """Batches of packs. Padding after the last example gets position_ids restarting at 0, so it
    forms a segment of its own that no real token attends to.

    attention="4d_mask" (CPU, eager/sdpa): adds a block-diagonal causal `attention_mask`
    (batch x seq x seq; an fp32 mask also works for a bf16 model).
    attention="position_ids": no mask; transformers finds the example boundaries in position_ids
    itself (flash-attention kernels; sdpa and eager too when use_cache=False, as in training),
    which saves the mask's seq^2 memory. Both give the same logits (tests/unit/test_packing.py).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    attention: Literal["4d_mask", "position_ids"] = "4d_mask"
    mask_dtype: Any = None  # torch dtype of the 4D mask; the model's compute dtype (default fp32)

    def __call__(self, batch: Sequence[PackedSequence]) -> dict[str, torch.Tensor]:
        import numpy as np
        import torch

        length = _round_up(max(len(pack) for pack in batch), self.pad_to_multiple_of)
        # numpy fills a row from a list of ints several times faster than torch.tensor reads one.
        input_ids = np.full((len(batch), length), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(batch), length), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.empty((len(batch), length), dtype=np.int64)
        ramp = np.arange(length, dtype=np.int64)
        for row, pack in enumerate(batch):
            size = len(pack)
            input_ids[row, :size] = pack.input_ids
            labels[row, :size] = pack.labels
            position_ids[row, :size] = pack.position_ids
            position_ids[row, size:] = ramp[: length - size]
        result = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
        }
        if self.attention == "4d_mask":
            result["attention_mask"] = block_diagonal_causal_mask(result["position_ids"], self.mask_dtype)
        return result


# ---------------------------------------------------------------------------------------------
# The data step
# ---------------------------------------------------------------------------------------------


@dataclass
class ConversationsRead:
    conversations: list[SourcedConversation]
    invalid: list[InvalidRow]
    rows: int
    etags: dict[str, str]
    formats: dict[str, str]


def read_conversations(
    uri: str,
    reader: ObjectReader,
    fmt: Format | Literal["auto"] = "auto",
    field_mapping: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
) -> ConversationsRead:
    """Every valid row of the object(s) a uri names as a conversation, with the invalid rows,
    the number of rows read, each object's ETag and the format each was read as."""
    refs = reader.list_objects(uri)
    if not refs:
        raise DataValidationError(f"no data objects ({', '.join(DATA_SUFFIXES)}) at {uri}")
    result = ConversationsRead([], [], 0, {}, {})
    for ref in refs:
        rows, unreadable = parse_object_bytes(reader.read_object(ref), ref.uri)
        conversations, invalid, used = rows_to_conversations(rows, fmt, field_mapping, system_prompt)
        result.conversations.extend(conversations)
        result.invalid.extend(unreadable + invalid)
        result.rows += len(rows) + len(unreadable)
        result.etags[ref.uri] = ref.etag
        if used:
            result.formats[ref.uri] = used
    return result


def read_any_format(
    uri: str, reader: ObjectReader, field_mapping: Mapping[str, str], system_prompt: str | None
) -> ConversationsRead:
    """Evaluation sets and probes may come in any supported format (detected per object). The
    training field mapping applies when the set shares the training data's columns; a set in
    canonical columns (a general probe, typically) is read without it."""
    read = read_conversations(uri, reader, "auto", field_mapping, system_prompt)
    if field_mapping and not read.conversations:
        read = read_conversations(uri, reader, "auto", None, system_prompt)
    return read


def load_examples(cfg: TrainConfig, tokenizer: Any, reader: ObjectReader | None = None) -> PreparedData:
    """The data step: read every training source (and the validation source), validate, render
    with the chat template, tokenize with loss on assistant tokens only, apply the invalid-row
    policy, mix sources by weight, split off validation, and pack when training.packing is on.
    Raises DataValidationError with a per-row report when the data is refused."""
    reader = reader or SchemeReader()
    data_cfg, training = cfg.dataset, cfg.training
    template = resolve_chat_template(tokenizer, cfg.template.chat_template)
    stats = DataStats(template_hash=template_hash(template))
    invalid: list[InvalidRow] = []

    audit_cfg, findings, seen = data_cfg.audit, list[AuditFinding](), dict[str, str]()

    def read(uri: str) -> list[SourcedConversation]:
        read = read_conversations(
            uri, reader, data_cfg.format, data_cfg.field_mapping, cfg.template.system_prompt
        )
        stats.rows += read.rows
        stats.etags.update(read.etags)
        stats.formats.update(read.formats)
        invalid.extend(read.invalid)
        # policy "fail" stops at the first bad row, before spending time tokenizing
        if data_cfg.invalid_rows.policy == "fail":
            enforce_invalid_rows_policy(invalid, stats.rows, data_cfg.invalid_rows)
        return read.conversations

    def audit_and_tokenize(
        conversations: list[SourcedConversation], references: set[str]
    ) -> list[TokenizedExample]:
        kept, found, counts = audit_conversations(
            conversations,
            deduplicate=audit_cfg.deduplicate,
            reference_prompts=references,
            pii=audit_cfg.pii,
            seen=seen,
            system_prompt=cfg.template.system_prompt,
        )
        findings.extend(found)
        stats.duplicates += counts.duplicates
        stats.contaminated += counts.contaminated
        stats.pii_rows += counts.pii_rows
        examples, too_long = tokenize_conversations(kept, tokenizer, template, training.max_seq_length)
        invalid.extend(too_long)
        return examples

    validation_rows = read(data_cfg.validation.uri) if data_cfg.validation.uri else None
    references: set[str] = set()
    if audit_cfg.decontaminate:
        references = reference_prompts(cfg, reader, stats.reference_etags)
        references |= prompt_keys(validation_rows or [])
    per_source = [audit_and_tokenize(read(source.uri), references) for source in data_cfg.train]
    validation_source = audit_and_tokenize(validation_rows, set()) if validation_rows is not None else None
    stats.invalid_rows = len(invalid)
    stats.invalid_samples = invalid[:_MAX_REPORTED_INVALID]
    enforce_invalid_rows_policy(invalid, stats.rows, data_cfg.invalid_rows)
    for source, examples in zip(data_cfg.train, per_source, strict=True):
        if not examples:
            dropped = [f for f in findings if f.object.startswith(source.uri) and f.action == "dropped"]
            why = f" ({len(dropped)} dropped by the audits, see the audit report)" if dropped else ""
            raise DataValidationError(
                f"training source {source.uri} has no valid rows{why}", invalid, stats.rows, findings
            )

    mixed = mix_sources(per_source, [source.weight for source in data_cfg.train], training.seed)
    if validation_source is not None:
        train, validation = mixed, validation_source
    else:
        train, validation = split_validation(mixed, data_cfg.validation.fraction, training.seed)

    packed = pack_examples(train, training.max_seq_length, seed=training.seed) if training.packing else None
    stats.train_examples, stats.validation_examples = len(train), len(validation)
    stats.tokens = sum(len(example) for example in train)
    stats.target_tokens = sum(sum(1 for label in ex.labels if label != IGNORE_INDEX) for ex in train)
    if packed is not None:
        stats.padding_fraction = packing_padding_fraction(packed, training.max_seq_length)
    else:
        stats.padding_fraction = dynamic_padding_fraction(
            [len(ex) for ex in train], training.batch_size_per_device
        )
    return PreparedData(train, validation, packed, template, stats, invalid, findings)


def reference_prompts(cfg: TrainConfig, reader: ObjectReader, etags: dict[str, str]) -> set[str]:
    """The prompts evaluation will ask (evaluation sets and the general probe, read in any format,
    as evaluation reads them), for decontamination; their ETags go into `etags`."""
    uris = [d.uri for d in cfg.evaluation.datasets]
    if cfg.evaluation.general_probe is not None:
        uris.append(cfg.evaluation.general_probe.uri)
    prompts: set[str] = set()
    for uri in uris:
        read = read_any_format(uri, reader, cfg.dataset.field_mapping, cfg.template.system_prompt)
        etags.update(read.etags)
        prompts |= prompt_keys(read.conversations)
    return prompts


def read_object_bytes(uri: str, reader: ObjectReader | None = None) -> bytes:
    """All of one object's bytes (small files: an evaluation schema, a report)."""
    reader = reader or SchemeReader()
    refs = reader.list_objects(uri)
    if len(refs) != 1:
        raise FileNotFoundError(f"expected one object at {uri}, found {len(refs)}")
    return reader.read_object(refs[0])


__all__ = [
    "IGNORE_INDEX",
    "ConversationsRead",
    "DataStats",
    "DataValidationError",
    "InvalidRow",
    "LocalObjectReader",
    "MemoryObjectReader",
    "ObjectReader",
    "PackedCollator",
    "PackedSequence",
    "PaddingCollator",
    "PreparedData",
    "S3ObjectReader",
    "SchemeReader",
    "TemplateError",
    "TokenizedExample",
    "block_diagonal_causal_mask",
    "detect_format",
    "load_examples",
    "pack_examples",
    "parse_object_bytes",
    "read_any_format",
    "read_conversations",
    "render_chat",
    "resolve_chat_template",
    "rows_to_conversations",
    "s3_client_from_env",
    "split_for_generation",
    "template_hash",
    "tokenize_conversations",
]
