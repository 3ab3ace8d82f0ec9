"""What the job and the operator share, in one place: the API group and version of the status the
job writes, the shapes of what it writes there, the exit codes by which a job says how it ended,
and which of them mean a retry would end the same way.

The operator image ships this module with `config.py` (pure Python, no training stack), so both
sides read the same numbers instead of two copies held together by a test.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TypedDict

# The InstructionTune API (the operator's api.py builds its CRD from these).
GROUP = "instructune.io"
VERSION = "v1alpha1"
PLURAL = "instructiontunes"


# What the job writes into the tune's status (a JSON merge patch of the status subresource). Keys are
# the API's camelCase names; tests/unit/test_contract.py holds each shape to the API's status models.
class ProgressPayload(TypedDict, total=False):
    step: int
    totalSteps: int
    epoch: float
    loss: float | None
    learningRate: float
    tokensPerSecond: float
    percent: int
    eta: str | None


class CheckpointPayload(TypedDict):
    step: int
    uri: str
    loss: float | None
    time: str


class DataPayload(TypedDict, total=False):
    rows: int
    invalidRows: int
    invalidRowsReport: str | None
    duplicateRows: int
    contaminatedRows: int
    piiRows: int
    auditReport: str | None
    tokens: int
    paddingFraction: float
    templateHash: str


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # anything else: worth a retry from the latest checkpoint
    BAD_CONFIG = 2
    CONFIG_MISMATCH = 3
    INVALID_DATA = 4
    VERSION_MISMATCH = 5
    # A node of the Ray cluster was reclaimed (spot preemption, a drained or deleted node): the
    # operator resumes from the latest checkpoint without counting it against the backoff limit.
    PREEMPTED = 6


# The condition reason the operator records for each permanent exit: retrying would fail again
# (a config the job refuses, checkpoints of another configuration under the root, refused data,
# a job image of another version than the operator).
PERMANENT_EXIT_REASONS: dict[ExitCode, str] = {
    ExitCode.BAD_CONFIG: "InvalidTrainingConfig",
    ExitCode.CONFIG_MISMATCH: "CheckpointConfigMismatch",
    ExitCode.INVALID_DATA: "InvalidData",
    ExitCode.VERSION_MISMATCH: "JobVersionMismatch",
}


class PermanentJobError(Exception):
    """An error a retry cannot cure; `exit_code` (one of PERMANENT_EXIT_REASONS) is what the job
    exits with when it ends the run."""

    exit_code: ExitCode = ExitCode.BAD_CONFIG
    what: str = ""  # how the job's log introduces it


def permanent_reason(exit_code: int | None) -> str | None:
    """The reason for a permanent exit code, None for one worth a retry (or unknown)."""
    try:
        return PERMANENT_EXIT_REASONS.get(ExitCode(exit_code or 0))
    except ValueError:
        return None
