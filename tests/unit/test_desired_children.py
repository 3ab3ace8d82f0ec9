"""builders.desired: every object a tune owns, in the order it must be applied."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from instructune_operator.api import InstructionTuneSpec
from instructune_operator.builders import Observed, Tune, desired
from instructune_operator.settings import load_settings

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SETTINGS = load_settings(str(ROOT / "hack" / "local-settings.yaml"), env={})
META = {"namespace": "ml-team", "name": "tune", "uid": "0123456789ab"}


def _tune(example: str) -> Tune:
    doc = yaml.safe_load((ROOT / "examples" / example).read_text())
    return Tune(META, InstructionTuneSpec.model_validate(doc["spec"]))


def test_training_children_come_in_the_order_they_must_be_applied() -> None:
    observed = Observed(ray_auth_token="t" * 64, operator_namespace="instructune-system")
    kinds = [m["kind"] for m in desired(_tune("quickstart.yaml"), SETTINGS, observed)]
    assert kinds == [
        "ServiceAccount",
        "Role",
        "ConfigMap",
        "Secret",
        "NetworkPolicy",
        "RoleBinding",
        "RayCluster",
    ]


def test_a_vllm_rollout_adds_its_deployment_and_service_and_ray_serve_adds_no_object() -> None:
    rollout = Observed(training=False, serving=True, template_hash="h")
    assert [m["kind"] for m in desired(_tune("lora-with-serving.yaml"), SETTINGS, rollout)] == [
        "Deployment",
        "Service",
    ]
    assert desired(_tune("quickstart.yaml"), SETTINGS, rollout) == []


def test_without_a_ray_token_or_an_operator_namespace_there_is_no_secret_or_network_policy() -> None:
    kinds = {m["kind"] for m in desired(_tune("quickstart.yaml"), SETTINGS, Observed())}
    assert "Secret" not in kinds and "NetworkPolicy" not in kinds
