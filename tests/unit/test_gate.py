from __future__ import annotations

import pytest

from instructune_operator.api import GateRule
from instructune_operator.gate import evaluate_gate

pytestmark = pytest.mark.unit


def test_gate_passes_when_every_rule_holds_and_reports_the_values() -> None:
    verdict = evaluate_gate(
        [GateRule(metric="a.jsonValid", min=0.98), GateRule(metric="forgetting.lossIncrease", max=0.02)],
        {"a.jsonValid": 0.99, "forgetting.lossIncrease": 0.01},
        {},
    )
    assert verdict.passed
    assert (
        verdict.message
        == "a.jsonValid=0.99 (needs >= 0.98) ok; forgetting.lossIncrease=0.01 (needs <= 0.02) ok"
    )


def test_a_missing_metric_fails_the_gate() -> None:
    verdict = evaluate_gate([GateRule(metric="a.exactMatch", min=0.5)], {}, {})
    assert not verdict.passed and "missing" in verdict.message


def test_rules_can_bound_the_difference_to_the_base_model() -> None:
    rules = [GateRule(metric="delta.a.jsonValid", min=0.3)]
    assert evaluate_gate(rules, {"a.jsonValid": 0.9}, {"a.jsonValid": 0.5}).passed
    assert not evaluate_gate(rules, {"a.jsonValid": 0.6}, {"a.jsonValid": 0.5}).passed
    assert evaluate_gate([GateRule(metric="base.a.jsonValid", max=0.5)], {}, {"a.jsonValid": 0.5}).passed
