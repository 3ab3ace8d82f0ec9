"""Fixtures shared by the data-pipeline unit tests: one tiny tokenizer/model per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny Llama with a locally trained tokenizer (built once, ~4 s)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from instructune_jobs.synthetic import build_tiny_llama

    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama"), hidden=64, layers=2, heads=4, vocab_size=1200
    )


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
