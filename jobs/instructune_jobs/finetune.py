"""The fine-tuning recipe: LoRA, QLoRA or full fine-tuning of a causal LM on Ray Train.

Read it top to bottom; there is no trainer class hierarchy, only a plain torch loop.

    run_training(cfg)            the driver: refuse a foreign checkpoint, prepare the data once
                                 (prepare.py: a Ray task; refused data stops here), start the
                                 workers, wait
    train_loop_per_worker()      every worker runs:
        1. setup       seed, base model, the prepared data, PEFT, optimizer + schedule, DeepSpeed or DDP,
                       then restore the latest checkpoint if the run was restarted
        2. train       optimizer steps; which examples a step sees is a pure function of
                       (seed, step), so a resumed run continues exactly where it left off
        3. checkpoint  every `every_steps` steps into Ray Train's storage (S3), last K kept
        4. finish      adapter (or model), tokenizer and manifest into <root>/final/; cleanup

Distributed: Ray Train starts one process per device and sets up torch.distributed (gloo on CPU,
nccl on GPU). engines.py: strategy "deepspeed" wraps the model in a DeepSpeed engine (ZeRO 2 or 3,
optional CPU offload), "ddp" in torch DistributedDataParallel. The optimizer is always a torch
AdamW object handed to DeepSpeed: DeepSpeed's own "AdamW" config JIT-compiles FusedAdam (~1 min).

Resuming (checkpointing.py): checkpoints go to `<root>/checkpoints/checkpoint_step_<N>/`. Each rank
uploads its part; after a barrier rank 0 writes instructune_state.json (step, config hash) and
prunes to the last `keep_last`. The driver picks the newest checkpoint with a state file and hands
its URI to every worker, which restores it. The state files are the one record of what exists: Ray
Train's checkpoint snapshot is written after the upload, so a stopped job could leave it behind.
The driver and the worker both refuse a checkpoint written by another configuration.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from instructune_jobs.artifacts import (
    RUN_NAME,
    ArtifactLayout,
    build_lineage_status,
    build_manifest,
    fetch_base_model,
)
from instructune_jobs.checkpointing import (
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from instructune_jobs.config import TrainConfig
from instructune_jobs.contract import ExitCode, PermanentJobError
from instructune_jobs.engines import Engine, build_deepspeed_config, init_deepspeed, wrap_for_distributed
from instructune_jobs.models import (
    attention_implementation,
    build_model,
    load_tokenizer,
    merge_adapter,
    resolve_compute_dtype,
)
from instructune_jobs.prepare import prepare_on_cluster, read_prepared
from instructune_jobs.storage import Storage, ray_storage

log = logging.getLogger("instructune.finetune")


class PreemptedError(RuntimeError):
    """A node of the attempt was reclaimed: the run resumes from its latest checkpoint."""


class UnsupportedSetupError(PermanentJobError, ValueError):
    """The configuration asks for something this machine or combination cannot do."""

    exit_code = ExitCode.BAD_CONFIG


# =============================================================================================
# Driver
# =============================================================================================


@dataclass(frozen=True)
class TrainingOutcome:
    root: str
    steps: int
    final_loss: float | None
    resumed_from_step: int | None
    manifest: dict[str, Any]
    seconds: float


def check_supported(cfg: TrainConfig, cuda_available: bool) -> None:
    """Fail before any worker starts when the combination cannot run."""
    if cfg.method.type == "qlora" and (cfg.resources.gpus_per_worker == 0 or not cuda_available):
        raise UnsupportedSetupError(
            "qlora needs CUDA GPUs (bitsandbytes 4-bit kernels): set resources.gpusPerWorker > 0 on a GPU "
            "pool, or use method lora/full on CPU"
        )
    if cfg.method.type == "qlora" and cuda_available and importlib.util.find_spec("bitsandbytes") is None:
        raise UnsupportedSetupError("qlora needs the bitsandbytes package in the training image")
    if (
        cfg.distributed.strategy == "deepspeed"
        and cfg.distributed.offload == "all"
        and cfg.distributed.zero_stage != 3
    ):
        raise UnsupportedSetupError("offload 'all' (parameters too) needs DeepSpeed zeroStage 3")


def run_training(
    cfg: TrainConfig,
    *,
    ray_address: str | None = None,
    local_root: str | None = None,
    storage: Storage | None = None,
) -> TrainingOutcome:
    """Train on the Ray cluster (connecting to ray_address or the ambient one) and return once the
    final artifacts are written. Raises ConfigMismatchError when the root holds another run,
    InvalidDataError (prepare.py) when the data is refused."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import PreemptionError

    started = time.monotonic()
    storage = storage or Storage()
    layout = ArtifactLayout.for_config(cfg, fallback_root=local_root)
    use_gpu = cfg.resources.gpus_per_worker > 0
    # The driver may run on a CPU-only head node: GPUs are the workers' concern.
    check_supported(cfg, cuda_available=use_gpu)
    resume = latest_checkpoint(layout, storage, cfg.config_hash())
    if resume:
        log.info("resuming from step %d (%s)", resume.step, resume.uri)

    if not ray.is_initialized():
        ray.init(address=ray_address or ray_address_from_env(), log_to_driver=True)
    # Tokenized once per attempt (and reused by the next one), before the workers take their
    # devices: refused data fails here, with its row report, not N times over on the workers.
    prepared = prepare_on_cluster(cfg, layout)
    storage_path, storage_filesystem = ray_storage(layout.root)
    gpus = cfg.resources.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config_json": cfg.to_json(),
            "root": layout.root,
            "attempt": uuid.uuid4().hex[:8],
            "resume_uri": resume.uri if resume else None,
            "prepared_uri": prepared.uri,
        },
        # One Ray Train worker per device; a node with 8 GPUs runs 8 workers.
        scaling_config=ScalingConfig(
            num_workers=cfg.world_size,
            use_gpu=use_gpu,
            resources_per_worker={
                "CPU": cfg.resources.cpus_per_worker / max(1, gpus),
                **({"GPU": 1} if use_gpu else {}),
            },
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=RUN_NAME,  # Ray's run files sit beside the checkpoints: one folder per tune
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            # A failed worker fails the attempt; the operator retries it from the latest checkpoint.
            # Retries belong to the operator (backoffLimit, from the latest checkpoint): fail at once,
            # also when the worker group cannot start (Ray's default retries that forever), and
            # when a node is preempted (Ray's default restarts the group in the job, from the
            # checkpoint this attempt started from, not the latest one, and out of the status's sight).
            failure_config=FailureConfig(  # type: ignore[call-arg]  # Train V2
                max_failures=0, controller_failure_limit=0, max_preemption_failures=0
            ),
        ),
    )
    try:
        trainer.fit()
    except PreemptionError as err:
        raise PreemptedError(str(err)) from err
    manifest = json.loads(storage.read_bytes(layout.manifest) or b"{}")
    training = manifest.get("training", {})
    return TrainingOutcome(
        root=layout.root,
        steps=int(training.get("steps", 0)),
        final_loss=training.get("finalLoss"),
        resumed_from_step=resume.step if resume else None,
        manifest=manifest,
        seconds=time.monotonic() - started,
    )


