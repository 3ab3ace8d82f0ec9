"""Gate rules that can never pass are refused before any cluster exists: on a key the evaluation
never reports (Validated=False, naming the rule), and the operator's list of reported keys is the
job's own (scoring and evaluate make the keys; config.reported_metric_keys must agree)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from instructune_jobs import scoring
from instructune_jobs.config import EvaluationConfig, reported_metric_keys
from instructune_jobs.evaluate import add_means_over_datasets
from instructune_operator.settings import load_settings
from instructune_operator.validation import validate_spec

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SETTINGS = load_settings(str(ROOT / "hack" / "local-settings.yaml"), env={})
QUICKSTART = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]


def _job_keys(evaluation: EvaluationConfig) -> tuple[set[str], set[str]]:
    """The keys evaluate.run_evaluation reports, made by the job's own functions (zero samples:
    the keys depend only on the metric spec)."""
    spec = scoring.MetricSpec.from_config(evaluation.metrics)
    per_set: dict[str, float] = {}
    if any(m.type == "loss" for m in evaluation.metrics):
        per_set |= {"loss": 0.0, "perplexity": 0.0}
    if spec.needs_generation:
        per_set |= scoring.aggregate_scores([], spec)
    names = [d.name for d in evaluation.datasets]
    raw = {"validation.loss": 0.0, "validation.perplexity": 0.0}
    raw |= {f"{name}.{key}": value for name in names for key, value in per_set.items()}
    metrics = add_means_over_datasets(raw, names)
    base = dict(metrics) if evaluation.compare_to_base else {}
    if evaluation.general_probe is not None:
        metrics |= scoring.forgetting_metrics(1.0, 1.0)
        base["forgetting.probeLoss"] = 1.0
    return set(metrics), set(base)


EVALUATIONS = {
    "loss only, two datasets": {
        "datasets": [{"name": "a", "uri": "s3://bucket/a"}, {"name": "b", "uri": "s3://bucket/b"}],
        "metrics": [{"type": "loss"}],
    },
    "every metric, a probe, no base": {
        "datasets": [{"name": "a", "uri": "s3://bucket/a"}],
        "metrics": [
            {"type": "loss"},
            {"type": "json_valid"},
            {"type": "json_schema", "schema": {"type": "object"}},
            {"type": "regex", "pattern": "x+"},
            {"type": "exact_match", "fields": ["p", "q"]},
        ],
        "compare_to_base": False,
        "general_probe": {"uri": "s3://bucket/probe"},
    },
    "two exactMatch metrics: the last one's fields": {
        "datasets": [{"name": "a", "uri": "s3://bucket/a"}],
        "metrics": [{"type": "exact_match", "fields": ["p"]}, {"type": "exact_match", "fields": ["q"]}],
    },
    "no datasets": {"general_probe": {"uri": "s3://bucket/probe"}},
}


@pytest.mark.parametrize("case", sorted(EVALUATIONS))
def test_the_reported_keys_the_operator_checks_are_the_keys_the_job_makes(case: str) -> None:
    evaluation = EvaluationConfig.model_validate(EVALUATIONS[case])
    metrics, base = reported_metric_keys(evaluation)
    assert (set(metrics), set(base)) == _job_keys(evaluation)


def _quickstart_gated(*rules: dict[str, Any], **evaluation: Any) -> dict[str, Any]:
    spec = copy.deepcopy(QUICKSTART)
    spec["evaluation"] = {**spec["evaluation"], **evaluation, "gate": list(rules)}
    return spec


NEVER_REPORTED = {
    "a dataset that is not declared": ({"metric": "support.jsonValid", "min": 0.9}, {}),
    "a metric that is not computed": ({"metric": "heldout.regex", "min": 0.9}, {}),
    "a field that is not compared": ({"metric": "heldout.fieldMatch.total", "min": 0.9}, {}),
    "a typo in the metric": ({"metric": "heldout.jsonvalid", "min": 0.9}, {}),
    "the base without compareToBase": ({"metric": "base.heldout.loss", "max": 2}, {"compareToBase": False}),
    "a delta without compareToBase": ({"metric": "delta.jsonValid", "min": 0}, {"compareToBase": False}),
    "the base's loss increase (only the tuned model has one)": (
        {"metric": "base.forgetting.lossIncrease", "max": 0.1},
        {},
    ),
}


@pytest.mark.parametrize("case", sorted(NEVER_REPORTED))
def test_a_gate_rule_on_a_key_never_reported_fails_validation_naming_the_rule(case: str) -> None:
    rule, evaluation = NEVER_REPORTED[case]
    spec = _quickstart_gated({"metric": "heldout.jsonSchema", "min": 0.8}, rule, **evaluation)
    parsed, errors = validate_spec(spec, SETTINGS)
    assert parsed is None
    assert len(errors) == 1 and errors[0].startswith(
        f"spec.evaluation.gate[1].metric: {rule['metric']!r} is never reported"
    )


@pytest.mark.parametrize(
    "metric",
    [
        "heldout.jsonSchema",
        "jsonSchema",
        "heldout.fieldMatch.party",
        "fieldMatch.date",
        "heldout.perplexity",
        "validation.loss",
        "forgetting.lossIncrease",
        "forgetting.relativeLossIncrease",
        "base.heldout.exactMatch",
        "base.forgetting.probeLoss",
        "delta.jsonValid",
        "delta.forgetting.probeLoss",
    ],
)
def test_a_gate_rule_on_a_reported_key_is_valid(metric: str) -> None:
    parsed, errors = validate_spec(_quickstart_gated({"metric": metric, "min": 0}), SETTINGS)
    assert errors == [] and parsed is not None


def test_a_regex_the_job_cannot_compile_fails_validation_naming_the_metric_field() -> None:
    spec = copy.deepcopy(QUICKSTART)
    spec["evaluation"]["metrics"].append({"type": "regex", "pattern": "(unclosed"})
    parsed, errors = validate_spec(spec, SETTINGS)
    assert parsed is None
    assert errors == [
        "spec.evaluation.metrics[4].pattern: Value error, regex does not compile: "
        "missing ), unterminated subpattern at position 0"
    ]
