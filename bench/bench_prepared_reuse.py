"""What a retried or resumed attempt spends on data: reading the prepared data vs preparing it again.

Before prepare.py every training rank ran the whole data step (parse, validate, render, tokenize,
pack) at the start of every attempt. Now one Ray task runs it once per configuration and writes
`<root>/data/prepared-<key>.npz`; a later attempt (a retry, a resume after suspension) finds it
and every rank only reads it. Both sides here use the same rows, tokenizer and settings, on a
local root (no network), in alternation --repeat times; each side's fastest run is kept.

  prepare   prepare_data on an empty root: the data step + writing the file
  reuse     prepare_data finding the file (the driver) + read_prepared (what each rank does)

Prints one JSON line. Run: python bench/bench_prepared_reuse.py [--rows 20000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_data_pipeline import mix_objects
from machine_facts import machine

from instructune_jobs.artifacts import ArtifactLayout
from instructune_jobs.config import TrainConfig
from instructune_jobs.prepare import prepare_data, read_prepared
from instructune_jobs.storage import MemoryObjectReader, Storage
from instructune_jobs.synthetic import build_tokenizer, tokenizer_corpus


def timed(run: Any) -> tuple[Any, float, float]:
    started, cpu_started = time.perf_counter(), time.process_time()
    result = run()
    return result, time.perf_counter() - started, time.process_time() - cpu_started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    objects = {f"s3://data/{name}": body for name, body in mix_objects(args.rows, seed=0).items()}
    reader, storage = MemoryObjectReader(objects), Storage()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "model")
        build_tokenizer(tokenizer_corpus(0), vocab_size=2000).save_pretrained(model_dir)
        cfg = TrainConfig.model_validate(
            {
                "base_model": {"uri": str(model_dir)},
                "dataset": {
                    "train": [{"uri": uri} for uri in objects],
                    "validation": {"fraction": 0.0},
                    "invalid_rows": {"policy": "skip", "max_fraction": 0.01},
                },
                "training": {"max_seq_length": args.max_seq_length, "packing": True},
            }
        )
        layout = ArtifactLayout(str(Path(tmp, "root")))
        prepare_runs, reuse_runs = [], []
        file_bytes = 0
        for _ in range(args.repeat):
            shutil.rmtree(layout.root, ignore_errors=True)
            prepared, seconds, cpu = timed(lambda: prepare_data(cfg, layout, storage, reader))
            assert not prepared.reused
            prepare_runs.append({"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3)})
            file_bytes = Path(prepared.uri).stat().st_size

            def reuse(expected_uri: str) -> int:
                again = prepare_data(cfg, layout, storage, reader)
                assert again.reused and again.uri == expected_uri
                return len(read_prepared(again.uri, storage).training_items)

            items, seconds, cpu = timed(lambda uri=prepared.uri: reuse(uri))
            reuse_runs.append({"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "items": items})
    best_prepare = min(prepare_runs, key=lambda run: run["seconds"])
    best_reuse = min(reuse_runs, key=lambda run: run["seconds"])
    print(
        json.dumps(
            {
                "bench": "prepared_reuse",
                "rows": args.rows,
                "max_seq_length": args.max_seq_length,
                "prepared_file_bytes": file_bytes,
                "prepare": best_prepare,
                "reuse": best_reuse,
                "speedup": round(best_prepare["seconds"] / best_reuse["seconds"], 1),
                "cpu_speedup": round(
                    min(r["cpu_seconds"] for r in prepare_runs) / min(r["cpu_seconds"] for r in reuse_runs), 1
                ),
                "runs": {"prepare": prepare_runs, "reuse": reuse_runs},
                "machine": machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
