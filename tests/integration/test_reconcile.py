"""Reconcile against the real API server, KubeRay, kube-scheduler and KWOK GPU pools."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import get_tune, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _tune(name: str, **resources: Any) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["resources"] = {
        "gpuPool": "a100-80g",
        "workers": 2,
        "gpusPerWorker": 8,
        "cpusPerWorker": 8,
        "memoryPerWorker": "64Gi",
        **resources,
    }
    # Nothing to train here: the job fails fast on missing data, once.
    doc["spec"]["dataset"]["train"] = [{"uri": "s3://datasets/does-not-exist.jsonl"}]
    doc["spec"]["backoffLimit"] = 0
    return doc


def _apply(stack: Any, namespace: str, doc: dict[str, Any]) -> None:
    stack.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))


def _pods(stack: Any, namespace: str, tune: str) -> list[dict[str, Any]]:
    out = stack.kubectl(
        "get", "pods", "-n", namespace, "-l", f"instructune.io/tune={tune}", "-o", "yaml"
    ).stdout
    return yaml.safe_load(out)["items"]


def _nodes_of_pool(stack: Any, pool: str) -> set[str]:
    out = stack.kubectl("get", "nodes", "-l", f"instructune.io/pool={pool}", "-o", "name").stdout
    return {line.removeprefix("node/") for line in out.split()}


def test_ray_pods_land_on_the_named_pool_only_and_the_cluster_becomes_ready(
    crd_installed: Any, operator: Any, namespace: str
) -> None:
    _apply(crd_installed, namespace, _tune("placed"))
    pods = wait_for(
        lambda: (
            (p := _pods(crd_installed, namespace, "placed"))
            and len(p) == 3
            and all(x["spec"].get("nodeName") for x in p)
            and p
        ),
        120,
        "3 scheduled Ray pods",
    )
    a100 = _nodes_of_pool(crd_installed, "a100-80g")
    assert {p["spec"]["nodeName"] for p in pods} <= a100
    workers = [p for p in pods if p["metadata"]["labels"]["instructune.io/component"] == "ray-worker"]
    assert len(workers) == 2
    for worker in workers:
        container = worker["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        env = {e["name"]: e for e in container["env"]}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "quickstart-s3"
        assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
    tune = wait_for(
        lambda: (t := get_tune(crd_installed, namespace, "placed")).get("status", {}).get("jobId") and t,
        120,
        "the cluster to become ready and the job to be submitted",
    )
    ready = next(c for c in tune["status"]["conditions"] if c["type"] == "ClusterReady")
    assert ready["status"] == "True"
    assert tune["status"]["rayCluster"]["name"] == "placed-ray"


def test_a_request_larger_than_the_pool_shows_as_unschedulable_in_status(
    crd_installed: Any, operator: Any, namespace: str
) -> None:
    _apply(crd_installed, namespace, _tune("too-big", workers=3))

    def unschedulable() -> dict[str, Any] | None:
        status = get_tune(crd_installed, namespace, "too-big").get("status", {})
        c = next((c for c in status.get("conditions", []) if c["type"] == "ClusterReady"), None)
        return c if c and c["reason"] == "Unschedulable" else None

    condition = wait_for(unschedulable, 120, "ClusterReady=False/Unschedulable")
    assert condition["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in condition["message"]
    assert get_tune(crd_installed, namespace, "too-big")["status"]["phase"] == "Provisioning"


def test_job_identity_may_patch_only_its_own_tune_status(
    crd_installed: Any, operator: Any, namespace: str
) -> None:
    _apply(crd_installed, namespace, _tune("ident"))
    _apply(crd_installed, namespace, _tune("other"))
    wait_for(
        lambda: (
            crd_installed.kubectl("get", "rolebinding", "ident-job", "-n", namespace, check=False).returncode
            == 0
        ),
        60,
        "the job identity",
    )
    who = f"system:serviceaccount:{namespace}:ident-job"

    def can(*args: str) -> str:
        return crd_installed.kubectl(
            "auth", "can-i", "--as", who, "-n", namespace, *args, check=False
        ).stdout.strip()

    assert can("patch", "instructiontunes.instructune.io/ident", "--subresource=status") == "yes"
    assert can("patch", "instructiontunes.instructune.io/other", "--subresource=status") == "no"
    assert can("patch", "instructiontunes.instructune.io/ident") == "no"
    assert can("get", "secrets") == "no"
    assert can("create", "pods") == "no"


def test_deleting_a_tune_removes_its_children(crd_installed: Any, operator: Any, namespace: str) -> None:
    _apply(crd_installed, namespace, _tune("gone"))
    wait_for(
        lambda: (
            crd_installed.kubectl("get", "raycluster", "gone-ray", "-n", namespace, check=False).returncode
            == 0
        ),
        60,
        "the RayCluster",
    )
    crd_installed.kubectl("delete", "itune", "gone", "-n", namespace, "--timeout=60s")
    for kind in ("raycluster", "configmap", "serviceaccount", "role", "rolebinding"):
        wait_for(
            lambda k=kind: (
                crd_installed.kubectl(
                    "get", k, "-n", namespace, "-l", "instructune.io/tune=gone", "-o", "name"
                ).stdout.strip()
                == ""
            ),
            60,
            f"{kind} deleted",
        )
