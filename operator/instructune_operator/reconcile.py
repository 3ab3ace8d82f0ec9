"""Observe -> build -> apply -> compute status: the one module that mixes pure logic with I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from instructune_operator.settings import Settings
from instructune_operator.status import compute_validation_status, status_changes, transitions
from instructune_operator.validation import validate_spec


@dataclass
class Outcome:
    """What a reconcile pass wants written: status keys that changed and events to record."""

    status_patch: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


def reconcile_tune(body: dict[str, Any], settings: Settings, now: str) -> Outcome:
    old_status: dict[str, Any] = dict(body.get("status") or {})
    generation = body.get("metadata", {}).get("generation")
    _, errors = validate_spec(dict(body.get("spec") or {}), settings)
    new_status = compute_validation_status(old_status, generation, errors, now)
    events = [
        ("Normal" if c["status"] == "True" else "Warning", c["reason"], f"{c['type']}={c['status']}: {c['message']}")
        for c in transitions(old_status, new_status)
    ]
    return Outcome(status_patch=status_changes(old_status, new_status), events=events)
