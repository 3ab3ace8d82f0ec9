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

Distributed: Ray Train starts one process per device and sets up torch.distributed (gloo on
CPU, nccl on GPU). strategy "deepspeed" wraps the model in a DeepSpeed engine (ZeRO 2 or 3,
optional CPU offload), "ddp" in torch DistributedDataParallel. The optimizer is always a torch
AdamW object handed to DeepSpeed: DeepSpeed's own "AdamW" config JIT-compiles FusedAdam (~1 min).

Resuming: checkpoints go to `<root>/checkpoints/checkpoint_step_<N>/`. Each rank uploads its
part; after a barrier rank 0 writes instructune_state.json (step, config hash) and prunes to the
last `keep_last`. The driver picks the newest checkpoint with a state file and hands its URI to
every worker, which restores it. The state files are the one record of what exists: Ray Train's
checkpoint snapshot is written after the upload, so a stopped job could leave it behind. The
driver and the worker both refuse a checkpoint written by another configuration.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import random
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from instructune_jobs.artifacts import (
    RUN_NAME,
    STATE_FILE,
    ArtifactLayout,
    CheckpointState,
    ConfigMismatchError,
    build_lineage_status,
    build_manifest,
    fetch_base_model,
    latest_checkpoint,
    part_of_rank,
    prune_checkpoints,
)
from instructune_jobs.config import TrainConfig
from instructune_jobs.models import (
    attention_implementation,
    build_model,
    load_tokenizer,
    merge_adapter,
    resolve_compute_dtype,
)
from instructune_jobs.prepare import prepare_on_cluster, read_prepared
from instructune_jobs.storage import Storage, join_uri, ray_storage

log = logging.getLogger("instructune.finetune")

TORCH_EXTENSIONS_DIR = Path.home() / ".cache" / "instructune" / "torch_extensions"
DS_TAG = "state"  # DeepSpeed's checkpoint tag: one fixed name, since each checkpoint has its own dir


class UnsupportedSetupError(ValueError):
    """The configuration asks for something this machine or combination cannot do."""


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
        ray.init(address=ray_address or _ray_address_from_env(), log_to_driver=True)
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
            # also when the worker group cannot start (Ray's default retries that forever).
            failure_config=FailureConfig(max_failures=0, controller_failure_limit=0),  # type: ignore[call-arg]  # Train V2
        ),
    )
    trainer.fit()
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


def _ray_address_from_env() -> str | None:
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
# 1. Setup
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


