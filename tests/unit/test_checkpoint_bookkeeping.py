"""Which checkpoints count and which are pruned: the state file is the one record."""

from __future__ import annotations

from pathlib import Path

import pytest

from instructune_jobs.artifacts import ArtifactLayout, checkpoint_dir_name
from instructune_jobs.checkpointing import (
    STATE_FILE,
    CheckpointState,
    checkpoints_to_prune,
    latest_checkpoint,
    list_checkpoints,
    part_of_rank,
    prune_checkpoints,
)
from instructune_jobs.storage import Storage

pytestmark = pytest.mark.unit


def names(*steps: int) -> list[str]:
    return [checkpoint_dir_name(step) for step in steps]


def test_only_the_newest_keep_last_complete_checkpoints_are_kept() -> None:
    assert checkpoints_to_prune([60, 120, 180], names(60, 120, 180), keep_last=2) == names(60)


def test_a_folder_without_state_newer_than_every_complete_one_is_an_upload_in_progress() -> None:
    assert checkpoints_to_prune([60, 120], names(60, 120, 180), keep_last=2) == []


def test_a_folder_without_state_older_than_the_newest_complete_one_is_debris() -> None:
    assert checkpoints_to_prune([60, 180], names(60, 120, 180), keep_last=2) == names(120)


def test_nothing_is_pruned_before_the_first_complete_checkpoint() -> None:
    assert checkpoints_to_prune([], names(60), keep_last=1) == []


def write_checkpoint(storage: Storage, layout: ArtifactLayout, step: int, *, complete: bool) -> None:
    uri = layout.checkpoint(step)
    storage.write_bytes(f"{uri}/state/mp_rank_00_model_states.pt", b"weights")
    if complete:
        state = CheckpointState(step, 1.0, "hash", 0.5, "now", uri)
        storage.write_bytes(f"{uri}/{STATE_FILE}", state.to_json().encode())


def test_a_checkpoint_whose_upload_finished_without_state_is_not_resumed(tmp_path: Path) -> None:
    storage, layout = Storage(), ArtifactLayout(str(tmp_path))
    write_checkpoint(storage, layout, 60, complete=True)
    write_checkpoint(storage, layout, 120, complete=False)
    latest = latest_checkpoint(layout, storage, "hash")
    assert latest is not None and latest.step == 60


def test_pruning_deletes_whole_folders_and_keeps_the_newest(tmp_path: Path) -> None:
    storage, layout = Storage(), ArtifactLayout(str(tmp_path))
    for step in (60, 120, 180):
        write_checkpoint(storage, layout, step, complete=True)
    write_checkpoint(storage, layout, 90, complete=False)
    assert prune_checkpoints(layout, storage, keep_last=2) == names(60, 90)
    assert [c.step for c in list_checkpoints(layout, storage)] == [120, 180]
    remaining = sorted(p.name for p in Path(layout.checkpoints).iterdir())
    assert remaining == names(120, 180)


def test_a_rank_restores_everything_but_the_other_ranks_zero_shards() -> None:
    files = [
        STATE_FILE,
        "latest",
        "state/mp_rank_00_model_states.pt",
        "state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "state/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "state/zero_pp_rank_10_mp_rank_00_optim_states.pt",
        "state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "state/zero_pp_rank_1_mp_rank_00_model_states.pt",  # ZeRO-3: the rank's weight shard
    ]
    assert [f for f in files if part_of_rank(1)(f)] == [
        STATE_FILE,
        "latest",
        "state/mp_rank_00_model_states.pt",
        "state/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "state/zero_pp_rank_1_mp_rank_00_model_states.pt",
    ]


def test_a_restore_downloads_only_what_the_rank_reads(tmp_path: Path) -> None:
    storage, layout = Storage(), ArtifactLayout(str(tmp_path / "root"))
    uri = layout.checkpoint(10)
    for name in (
        "state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "state/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ):
        storage.write_bytes(f"{uri}/{name}", b"shard")
    storage.write_bytes(f"{uri}/{STATE_FILE}", b"{}")
    dest = tmp_path / "restore"
    storage.download_prefix(uri, dest, wanted=part_of_rank(0))
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        STATE_FILE,
        "state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ]
