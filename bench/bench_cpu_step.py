"""CPU training throughput of the instructune recipe vs a plain Hugging Face Trainer.

Same run, same tiny random Llama (built offline), same LoRA settings, same rows (alpaca- and
dolly-shaped, with those sets' length mix), same batch size and threads:

- instructune_packed: the recipe as it runs in production (Ray Train worker, DDP, best-fit
  packing with a block-diagonal mask), its tokens/s read from the run's own metrics.jsonl;
- instructune_padded: the same recipe with packing off (dynamic padding per batch);
- hf_trainer_padded: transformers.Trainer + PEFT with DataCollatorForSeq2Seq (dynamic padding),
  timed by a callback around the same number of steps.

Tokens are real (non-padding) tokens, so packing's gain shows up as throughput. The first
`--warmup` steps are excluded from every measurement. Prints one JSON document.

    python bench/bench_cpu_step.py [--steps 30] [--warmup 5] [--batch 4] [--threads 2] [--seq 1024]

Uses a local Ray instance unless RAY_ADDRESS names a cluster; needs no S3 (local files).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def write_rows(work: Path, rows_count: int) -> list[str]:
    from instructune_jobs.synthetic import length_mix_rows, rows_to_bytes

    rows = length_mix_rows(rows_count, seed=0)
    alpaca, dolly = rows[0::2], rows[1::2]
    uris = []
    for name, part in (("alpaca.jsonl", alpaca), ("dolly.jsonl", dolly)):
        (work / name).write_bytes(rows_to_bytes(part, name))
        uris.append(str(work / name))
    return uris


def make_config(model_dir: Path, data: list[str], root: Path, args: argparse.Namespace, packing: bool) -> Any:
    from instructune_jobs.config import TrainConfig

    return TrainConfig.model_validate(
        {
            "base_model": {"uri": str(model_dir)},
            "dataset": {
                "train": [{"uri": uri} for uri in data],
                "validation": {"fraction": 0.0},
                # Rows longer than --seq are dropped the same way for every contender.
                "invalid_rows": {"policy": "skip", "max_fraction": 0.5},
            },
            "method": {
                "type": "lora",
                "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            },
            "training": {
                "max_steps": args.steps + args.warmup,
                "learning_rate": 2e-4,
                "batch_size_per_device": args.batch,
                "max_seq_length": args.seq,
                "packing": packing,
                "precision": "fp32",
                "gradient_checkpointing": False,
                "seed": 0,
            },
            "distributed": {"strategy": "ddp"},
            "resources": {"workers": 1, "gpus_per_worker": 0, "cpus_per_worker": args.threads},
            "checkpointing": {"uri": str(root), "every_steps": 10**6, "keep_last": 1},
        }
    )


def bench_recipe(cfg: Any, warmup: int) -> dict[str, Any]:
    from instructune_jobs.artifacts import ArtifactLayout
    from instructune_jobs.finetune import run_training

    started = time.monotonic()
    run_training(cfg)
    wall = time.monotonic() - started
    lines = [
        json.loads(line) for line in Path(ArtifactLayout.for_config(cfg).metrics).read_text().splitlines()
    ]
    measured = lines[warmup:]
    # Each line's tokens_per_s is that step's real tokens over its wall time (collation included;
    # the Trainer's callback timing below excludes its data loading, which favours the Trainer).
    rates = [line["tokens_per_s"] for line in measured]
    return {
        "tokens_per_s": round(statistics.fmean(rates), 1),
        "tokens_per_s_median": round(statistics.median(rates), 1),
        "steps_measured": len(measured),
        "final_loss": measured[-1]["loss"],
        "wall_s_including_ray_startup": round(wall, 1),
    }


def bench_hf_trainer(cfg: Any, model_dir: Path, warmup: int, threads: int, out_dir: Path) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from instructune_jobs.data import IGNORE_INDEX, load_examples

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples(
        cfg.model_copy(update={"training": cfg.training.model_copy(update={"packing": False})}), tokenizer
    ).train
    dataset = [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in examples]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    lora = cfg.method.lora
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    token_counts: list[int] = []

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        token_counts.append(sum(len(f["input_ids"]) for f in features))
        return pad(features)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.starts.append(time.perf_counter())

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.ends.append(time.perf_counter())

    timer = StepTimer()
    training = cfg.training
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out_dir),
            max_steps=training.max_steps,
            per_device_train_batch_size=training.batch_size_per_device,
            learning_rate=training.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=1,
            logging_steps=10**6,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            seed=training.seed,
            remove_unused_columns=False,
            disable_tqdm=True,
        ),
        train_dataset=dataset,  # type: ignore[arg-type]
        data_collator=collate,
        callbacks=[timer],
    )
    trainer.train()
    # The data loader may prefetch; batch i is consumed by step i.
    rates = [token_counts[i] / (timer.ends[i] - timer.starts[i]) for i in range(warmup, len(timer.ends))]
    return {
        "tokens_per_s": round(statistics.fmean(rates), 1),
        "tokens_per_s_median": round(statistics.median(rates), 1),
        "steps_measured": len(rates),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="measured steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the measurement")
    parser.add_argument("--batch", type=int, default=4, help="sequences (packs) per step")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seq", type=int, default=1024, help="max sequence length (pack size)")
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    import ray

    from instructune_jobs.synthetic import build_tiny_llama

    with tempfile.TemporaryDirectory(prefix="bench-cpu-step-") as tmp:
        work = Path(tmp)
        model_dir = build_tiny_llama(
            work / "model",
            hidden=args.hidden,
            layers=args.layers,
            heads=max(1, args.hidden // 64),
            max_position_embeddings=max(2048, args.seq),
        )
        data = write_rows(work, args.rows)
        if not ray.is_initialized():
            ray.init(
                address=os.environ.get("RAY_ADDRESS") or None,
                num_cpus=None if os.environ.get("RAY_ADDRESS") else max(args.threads, 1),
                log_to_driver=False,
            )
        results = {
            "instructune_packed": bench_recipe(
                make_config(model_dir, data, work / "packed", args, True), args.warmup
            ),
            "instructune_padded": bench_recipe(
                make_config(model_dir, data, work / "padded", args, False), args.warmup
            ),
        }
        ray.shutdown()
        results["hf_trainer_padded"] = bench_hf_trainer(
            make_config(model_dir, data, work / "hf", args, False),
            model_dir,
            args.warmup,
            args.threads,
            work / "hf-out",
        )
    hf = results["hf_trainer_padded"]["tokens_per_s"]
    report = {
        "benchmark": "cpu_step",
        "model": {"hidden": args.hidden, "layers": args.layers, "lora_r": 16},
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "results": results,
        "speedup_vs_hf_trainer": {name: round(r["tokens_per_s"] / hf, 3) for name, r in results.items()},
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
