"""One chat template for training, evaluation and serving; loss only on assistant tokens."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from instructune_jobs.data.template import (
    render_chat,
    resolve_chat_template,
    split_for_generation,
    template_hash,
)
from instructune_jobs.data.tokenize import encode_with_offsets, tokenize_conversations
from instructune_jobs.data.types import IGNORE_INDEX, SourcedConversation, TemplateError, TokenizedExample
from instructune_jobs.synthetic import CHATML_TEMPLATE

pytestmark = pytest.mark.unit

SINGLE = [
    {"role": "system", "content": "Answer in JSON."},
    {"role": "user", "content": "Extract: Acme Corp. pays $5 on 2024-01-02."},
    {"role": "assistant", "content": '{"party": "Acme Corp.", "amount": 5, "date": "2024-01-02"}'},
]
MULTI = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello, how can I help?"},
    {"role": "user", "content": "Count to three"},
    {"role": "assistant", "content": "one two three"},
]

# Llama-3 style headers (as plain text for this tokenizer), with content trimmed by the template.
LLAMA3_STYLE = (
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Not prefix-stable: the last message is rendered differently from the same message followed by others.
LAST_MARKED = CHATML_TEMPLATE.replace(
    "{{- '<|im_start|>' + message['role'] + '\\n' }}",
    "{{- '<|im_start|>' + message['role'] + ('*' if loop.last else '') + '\\n' }}",
)
LAST_MARKED_NO_GENERATION = LAST_MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def tokenize_one(
    tokenizer: Any,
    conversation: list[dict[str, str]],
    template: str | None = None,
    max_seq_length: int | None = None,
) -> TokenizedExample:
    examples, invalid = tokenize_conversations(
        [SourcedConversation("x", 1, conversation)], tokenizer, template, max_seq_length
    )
    assert invalid == [], invalid
    return examples[0]


def labelled_runs(tokenizer: Any, example: TokenizedExample) -> list[str]:
    """The decoded text of each run of consecutive labelled tokens."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(example.input_ids, example.labels, strict=True):
        labelled = label != IGNORE_INDEX
        if labelled:
            assert label == token  # labels are the tokens themselves (the model shifts them)
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = labelled
    return [tokenizer.decode(run) for run in runs]


def test_render_chat_uses_the_tokenizers_own_template_by_default(tokenizer: Any) -> None:
    assert resolve_chat_template(tokenizer) == tokenizer.chat_template == CHATML_TEMPLATE
    assert render_chat(tokenizer, SINGLE) == tokenizer.apply_chat_template(SINGLE, tokenize=False)
    assert render_chat(tokenizer, SINGLE).startswith("<|im_start|>system\nAnswer in JSON.<|im_end|>\n")


def test_spec_template_overrides_the_tokenizers(tokenizer: Any) -> None:
    assert resolve_chat_template(tokenizer, LLAMA3_STYLE) == LLAMA3_STYLE
    text = render_chat(tokenizer, MULTI[:2], LLAMA3_STYLE, add_generation_prompt=False)
    assert text == (
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello, how can I help?<|eot_id|>"
    )


def test_missing_template_is_an_error_that_says_what_to_set(tokenizer: Any) -> None:
    class NoTemplate:
        chat_template = None

    with pytest.raises(TemplateError, match="chatTemplate"):
        resolve_chat_template(NoTemplate())


def test_template_hash_is_the_sha256_of_the_template_text() -> None:
    assert template_hash(CHATML_TEMPLATE) == hashlib.sha256(CHATML_TEMPLATE.encode()).hexdigest()
    assert template_hash(CHATML_TEMPLATE) != template_hash(LLAMA3_STYLE)


def test_loss_is_only_on_the_assistant_answer_and_its_end_of_turn(tokenizer: Any) -> None:
    example = tokenize_one(tokenizer, SINGLE)
    assert labelled_runs(tokenizer, example) == [SINGLE[-1]["content"] + "<|im_end|>"]
    first_label = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    prompt = tokenizer.decode(example.input_ids[:first_label])
    assert prompt == render_chat(tokenizer, SINGLE[:-1], add_generation_prompt=True)


def test_every_assistant_turn_of_a_multi_turn_conversation_carries_loss(tokenizer: Any) -> None:
    example = tokenize_one(tokenizer, MULTI)
    assert labelled_runs(tokenizer, example) == [
        "Hello, how can I help?<|im_end|>",
        "one two three<|im_end|>",
    ]


