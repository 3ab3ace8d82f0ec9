"""Pure evaluation gate: thresholds on reported metrics, including differences against the base.

A rule's metric is a key of the tuned metrics (`heldout.jsonValid`), of the base metrics with the
prefix `base.`, or `delta.<key>` for tuned minus base. A metric that was not reported fails its
rule: nothing is deployed on a number nobody measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from instructune_operator.api import GateRule


@dataclass(frozen=True)
class Verdict:
    passed: bool
    message: str
    summary: str


def metric_value(key: str, metrics: dict[str, float], base: dict[str, float]) -> float | None:
    if key.startswith("base."):
        return base.get(key.removeprefix("base."))
    if key.startswith("delta."):
        inner = key.removeprefix("delta.")
        if inner in metrics and inner in base:
            return metrics[inner] - base[inner]
        return None
    return metrics.get(key)


def rule_bounds(rule: GateRule, joiner: str = " ") -> str:
    """A rule's bounds as people read them: ">= 0.8", "<= 0.02", ">= 0.1 <= 0.9"."""
    parts = (
        f">= {rule.min:g}" if rule.min is not None else "",
        f"<= {rule.max:g}" if rule.max is not None else "",
    )
    return joiner.join(part for part in parts if part)


def evaluate_gate(rules: Sequence[GateRule], metrics: dict[str, float], base: dict[str, float]) -> Verdict:
    if not rules:
        return Verdict(True, "no gate rules", "no gate")
    results: list[str] = []
    passed = True
    for rule in rules:
        value = metric_value(rule.metric, metrics, base)
        bounds = rule_bounds(rule)
        if value is None:
            passed = False
            results.append(f"{rule.metric}=missing (needs {bounds}) FAIL")
            continue
        ok = (rule.min is None or value >= rule.min) and (rule.max is None or value <= rule.max)
        passed &= ok
        results.append(f"{rule.metric}={value:.4g} (needs {bounds}) {'ok' if ok else 'FAIL'}")
    message = "; ".join(results)
    first = results[0].split(" (")[0]
    return Verdict(passed, message, f"{'passed' if passed else 'failed'} {first}")
