"""Tokens/s from JSONL bytes to training batches: our pipeline vs Hugging Face `datasets` `.map`.

Both read the same alpaca-shaped and dolly-shaped JSONL objects (an alpaca+dolly-like length mix)
and render them with the same chat template and tokenizer, in the same process:

  ours      parse bytes -> validate -> render -> tokenize with assistant-only labels -> pack
            (best-fit decreasing) -> PackedCollator batches (position_ids; the GPU path)
  datasets  load_dataset("json") -> .map(batched: apply_chat_template + tokenizer(padding="max_length",
            truncation)) -> torch batches; labels = input_ids (no masking, no validation)

Tokens/s counts real (non-padding) tokens. Prints one JSON line.
Run: python bench/bench_data_pipeline.py [--rows 20000] [--max-seq-length 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from instructune_jobs.data import (
    IGNORE_INDEX,
    PackedCollator,
    PackedSequence,
    pack_examples,
    parse_object_bytes,
    rows_to_conversations,
    tokenize_conversations,
)
from instructune_jobs.synthetic import build_tokenizer, length_mix_rows, rows_to_bytes, tokenizer_corpus


def machine() -> dict[str, Any]:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()}


def mix_objects(rows: int, seed: int) -> dict[str, bytes]:
    mix = length_mix_rows(rows, seed)
    return {
        "alpaca.jsonl": rows_to_bytes([row for row in mix if "output" in row], "alpaca.jsonl"),
        "dolly.jsonl": rows_to_bytes([row for row in mix if "response" in row], "dolly.jsonl"),
    }


def batches(items: list[PackedSequence], batch_size: int) -> Iterator[list[PackedSequence]]:
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def run_ours(objects: dict[str, bytes], tokenizer: Any, max_seq_length: int, batch_size: int) -> dict[str, Any]:
    started = time.perf_counter()
    examples = []
    for name, data in objects.items():
        rows, _unreadable = parse_object_bytes(data, name)
        conversations, _invalid, _ = rows_to_conversations(rows)
        accepted, _too_long = tokenize_conversations(conversations, tokenizer, None, max_seq_length)
        examples += accepted
    packs = pack_examples(examples, max_seq_length, seed=0)
    collate = PackedCollator(tokenizer.pad_token_id, attention="position_ids")
    real_tokens = positions = 0
    for batch in batches(packs, batch_size):
        tensors = collate(batch)
        positions += tensors["input_ids"].numel()
        real_tokens += sum(len(pack) for pack in batch)
    seconds = time.perf_counter() - started
    target = sum(1 for example in examples for label in example.labels if label != IGNORE_INDEX)
    return {"seconds": round(seconds, 3), "tokens": real_tokens, "tokens_per_s": round(real_tokens / seconds),
            "padding_fraction": round(1 - real_tokens / positions, 5), "target_tokens": target}


def to_messages(row: dict[str, str]) -> list[dict[str, str]]:
    extra = row.get("input") or row.get("context") or ""
    user = f"{row['instruction']}\n\n{extra}" if extra else row["instruction"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row.get("output") or row["response"]}]


def run_datasets(objects: dict[str, bytes], tokenizer: Any, max_seq_length: int, batch_size: int) -> dict[str, Any]:
    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in objects.items():
            Path(tmp, name).write_bytes(data)
        started = time.perf_counter()
        real_tokens = positions = 0
        for name in objects:
            dataset = datasets.load_dataset("json", data_files=str(Path(tmp, name)), split="train",
                                            cache_dir=str(Path(tmp, "cache")), keep_in_memory=True)

            def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
                rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
                texts = tokenizer.apply_chat_template([to_messages(row) for row in rows], tokenize=False)
                encoded = tokenizer(texts, add_special_tokens=False, padding="max_length", truncation=True,
                                    max_length=max_seq_length)
                encoded["labels"] = encoded["input_ids"]
                return dict(encoded)

            tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, keep_in_memory=True)
            tokenized.set_format("torch")
            for start in range(0, len(tokenized), batch_size):
                batch = tokenized[start:start + batch_size]
                positions += batch["input_ids"].numel()
                real_tokens += int(batch["attention_mask"].sum())
        seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "tokens": real_tokens, "tokens_per_s": round(real_tokens / seconds),
            "padding_fraction": round(1 - real_tokens / positions, 5), "datasets_version": datasets.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    tokenizer = build_tokenizer(tokenizer_corpus(args.seed), vocab_size=2000)
    objects = mix_objects(args.rows, args.seed)
    result: dict[str, Any] = {"bench": "data_pipeline", "rows": args.rows, "max_seq_length": args.max_seq_length,
                              "batch_size": args.batch_size, "repeat": args.repeat, "jsonl_bytes": sum(map(len, objects.values()))}
    # Alternate the two pipelines and keep each one's fastest run: the machine may be shared.
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for _ in range(args.repeat):
        ours.append(run_ours(objects, tokenizer, args.max_seq_length, args.batch_size))
        with contextlib.suppress(ImportError):  # datasets is an optional peer
            theirs.append(run_datasets(objects, tokenizer, args.max_seq_length, args.batch_size))
    result["ours"] = min(ours, key=lambda run: run["seconds"])
    if theirs:
        result["datasets"] = min(theirs, key=lambda run: run["seconds"])
        result["speedup"] = round(result["ours"]["tokens_per_s"] / result["datasets"]["tokens_per_s"], 2)
    else:
        result["datasets"] = "not installed (pip install datasets==5.2.0)"
    result["machine"] = machine()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
