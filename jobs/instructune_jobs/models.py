"""The model side shared by training, evaluation and serving: tokenizer, model loading, the
tuning method (LoRA, QLoRA, full) and the compute dtype."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        # Padding is masked out everywhere; any id works, eos is the conventional choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
