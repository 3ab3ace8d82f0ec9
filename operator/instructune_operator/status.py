"""Pure status computation: observed facts in, the status the tune should show out.

Conditions and the validation outcome are computed on the API models (api.InstructionTuneStatus);
`status_changes` and `transitions` compare the wire form (what the API server holds and the patch
carries).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationError

from instructune_operator.api import (
    CONDITION_VALIDATED,
    PHASE_FAILED,
    PHASE_PENDING,
    Condition,
    ConditionStatus,
    ConditionType,
    InstructionTuneStatus,
    Model,
    Reason,
)


def set_condition(
    conditions: list[Condition],
    type_: ConditionType,
    status: ConditionStatus,
    reason: Reason,
    message: str,
    now: str,
    generation: int | None,
) -> list[Condition]:
    """Returns conditions with `type_` set; lastTransitionTime moves only when the status changes."""
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old and old.status == status else now
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
    return (
        [c for c in conditions if c.type != type_] + [new]
        if old is None
        else [new if c.type == type_ else c for c in conditions]
    )


def get_condition(status: InstructionTuneStatus, type_: ConditionType) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def compute_validation_status(
    status: InstructionTuneStatus, generation: int | None, errors: list[str], now: str
) -> InstructionTuneStatus:
    """Status after validating the spec: Validated True, or False with every reason, and Failed."""
    new = status.model_copy(deep=True)
    if errors:
        message = "; ".join(errors)
        new.conditions = set_condition(
            status.conditions, CONDITION_VALIDATED, "False", Reason.INVALID_SPEC, message, now, generation
        )
        new.phase = PHASE_FAILED
    else:
        new.conditions = set_condition(
            status.conditions,
            CONDITION_VALIDATED,
            "True",
            Reason.SPEC_VALID,
            "spec is valid",
            now,
            generation,
        )
        if new.phase is None:
            new.phase = PHASE_PENDING
        if new.phase == PHASE_FAILED and _failed_only_by_validation(status):
            new.phase = PHASE_PENDING
    new.observed_generation = generation
    return new


def _failed_only_by_validation(status: InstructionTuneStatus) -> bool:
    validated = get_condition(status, CONDITION_VALIDATED)
    return validated is not None and validated.status == "False"


def parse_status(raw: dict[str, Any]) -> InstructionTuneStatus:
    """The live status as the API model. A condition whose type or reason this operator does not
    know (written by a newer operator before a rollback, or by hand) is dropped, not fatal: the
    decision sets its own conditions again, and a status the operator cannot read would otherwise
    stop every pass of the tune."""
    try:
        return InstructionTuneStatus.model_validate(raw)
    except ValidationError:
        known = []
        for condition in raw.get("conditions") or []:
            try:
                Condition.model_validate(condition)
            except ValidationError:
                continue
            known.append(condition)
        return InstructionTuneStatus.model_validate({**raw, "conditions": known})


def wire(status: Model) -> dict[str, Any]:
    """A status (or part of one) as the API server holds it: camelCase, only the fields set."""
    return status.model_dump(by_alias=True, exclude_unset=True, mode="json")


def status_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The top-level status keys whose value changed: an empty dict means nothing to write."""
    changes = {k: v for k, v in new.items() if old.get(k) != v}
    changes.update({k: None for k in old if k not in new})
    return changes


def transitions(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Conditions whose status or reason changed: each becomes a Kubernetes event."""
    before = {c["type"]: (c.get("status"), c.get("reason")) for c in old.get("conditions", [])}
    return [
        c for c in new.get("conditions", []) if before.get(c["type"]) != (c.get("status"), c.get("reason"))
    ]


# (type, reason, message) of a Kubernetes event.
Event = tuple[Literal["Normal", "Warning"], str, str]


def events(old: dict[str, Any], new: dict[str, Any]) -> list[Event]:
    """The events of a pass: one per condition transition (a False one is a Warning, but for the
    steps that are expected to leave a condition False), and one for a phase change."""
    out: list[Event] = [
        (
            "Normal"
            if c["status"] == "True" or c["reason"] in (Reason.SUBMITTED, Reason.COMPLETED)
            else "Warning",
            c["reason"],
            f"{c['type']}={c['status']}: {c['message']}",
        )
        for c in transitions(old, new)
    ]
    if old.get("phase") != new.get("phase"):
        out.append(
            ("Normal", Reason.PHASE.value, f"phase {old.get('phase') or 'None'} -> {new.get('phase')}")
        )
    return out
