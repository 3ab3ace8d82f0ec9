"""Admission by the real API server with the generated CRD: every manifest of
tests/integration/invalid/ is refused with its field named before the operator (or a cluster) sees
it, and what Kubernetes itself allows (quantities, the longest name) is admitted, not refused by a
narrower rule of ours."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import localstack  # hack/ is on sys.path through tests/conftest.py
import pytest
import yaml

from instructune_operator.api import NAME_MAX

from .conftest import ApiServer

pytestmark = pytest.mark.reconcile
ROOT = Path(__file__).resolve().parents[2]
INVALID = sorted((ROOT / "tests" / "integration" / "invalid").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _apply(api_server: ApiServer, namespace: str, doc: dict[str, Any], *extra: str) -> Any:
    return localstack.kubectl(
        api_server.dir,
        "apply",
        "--server-side",
        *extra,
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(doc),  # JSON: "1e9" stays the string a user quotes in YAML
        check=False,
    )


def _quickstart(**spec_changes: Any) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    for path, value in spec_changes.items():
        node = doc["spec"]
        *parents, leaf = path.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return doc


@pytest.mark.parametrize("manifest", INVALID, ids=lambda p: p.stem)
def test_the_api_server_refuses_each_invalid_manifest_naming_the_field(
    api_server: ApiServer, namespace: str, manifest: Path
) -> None:
    doc = yaml.safe_load(manifest.read_text())
    expect = doc["metadata"]["annotations"]
    result = _apply(api_server, namespace, doc)
    assert result.returncode != 0, f"{manifest.name} was admitted"
    assert expect["test.instructune.io/field"] in result.stderr, result.stderr
    assert expect["test.instructune.io/message"] in result.stderr, result.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_is_admitted(api_server: ApiServer, namespace: str, example: Path) -> None:
    doc = yaml.safe_load(example.read_text())
    doc["metadata"].pop("namespace", None)
    result = _apply(api_server, namespace, doc, "--dry-run=server")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("memory", ["64G", "1.5Gi", "500m", "1e9", "128974848", "129M", "123Mi"])
def test_every_kubernetes_quantity_is_admitted_as_worker_memory(
    api_server: ApiServer, namespace: str, memory: str
) -> None:
    doc = _quickstart(resources__memoryPerWorker=memory)
    result = _apply(api_server, namespace, doc, "--dry-run=server")
    assert result.returncode == 0, result.stderr


def test_the_longest_name_and_the_largest_validation_fraction_the_job_accepts_are_admitted(
    api_server: ApiServer, namespace: str
) -> None:
    doc = _quickstart(dataset__validation={"fraction": 0.5})
    doc["metadata"]["name"] = "t" + "-x" * ((NAME_MAX - 1) // 2)
    assert len(doc["metadata"]["name"]) == NAME_MAX
    result = _apply(api_server, namespace, copy.deepcopy(doc), "--dry-run=server")
    assert result.returncode == 0, result.stderr
