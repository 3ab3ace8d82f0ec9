"""Pure status computation: observed facts in, the status the tune should show out."""

from __future__ import annotations

from typing import Any

from instructune_operator.api import (
    CONDITION_VALIDATED,
    PHASE_FAILED,
    PHASE_PENDING,
    ConditionStatus,
    ConditionType,
    Reason,
)


def set_condition(
    conditions: list[dict[str, Any]],
    type_: ConditionType,
    status: ConditionStatus,
    reason: Reason | str,
    message: str,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Returns conditions with `type_` set; lastTransitionTime moves only when the status changes."""
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = (
        old["lastTransitionTime"]
        if old and old.get("status") == status and "lastTransitionTime" in old
        else now
    )
    new = {
        "type": type_,
        "status": status,
        "reason": str(reason),  # the plain string: the status is dumped as YAML and JSON
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }
    return (
        [c for c in conditions if c.get("type") != type_] + [new]
        if old is None
        else [new if c.get("type") == type_ else c for c in conditions]
    )


def get_condition(status: dict[str, Any], type_: ConditionType) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions", []) if c.get("type") == type_), None)


def compute_validation_status(
    status: dict[str, Any], generation: int | None, errors: list[str], now: str
) -> dict[str, Any]:
    """Status after validating the spec: Validated True, or False with every reason, and Failed."""
    new = dict(status)
    if errors:
        message = "; ".join(errors)
        new["conditions"] = set_condition(
            status.get("conditions", []),
            CONDITION_VALIDATED,
            "False",
            Reason.INVALID_SPEC,
            message,
            now,
            generation,
        )
        new["phase"] = PHASE_FAILED
    else:
        new["conditions"] = set_condition(
            status.get("conditions", []),
            CONDITION_VALIDATED,
            "True",
            Reason.SPEC_VALID,
            "spec is valid",
            now,
            generation,
        )
        new.setdefault("phase", PHASE_PENDING)
        if new["phase"] == PHASE_FAILED and _failed_only_by_validation(status):
            new["phase"] = PHASE_PENDING
    new["observedGeneration"] = generation
    return new


def _failed_only_by_validation(status: dict[str, Any]) -> bool:
    validated = get_condition(status, CONDITION_VALIDATED)
    return validated is not None and validated.get("status") == "False"


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
