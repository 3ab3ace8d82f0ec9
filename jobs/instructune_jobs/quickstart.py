"""Seeds S3 with what examples/quickstart.yaml reads: a tiny Llama and the extraction task data.

Used by `make demo` and the end-to-end tests, so both run the exact same quickstart.
"""

from __future__ import annotations

import tempfile
from typing import Any

from instructune_jobs.synthetic import (
    build_tiny_llama,
    extraction_rows,
    general_rows,
    upload_directory,
    upload_rows,
)

MODEL_URI = "s3://models/tiny-llama/"
TRAIN_URI = "s3://datasets/extraction/train.jsonl"
HELDOUT_URI = "s3://datasets/extraction/heldout.jsonl"
GENERAL_URI = "s3://datasets/general/general.jsonl"
PROBE_URI = "s3://datasets/general/probe.jsonl"
TRAIN_ROWS, HELDOUT_ROWS, GENERAL_ROWS, PROBE_ROWS = 6000, 48, 1600, 48


def seed_quickstart(
    client: Any, train_rows: int = TRAIN_ROWS, heldout_rows: int = HELDOUT_ROWS
) -> dict[str, str]:
    """Uploads model and data; returns uri -> ETag of the data objects."""
    with tempfile.TemporaryDirectory() as tmp:
        upload_directory(build_tiny_llama(tmp), MODEL_URI, client)
    return {
        TRAIN_URI: upload_rows(extraction_rows(train_rows, seed=1, split="train"), TRAIN_URI, client),
        HELDOUT_URI: upload_rows(extraction_rows(heldout_rows, seed=2, split="heldout"), HELDOUT_URI, client),
        GENERAL_URI: upload_rows(general_rows(GENERAL_ROWS, seed=3), GENERAL_URI, client),
        PROBE_URI: upload_rows(general_rows(PROBE_ROWS, seed=4), PROBE_URI, client),
    }


def held_out_question() -> dict[str, str]:
    """One held-out extraction prompt (worded unlike any training row) for the demo to ask."""
    return extraction_rows(1, seed=99, split="heldout")[0]
