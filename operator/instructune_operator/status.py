"""Pure status computation: observed facts in, the status the tune should show out."""

from __future__ import annotations

from typing import Any

CONDITION_TYPES = (
    "Validated",
    "ClusterReady",
    "Training",
    "Evaluated",
    "EvalPassed",
    "Serving",
    "Ready",
    "Succeeded",
)


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: str,
    reason: str,
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
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }
    return (
        [c for c in conditions if c.get("type") != type_] + [new]
        if old is None
        else [new if c.get("type") == type_ else c for c in conditions]
    )


def get_condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions", []) if c.get("type") == type_), None)


def compute_validation_status(
    status: dict[str, Any], generation: int | None, errors: list[str], now: str
) -> dict[str, Any]:
    """Status after validating the spec: Validated True, or False with every reason, and Failed."""
    new = dict(status)
    if errors:
        message = "; ".join(errors)
        new["conditions"] = set_condition(
            status.get("conditions", []), "Validated", "False", "InvalidSpec", message, now, generation
        )
        new["phase"] = "Failed"
    else:
        new["conditions"] = set_condition(
            status.get("conditions", []), "Validated", "True", "SpecValid", "spec is valid", now, generation
        )
        new.setdefault("phase", "Pending")
        if new["phase"] == "Failed" and _failed_only_by_validation(status):
            new["phase"] = "Pending"
    new["observedGeneration"] = generation
    return new


def _failed_only_by_validation(status: dict[str, Any]) -> bool:
    validated = get_condition(status, "Validated")
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
