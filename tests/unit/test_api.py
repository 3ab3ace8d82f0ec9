from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from instructune_operator.api import InstructionTuneSpec
from instructune_operator.crd import crd
from tests.unit.conftest import generated_files_drift

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for name, prop in schema.get("properties", {}).items():
        out += _walk(prop, f"{path}.{name}")
    if "items" in schema:
        out += _walk(schema["items"], f"{path}[]")
    return out


def _schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_matches_the_models() -> None:
    assert not (drift := generated_files_drift("gen_crd.py")), drift


def test_every_spec_and_status_field_has_a_description() -> None:
    schema = _schema()
    nodes = _walk(schema["properties"]["spec"], "spec") + _walk(schema["properties"]["status"], "status")
    # Items of scalar lists are not fields: kubectl explain documents the list itself.
    missing = [p for p, node in nodes if not node.get("description") and not p.endswith("[]")]
    assert missing == []


def test_schema_is_structural_no_refs_unions_or_nulls() -> None:
    text = yaml.safe_dump(_schema())
    for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "type: 'null'", "title:"):
        assert forbidden not in text
    for path, node in _walk(_schema()):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields") or path == "", path


def test_training_fields_carry_an_immutability_rule_and_mutable_ones_do_not() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    for field in (
        "baseModel",
        "dataset",
        "template",
        "method",
        "training",
        "distributed",
        "resources",
        "checkpointing",
    ):
        rules = [r["rule"] for r in spec[field].get("x-kubernetes-validations", [])]
        assert "self == oldSelf" in rules, field
    for field in ("suspend", "serving", "ttlSecondsAfterFinished", "evaluation"):
        rules = [r["rule"] for r in spec[field].get("x-kubernetes-validations", [])]
        assert "self == oldSelf" not in rules, field


def test_crd_has_short_name_status_subresource_and_printer_columns() -> None:
    version = crd()["spec"]["versions"][0]
    assert crd()["spec"]["names"]["shortNames"] == ["itune"]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Progress",
        "Loss",
        "Eval",
        "Age",
    ]


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_parses_as_a_spec(example: Path) -> None:
    doc = yaml.safe_load(example.read_text())
    InstructionTuneSpec.model_validate(doc["spec"])


def test_spec_rejects_nonpositive_weight_with_the_field_named() -> None:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["dataset"]["train"][0]["weight"] = 0
    with pytest.raises(ValidationError) as err:
        InstructionTuneSpec.model_validate(doc["spec"])
    assert "weight" in str(err.value)


def test_every_permanent_exit_of_the_job_has_a_condition_reason() -> None:
    from instructune_jobs.contract import PERMANENT_EXIT_REASONS
    from instructune_operator.api import Reason

    assert {Reason(reason) for reason in PERMANENT_EXIT_REASONS.values()}


def test_condition_types_and_reasons_stay_plain_strings_in_the_crd() -> None:
    condition = _schema()["properties"]["status"]["properties"]["conditions"]["items"]["properties"]
    assert condition["type"]["type"] == condition["reason"]["type"] == "string"
    assert "enum" not in condition["type"] and "enum" not in condition["reason"]