def build_deepspeed_config(cfg: TrainConfig, world_size: int, compute_dtype: Any) -> dict[str, Any]:
    import torch

    training, distributed = cfg.training, cfg.distributed
    on_gpu = cfg.resources.gpus_per_worker > 0
    zero: dict[str, Any] = {
        "stage": distributed.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": on_gpu,
        # ZeRO-3: consolidate 16-bit weights when the model is saved (final export).
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    if distributed.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if distributed.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": training.batch_size_per_device,
        "gradient_accumulation_steps": training.gradient_accumulation,
        "train_batch_size": training.batch_size_per_device * training.gradient_accumulation * world_size,
        "gradient_clipping": training.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": compute_dtype == torch.bfloat16},
        "fp16": {"enabled": compute_dtype == torch.float16, "initial_scale_power": 16},
        # We pass a torch AdamW object: allow it under ZeRO and with CPU offload (DeepSpeed would
        # otherwise insist on its own CPU Adam, a JIT-compiled extension).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


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


# ----------------------------------------------------------------------- the two engines
#
# Both expose the same four operations so that the loop above reads the same for either:
# forward_backward(batch) -> loss, optimizer_step(), learning_rate(), and the checkpoint hooks.


class DeepSpeedEngine:
    def __init__(
        self, cfg: TrainConfig, model: Any, optimizer: Any, plan: StepPlan, ds_config: dict[str, Any]
    ):
        import deepspeed

        self.cfg = cfg
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            # A callable: DeepSpeed builds the schedule on its own wrapped optimizer, steps it with
            # engine.step() and saves/restores it with the checkpoint.
            lr_scheduler=lambda wrapped: build_lr_scheduler(cfg, wrapped, plan.total_steps),
            config=ds_config,
            dist_init_required=False,  # Ray Train already set up torch.distributed
        )

    @property
    def module(self) -> Any:
        return self.engine.module

    def forward_backward(self, batch: dict[str, Any], is_last_micro: bool) -> float:
        loss = self.engine(**batch).loss
        self.engine.backward(loss)  # scales by 1/accumulation itself
        # DeepSpeed's contract is step() after every micro-batch: it counts them and only clips,
        # updates and advances the schedule at the accumulation boundary.
        self.engine.step()
        return float(loss.detach())

    def optimizer_step(self) -> None:
        """Done by the engine at the accumulation boundary (see forward_backward)."""

    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        # LoRA: the frozen base is in the base model already; checkpoints hold only what trains.
        self.engine.save_checkpoint(
            str(directory),
            tag=DS_TAG,
            client_state=client_state,
            exclude_frozen_parameters=self.cfg.method.type != "full",
        )

    def load(self, directory: Path) -> dict[str, Any]:
        _, client_state = self.engine.load_checkpoint(
            str(directory),
            tag=DS_TAG,
            load_module_strict=self.cfg.method.type == "full",
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        return client_state or {}

    @contextlib.contextmanager
    def gathered(self, trainable_only: bool) -> Iterator[None]:
        """Under ZeRO-3 every rank holds a shard of each weight: gather them for saving."""
        if self.cfg.distributed.zero_stage != 3:
            yield
            return
        import deepspeed

        parameters = [p for p in self.module.parameters() if p.requires_grad or not trainable_only]
        with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
            yield

    def close(self) -> None:
        self.engine.destroy()


class DDPEngine:
    def __init__(
        self, cfg: TrainConfig, model: Any, optimizer: Any, plan: StepPlan, device: Any, compute_dtype: Any
    ):
        import torch
        from torch.nn.parallel import DistributedDataParallel

        self.cfg = cfg
        self.device = device
        self.compute_dtype = compute_dtype
        self.model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        self.optimizer = optimizer
        self.scheduler = build_lr_scheduler(cfg, optimizer, plan.total_steps)
        # fp16 needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    @property
    def module(self) -> Any:
        return self.model.module

    def forward_backward(self, batch: dict[str, Any], is_last_micro: bool) -> float:
        import torch

        accumulation = self.cfg.training.gradient_accumulation
        # Gradients are all-reduced only on the last micro-batch of a step.
        sync = contextlib.nullcontext() if is_last_micro else self.model.no_sync()
        autocast = torch.autocast(
            self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32
        )
        with sync, autocast:
            loss = self.model(**batch).loss
        with sync:
            self.scaler.scale(loss / accumulation).backward()
        return float(loss.detach())

    def optimizer_step(self) -> None:
        import torch

        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.training.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def trainable_state_dict(self) -> dict[str, Any]:
        names = {id(p): n for n, p in self.module.named_parameters()}
        return {names[id(p)]: p.detach().cpu() for p in self.trainable}

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        import torch
        import torch.distributed as dist

        # DDP ranks hold identical replicas: rank 0 writes the one copy.
        if dist.get_rank() == 0:
            torch.save(
                {
                    "trainable": self.trainable_state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "client_state": client_state,
                },
                directory / "ddp_state.pt",
            )

    def load(self, directory: Path) -> dict[str, Any]:
        import torch

        state = torch.load(directory / "ddp_state.pt", map_location=self.device, weights_only=False)
        missing = set(self.trainable_state_dict()) - set(state["trainable"])
        if missing:
            raise RuntimeError(f"checkpoint lacks trainable weights: {sorted(missing)[:5]}")
        self.module.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        return dict(state["client_state"])

    @contextlib.contextmanager
    def gathered(self, trainable_only: bool) -> Iterator[None]:
        yield

    def close(self) -> None:
        pass


def build_lr_scheduler(cfg: TrainConfig, optimizer: Any, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        cfg.training.lr_scheduler
    ]
    warmup = math.ceil(cfg.training.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def init_deepspeed(device: Any) -> None:
    """Before DeepSpeed is first imported: it JIT-compiles a shared-memory collective for CPU
    (and CPU Adam when offloading), so cache the build once per machine, not once per run. Then
    let it adopt the process group Ray Train created (ZeRO-3 loading needs its world size)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(TORCH_EXTENSIONS_DIR))
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def wrap_for_distributed(
    cfg: TrainConfig,
    model: Any,
    optimizer: Any,
    plan: StepPlan,
    ds_config: dict[str, Any] | None,
    device: Any,
) -> DeepSpeedEngine | DDPEngine:
    if ds_config is not None:
        return DeepSpeedEngine(cfg, model, optimizer, plan, ds_config)
    return DDPEngine(
        cfg, model, optimizer, plan, device, resolve_compute_dtype(cfg.training.precision, device)
    )


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
# 3. Checkpoint
# =============================================================================================


def save_checkpoint(
    cfg: TrainConfig,
    engine: DeepSpeedEngine | DDPEngine,
    layout: ArtifactLayout,
    storage: Storage,
    step: int,
    epoch: float,
    loss: float,
    reporter: Any,
) -> None:
    """Every rank writes its part (DeepSpeed: its optimizer shard) and uploads it into the step's
    folder; after a barrier rank 0 writes the state file that makes the checkpoint count, then
    prunes. The storage is the only record: Ray's checkpoint bookkeeping is not used, since its
    snapshot lags the uploads (a stopped job left it one checkpoint behind) and it refuses to
    start once a checkpoint it lists is gone."""
    import ray.train
    import torch.distributed as dist

    state = CheckpointState(
        step,
        epoch,
        cfg.config_hash(),
        loss if math.isfinite(loss) else None,
        _utc_now(),
        layout.checkpoint(step),
    )
    with tempfile.TemporaryDirectory(prefix="instructune-ckpt-") as tmp:
        engine.save(Path(tmp), {"step": step, "config_hash": state.config_hash})
        storage.upload_directory(Path(tmp), state.uri)
    ray.train.report({"step": step, "loss": state.loss})
    if dist.get_world_size() > 1:
        dist.barrier()
    if dist.get_rank() == 0:
        storage.write_bytes(join_uri(state.uri, STATE_FILE), state.to_json().encode(), "application/json")
        pruned = prune_checkpoints(layout, storage, cfg.checkpointing.keep_last)
        if pruned:
            log.info("pruned checkpoints %s (keeping the last %d)", pruned, cfg.checkpointing.keep_last)
    if reporter is not None:
        reporter.checkpoint(step, state.uri, state.loss)


def restore_checkpoint(
    cfg: TrainConfig, engine: DeepSpeedEngine | DDPEngine, uri: str | None, storage: Storage
) -> CheckpointState | None:
    """Restore weights, optimizer, schedule (and with them the data position, a function of the
    step) from the checkpoint the driver chose; its state file must carry this config's hash.
    None on a fresh start."""
    if uri is None:
        return None
    with tempfile.TemporaryDirectory(prefix="instructune-restore-") as tmp:
        path = Path(tmp)
        storage.download_prefix(uri, path, wanted=part_of_rank(_rank()))
        state = CheckpointState.from_json((path / STATE_FILE).read_text(), uri)
        if state.config_hash != cfg.config_hash():
            raise ConfigMismatchError(
                f"checkpoint {uri} was written by config {state.config_hash[:12]}, not "
                f"{cfg.config_hash()[:12]}"
            )
        client_state = engine.load(path)
    if int(client_state.get("step", state.step)) != state.step:
        raise RuntimeError(
            f"checkpoint {uri} is inconsistent: engine state at step "
            f"{client_state.get('step')}, state file at {state.step}"
        )
    log.info("restored step %d from %s", state.step, uri)
    return state


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _utc_now() -> str:
    from instructune_jobs.report import utc_now

    return utc_now()


# =============================================================================================
# 4. Finish: final artifacts
# =============================================================================================


def export_final_artifacts(
    cfg: TrainConfig,
    engine: DeepSpeedEngine | DDPEngine,
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
    "TORCH_EXTENSIONS_DIR",
    "ConfigMismatchError",
    "StepPlan",
    "TrainingOutcome",
    "UnsupportedSetupError",
    "build_deepspeed_config",
    "epoch_order",
    "run_training",
    "train_loop_per_worker",
    "training_already_done",
]
