from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from instructune_operator.naming import child_name, ray_cluster_name, submission_id
from instructune_operator.settings import load_settings
from instructune_operator.validation import validate_spec

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SETTINGS = load_settings(str(ROOT / "hack" / "local-settings.yaml"), env={})


def _quickstart() -> dict:
    return yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]


def test_child_names_are_deterministic_and_short_enough() -> None:
    long = "a" * 80
    assert child_name("tune", "ray") == "tune-ray"
    assert child_name(long, "config") == child_name(long, "config")
    assert len(child_name(long, "config")) <= 63
    assert len(ray_cluster_name(long)) <= 47
    assert child_name(long + "b", "config") != child_name(long + "c", "config")


def test_submission_id_differs_per_attempt_and_is_stable() -> None:
    assert submission_id("ns", "t", "0123456789", 1) == submission_id("ns", "t", "0123456789", 1)
    assert submission_id("ns", "t", "0123456789", 1) != submission_id("ns", "t", "0123456789", 2)


def test_quickstart_is_valid_against_the_local_pools() -> None:
    parsed, errors = validate_spec(_quickstart(), SETTINGS)
    assert errors == [] and parsed is not None


def test_unknown_pool_is_rejected_naming_the_known_ones() -> None:
    spec = _quickstart()
    spec["resources"]["gpuPool"] = "h100"
    _, errors = validate_spec(spec, SETTINGS)
    assert errors == ["spec.resources.gpuPool: unknown pool 'h100' (known: a100-80g, cpu, l4, local)"]


def test_request_larger_than_the_pool_is_rejected() -> None:
    spec = _quickstart()
    spec["resources"].update(gpuPool="l4", gpusPerWorker=2, workers=3)
    _, errors = validate_spec(spec, SETTINGS)
    assert any("gpusPerWorker: 2 exceeds the 1 GPUs per node of pool 'l4'" in e for e in errors)
    assert any("workers: 3 exceeds pool 'l4'" in e for e in errors)


def test_schema_errors_name_the_camel_case_field() -> None:
    spec = _quickstart()
    spec["training"]["learningRate"] = -1
    _, errors = validate_spec(spec, SETTINGS)
    assert errors and errors[0].startswith("spec.training.learningRate:")