def ray_address_from_env() -> str | None:
    """Inside a Ray job RAY_ADDRESS is the cluster's GCS; the local stack's env gives the
    dashboard URL there (for the Jobs API) and the GCS in INSTRUCTUNE_RAY_GCS_ADDRESS."""
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        return os.environ.get("INSTRUCTUNE_RAY_GCS_ADDRESS") or None
    return address or None


# =============================================================================================
# Worker: the recipe
# =============================================================================================


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import torch

    cfg = TrainConfig.from_json(loop_config["config_json"])
    layout = ArtifactLayout(loop_config["root"])
    context = ray.train.get_context()
    rank, world_size, local_rank = (
        context.get_world_rank(),
        context.get_world_size(),
        context.get_local_rank(),
    )
    is_rank0 = rank == 0
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"
    )
    storage = Storage()

    # ----------------------------------------------------------------------------- 1. setup
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Both workers of a 2-core machine would otherwise each start one thread per core.
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    check_supported(cfg, cuda_available=device.type == "cuda")
    compute_dtype = resolve_compute_dtype(cfg.training.precision, device)
    seed_everything(cfg.training.seed)

    base = fetch_base_model(cfg.base_model, storage)
    tokenizer = load_tokenizer(base.path)
    data = read_prepared(loop_config["prepared_uri"], storage)
    items = data.training_items
    plan = StepPlan.build(len(items), world_size, cfg)
    ds_config = None
    if cfg.distributed.strategy == "deepspeed":
        init_deepspeed(device)
        ds_config = build_deepspeed_config(cfg, world_size, compute_dtype)
    model = build_model(cfg, base.path, device, compute_dtype, ds_config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=cfg.training.learning_rate,
        weight_decay=cfg.training.weight_decay,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    engine = wrap_for_distributed(cfg, model, optimizer, plan, ds_config, device)
    collate = make_collator(cfg, tokenizer, device, compute_dtype)

    restored = restore_checkpoint(cfg, engine, loop_config.get("resume_uri"), storage)
    start_step = restored.step if restored else 0
    reporter = (
        make_reporter(cfg, layout, storage, plan, loop_config["attempt"], start_step, data, base)
        if is_rank0
        else None
    )
    if is_rank0:
        log.info(
            "training %s: %d items, %d steps (%d per epoch), world size %d, %s%s",
            cfg.method.type,
            len(items),
            plan.total_steps,
            plan.steps_per_epoch,
            world_size,
            cfg.distributed.strategy,
            f", resumed at step {start_step}" if restored else "",
        )

    # ----------------------------------------------------------------------------- 2. train
    last_loss = restored.loss if restored and restored.loss is not None else math.nan
    for step in range(start_step + 1, plan.total_steps + 1):
        step_started = time.monotonic()
        learning_rate = engine.learning_rate()  # the rate this step applies (read before it advances)
        # Dropout noise is a function of (seed, step, rank) too: a resumed step draws the same.
        torch.manual_seed(cfg.training.seed * 1_000_003 + step * 1009 + rank)
        loss_sum, tokens = 0.0, 0
        for micro in range(plan.accumulation):
            batch_items = [items[i] for i in plan.micro_batch(step, micro, rank, cfg.training.seed)]
            batch = collate(batch_items)
            loss = engine.forward_backward(batch, is_last_micro=micro == plan.accumulation - 1)
            loss_sum += loss
            tokens += sum(len(item) for item in batch_items)
        engine.optimizer_step()
        last_loss, global_tokens = all_reduce_step_stats(
            loss_sum / plan.accumulation, tokens, device, world_size
        )
        if reporter is not None:
            reporter.step(
                step,
                plan.epoch_at(step),
                last_loss,
                learning_rate,
                global_tokens / max(time.monotonic() - step_started, 1e-9),
            )

        # ------------------------------------------------------------------------ 3. checkpoint
        if step % cfg.checkpointing.every_steps == 0 or step == plan.total_steps:
            save_checkpoint(cfg, engine, layout, storage, step, plan.epoch_at(step), last_loss, reporter)

    # ----------------------------------------------------------------------------- 4. finish
    if start_step >= plan.total_steps and is_rank0:
        log.info("all %d steps were done before this attempt: exporting only", plan.total_steps)
    outputs = export_final_artifacts(
        cfg, engine, tokenizer, data.chat_template, base.path, layout, storage, compute_dtype, is_rank0
    )
    if is_rank0 and reporter is not None:
        final_loss = last_loss if math.isfinite(last_loss) else None
        manifest = build_manifest(
            cfg,
            base=base,
            data_stats=data.stats.to_status()
            | {
                "trainExamples": data.stats.train_examples,
                "validationExamples": data.stats.validation_examples,
                "trainItems": len(items),
                "preparedUri": loop_config["prepared_uri"],
            },
            data_etags=data.stats.etags,
            template_hash=data.stats.template_hash,
            outputs=outputs,
            training={
                "steps": plan.total_steps,
                "finalLoss": final_loss,
                "worldSize": world_size,
                "resumedFromStep": start_step if restored else None,
                "computeDtype": str(compute_dtype),
            },
        )
        body = json.dumps(manifest, indent=2).encode()
        storage.write_bytes(layout.manifest, body, "application/json")
        storage.write_bytes(layout.final_manifest, body, "application/json")
        reporter.finish()
    engine.close()


# =============================================================================================
# Setup helpers and the step plan
# =============================================================================================


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass(frozen=True)
class StepPlan:
    """Which items each optimizer step sees. Every epoch is a seeded permutation of the items,
    cut into micro-batches of world_size * batch_size (a ragged tail is dropped so that every
    rank does the same number of steps); step s uses micro-batches s*accumulation ... onwards."""

    items: int
    world_size: int
    batch_size: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def build(cls, items: int, world_size: int, cfg: TrainConfig) -> StepPlan:
        batch, accumulation = cfg.training.batch_size_per_device, cfg.training.gradient_accumulation
        steps_per_epoch = items // (world_size * batch) // accumulation
        if steps_per_epoch == 0:
            raise ValueError(
                f"{items} training items cannot fill one optimizer step of {world_size} workers x "
                f"{batch} per device x {accumulation} accumulation: add data or lower the batch size"
            )
        total = cfg.training.max_steps or cfg.training.epochs * steps_per_epoch
        return cls(items, world_size, batch, accumulation, steps_per_epoch, total)

    def epoch_at(self, step: int) -> float:
        return step / self.steps_per_epoch

    def micro_batch(self, step: int, micro: int, rank: int, seed: int) -> list[int]:
        """Item indices of one rank's micro-batch `micro` of optimizer step `step` (1-based)."""
        global_micro = (step - 1) * self.accumulation + micro
        micro_per_epoch = self.steps_per_epoch * self.accumulation
        epoch, within = divmod(global_micro, micro_per_epoch)
        order = epoch_order(self.items, seed, epoch)
        start = (within * self.world_size + rank) * self.batch_size
        return order[start : start + self.batch_size]


_ORDER_CACHE: dict[tuple[int, int, int], list[int]] = {}


def epoch_order(items: int, seed: int, epoch: int) -> list[int]:
    """The item order of one epoch: random.Random(seed + epoch).shuffle of range(items)."""
    key = (items, seed, epoch)
    if key not in _ORDER_CACHE:
        order = list(range(items))
        random.Random(seed + epoch).shuffle(order)
        _ORDER_CACHE.clear()  # one epoch at a time is all a run needs
        _ORDER_CACHE[key] = order
    return _ORDER_CACHE[key]


def make_collator(cfg: TrainConfig, tokenizer: Any, device: Any, compute_dtype: Any) -> Any:
    from instructune_jobs.data.collate import PackedCollator, PaddingCollator

    pad_id = tokenizer.pad_token_id
    # Multiples of 8 let tensor cores run on GPUs; on CPU they only add padding.
    multiple = 8 if device.type == "cuda" else None
    if cfg.training.packing:
        attention: Literal["position_ids", "4d_mask"] = (
            "position_ids" if attention_implementation(device) == "flash_attention_2" else "4d_mask"
        )
        collator: Any = PackedCollator(pad_id, multiple, attention=attention, mask_dtype=compute_dtype)
    else:
        collator = PaddingCollator(pad_id, multiple)

    def collate(items: Sequence[Any]) -> dict[str, Any]:
        return {name: tensor.to(device, non_blocking=True) for name, tensor in collator(items).items()}

    return collate


def all_reduce_step_stats(mean_loss: float, tokens: int, device: Any, world_size: int) -> tuple[float, int]:
    """Mean loss over ranks and total tokens of the step (one small collective per step)."""
    import torch
    import torch.distributed as dist

    stats = torch.tensor([mean_loss, float(tokens)], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(stats)
    return float(stats[0]) / world_size, int(stats[1])


def make_reporter(
    cfg: TrainConfig,
    layout: ArtifactLayout,
    storage: Storage,
    plan: StepPlan,
    attempt: str,
    start_step: int,
    data: Any,
    base: Any,
) -> Any:
    from instructune_jobs.report import ProgressReporter, StatusPatcher, status_endpoint_from_env

    endpoint = status_endpoint_from_env(cfg.run)
    reporter = ProgressReporter(
        metrics_uri=layout.metrics,
        progress_uri=layout.progress,
        total_steps=plan.total_steps,
        write=storage.write_bytes,
        patcher=StatusPatcher(endpoint) if endpoint else None,
        keep_checkpoints=cfg.checkpointing.keep_last,
        attempt_id=attempt,
    )
    previous_metrics = (storage.read_bytes(layout.metrics) or b"").decode() if start_step else ""
    previous_progress = json.loads(storage.read_bytes(layout.progress) or b"{}") if start_step else {}
    reporter.start(
        start_step,
        previous_metrics,
        [c for c in previous_progress.get("checkpoints", []) if c["step"] <= start_step],
        data=data.stats.to_status()
        | ({"invalidRowsReport": layout.invalid_rows} if data.invalid else {})
        | ({"auditReport": layout.audit_report} if data.stats.audited_rows else {}),
        lineage=build_lineage_status(cfg, base.revision, data.stats.etags),
    )
    return reporter


# =============================================================================================
# Finish: final artifacts
# =============================================================================================


def export_final_artifacts(
    cfg: TrainConfig,
    engine: Engine,
    tokenizer: Any,
    chat_template: str,
    base_path: Path,
    layout: ArtifactLayout,
    storage: Storage,
    compute_dtype: Any,
    is_rank0: bool,
) -> dict[str, str]:
    """final/adapter (or final/model), final/tokenizer, and final/model merged when asked.
    All ranks take part (ZeRO-3 gathers shards collectively); rank 0 writes."""
    import torch.distributed as dist

    outputs: dict[str, str] = {}
    full = cfg.method.type == "full"
    with tempfile.TemporaryDirectory(prefix="instructune-final-") as tmp:
        local = Path(tmp)
        with engine.gathered(trainable_only=not full):
            if is_rank0:
                module = engine.module
                if full:
                    state_dict = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
                    module.save_pretrained(local / "model", state_dict=state_dict, safe_serialization=True)
                else:
                    module.save_pretrained(local / "adapter", safe_serialization=True)
        if is_rank0:
            # The tokenizer carries the exact template trained with: serving renders with it.
            tokenizer.chat_template = chat_template
            tokenizer.save_pretrained(local / "tokenizer")
            if not full and cfg.output.merge:
                merge_adapter(base_path, local / "adapter", local / "model", compute_dtype)
            for name, uri in (
                ("adapter", layout.final_adapter),
                ("model", layout.final_model),
                ("tokenizer", layout.final_tokenizer),
            ):
                if (local / name).is_dir():
                    storage.upload_directory(local / name, uri)
                    outputs[name] = uri
        dist.barrier()
    return outputs


def training_already_done(cfg: TrainConfig, storage: Storage | None = None) -> dict[str, Any] | None:
    """The manifest of a finished run of this very configuration, if the root has one: a retried
    job (say, after a failed evaluation) does not train again."""
    storage = storage or Storage()
    try:
        layout = ArtifactLayout.for_config(cfg)
    except ValueError:
        return None
    body = storage.read_bytes(layout.manifest)
    if not body:
        return None
    manifest = json.loads(body)
    if manifest.get("configHash") != cfg.config_hash():
        return None
    outputs = manifest.get("outputs", {})
    if not any(storage.list(uri) for uri in outputs.values()):
        return None
    return dict(manifest)


__all__ = [
    "StepPlan",
    "TrainingOutcome",
    "UnsupportedSetupError",
    "epoch_order",
    "run_training",
    "train_loop_per_worker",
    "training_already_done",
]
