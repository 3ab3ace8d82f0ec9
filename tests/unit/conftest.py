"""Shared by the unit tests: one tiny tokenizer/model per session, and the generators' drift checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def generated_files_drift(generator: str) -> str:
    """Runs `hack/<generator> --check`: "" when the committed files match what it generates, else
    what it says (it names the stale file)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "hack" / generator), "--check"], capture_output=True, text=True
    )
    return "" if result.returncode == 0 else result.stderr or result.stdout or f"exit {result.returncode}"


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
