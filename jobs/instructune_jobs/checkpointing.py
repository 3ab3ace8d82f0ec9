"""Checkpoints under `<root>/checkpoints/`: saving and restoring one, finding the one to resume
from, and pruning to the last `keep_last`.

Each rank uploads its part; after a barrier rank 0 writes instructune_state.json (step, config
hash): its presence is what makes a checkpoint complete, and the state files are the one record
of what exists."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructune_jobs.artifacts import CHECKPOINT_PREFIX, ArtifactLayout, checkpoint_dir_name
from instructune_jobs.config import TrainConfig
from instructune_jobs.contract import ExitCode, PermanentJobError
from instructune_jobs.engines import Engine
from instructune_jobs.storage import Storage, join_uri

log = logging.getLogger("instructune.checkpointing")

STATE_FILE = "instructune_state.json"


@dataclass(frozen=True)
class CheckpointState:
    """What instructune_state.json in a checkpoint says."""

    step: int
    epoch: float
    config_hash: str
    loss: float | None
    time: str
    uri: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "step": self.step,
                "epoch": self.epoch,
                "config_hash": self.config_hash,
                "loss": self.loss,
                "time": self.time,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str | bytes, uri: str) -> CheckpointState:
        raw = json.loads(text)
        return cls(
            int(raw["step"]),
            float(raw["epoch"]),
            str(raw["config_hash"]),
            raw.get("loss"),
            str(raw.get("time", "")),
            uri,
        )


class ConfigMismatchError(PermanentJobError, RuntimeError):
    """The checkpoints under the root belong to a different training configuration."""

    exit_code = ExitCode.CONFIG_MISMATCH


_STATE_KEY = re.compile(rf"/{CHECKPOINT_PREFIX}(\d+)/{re.escape(STATE_FILE)}$")
_CHECKPOINT_DIR = re.compile(rf"/({CHECKPOINT_PREFIX}\d+)/")


def list_checkpoints(layout: ArtifactLayout, storage: Storage) -> list[CheckpointState]:
    """Complete checkpoints under the root, oldest first. A checkpoint counts once its state file
    exists: rank 0 writes that file only after every rank's part is uploaded."""
    found = []
    for obj in storage.list(layout.checkpoints):
        match = _STATE_KEY.search(obj.uri.replace(os.sep, "/"))
        if match:
            body = storage.read_bytes(obj.uri)
            if body is not None:
                found.append(CheckpointState.from_json(body, obj.uri.rsplit("/", 1)[0]))
    return sorted(found, key=lambda c: c.step)


def checkpoints_to_prune(complete_steps: list[int], stored_dirs: list[str], keep_last: int) -> list[str]:
    """Checkpoint folders to delete: complete ones beyond the newest `keep_last`, and folders
    without a state file older than the newest complete one (an attempt that died mid-upload).
    A folder newer than every complete checkpoint may be an upload in progress: kept."""
    kept = sorted(complete_steps)[-keep_last:] if keep_last > 0 else []
    if not kept:
        return []
    names = {checkpoint_dir_name(step) for step in kept}
    newest = checkpoint_dir_name(kept[-1])
    return sorted(name for name in set(stored_dirs) if name not in names and name < newest)


def prune_checkpoints(layout: ArtifactLayout, storage: Storage, keep_last: int) -> list[str]:
    """Apply checkpoints_to_prune to the stored folders; returns the names deleted."""
    objects = storage.list(layout.checkpoints)
    dirs = [m.group(1) for o in objects if (m := _CHECKPOINT_DIR.search(o.uri.replace(os.sep, "/")))]
    complete = [c.step for c in list_checkpoints(layout, storage)]
    doomed = checkpoints_to_prune(complete, dirs, keep_last)
    for name in doomed:
        storage.delete_prefix(join_uri(layout.checkpoints, name), first=STATE_FILE)
    return doomed


_RANK_SHARD = re.compile(r"(?:^|/)(?:bf16_)?zero_pp_rank_(\d+)_")


def part_of_rank(rank: int) -> Callable[[str], bool]:
    """Which files of a checkpoint a rank restores from: everything but the other ranks' ZeRO
    shards (`zero_pp_rank_<r>_*`). DeepSpeed reads only its own rank's shard (no elastic
    checkpoints), so 8 ranks need not each download all 8 optimizer shards of a full fine-tune."""

    def wanted(path: str) -> bool:
        match = _RANK_SHARD.search(path)
        return match is None or int(match.group(1)) == rank

    return wanted


def latest_checkpoint(layout: ArtifactLayout, storage: Storage, config_hash: str) -> CheckpointState | None:
    """The newest complete checkpoint, after checking it was written by this configuration."""
    checkpoints = list_checkpoints(layout, storage)
    if not checkpoints:
        return None
    latest = checkpoints[-1]
    if latest.config_hash != config_hash:
        raise ConfigMismatchError(
            f"the checkpoint at {latest.uri} was written by config {latest.config_hash[:12]}, this job's "
            f"config is {config_hash[:12]}: refusing to resume another run (use a new checkpointing.uri)"
        )
    return latest


def save_checkpoint(
    cfg: TrainConfig,
    engine: Engine,
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
    cfg: TrainConfig, engine: Engine, uri: str | None, storage: Storage
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
