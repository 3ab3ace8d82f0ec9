"""The two distributed engines behind one protocol (`Engine`): DeepSpeed (ZeRO 2 or 3, optional
CPU offload) and torch DistributedDataParallel. The training loop reads the same for either."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from instructune_jobs.config import TrainConfig
from instructune_jobs.models import resolve_compute_dtype

TORCH_EXTENSIONS_DIR = Path.home() / ".cache" / "instructune" / "torch_extensions"
DS_TAG = "state"  # DeepSpeed's checkpoint tag: one fixed name, since each checkpoint has its own dir


class StepCount(Protocol):
    """What an engine needs of the step plan: the length of the learning-rate schedule."""

    @property
    def total_steps(self) -> int: ...


class Engine(Protocol):
    """A model wrapped for distributed training with its optimizer and learning-rate schedule."""

    @property
    def module(self) -> Any:
        """The wrapped model itself (a PEFT model for (Q)LoRA)."""
        ...

    def forward_backward(self, batch: dict[str, Any], is_last_micro: bool) -> float:
        """One micro-batch's forward and backward pass; returns its loss."""
        ...

    def optimizer_step(self) -> None: ...

    def learning_rate(self) -> float: ...

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        """This rank's part of a checkpoint into a local directory."""
        ...

    def load(self, directory: Path) -> dict[str, Any]:
        """Restore from this rank's part of a checkpoint; returns the client state saved with it."""
        ...

    def gathered(self, trainable_only: bool) -> contextlib.AbstractContextManager[None]:
        """The full weights on every rank for the block (ZeRO-3 shards them)."""
        ...

    def close(self) -> None: ...


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


class DeepSpeedEngine:
    def __init__(
        self, cfg: TrainConfig, model: Any, optimizer: Any, plan: StepCount, ds_config: dict[str, Any]
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
        self, cfg: TrainConfig, model: Any, optimizer: Any, plan: StepCount, device: Any, compute_dtype: Any
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
    plan: StepCount,
    ds_config: dict[str, Any] | None,
    device: Any,
) -> Engine:
    if ds_config is not None:
        return DeepSpeedEngine(cfg, model, optimizer, plan, ds_config)
    return DDPEngine(
        cfg, model, optimizer, plan, device, resolve_compute_dtype(cfg.training.precision, device)
    )
