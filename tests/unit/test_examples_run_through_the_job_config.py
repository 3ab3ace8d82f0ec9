"""Every example is what the job runs, not only what the API server admits: the operator's
spec -> TrainConfig builder, the job's own parse of the ConfigMap's JSON (regexes compiled) and
the gate's keys checked against what the evaluation reports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from instructune_jobs.config import RegexMetric, TrainConfig, gate_metric_reported
from instructune_operator.builders.train_config import build_train_config
from instructune_operator.settings import load_settings
from instructune_operator.validation import validate_spec

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
SETTINGS = load_settings(str(ROOT / "hack" / "local-settings.yaml"), env={})


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_builds_a_train_config_the_job_accepts(example: Path) -> None:
    doc = yaml.safe_load(example.read_text())
    spec, errors = validate_spec(doc["spec"], SETTINGS)
    assert errors == [] and spec is not None
    config = build_train_config(spec, "ns", doc["metadata"]["name"], "0123456789abcdef", 1)
    # What the job reads from its ConfigMap, parsed by the job's own model.
    job = TrainConfig.from_json(config.to_json())
    assert job == config
    for metric in job.evaluation.metrics:
        if isinstance(metric, RegexMetric):
            re.compile(metric.pattern)
    for rule in spec.evaluation.gate:
        assert gate_metric_reported(rule.metric, job.evaluation), rule.metric
