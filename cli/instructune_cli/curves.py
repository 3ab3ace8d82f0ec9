"""Pure: the series `instructune plot` draws, from what the job wrote under the run's root.

- `<root>/metrics.jsonl` (report.ProgressReporter): one line per optimizer step,
  `{"step", "epoch", "loss", "lr", "tokens_per_s", "time", "attempt"}` (`attempt`: a random id
  per job run), every attempt's lines in the order written (a resumed attempt repeats the steps
  after its checkpoint). One curve per attempt, so a resume shows where it picked up.
- `<root>/eval/report.json` (evaluate.run_evaluation), or the tune's `status.evaluation`: the
  tuned model's `metrics` and the base model's `baseMetrics`, flat keys such as
  `heldout.jsonValid`, `validation.loss`, `forgetting.probeLoss`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class LossCurve:
    attempt: str
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Comparison:
    metric: str
    tuned: float
    base: float | None


def loss_curves(metrics_jsonl: str) -> list[LossCurve]:
    """One curve per attempt, in the order the attempts first wrote; a step whose loss was not
    finite (written as null) and a line that is not a step's JSON are left out."""
    curves: dict[str, LossCurve] = {}
    for line in metrics_jsonl.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict):
            continue
        step, loss = entry.get("step"), entry.get("loss")
        if not isinstance(step, int) or not isinstance(loss, int | float) or not math.isfinite(loss):
            continue
        attempt = str(entry.get("attempt") or "")
        curve = curves.setdefault(attempt, LossCurve(attempt))
        curve.steps.append(step)
        curve.losses.append(float(loss))
    return list(curves.values())


# Derived from another metric (perplexity = exp(loss)) or with no base value (the increase over
# the base is itself a comparison): not drawn as tuned-vs-base bars.
_DERIVED = ("perplexity", "lossIncrease", "relativeLossIncrease")


def _is_loss(key: str) -> bool:
    return key.rsplit(".", 1)[-1].lower().endswith("loss")


def comparisons(
    metrics: Mapping[str, float], base: Mapping[str, float]
) -> tuple[list[Comparison], list[Comparison]]:
    """(scores, losses): the tuned model's metrics next to the base model's, scores (rates in
    [0, 1]: jsonValid, jsonSchema, exactMatch, field matches, regex) apart from losses (another
    scale). A mean over datasets (`jsonValid`, `fieldMatch.party`) is left out: the datasets' own
    keys (`<dataset>.jsonValid`) show it."""
    scores: list[Comparison] = []
    losses: list[Comparison] = []
    for key in sorted(metrics):
        last = key.rsplit(".", 1)[-1]
        if last in _DERIVED:
            continue
        if any(other.endswith(f".{key}") for other in metrics):
            continue
        entry = Comparison(key, float(metrics[key]), float(base[key]) if key in base else None)
        (losses if _is_loss(key) else scores).append(entry)
    return scores, losses