def test_masks_follow_a_different_template_family(tokenizer: Any) -> None:
    example = tokenize_one(tokenizer, MULTI, LLAMA3_STYLE)
    assert labelled_runs(tokenizer, example) == [
        "Hello, how can I help?<|eot_id|>",
        "one two three<|eot_id|>",
    ]


def test_prefix_rendering_and_generation_markers_give_the_same_tokens_and_labels(tokenizer: Any) -> None:
    ours = tokenize_one(tokenizer, MULTI)
    encoded = tokenizer.apply_chat_template(
        MULTI, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ours.input_ids == list(encoded["input_ids"])
    assert [label != IGNORE_INDEX for label in ours.labels] == [bool(m) for m in encoded["assistant_masks"]]


def test_template_that_is_not_prefix_stable_falls_back_to_generation_markers(tokenizer: Any) -> None:
    example = tokenize_one(tokenizer, MULTI, LAST_MARKED)
    assert labelled_runs(tokenizer, example) == [
        "Hello, how can I help?<|im_end|>",
        "one two three<|im_end|>",
    ]


def test_template_that_is_not_prefix_stable_and_has_no_markers_rejects_the_row(tokenizer: Any) -> None:
    examples, invalid = tokenize_conversations(
        [SourcedConversation("x.jsonl", 4, MULTI)], tokenizer, LAST_MARKED_NO_GENERATION
    )
    assert examples == []
    assert invalid[0].line == 4 and "prefix" in invalid[0].reason


def test_a_conversation_starting_with_the_assistant_is_handled(tokenizer: Any) -> None:
    conversation = [{"role": "assistant", "content": "I speak first"}]
    # rendering an empty prefix is impossible, so the generation markers locate the answer
    example = tokenize_one(tokenizer, conversation)
    assert labelled_runs(tokenizer, example) == ["I speak first<|im_end|>"]


def test_serving_prompt_is_exactly_the_training_prefix(tokenizer: Any) -> None:
    """What evaluation/serving render for generation is what training saw before the answer."""
    prompt_turns, reference = split_for_generation(SINGLE)
    assert reference == SINGLE[-1]["content"]
    prompt = render_chat(tokenizer, prompt_turns, add_generation_prompt=True)
    full = render_chat(tokenizer, SINGLE)
    assert full.startswith(prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    example = tokenize_one(tokenizer, SINGLE)
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert (
        example.labels[len(prompt_ids) - 1] == IGNORE_INDEX
        and example.labels[len(prompt_ids)] != IGNORE_INDEX
    )


def test_split_for_generation_needs_a_final_assistant_turn() -> None:
    with pytest.raises(ValueError, match="assistant"):
        split_for_generation(MULTI[:1])


def test_special_tokens_are_single_tokens_not_text(tokenizer: Any) -> None:
    example = tokenize_one(tokenizer, SINGLE)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert example.input_ids.count(im_end) == 3
    assert tokenizer.eos_token_id == im_end  # generation stops where the labels end


def test_fast_path_encoding_equals_the_tokenizers_own_call(tokenizer: Any) -> None:
    texts = [render_chat(tokenizer, SINGLE), render_chat(tokenizer, MULTI), "  leading spaces and ünïcödé ✓"]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    expected = [
        (list(ids), [tuple(o) for o in offsets])
        for ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]
    assert [
        (ids, [tuple(o) for o in offsets]) for ids, offsets in encode_with_offsets(tokenizer, texts)
    ] == expected


def test_encoding_ignores_padding_and_truncation_another_caller_left_on(tokenizer: Any) -> None:
    texts = [render_chat(tokenizer, SINGLE), render_chat(tokenizer, MULTI)]
    clean = [(list(ids), list(offsets)) for ids, offsets in encode_with_offsets(tokenizer, texts)]
    tokenizer(texts, add_special_tokens=False, padding="max_length", truncation=True, max_length=16)
    backend = tokenizer.backend_tokenizer
    left = (backend.padding, backend.truncation)
    try:
        assert [(list(ids), list(offsets)) for ids, offsets in encode_with_offsets(tokenizer, texts)] == clean
        assert tokenize_one(tokenizer, SINGLE, max_seq_length=256).input_ids == clean[0][0]
        assert (backend.padding, backend.truncation) == left  # given back as found
    finally:
        backend.no_padding()
        backend.no_truncation()
