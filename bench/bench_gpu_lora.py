"""LoRA training throughput and MFU on one GPU: the instructune recipe vs Hugging Face Trainer.

An 8B-shaped Llama (Llama-3-8B dimensions, random bf16 weights: no hub needed) is tuned with
LoRA r=16 on all linear layers, gradient checkpointing on, bf16 autocast, in one process:

- instructune: the recipe's own pieces (models.apply_method, the DDP engine, AdamW, cosine
  schedule) on best-fit packed sequences of --seq tokens (flash-attention 2 with position_ids
  when flash_attn is installed, else sdpa with the block-diagonal mask);
- hf_trainer: transformers.Trainer + PEFT with dynamic padding per batch (as
  DataCollatorForSeq2Seq pads) (what TRL's SFTTrainer does without packing), on the same examples.

Examples: token sequences with the alpaca/dolly length mix (synthetic.length_mix_rows word counts
x 1.3 tokens/word), the prompt part masked from the loss. Tokens/s counts real tokens only; MFU
is useful model FLOPs (LoRA: 4 x params per token for forward + activation gradients, plus
attention over each example's own context) over the GPU's dense bf16 peak.

Self-checks before timing (the run fails when one does not hold): the loss of the same examples
packed and padded agrees (packing keeps examples apart), losses are finite, and only LoRA weights
train. Prints one JSON document.

    python bench/bench_gpu_lora.py [--steps 20] [--warmup 3] [--seq 4096] [--padded-batch 4]
    python bench/bench_gpu_lora.py --smoke     # tiny shapes, runs on CPU: checks the code paths

Without CUDA (and without --smoke) it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import statistics
import sys
import time
from typing import Any

# Dense bf16 tensor-core peaks (FLOP/s), by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 756e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
}
LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
}
SMOKE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 2000,
    "rope_theta": 10000.0,
}


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, value in PEAK_BF16.items():
        if key in device_name:
            return value
    return None


def make_examples(count: int, seq: int, vocab: int, seed: int) -> list[Any]:
    """TokenizedExamples with the alpaca/dolly length mix; labels only on the response part."""
    from instructune_jobs.data.types import IGNORE_INDEX, TokenizedExample
    from instructune_jobs.synthetic import length_mix_rows

    rng = random.Random(seed)
    examples = []
    for row in length_mix_rows(count, seed=seed):
        prompt_words = sum(len(row.get(k, "").split()) for k in ("instruction", "input", "context"))
        answer_words = sum(len(row.get(k, "").split()) for k in ("output", "response"))
        prompt, answer = 12 + int(prompt_words * 1.3), 2 + int(answer_words * 1.3)  # + template tokens
        total = min(seq, prompt + answer)
        prompt = min(prompt, total - 1)
        ids = [rng.randrange(vocab) for _ in range(total)]
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


def build_config(args: argparse.Namespace) -> Any:
    from instructune_jobs.config import TrainConfig

    return TrainConfig.model_validate(
        {
            "base_model": {"uri": "/dev/null"},
            "dataset": {"train": [{"uri": "/dev/null"}]},
            "method": {
                "type": "lora",
                "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            },
            "training": {
                "max_steps": args.steps + args.warmup,
                "learning_rate": 1e-4,
                "batch_size_per_device": 1,
                "max_seq_length": args.seq,
                "packing": True,
                "precision": "bf16",
                "gradient_checkpointing": True,
                "seed": 0,
            },
            "distributed": {"strategy": "ddp"},
            "resources": {"workers": 1, "gpus_per_worker": 1 if args.device == "cuda" else 0},
        }
    )


def random_llama(shape: dict[str, Any], device: Any, dtype: Any, attn: str, seq: int) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        **shape, max_position_embeddings=max(8192, seq), tie_word_embeddings=False, attn_implementation=attn
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def model_flops_per_token(n_params: int, shape: dict[str, Any], context: float) -> float:
    """LoRA: forward (2N) + activation gradients (2N); the frozen weights get no weight gradients.
    Attention: 4 * layers * hidden * context forward, x3 with its backward (no weights to spare)."""
    return 4 * n_params + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * context


def attention_context(lengths: list[int]) -> float:
    """Token-weighted mean context: each token of an example of length L attends ~L/2 tokens
    (causal); summed as sum(L^2)/2 over tokens."""
    return sum(length * length for length in lengths) / 2 / max(1, sum(lengths))


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def self_check_packing(
    model: Any, examples: list[Any], seq: int, device: Any, attention: str, dtype: Any
) -> dict[str, float]:
    """Loss of the same examples packed vs padded, without training: packing must not leak."""
    import torch

    from instructune_jobs.data.collate import PackedCollator, PaddingCollator
    from instructune_jobs.data.packing import pack_examples

    sample = examples[:8]
    packs = pack_examples(sample, seq)
    packed_collate = PackedCollator(0, 8, attention=attention, mask_dtype=dtype)
    padded_collate = PaddingCollator(0, 8)
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        total_packed = total_padded = 0.0
        count = 0
        for pack in packs:
            batch = {k: v.to(device) for k, v in packed_collate([pack]).items()}
            labels = batch["labels"]
            n = int((labels[:, 1:] != -100).sum())
            total_packed += float(model(**batch).loss) * n
            count += n
        for example in sample:
            batch = {k: v.to(device) for k, v in padded_collate([example]).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total_padded += float(model(**batch).loss) * n
    model.train()
    packed, padded = total_packed / count, total_padded / count
    tolerance = 0.02 if dtype != torch.float32 else 1e-3
    if not (math.isfinite(packed) and abs(packed - padded) / padded < tolerance):
        raise AssertionError(
            f"packed loss {packed:.4f} != padded loss {padded:.4f}: packing leaks across examples"
        )
    return {"packed_loss": round(packed, 4), "padded_loss": round(padded, 4)}


def bench_instructune(
    args: argparse.Namespace,
    shape: dict[str, Any],
    examples: list[Any],
    device: Any,
    dtype: Any,
    peak: float | None,
) -> dict[str, Any]:
    import torch

    from instructune_jobs.data.collate import PackedCollator
    from instructune_jobs.data.packing import pack_examples
    from instructune_jobs.engines import DDPEngine
    from instructune_jobs.finetune import StepPlan
    from instructune_jobs.models import apply_method, attention_implementation

    cfg = build_config(args)
    attn = attention_implementation(device)
    attention = "position_ids" if attn == "flash_attention_2" else "4d_mask"
    model = random_llama(shape, device, dtype, attn, args.seq)
    n_params = sum(p.numel() for p in model.parameters())
    checks = self_check_packing(model, examples, args.seq, device, attention, dtype)
    model = apply_method(cfg, model, device, keep_on_cpu=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable or not all("lora_" in n for n in trainable):
        raise AssertionError(f"only LoRA weights may train; trainable: {trainable[:5]}")

    packs = pack_examples(examples, args.seq, seed=0)
    plan = StepPlan(
        len(packs), 1, args.packed_batch, 1, len(packs) // args.packed_batch, args.steps + args.warmup
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    engine = DDPEngine(cfg, model, optimizer, plan, device, dtype)
    collate = PackedCollator(0, 8, attention=attention, mask_dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, tokens, contexts, losses = [], [], [], []
    for step in range(1, args.steps + args.warmup + 1):
        batch_packs = [packs[i] for i in plan.micro_batch(step, 0, 0, 0)]
        batch = {k: v.to(device, non_blocking=True) for k, v in collate(batch_packs).items()}
        sync(device)
        started = time.perf_counter()
        losses.append(engine.forward_backward(batch, is_last_micro=True))
        engine.optimizer_step()
        sync(device)
        if step > args.warmup:
            times.append(time.perf_counter() - started)
            tokens.append(sum(len(p) for p in batch_packs))
            contexts.extend(length for p in batch_packs for length in p.example_lengths)
    if not all(math.isfinite(loss) for loss in losses):
        raise AssertionError(f"non-finite loss: {losses}")
    result = summarise(times, tokens, attention_context(contexts), n_params, shape, peak)
    result.update(
        {
            "params": n_params,
            "attention": attn,
            "packing": attention,
            "packs_per_step": args.packed_batch,
            "padding_fraction": round(1 - sum(tokens) / (len(times) * args.packed_batch * args.seq), 4),
            "self_check": checks,
            "first_loss": round(losses[0], 4),
            "last_loss": round(losses[-1], 4),
            "peak_memory_gib": peak_memory(device),
        }
    )
    engine.close()
    del engine, model, optimizer
    return result


def bench_hf_trainer(
    args: argparse.Namespace,
    shape: dict[str, Any],
    examples: list[Any],
    device: Any,
    dtype: Any,
    peak: float | None,
) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from instructune_jobs.data.collate import PaddingCollator
    from instructune_jobs.models import attention_implementation

    attn = attention_implementation(device)
    model = random_llama(shape, device, dtype, attn, args.seq)
    n_params = sum(p.numel() for p in model.parameters())
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )

    # Dynamic padding to the batch's longest example (a multiple of 8), labels padded with -100:
    # what DataCollatorForSeq2Seq and TRL's SFTTrainer without packing do.
    pad = PaddingCollator(0, 8)
    dataset = list(examples)
    batch_lengths: list[list[int]] = []
    padded_sizes: list[int] = []

    def collate(features: list[Any]) -> dict[str, Any]:
        batch = pad(features)
        batch_lengths.append([len(f) for f in features])
        padded_sizes.append(int(batch["input_ids"].numel()))
        return batch

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._started = 0.0

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            sync(device)
            self._started = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            sync(device)
            self.times.append(time.perf_counter() - self._started)

    timer = StepTimer()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=os.path.join(args.work_dir, "hf-trainer"),
            max_steps=args.steps + args.warmup,
            per_device_train_batch_size=args.padded_batch,
            learning_rate=1e-4,
            lr_scheduler_type="cosine",
            warmup_steps=0,
            bf16=dtype == torch.bfloat16,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            logging_steps=10**6,
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            seed=0,
            remove_unused_columns=False,
            disable_tqdm=True,
            use_cpu=device.type != "cuda",
        ),
        train_dataset=dataset,  # type: ignore[arg-type]
        data_collator=collate,
        callbacks=[timer],
    )
    output = trainer.train()
    if not math.isfinite(output.training_loss):
        raise AssertionError(f"non-finite Trainer loss {output.training_loss}")
    measured = range(args.warmup, len(timer.times))
    tokens = [sum(batch_lengths[i]) for i in measured]
    contexts = [length for i in measured for length in batch_lengths[i]]
    result = summarise(
        [timer.times[i] for i in measured], tokens, attention_context(contexts), n_params, shape, peak
    )
    result.update(
        {
            "attention": attn,
            "batch": args.padded_batch,
            "padding_fraction": round(1 - sum(tokens) / sum(padded_sizes[i] for i in measured), 4),
            "peak_memory_gib": peak_memory(device),
        }
    )
    del trainer, model
    return result


def summarise(
    times: list[float],
    tokens: list[int],
    context: float,
    n_params: int,
    shape: dict[str, Any],
    peak: float | None,
) -> dict[str, Any]:
    tokens_per_s = sum(tokens) / sum(times)
    flops = model_flops_per_token(n_params, shape, context) * tokens_per_s
    return {
        "tokens_per_s": round(tokens_per_s, 1),
        "step_s_median": round(statistics.median(times), 4),
        "steps_measured": len(times),
        "tokens_per_step": round(statistics.fmean(tokens), 1),
        "model_tflops": round(flops / 1e12, 2),
        "mfu": round(flops / peak, 4) if peak else None,
    }


def peak_memory(device: Any) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def free(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq", type=int, default=4096, help="pack length (and max example length)")
    parser.add_argument("--packed-batch", type=int, default=1, help="packs per step for instructune")
    parser.add_argument("--padded-batch", type=int, default=4, help="examples per step for the Trainer")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--layers", type=int, help="override the layer count (memory or time)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU, when not in the table")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes; CPU allowed (checks the code paths)"
    )
    parser.add_argument("--work-dir", default="/tmp/bench-gpu-lora")
    args = parser.parse_args()

    import torch

    # Libraries print progress to stdout (the Trainer its metrics): keep it for the JSON document.
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    if not torch.cuda.is_available() and not args.smoke:
        print(
            "bench_gpu_lora: no CUDA device here; this benchmark measures one GPU "
            "(run it on a GPU node, or pass --smoke to check the code paths on CPU)",
            file=sys.stderr,
        )
        return 2
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    shape = dict(SMOKE if args.smoke else LLAMA3_8B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    if args.smoke:
        args.seq = min(args.seq, 512)
        args.examples = min(args.examples, 200)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(device_name, args.peak_tflops)

    # The recipe's DDP engine expects a process group; a world of one.
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    examples = make_examples(args.examples, args.seq, shape["vocab_size"], seed=0)
    try:
        ours = bench_instructune(args, shape, examples, device, dtype, peak)
    finally:
        # The Trainer runs single-process; a live process group would make it think otherwise.
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    free(device)
    theirs = bench_hf_trainer(args, shape, examples, device, dtype, peak)

    report = {
        "benchmark": "gpu_lora",
        "device": device_name,
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "model": {**shape, "params": ours["params"]},
        "seq": args.seq,
        "lora_r": 16,
        "gradient_checkpointing": True,
        "smoke": args.smoke,
        "results": {"instructune_packed": ours, "hf_trainer_padded": theirs},
        "speedup_tokens_per_s": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
        "versions": {"torch": torch.__version__},
    }
    json.dump(report, real_stdout, indent=2)
    real_stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
