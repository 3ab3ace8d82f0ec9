"""Sizing the quickstart's pre-trained tiny base: how many steps until a random-init tiny Llama can
copy and normalize spans of its input (the abilities extraction needs), on this machine's CPUs.

A research bench, not the product's pre-training: a plain torch loop in one process (2 threads), so
that a stage's cost is the model's alone. Stages run one after the other on one model:

    copy     instructune_jobs.base_corpus.copy_stage_rows: copying only (digits, names, dates)
    corpus   instructune_jobs.base_corpus.base_corpus_rows: narratives with questions and fact
             lists, copying, date/money normal forms, small general tasks

After each stage it greedily answers held-out rows of each kind and prints the exact-match rate per
kind (org, person, city, amount, date questions; copy; conversion), the steps, tokens and seconds.

    python bench/tiny_base_pretrain.py [--stages copy:1000:3e-3,corpus:600:2e-3] [--hidden 128 --layers 2]
        [--batch 64 --seq 128] [--lr 3e-3 (stages without their own)] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "jobs")]

from instructune_jobs import base_corpus  # noqa: E402
from instructune_jobs.synthetic import _chatml, build_tokenizer, tokenizer_corpus  # noqa: E402

Rows = list[dict[str, list[dict[str, str]]]]


def encode(tokenizer: Any, rows: Rows, seq: int) -> tuple[Any, Any]:
    """Rows rendered with the chat template, packed into seq-token rows; labels on the assistant's
    tokens only (as the job trains)."""
    import torch

    ids: list[int] = []
    labels: list[int] = []
    for row in rows:
        out = tokenizer.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids += out["input_ids"]
        labels += [t if m else -100 for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True)]
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq]).view(n, seq), torch.tensor(labels[: n * seq]).view(n, seq)


def train_stage(
    model: Any, data: tuple[Any, Any], steps: int, batch: int, lr: float, seed: int
) -> dict[str, Any]:
    """AdamW, 20 warm-up steps, cosine to 10%, gradient clipping at 1."""
    import torch

    inputs, labels = data
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    model.train()
    started, losses = time.monotonic(), []
    for step in range(steps):
        scale = min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        start = (step * batch) % max(1, len(inputs) - batch)
        index = order[start : start + batch]
        loss = model(input_ids=inputs[index], labels=labels[index]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    tail = losses[-20:]
    return {
        "steps": steps,
        "tokens": steps * batch * inputs.shape[1],
        "seconds": round(time.monotonic() - started, 1),
        "final_loss": round(sum(tail) / len(tail), 4),
    }


def _kind(row: dict[str, list[dict[str, str]]]) -> str:
    question = row["messages"][0]["content"]
    for kind, asks in base_corpus._ASK.items():
        if any(ask in question for ask in asks):
            return kind
    return "conversion" if question.startswith("Write ") else "copy"


def held_out_accuracy(model: Any, tokenizer: Any, per_kind: int = 40) -> dict[str, float]:
    """Exact match of greedy answers to the first question of held-out rows, by kind."""
    import torch

    rng = random.Random("tiny-base-held-out")
    makers = [base_corpus._passage_row, base_corpus._copy_row, base_corpus._conversion_row]
    hits: dict[str, list[int]] = {}
    model.eval()
    with torch.no_grad():
        while min((len(v) for v in hits.values()), default=0) < per_kind or len(hits) < 7:
            row = rng.choice(makers)(rng)
            kind = _kind(row)
            if len(hits.get(kind, [])) >= per_kind:
                continue
            prompt = tokenizer.apply_chat_template(
                row["messages"][:1], tokenize=True, add_generation_prompt=True, return_dict=True
            )["input_ids"]
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            answer = tokenizer.decode(out[0][len(prompt) :], skip_special_tokens=True).strip()
            hits.setdefault(kind, []).append(int(answer == row["messages"][1]["content"]))
    return {kind: round(sum(v) / len(v), 3) for kind, v in sorted(hits.items())}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", default="copy:1000:3e-3,corpus:600:2e-3", help="name:steps[:lr],...")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    corpus_rows = base_corpus.base_corpus_rows(60_000, args.seed)

    def tokenizer_text() -> Any:
        yield from tokenizer_corpus(args.seed)
        for row in corpus_rows[:3000]:
            yield _chatml(row["messages"])

    tokenizer = build_tokenizer(tokenizer_text(), 2000, split_digits=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    stage_rows = {
        "copy": lambda: base_corpus.copy_stage_rows(60_000, args.seed),
        "corpus": lambda: corpus_rows,
    }
    machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    for number, stage in enumerate(args.stages.split(",")):
        name, steps, *lr = stage.split(":")
        data = encode(tokenizer, stage_rows[name](), args.seq)
        learning_rate = float(lr[0]) if lr else args.lr
        result = train_stage(model, data, int(steps), args.batch, learning_rate, args.seed + number)
        result["lr"] = learning_rate
        result |= {"stage": name, "accuracy": held_out_accuracy(model, tokenizer), "machine": machine}
        print(json.dumps(result), flush=True)
    if args.out:
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
