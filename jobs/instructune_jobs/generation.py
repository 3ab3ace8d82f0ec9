"""Greedy, batched generation from rendered prompts: evaluation scores it and serving answers
with it, so both stop where the template's assistant turn ends."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_BATCH_SIZE = 16


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """eos of the tokenizer plus whatever the model's generation config stops on (e.g. Llama 3's
    <|eot_id|>), so that generation ends where the template's assistant turn ends."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in ([configured] if isinstance(configured, int) else list(configured or [])) + [
        tokenizer.eos_token_id
    ]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int  # new tokens before the stop token
    stopped: bool  # ended with a stop token; False: cut off at max_new_tokens


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[Generation]:
    """Greedy continuations of the rendered prompts, in input order.

    Left padding keeps every prompt's last token at the end of the row, where generation
    continues; prompts are grouped by length so that little padding is needed."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    stop_ids = stop_token_ids(model, tokenizer)
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[Generation] = [Generation("", 0, False)] * len(prompts)
    with torch.inference_mode():
        for chunk in batches(order, batch_size):
            width = max(len(encoded[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, index in enumerate(chunk):
                ids = encoded[index]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )
            for row, index in enumerate(chunk):
                new_tokens = generated[row, width:].tolist()
                # Cut at the first stop token: rows that stopped early are padded after it.
                stop = next((pos for pos, token in enumerate(new_tokens) if token in stop_ids), None)
                kept = new_tokens if stop is None else new_tokens[:stop]
                outputs[index] = Generation(
                    tokenizer.decode(kept, skip_special_tokens=True), len(kept), stop is not None
                )
    return outputs
