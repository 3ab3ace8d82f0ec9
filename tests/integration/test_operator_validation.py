"""The operator process against the real API server: Validated condition, observedGeneration, events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import get_tune, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _condition(tune: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in tune.get("status", {}).get("conditions", []) if c["type"] == type_), None)


def _apply(stack: Any, namespace: str, doc: dict[str, Any]) -> None:
    stack.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))


def test_valid_tune_gets_validated_true_with_observed_generation_and_an_event(
    crd_installed: Any, operator: Any, namespace: str
) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["suspend"] = True  # only validation is under test here
    _apply(crd_installed, namespace, doc)
    tune = wait_for(
        lambda: (t := get_tune(crd_installed, namespace, "quickstart")) and _condition(t, "Validated") and t,
        60,
        "the Validated condition",
    )
    validated = _condition(tune, "Validated")
    assert validated is not None
    assert (validated["status"], validated["reason"]) == ("True", "SpecValid")
    assert tune["status"]["observedGeneration"] == tune["metadata"]["generation"]
    assert validated["observedGeneration"] == tune["metadata"]["generation"]
    events = wait_for(
        lambda: crd_installed.kubectl(
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            "involvedObject.name=quickstart",
            "-o",
            "yaml",
        ).stdout.count("SpecValid"),
        30,
        "the SpecValid event",
    )
    assert events >= 1


def test_tune_naming_an_unknown_pool_gets_validated_false_with_the_reason(
    crd_installed: Any, operator: Any, namespace: str
) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["name"] = "no-such-pool"
    doc["spec"]["resources"]["gpuPool"] = "h100-sxm"
    _apply(crd_installed, namespace, doc)

    def validated_false() -> dict[str, Any] | None:
        c = _condition(get_tune(crd_installed, namespace, "no-such-pool"), "Validated")
        return c if c and c["status"] == "False" else None

    condition = wait_for(validated_false, 60, "Validated=False")
    assert condition["reason"] == "InvalidSpec"
    assert "spec.resources.gpuPool: unknown pool 'h100-sxm'" in condition["message"]
    assert get_tune(crd_installed, namespace, "no-such-pool")["status"]["phase"] == "Failed"
