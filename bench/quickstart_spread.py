"""The quickstart's outcome across seeds and CPU math settings: does its worst run clear its gate?

Runs the job of examples/quickstart.yaml (the operator's own spec -> TrainConfig builder, the job's
training and evaluation recipes, a local Ray) on the quickstart's seeded model and data, written to
a local directory instead of MinIO (the job reads file paths through the same code). For each
training seed and each math setting it records the gated metric, the field matches and the final
loss, and ends with the spread and the margin of the worst run over the gate.

Math settings are what another machine may pick on its own: ATen's vector ISA
(ATEN_CPU_CAPABILITY), oneDNN's (DNNL_MAX_CPU_ISA) and the thread count of the workers.

    python bench/quickstart_spread.py [--seeds 7,1,2,3,4] [--settings default,avx2,threads2]
        [--max-steps N] [--learning-rate X] [--train-rows N] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"},
    "threads2": {"OMP_NUM_THREADS": "2"},
}
FIELDS = ("party", "amount", "date")


def seed_locally(data: Path, train_rows: int) -> dict[str, str]:
    """The quickstart's objects (instructune_jobs.quickstart) as local files; returns s3 uri -> path."""
    from instructune_jobs import quickstart
    from instructune_jobs.synthetic import build_tiny_llama, extraction_rows, general_rows, rows_to_bytes

    model = data / "models" / "tiny-llama"
    if not (model / "config.json").exists():
        build_tiny_llama(model)
    rows = {
        quickstart.TRAIN_URI: extraction_rows(train_rows, seed=1, split="train"),
        quickstart.HELDOUT_URI: extraction_rows(quickstart.HELDOUT_ROWS, seed=2, split="heldout"),
        quickstart.GENERAL_URI: general_rows(quickstart.GENERAL_ROWS, seed=3),
        quickstart.PROBE_URI: general_rows(quickstart.PROBE_ROWS, seed=4),
    }
    paths = {quickstart.MODEL_URI: str(model) + "/"}
    for uri, part in rows.items():
        path = data / uri.removeprefix("s3://")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rows_to_bytes(part, uri))
        paths[uri] = str(path)
    return paths


def one_run(work: Path, paths: dict[str, str], seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """One tune's job in a fresh process (so the math settings' environment reaches torch)."""
    from instructune_operator.api import InstructionTuneSpec
    from instructune_operator.builders.train_config import build_train_config

    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec = doc["spec"]
    spec["training"]["seed"] = seed
    spec["training"].update(overrides)
    cfg = build_train_config(InstructionTuneSpec.model_validate(spec), "bench", "quickstart", "bench", 1)
    # The API takes s3:// only; the job reads local paths through the same code.
    raw = json.loads(cfg.to_json())
    raw["checkpointing"]["uri"] = raw["output"]["uri"] = str(work / "artifacts") + "/"
    text = json.dumps(raw)
    for uri, path in paths.items():
        text = text.replace(json.dumps(uri), json.dumps(path))
    assert "s3://" not in text, text
    return {"config": text, "gate": spec["evaluation"]["gate"]}


CHILD = r"""
import json, sys, time, ray
from instructune_jobs.config import TrainConfig
from instructune_jobs.finetune import run_training
from instructune_jobs.evaluate import run_evaluation
cfg = TrainConfig.from_json(sys.stdin.read())
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
t0 = time.monotonic()
outcome = run_training(cfg)
t1 = time.monotonic()
evaluation = run_evaluation(cfg)
print("RESULT " + json.dumps({"final_loss": outcome.final_loss, "train_s": t1 - t0,
      "eval_s": time.monotonic() - t1, "metrics": evaluation["metrics"]}))
"""


def run_child(config_json: str, env: dict[str, str], log: Path) -> dict[str, Any]:
    """The child starts a Ray of its own: its whole process group goes when the bench stops."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=out,
            text=True,
            env={**os.environ, **env},
            start_new_session=True,
        )
        try:
            stdout, _ = proc.communicate(config_json)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"run failed (exit {proc.returncode}); log: {log}")
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return result


def summarize(results: list[dict[str, Any]], gate_metric: str, gate_min: float) -> dict[str, Any]:
    values = [r["metrics"][gate_metric] for r in results]
    out: dict[str, Any] = {
        "runs": len(results),
        gate_metric: {"min": min(values), "median": statistics.median(values), "max": max(values)},
        "gate": gate_min,
        "worst_margin": round(min(values) - gate_min, 4),
    }
    for name in FIELDS:
        key = f"heldout.fieldMatch.{name}"
        got = [r["metrics"].get(key) for r in results if key in r["metrics"]]
        if got:
            out[key] = {"min": min(got), "max": max(got)}
    losses = [r["final_loss"] for r in results if r["final_loss"] is not None]
    out["final_loss"] = {"min": min(losses), "max": max(losses)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="7,1,2,3,4")
    parser.add_argument("--settings", default="default")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--train-rows", type=int, help="default: the quickstart's own")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    # A stopped bench stops its run (run_child's finally) instead of leaving a Ray cluster behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    overrides: dict[str, Any] = {}
    if args.max_steps:
        overrides["maxSteps"] = args.max_steps
    if args.learning_rate:
        overrides["learningRate"] = args.learning_rate

    results = []
    with tempfile.TemporaryDirectory(prefix="quickstart-spread-") as tmp:
        data = Path(tmp) / "data"
        from instructune_jobs.quickstart import TRAIN_ROWS

        train_rows = args.train_rows or TRAIN_ROWS
        paths = seed_locally(data, train_rows)
        for setting in args.settings.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                work = Path(tmp) / f"{setting}-{seed}"
                work.mkdir()
                job = one_run(work, paths, seed, overrides)
                started = time.monotonic()
                result = run_child(job["config"], SETTINGS[setting], work / "log.txt")
                row = {"setting": setting, "seed": seed, "trainRows": train_rows, **overrides, **result}
                row["wall_s"] = round(time.monotonic() - started, 1)
                print(json.dumps(row), flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                results.append(row)
        gate = job["gate"][0]
        summary = summarize(results, gate["metric"], gate["min"])
    summary["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    print(json.dumps({"summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
