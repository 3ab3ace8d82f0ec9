"""The chat template: one rendering (`render_chat`) for training, evaluation and serving alike.
The template text it resolves is what serving is given, and `template_hash` records which one."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from instructune_jobs.data.types import Conversation, TemplateError


class TemplateMismatchError(RuntimeError):
    """Evaluation or serving would render prompts with another chat template than training did."""


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
