"""Conversations -> tokens, with loss (labels) on assistant tokens only."""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from instructune_jobs.data.collector import collector_paused
from instructune_jobs.data.template import (
    CharSpan,
    assistant_char_spans_batch,
    has_generation_markers,
    resolve_chat_template,
)
from instructune_jobs.data.types import (
    IGNORE_INDEX,
    Conversation,
    InvalidRow,
    SourcedConversation,
    TemplateError,
    TokenizedExample,
    too_long_reason,
)


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
            invalid.append(InvalidRow(conv.object, conv.line, too_long_reason(len(example), max_seq_length)))
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
        with collector_paused():
            tokenize_chunk(conversations[start : start + batch_size])
    return examples, invalid
