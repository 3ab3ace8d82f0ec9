"""The local stack's real components behave like the cluster the operator will meet."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import localstack
import localstack_node
import pytest

from tests.conftest import Stack

pytestmark = pytest.mark.integration


def api_get(stack: Stack, path: str, cert: tuple[Path, Path] | None) -> tuple[int, dict[str, Any]]:
    ctx = ssl.create_default_context(cafile=str(stack.dir / "pki" / "ca.crt"))
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    try:
        with urllib.request.urlopen(
            stack.info["endpoints"]["apiserver"] + path, context=ctx, timeout=10
        ) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_for(what: str, predicate: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def namespace(stack: Stack) -> Iterator[str]:
    name = f"ls-{uuid.uuid4().hex[:8]}"
    stack.kubectl("create", "namespace", name)
    wait_for("the namespace's default ServiceAccount", lambda: stack.kubectl(
        "get", "serviceaccount/default", "-n", name, check=False).returncode == 0)  # fmt: skip
    yield name
    stack.kubectl("delete", "namespace", name, "--wait=false", check=False)


def get_json(stack: Stack, *args: str) -> Any:
    return json.loads(stack.kubectl("get", *args, "-o", "json").stdout)


def test_api_server_denies_anonymous_and_ungranted_users_because_rbac_is_on(stack: Stack) -> None:
    status, body = api_get(stack, "/api/v1/namespaces/default/pods", cert=None)
    assert (status, body["reason"]) == (403, "Forbidden")
    assert "system:anonymous" in body["message"]

    nobody = localstack.issue_client_cert(
        stack.dir, f"nobody-{uuid.uuid4().hex[:6]}", groups=["instructune:none"]
    )
    status, body = api_get(stack, "/api/v1/namespaces/default/pods", cert=nobody)
    assert (status, body["reason"]) == (403, "Forbidden")
    assert "nobody-" in body["message"]

    admin = (stack.dir / "pki" / "admin.crt", stack.dir / "pki" / "admin.key")
    status, body = api_get(stack, "/api/v1/namespaces/default/pods", cert=admin)
    assert status == 200 and body["kind"] == "PodList"
    assert stack.kubectl("auth", "can-i", "list", "pods", "--as=nobody", check=False).stdout.strip() == "no"


def test_each_pool_has_ready_fake_nodes_with_its_gpu_capacity_and_taint(stack: Stack) -> None:
    # The fake nodes (the stack's real node, in pool `local`, has tests of its own: test_real_node.py).
    nodes = get_json(stack, "nodes", "-l", f"{localstack.POOL_LABEL},type=kwok")["items"]
    by_pool: dict[str, list[dict[str, Any]]] = {}
    for node in nodes:
        by_pool.setdefault(node["metadata"]["labels"][localstack.POOL_LABEL], []).append(node)
    assert {name: len(ns) for name, ns in by_pool.items()} == {"a100-80g": 2, "l4": 2, "cpu": 2}

    expected_gpus = {"a100-80g": "8", "l4": "1", "cpu": None}
    for pool, pool_nodes in by_pool.items():
        for node in pool_nodes:
            ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
            assert ready == "True", node["metadata"]["name"]
            assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
            assert node["status"]["allocatable"].get("nvidia.com/gpu") == expected_gpus[pool]
            taints = [(t["key"], t.get("value"), t["effect"]) for t in node["spec"].get("taints", [])]
            if expected_gpus[pool]:
                assert taints == [("nvidia.com/gpu", "present", "NoSchedule")]
            else:
                assert taints == []
    assert by_pool["a100-80g"][0]["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    assert by_pool["a100-80g"][0]["status"]["capacity"]["cpu"] == "96"


def gpu_pod(name: str, tolerate: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "nodeSelector": {localstack.POOL_LABEL: "a100-80g"},
        "containers": [
            {"name": "main", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": "8"}}}
        ],
    }
    if tolerate:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def test_scheduler_places_a_tolerating_gpu_pod_on_its_pool_and_kwok_runs_it(
    stack: Stack, namespace: str
) -> None:
    stack.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(gpu_pod("tolerates", tolerate=True)))
    stack.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(gpu_pod("untolerated", tolerate=False))
    )
    stack.kubectl("wait", "-n", namespace, "--for=condition=Ready", "--timeout=60s", "pod/tolerates")

    pod = get_json(stack, "pod", "tolerates", "-n", namespace)
    assert pod["status"]["phase"] == "Running"
    assert pod["spec"]["nodeName"].startswith("kwok-a100-80g-")
    events = get_json(stack, "events", "-n", namespace, "--field-selector", "involvedObject.name=tolerates")
    assert any(e["reason"] == "Scheduled" and e["source"].get("component", e.get("reportingComponent", ""))
               in ("default-scheduler", "") for e in events["items"])  # fmt: skip

    def unschedulable() -> bool:
        p = get_json(stack, "pod", "untolerated", "-n", namespace)
        conds = {c["type"]: c for c in p["status"].get("conditions", [])}
        return conds.get("PodScheduled", {}).get("reason") == "Unschedulable"

    wait_for("the untolerated pod to be reported Unschedulable", unschedulable, timeout=30)
    untolerated = get_json(stack, "pod", "untolerated", "-n", namespace)
    assert untolerated["status"]["phase"] == "Pending"
    assert "untolerated taint" in untolerated["status"]["conditions"][0]["message"]


def test_kuberay_operator_reconciles_a_raycluster_into_a_running_head_pod(
    stack: Stack, namespace: str
) -> None:
    for crd in ("rayclusters.ray.io", "rayjobs.ray.io", "rayservices.ray.io"):
        conds = {c["type"]: c["status"] for c in get_json(stack, "crd", crd)["status"]["conditions"]}
        assert conds["Established"] == "True", crd
    raycluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "tiny"},
        "spec": {
            "headGroupSpec": {
                "rayStartParams": {},
                "template": {"spec": {"containers": [{
                    "name": "ray-head", "image": "rayproject/ray:2.60.0",
                    "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
                }]}},
            }
        },
    }  # fmt: skip
    stack.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(raycluster))

    selector = "ray.io/cluster=tiny,ray.io/node-type=head"
    wait_for("the head pod", lambda: get_json(stack, "pods", "-n", namespace, "-l", selector)["items"], 60)
    stack.kubectl("wait", "-n", namespace, "--for=condition=Ready", "--timeout=60s", "pod", "-l", selector)
    head = get_json(stack, "pods", "-n", namespace, "-l", selector)["items"][0]
    assert head["spec"]["nodeName"].startswith("kwok-cpu-")
    assert head["metadata"]["ownerReferences"][0]["kind"] == "RayCluster"
    services = get_json(stack, "services", "-n", namespace, "-l", "ray.io/cluster=tiny")["items"]
    assert services, "the operator created no head service"


def test_minio_holds_the_project_buckets_and_round_trips_objects(stack: Stack) -> None:
    boto3 = pytest.importorskip("boto3")
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=stack.access_key,
                      aws_secret_access_key=stack.secret_key, region_name="us-east-1")  # fmt: skip
    assert {"models", "datasets", "artifacts"} <= {b["Name"] for b in s3.list_buckets()["Buckets"]}
    for bucket in ("models", "datasets", "artifacts"):
        key = f"probe/{uuid.uuid4().hex}.txt"
        s3.put_object(Bucket=bucket, Key=key, Body=b"hello " + bucket.encode())
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"hello " + bucket.encode()
        s3.delete_object(Bucket=bucket, Key=key)

    wrong = boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=stack.access_key,
                         aws_secret_access_key="wrong-secret", region_name="us-east-1")  # fmt: skip
    with pytest.raises(ClientError):
        wrong.list_buckets()


def test_ray_head_answers_the_jobs_api_only_with_its_token(stack: Stack) -> None:
    def get(path: str, token: str | None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with urllib.request.urlopen(
                urllib.request.Request(stack.ray_address + path, headers=headers)
            ) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, None

    status, version = get("/api/version", stack.ray_token)
    assert status == 200 and version["ray_version"].startswith("2.")
    status, jobs = get("/api/jobs/", stack.ray_token)
    assert status == 200 and isinstance(jobs, list)
    assert get("/api/jobs/", None)[0] == 401
    assert get("/api/jobs/", "not-the-token")[0] in (401, 403)


def test_env_file_is_private_sourceable_and_the_only_place_with_credentials(stack: Stack) -> None:
    env_file = stack.dir / "env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    out = subprocess.run(["bash", "-c", f". {env_file} && kubectl get nodes -o name && echo $RAY_ADDRESS"],
                         capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]}).stdout  # fmt: skip
    assert "node/kwok-a100-80g-0" in out and stack.ray_address in out
    assert stack.env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert stack.env["AWS_ENDPOINT_URL"] == stack.s3_endpoint == stack.env["INSTRUCTUNE_S3_ENDPOINT"]
    recorded = (stack.dir / "stack.json").read_text()
    assert stack.secret_key not in recorded and stack.ray_token not in recorded


def test_up_on_a_healthy_running_stack_reuses_it(stack: Stack) -> None:
    again = localstack.up(stack.dir)
    assert again["reused"] is True
    assert [p["pid"] for p in again["processes"]] == [p["pid"] for p in stack.info["processes"]]


@pytest.mark.stack_teardown
def test_down_leaves_no_recorded_process_or_port_alive(stack: Stack, tmp_path: Path) -> None:
    # Stops the session's own stack (this test runs last); a stack the session reused is left alone.
    state_dir = stack.dir if stack.owned else tmp_path / "own-stack"
    info = stack.info if stack.owned else localstack.up(state_dir)
    recorded = [localstack.Proc(**p) for p in info["processes"]]
    tree = recorded + localstack.descendants([p.pid for p in recorded])
    assert {p.name for p in recorded} >= {
        "etcd",
        "kube-apiserver",
        "kwok",
        "kuberay-operator",
        "minio",
        "ray",
    }
    assert all(localstack.alive(p) for p in recorded)

    record = info.get("node")
    localstack.down(state_dir)

    assert [f"{p.name}[{p.pid}]" for p in tree if localstack.alive(p)] == []
    if record:
        # The real node: no process, mount, netns, link, iptables rule, socket or cgroup of it is left
        # (compared with what the machine had before the node started).
        assert localstack_node.leftovers(record) == []
        assert record["bridge"] not in localstack_node.inventory([])["links"]

    assert not localstack.ray_temp_dir(state_dir).exists()
    assert localstack.status(state_dir)["running"] is False
    for name in ("apiserver", "etcd", "minio", "ray_dashboard"):
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", info["ports"][name]), timeout=2):
            pass
