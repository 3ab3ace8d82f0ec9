"""The CRD admits only what the job's contract accepts: every bound and choice of a spec field is
held inside the same-named TrainConfig field's, so no value passes admission and then fails the job
after its Ray cluster is up (issue #15)."""

from __future__ import annotations

from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from instructune_jobs.config import TrainConfig
from instructune_operator.api import InstructionTuneSpec, MetricSpec
from instructune_operator.builders.train_config import _METRIC_TYPES

pytestmark = pytest.mark.unit

Bound = tuple[float, bool]  # value, inclusive


def _bounds(info: FieldInfo) -> tuple[Bound | None, Bound | None]:
    """(lower, upper) of a number, or of a list's or string's length."""
    low: Bound | None = None
    high: Bound | None = None
    for item in info.metadata:
        if isinstance(item, at.Ge):
            low = (float(item.ge), True)  # type: ignore[arg-type]
        elif isinstance(item, at.Gt):
            low = (float(item.gt), False)  # type: ignore[arg-type]
        elif isinstance(item, at.MinLen):
            low = (float(item.min_length), True)
        elif isinstance(item, at.Le):
            high = (float(item.le), True)  # type: ignore[arg-type]
        elif isinstance(item, at.Lt):
            high = (float(item.lt), False)  # type: ignore[arg-type]
        elif isinstance(item, at.MaxLen):
            high = (float(item.max_length), True)
    return low, high


def _inside_low(crd: Bound | None, job: Bound | None) -> bool:
    if job is None:
        return True
    if crd is None:
        return False
    return crd[0] > job[0] or (crd[0] == job[0] and (job[1] or not crd[1]))


def _inside_high(crd: Bound | None, job: Bound | None) -> bool:
    if job is None:
        return True
    if crd is None:
        return False
    return crd[0] < job[0] or (crd[0] == job[0] and (job[1] or not crd[1]))


def _strip(annotation: Any) -> list[Any]:
    """The non-None members of a union (or the type itself)."""
    if get_origin(annotation) in (Union, UnionType):
        return [a for a in get_args(annotation) if a is not NoneType]
    return [annotation]


def _literals(annotation: Any) -> set[Any] | None:
    values: set[Any] = set()
    for member in _strip(annotation):
        if get_origin(member) is not Literal:
            return None
        values.update(get_args(member))
    return values


def _model(annotation: Any) -> type[BaseModel] | None:
    for member in _strip(annotation):
        if get_origin(member) is list:
            member = get_args(member)[0]
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def _disagreements(crd: type[BaseModel], job: type[BaseModel], path: str, checked: list[str]) -> list[str]:
    found: list[str] = []
    for name, crd_field in crd.model_fields.items():
        job_field = job.model_fields.get(name)
        if job_field is None:
            continue
        where = f"{path}.{name}"
        crd_model, job_model = _model(crd_field.annotation), _model(job_field.annotation)
        if crd_model is not None and job_model is not None:
            found += _disagreements(crd_model, job_model, where, checked)
        crd_low, crd_high = _bounds(crd_field)
        job_low, job_high = _bounds(job_field)
        if not _inside_low(crd_low, job_low):
            found.append(f"{where}: the CRD's lower bound {crd_low} is below the job's {job_low}")
        if not _inside_high(crd_high, job_high):
            found.append(f"{where}: the CRD's upper bound {crd_high} is above the job's {job_high}")
        crd_choices, job_choices = _literals(crd_field.annotation), _literals(job_field.annotation)
        if crd_choices is not None and job_choices is not None and not crd_choices <= job_choices:
            found.append(f"{where}: the CRD admits {sorted(crd_choices - job_choices, key=str)}")
        checked.append(where)
    return found


def test_every_bound_and_choice_the_crd_admits_is_one_the_job_accepts() -> None:
    checked: list[str] = []
    assert _disagreements(InstructionTuneSpec, TrainConfig, "spec", checked) == []
    # The walk reaches the nested fields the two models share, not only the top level.
    for field in (
        "spec.dataset.validation.fraction",
        "spec.dataset.train.weight",
        "spec.method.lora.target_modules",
        "spec.training.learning_rate",
        "spec.distributed.zero_stage",
        "spec.resources.cpus_per_worker",
        "spec.checkpointing.keep_last",
        "spec.evaluation.max_new_tokens",
    ):
        assert field in checked


def test_the_walk_reports_a_crd_bound_wider_than_the_job() -> None:
    from pydantic import Field

    class Job(BaseModel):
        fraction: float = Field(ge=0, lt=0.5)
        kind: Literal["a", "b"] = "a"

    class Crd(BaseModel):
        fraction: float = Field(gt=0, le=0.5)
        kind: Literal["a", "c"] = "a"

    found = _disagreements(Crd, Job, "spec", [])
    assert len(found) == 2 and "spec.fraction" in found[0] and "['c']" in found[1]


def test_every_metric_type_of_the_crd_is_a_metric_type_of_the_job() -> None:
    crd_types = set(get_args(MetricSpec.model_fields["type"].annotation))
    assert set(_METRIC_TYPES) == crd_types
    job_union = TrainConfig.model_fields["evaluation"].annotation.model_fields["metrics"].annotation  # type: ignore[union-attr]
    job_tags = {
        get_args(m.model_fields["type"].annotation)[0] for m in get_args(get_args(get_args(job_union)[0])[0])
    }
    assert set(_METRIC_TYPES.values()) == job_tags
