from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from instructune_jobs.scoring import MetricSpec, score_sample
from instructune_jobs.synthetic import extraction_rows
from instructune_operator.api import InstructionTuneSpec
from instructune_operator.builders.train_config import build_train_config

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_metrics_give_full_marks_to_the_reference_answers() -> None:
    # A gate is only meaningful when a perfect answer passes it: the example's schema and
    # fields must accept the task's own reference outputs.
    spec = InstructionTuneSpec.model_validate(
        yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    )
    metrics = MetricSpec.from_config(build_train_config(spec, "ns", "qs", "uid", 1).evaluation.metrics)
    for row in extraction_rows(50, seed=5, split="heldout"):
        score = score_sample(row["output"], row["output"], metrics)
        assert (score.json_valid, score.json_schema, score.exact_match) == (True, True, True), row["output"]
