"""The data step's fast paths give exactly what the straightforward code gives: batched rendering,
labels bisected from lazily read token starts, packing and the numpy-built collator."""

from __future__ import annotations

import gc
import random
from typing import Any

import pytest

from instructune_jobs.data.collate import PackedCollator
from instructune_jobs.data.packing import best_fit_decreasing, pack_examples
from instructune_jobs.data.template import (
    assistant_char_spans,
    assistant_char_spans_batch,
    render_chat,
    resolve_chat_template,
)
from instructune_jobs.data.tokenize import (
    encode_with_offsets,
    encode_with_token_starts,
    tokenize_conversations,
)
from instructune_jobs.data.types import (
    IGNORE_INDEX,
    PackedSequence,
    SourcedConversation,
    TemplateError,
    TokenizedExample,
)
from instructune_jobs.synthetic import CHATML_TEMPLATE

pytestmark = pytest.mark.unit

# Llama-3 style headers as plain text, content trimmed by the template (prefix-stable).
LLAMA3_STYLE = (
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Renders every conversation whole, but refuses a prompt of more than two messages: the prefix
# before a second assistant turn cannot be rendered.
SHORT_PROMPTS_ONLY = CHATML_TEMPLATE.replace(
    "{%- if add_generation_prompt %}",
    "{%- if add_generation_prompt and messages | length > 2 %}{{ raise_exception('prompt too long') }}"
    "{%- endif %}{%- if add_generation_prompt %}",
)
# Not prefix-stable, and without generation markers.
LAST_MARKED = (
    CHATML_TEMPLATE.replace(
        "{{- '<|im_start|>' + message['role'] + '\\n' }}",
        "{{- '<|im_start|>' + message['role'] + ('*' if loop.last else '') + '\\n' }}",
    )
    .replace("{% generation %}", "")
    .replace("{% endgeneration %}", "")
)

_WORDS = ["alpha", "beta", "ünïcödé", "naïve", "日本語", "emoji ✓🙂", "tab\there", "x", "  spaced  ", "\n"]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def conversations(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Multi-turn chats with multi-byte characters, and leading, trailing and inner whitespace."""
    rng = random.Random(seed)
    chats = []
    for _ in range(count):
        chat = [{"role": "system", "content": _text(rng, 3)}] if rng.random() < 0.3 else []
        for _turn in range(rng.randint(1, 4)):
            chat.append({"role": "user", "content": _text(rng, rng.randint(0, 12))})
            answer = _text(rng, rng.randint(1, 12))
            chat.append({"role": "assistant", "content": rng.choice(["", " ", "\n"]) + answer})
        chats.append(chat)
    return chats


def per_token_reference(
    tokenizer: Any, conversation: list[dict[str, str]], template: str
) -> TokenizedExample:
    """The labels as the pipeline first computed them: each prefix rendered on its own, every
    token's offsets read, and a token labelled when it starts inside an assistant turn's span."""
    full = render_chat(tokenizer, conversation, template)
    spans = []
    for index, message in enumerate(conversation):
        if message["role"] == "assistant":
            before = render_chat(tokenizer, conversation[:index], template, add_generation_prompt=True)
            through = render_chat(tokenizer, conversation[: index + 1], template)
            spans.append((len(before), len(through.rstrip())))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(start <= offset < end for start, end in spans) else IGNORE_INDEX
        for token, (offset, _end) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return TokenizedExample(ids, labels)


@pytest.mark.parametrize("template", [None, LLAMA3_STYLE], ids=["chatml", "llama3-style"])
def test_labels_equal_the_per_token_reference_on_multi_turn_chats(
    tokenizer: Any, template: str | None
) -> None:
    chats = conversations(120, seed=1)
    sourced = [SourcedConversation("x.jsonl", line, chat) for line, chat in enumerate(chats, start=1)]
    # a small batch size: several chunks, the last one partial
    examples, invalid = tokenize_conversations(sourced, tokenizer, template, batch_size=32)
    assert invalid == []
    text = resolve_chat_template(tokenizer, template)
    assert examples == [per_token_reference(tokenizer, chat, text) for chat in chats]
    assert any(sum(label != IGNORE_INDEX for label in e.labels) > 0 for e in examples)


def test_token_starts_are_the_offsets_starts(tokenizer: Any) -> None:
    texts = [render_chat(tokenizer, chat) for chat in conversations(20, seed=2)] + ["  ünïcödé ✓🙂 x"]
    for (ids, offsets), (lazy_ids, starts) in zip(
        encode_with_offsets(tokenizer, texts), encode_with_token_starts(tokenizer, texts), strict=True
    ):
        assert lazy_ids == ids
        assert [starts[i] for i in range(len(starts))] == [start for start, _end in offsets]


def _outcome(result: tuple[str, list[tuple[int, int]]] | TemplateError) -> object:
    return ("error", str(result)) if isinstance(result, TemplateError) else result


@pytest.mark.parametrize(
    "template", [CHATML_TEMPLATE, LLAMA3_STYLE, SHORT_PROMPTS_ONLY, LAST_MARKED], ids=lambda t: str(len(t))
)
def test_batched_rendering_equals_rendering_one_conversation_at_a_time(tokenizer: Any, template: str) -> None:
    chats = conversations(40, seed=3)
    chats.insert(5, [{"role": "assistant", "content": "I speak first"}])  # an empty prompt
    batched = assistant_char_spans_batch(tokenizer, chats, template)
    one_by_one: list[object] = []
    for chat in chats:
        try:
            one_by_one.append(assistant_char_spans(tokenizer, chat, template))
        except TemplateError as err:
            one_by_one.append(("error", str(err)))
    assert [_outcome(result) for result in batched] == one_by_one
    assert any(isinstance(result, TemplateError) for result in batched)


def test_a_conversation_the_template_cannot_render_still_fails_the_call(tokenizer: Any) -> None:
    failing = CHATML_TEMPLATE.replace("{%- for message", "{{ raise_exception('no') }}{%- for message")
    with pytest.raises(Exception, match="no"):
        assistant_char_spans_batch(tokenizer, conversations(3), failing)


def reference_pack(examples: list[TokenizedExample]) -> PackedSequence:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in examples:
        input_ids.extend(example.input_ids)
        labels.append(IGNORE_INDEX)
        labels.extend(example.labels[1:])
        position_ids.extend(range(len(example)))
    return PackedSequence(input_ids, labels, position_ids, [len(example) for example in examples])


def _examples(count: int, seed: int) -> list[TokenizedExample]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        ids = [rng.randrange(5, 900) for _ in range(rng.randint(1, 200))]
        prompt = rng.randint(0, len(ids) - 1)
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


def test_packs_equal_the_reference_concatenation() -> None:
    examples = _examples(300, seed=4)
    bins = best_fit_decreasing([len(example) for example in examples], 512)
    expected = [reference_pack([examples[i] for i in items]) for items in bins]
    assert pack_examples(examples, 512) == expected


@pytest.mark.parametrize("attention", ["position_ids", "4d_mask"])
@pytest.mark.parametrize("multiple", [None, 64])
def test_collator_equals_building_tensors_from_padded_lists(attention: Any, multiple: int | None) -> None:
    torch = pytest.importorskip("torch")
    packs = pack_examples(_examples(60, seed=5), 400, seed=0)
    collate = PackedCollator(pad_token_id=3, pad_to_multiple_of=multiple, attention=attention)
    for start in range(0, len(packs), 8):
        batch = packs[start : start + 8]
        tensors = collate(batch)
        length = max(len(pack) for pack in batch)
        if multiple:
            length = -(-length // multiple) * multiple
        pads = [length - len(pack) for pack in batch]
        expected = {
            "input_ids": [p.input_ids + [3] * n for p, n in zip(batch, pads, strict=True)],
            "labels": [p.labels + [IGNORE_INDEX] * n for p, n in zip(batch, pads, strict=True)],
            "position_ids": [p.position_ids + list(range(n)) for p, n in zip(batch, pads, strict=True)],
        }
        for name, rows in expected.items():
            assert tensors[name].dtype == torch.long
            assert tensors[name].tolist() == rows
        assert ("attention_mask" in tensors) == (attention == "4d_mask")


def test_the_cycle_collector_is_left_as_found(tokenizer: Any) -> None:
    sourced = [SourcedConversation("x", 1, chat) for chat in conversations(5)]
    assert gc.isenabled()
    tokenize_conversations(sourced, tokenizer, batch_size=2)
    pack_examples(_examples(10, seed=6), 256)
    assert gc.isenabled()
    gc.disable()
    try:
        tokenize_conversations(sourced, tokenizer, batch_size=2)
        assert not gc.isenabled()
    finally:
        gc.enable()
