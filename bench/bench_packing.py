"""Padding fraction: best-fit-decreasing packing vs padding without packing.

On an alpaca+dolly-like length mix (synthetic rows whose word counts follow those sets' mix,
tokenized with the project's chat template and tokenizer), compare the share of padding tokens:
  packed        packs padded to max_seq_length (the fixed-shape worst case for packing)
  pad_to_max    every example padded to max_seq_length (padding="max_length")
  dynamic       batches of `batch_size` in shuffled order, padded to their longest example

Prints one JSON line.  Run: python bench/bench_packing.py [--rows 20000] [--max-seq-length 2048]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

from machine_facts import machine

from instructune_jobs.data.formats import rows_to_conversations
from instructune_jobs.data.packing import (
    dynamic_padding_fraction,
    fixed_padding_fraction,
    pack_examples,
    packing_padding_fraction,
)
from instructune_jobs.data.tokenize import tokenize_conversations
from instructune_jobs.data.types import LocatedRow, TokenizedExample
from instructune_jobs.synthetic import build_tokenizer, length_mix_rows, tokenizer_corpus


def tokenized_length_mix(
    tokenizer: Any, rows: int, seed: int, max_seq_length: int
) -> tuple[list[TokenizedExample], int]:
    examples: list[TokenizedExample] = []
    too_long = 0
    mix = length_mix_rows(rows, seed)
    for answer_field in ("output", "response"):  # alpaca-shaped and dolly-shaped rows, as two sources
        located = [LocatedRow("mix", i + 1, row) for i, row in enumerate(mix) if answer_field in row]
        conversations, _, _ = rows_to_conversations(located)
        accepted, rejected = tokenize_conversations(conversations, tokenizer, None, max_seq_length)
        examples += accepted
        too_long += len(rejected)
    return examples, too_long


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--max-seq-length", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokenizer = build_tokenizer(tokenizer_corpus(args.seed), vocab_size=2000)
    results = []
    for max_seq_length in args.max_seq_length:
        examples, too_long = tokenized_length_mix(tokenizer, args.rows, args.seed, max_seq_length)
        lengths = [len(example) for example in examples]
        shuffled = lengths[:]
        random.Random(args.seed).shuffle(shuffled)
        started = time.perf_counter()
        packs = pack_examples(examples, max_seq_length)
        pack_seconds = time.perf_counter() - started
        results.append(
            {
                "max_seq_length": max_seq_length,
                "examples": len(examples),
                "rejected_too_long": too_long,
                "tokens": sum(lengths),
                "mean_length": round(sum(lengths) / len(lengths), 1),
                "packs": len(packs),
                "padding_packed": round(packing_padding_fraction(packs, max_seq_length), 5),
                "padding_pad_to_max": round(fixed_padding_fraction(lengths, max_seq_length), 5),
                "padding_dynamic": round(dynamic_padding_fraction(shuffled, args.batch_size), 5),
                "pack_seconds": round(pack_seconds, 4),
            }
        )
    print(
        json.dumps(
            {
                "bench": "packing",
                "rows": args.rows,
                "batch_size": args.batch_size,
                "results": results,
                "machine": machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
