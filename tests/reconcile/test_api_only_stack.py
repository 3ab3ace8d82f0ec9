"""The tier's own stack (`localstack.up(dir, api_only=True)`): etcd and kube-apiserver alone."""

from __future__ import annotations

import localstack  # hack/ is on sys.path through tests/conftest.py
import pytest

from .conftest import ApiServer

pytestmark = pytest.mark.reconcile


def test_the_api_only_stack_runs_etcd_and_the_api_server_alone_with_the_crds_established(
    api_server: ApiServer,
) -> None:
    assert {p["name"] for p in api_server.info["processes"]} == {"etcd", "kube-apiserver"}
    status = localstack.status(api_server.dir)
    assert status["running"] and status["complete"]
    assert all(c["healthy"] for c in status["components"].values()), status
    crds = localstack.kubectl(api_server.dir, "get", "crd", "-o", "name").stdout.split()
    assert sorted(crds) == [
        "customresourcedefinition.apiextensions.k8s.io/instructiontunes.instructune.io",
        "customresourcedefinition.apiextensions.k8s.io/rayclusters.ray.io",
    ]


def test_up_on_the_running_api_only_stack_reuses_it_and_a_full_up_refuses_it(api_server: ApiServer) -> None:
    again = localstack.up(api_server.dir, api_only=True)
    assert again["reused"] is True
    assert [p["pid"] for p in again["processes"]] == [p["pid"] for p in api_server.info["processes"]]
    with pytest.raises(localstack.StackError, match="is API-only"):
        localstack.up(api_server.dir)
