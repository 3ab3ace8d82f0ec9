"""The generated CRD on the real API server: examples accepted, wrong manifests rejected by field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((Path(__file__).parent / "invalid").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted_by_server_side_dry_run(
    crd_installed: Any, namespace: str, example: Path
) -> None:
    doc = yaml.safe_load(example.read_text())
    doc["metadata"].pop("namespace", None)  # each test runs in a namespace of its own
    result = crd_installed.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        "-",
        input=yaml.safe_dump(doc),
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("manifest", INVALID, ids=lambda p: p.name)
def test_invalid_manifest_is_rejected_naming_the_field(
    crd_installed: Any, namespace: str, manifest: Path
) -> None:
    # Each file says which field the API server must name and a phrase of its message.
    doc = yaml.safe_load(manifest.read_text())
    expect = doc["metadata"]["annotations"]
    result = crd_installed.kubectl(
        "apply", "--server-side", "-n", namespace, "-f", str(manifest), check=False
    )
    assert result.returncode != 0, f"{manifest.name} was accepted"
    assert expect["test.instructune.io/field"] in result.stderr, result.stderr
    assert expect["test.instructune.io/message"] in result.stderr, result.stderr


def test_training_spec_is_immutable_but_suspend_and_serving_may_change(
    crd_installed: Any, namespace: str
) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["name"] = "immutable"
    apply = lambda d: crd_installed.kubectl(  # noqa: E731
        "apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(d), check=False
    )
    assert apply(doc).returncode == 0

    changed = yaml.safe_load(yaml.safe_dump(doc))
    changed["spec"]["training"]["learningRate"] = 0.1
    result = apply(changed)
    assert result.returncode != 0
    assert "spec.training" in result.stderr and "immutable" in result.stderr

    allowed = yaml.safe_load(yaml.safe_dump(doc))
    allowed["spec"].update(suspend=True, ttlSecondsAfterFinished=60)
    allowed["spec"]["serving"]["replicas"] = 2
    result = apply(allowed)
    assert result.returncode == 0, result.stderr


def test_kubectl_get_by_short_name_and_explain_document_the_api(crd_installed: Any, namespace: str) -> None:
    crd_installed.kubectl(
        "apply", "--server-side", "-n", namespace, "-f", str(ROOT / "examples" / "quickstart.yaml")
    )
    table = crd_installed.kubectl("get", "itune", "-n", namespace).stdout
    assert table.split()[:6] == ["NAME", "PHASE", "PROGRESS", "LOSS", "EVAL", "AGE"]
    assert "quickstart" in table
    explained = crd_installed.kubectl("explain", "instructiontune.spec.dataset").stdout
    assert "Training and validation data" in explained
    assert "invalidRows" in explained and "Handling of rows that do not fit" in explained
