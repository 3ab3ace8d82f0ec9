"""The job and the operator read one contract: the shapes the job writes into status are the API's,
and each error the job refuses to retry carries an exit code the operator knows to be permanent."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from instructune_jobs.checkpointing import ConfigMismatchError
from instructune_jobs.contract import (
    PERMANENT_EXIT_REASONS,
    CheckpointPayload,
    DataPayload,
    PermanentJobError,
    ProgressPayload,
    permanent_reason,
)
from instructune_jobs.finetune import UnsupportedSetupError
from instructune_jobs.prepare import InvalidDataError
from instructune_operator.api import CheckpointRef, DataStatus, Progress, Reason

pytestmark = pytest.mark.unit


def _api_keys(model: type[BaseModel]) -> set[str]:
    return {field.alias or name for name, field in model.model_fields.items()}


@pytest.mark.parametrize(
    ("payload", "model"),
    [(ProgressPayload, Progress), (CheckpointPayload, CheckpointRef), (DataPayload, DataStatus)],
    ids=["progress", "checkpoints", "data"],
)
def test_what_the_job_writes_into_status_has_the_apis_field_names(
    payload: Any, model: type[BaseModel]
) -> None:
    assert set(payload.__annotations__) == _api_keys(model)


@pytest.mark.parametrize("error", [UnsupportedSetupError, ConfigMismatchError, InvalidDataError])
def test_every_error_the_job_will_not_retry_exits_with_a_code_the_operator_fails_the_tune_on(
    error: type[PermanentJobError],
) -> None:
    assert issubclass(error, PermanentJobError)
    reason = permanent_reason(int(error.exit_code))
    assert reason is not None and Reason(reason) == PERMANENT_EXIT_REASONS[error.exit_code]
