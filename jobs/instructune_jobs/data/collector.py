"""Python's cycle collector paused over the data step's allocation-heavy loops."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
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
