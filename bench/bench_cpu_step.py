"""CPU training throughput of the instructune recipe vs a plain Hugging Face Trainer.

Same process, same tiny random Llama (built offline), same LoRA settings, same rows (alpaca- and
dolly-shaped, with those sets' length mix), same batch size and threads:

- instructune_packed: the recipe's step as a Ray Train worker runs it (models.build_model,
  the DDP engine on a one-process gloo group, the step plan and collator: best-fit packing with
  a block-diagonal mask). Ray only starts that process, so it is left out here;
- instructune_padded: the same with packing off (dynamic padding per batch);
- hf_trainer_padded: transformers.Trainer + PEFT with DataCollatorForSeq2Seq (dynamic padding),
  timed by a callback around each step (its data loading falls outside that window).

Tokens are real (non-padding) tokens, so packing's gain shows up as throughput. Shared machines
make single measurements noisy, so the contenders run interleaved for --rounds rounds; each
round reports the median tokens/s of its measured steps (after --warmup), and the summary takes
each contender's best round. Prints one JSON document.

    python bench/bench_cpu_step.py [--steps 8] [--warmup 2] [--rounds 3] [--batch 4] [--seq 512] [--threads 2]
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
    uris = []
    for name, part in (("alpaca.jsonl", rows[0::2]), ("dolly.jsonl", rows[1::2])):
        (work / name).write_bytes(rows_to_bytes(part, name))
        uris.append(str(work / name))
    return uris


def make_config(model_dir: Path, data: list[str], args: argparse.Namespace, packing: bool) -> Any:
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
        }
    )


def run_recipe(cfg: Any, tokenizer: Any, data: Any, round_index: int, warmup: int) -> list[float]:
    import torch

    from instructune_jobs.engines import DDPEngine
    from instructune_jobs.finetune import StepPlan, make_collator
    from instructune_jobs.models import build_model

    device = torch.device("cpu")
    items = data.training_items
    plan = StepPlan.build(len(items), 1, cfg)
    model = build_model(cfg, Path(cfg.base_model.uri), device, torch.float32, None)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.training.learning_rate
    )
    engine = DDPEngine(cfg, model, optimizer, plan, device, torch.float32)
    collate = make_collator(cfg, tokenizer, device, torch.float32)
    rates = []
    # Each round starts at another place in the data, the same for every contender.
    first = 1 + round_index * plan.total_steps
    for step in range(first, first + plan.total_steps):
        started = time.perf_counter()
        batch_items = [items[i] for i in plan.micro_batch(step, 0, 0, cfg.training.seed)]
        engine.forward_backward(collate(batch_items), is_last_micro=True)
        engine.optimizer_step()
        rates.append(sum(len(item) for item in batch_items) / (time.perf_counter() - started))
    return rates[warmup:]


def run_hf_trainer(
    cfg: Any, tokenizer: Any, examples: list[Any], round_index: int, warmup: int, out_dir: Path
) -> list[float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from instructune_jobs.data.types import IGNORE_INDEX

    model = AutoModelForCausalLM.from_pretrained(
        cfg.base_model.uri, dtype=torch.float32, attn_implementation="sdpa"
    )
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
            seed=training.seed + round_index,
            remove_unused_columns=False,
            disable_tqdm=True,
        ),
        train_dataset=[{"input_ids": ex.input_ids, "labels": ex.labels} for ex in examples],  # type: ignore[arg-type]
        data_collator=collate,
        callbacks=[timer],
    )
    trainer.train()
    # Without prefetching workers, batch i is collated right before step i.
    return [token_counts[i] / (timer.ends[i] - timer.starts[i]) for i in range(warmup, len(timer.ends))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="measured steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="steps per round excluded from the measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="sequences (packs) per step")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seq", type=int, default=512, help="max sequence length (pack size)")
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from instructune_jobs.data.pipeline import load_examples
    from instructune_jobs.models import load_tokenizer
    from instructune_jobs.synthetic import build_tiny_llama

    torch.set_num_threads(args.threads)
    # Libraries print progress to stdout (the Trainer its metrics, DeepSpeed its accelerator):
    # keep stdout for the one JSON document.
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    # The recipe's DDP engine runs inside a process group, as Ray Train sets one up: a world of one.
    dist.init_process_group("gloo", rank=0, world_size=1)
    rounds: dict[str, list[float]] = {
        "instructune_packed": [],
        "instructune_padded": [],
        "hf_trainer_padded": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-cpu-step-") as tmp:
        work = Path(tmp)
        model_dir = build_tiny_llama(
            work / "model",
            hidden=args.hidden,
            layers=args.layers,
            heads=max(1, args.hidden // 64),
            max_position_embeddings=max(2048, args.seq),
        )
        files = write_rows(work, args.rows)
        packed_cfg, padded_cfg = (make_config(model_dir, files, args, packing) for packing in (True, False))
        tokenizer = load_tokenizer(model_dir)
        packed_data, padded_data = load_examples(packed_cfg, tokenizer), load_examples(padded_cfg, tokenizer)
        for index in range(args.rounds):
            rates = {
                "instructune_packed": run_recipe(packed_cfg, tokenizer, packed_data, index, args.warmup),
                "instructune_padded": run_recipe(padded_cfg, tokenizer, padded_data, index, args.warmup),
                "hf_trainer_padded": run_hf_trainer(
                    padded_cfg, tokenizer, padded_data.train, index, args.warmup, work / "hf"
                ),
            }
            for name, values in rates.items():
                rounds[name].append(round(statistics.median(values), 1))
    dist.destroy_process_group()

    best = {name: max(values) for name, values in rounds.items()}
    report = {
        "benchmark": "cpu_step",
        "model": {"hidden": args.hidden, "layers": args.layers, "lora_r": 16},
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "padding_fraction": {
            "packed": round(packed_data.stats.padding_fraction, 4),
            "padded": round(padded_data.stats.padding_fraction, 4),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "tokens_per_s_rounds": rounds,
        "tokens_per_s_best": best,
        "speedup_vs_hf_trainer": {
            name: round(value / best["hf_trainer_padded"], 3) for name, value in best.items()
        },
    }
    json.dump(report, real_stdout, indent=2)
    real_stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
