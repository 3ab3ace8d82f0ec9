from __future__ import annotations

from typing import Any

import pytest

from instructune_operator import status as typed
from instructune_operator.api import Condition, InstructionTuneStatus
from instructune_operator.status import status_changes, transitions, wire

pytestmark = pytest.mark.unit


# The status functions work on the API models; these tests speak the wire form the API server holds.
def set_condition(conditions: list[dict[str, Any]], *args: Any) -> list[dict[str, Any]]:
    return [wire(c) for c in typed.set_condition([Condition.model_validate(c) for c in conditions], *args)]


def compute_validation_status(status: dict[str, Any], *args: Any) -> dict[str, Any]:
    return wire(typed.compute_validation_status(InstructionTuneStatus.model_validate(status), *args))


def test_condition_keeps_its_transition_time_while_status_is_unchanged() -> None:
    first = set_condition([], "Validated", "True", "SpecValid", "ok", "2026-01-01T00:00:00Z", 1)
    again = set_condition(first, "Validated", "True", "SpecValid", "ok", "2026-01-02T00:00:00Z", 2)
    assert again[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert again[0]["observedGeneration"] == 2


def test_condition_moves_its_transition_time_when_status_flips() -> None:
    first = set_condition([], "Validated", "True", "SpecValid", "ok", "2026-01-01T00:00:00Z", 1)
    flipped = set_condition(first, "Validated", "False", "InvalidSpec", "bad", "2026-01-02T00:00:00Z", 2)
    assert flipped == [
        {
            "type": "Validated",
            "status": "False",
            "reason": "InvalidSpec",
            "message": "bad",
            "lastTransitionTime": "2026-01-02T00:00:00Z",
            "observedGeneration": 2,
        }
    ]


def test_invalid_spec_fails_the_tune_with_every_reason() -> None:
    status = compute_validation_status({}, 3, ["spec.a: x", "spec.b: y"], "t")
    assert status["phase"] == "Failed"
    assert status["observedGeneration"] == 3
    assert status["conditions"][0]["message"] == "spec.a: x; spec.b: y"


def test_fixed_spec_leaves_the_failed_phase_it_caused() -> None:
    failed = compute_validation_status({}, 1, ["spec.a: x"], "t1")
    fixed = compute_validation_status(failed, 2, [], "t2")
    assert fixed["phase"] == "Pending"
    assert fixed["conditions"][0]["status"] == "True"


def test_reconciling_an_unchanged_tune_writes_nothing() -> None:
    status = compute_validation_status({}, 1, [], "t1")
    again = compute_validation_status(status, 1, [], "t2")
    assert status_changes(status, again) == {}
    assert transitions(status, again) == []


def test_a_condition_flip_is_one_transition() -> None:
    ok = compute_validation_status({}, 1, [], "t1")
    bad = compute_validation_status(ok, 2, ["spec.a: x"], "t2")
    assert [(c["type"], c["status"]) for c in transitions(ok, bad)] == [("Validated", "False")]


def test_a_phase_change_and_a_failed_condition_are_events() -> None:
    from instructune_operator.status import events

    ok = compute_validation_status({}, 1, [], "t1")
    bad = compute_validation_status(ok, 2, ["spec.a: x"], "t2")
    assert events(ok, bad) == [
        ("Warning", "InvalidSpec", "Validated=False: spec.a: x"),
        ("Normal", "Phase", "phase Pending -> Failed"),
    ]


def test_a_condition_with_a_reason_this_operator_does_not_know_is_dropped_not_fatal() -> None:
    from instructune_operator.status import parse_status

    raw = {
        "phase": "Training",
        "attempts": 2,
        "conditions": [
            {"type": "Training", "status": "True", "reason": "FromANewerOperator", "lastTransitionTime": "t"},
            {"type": "Validated", "status": "True", "reason": "SpecValid", "lastTransitionTime": "t"},
        ],
    }
    status = parse_status(raw)
    assert status.attempts == 2 and status.phase == "Training"
    assert [c.type for c in status.conditions] == ["Validated"]
