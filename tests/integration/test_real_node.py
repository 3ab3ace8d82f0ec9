"""The local stack's real node: a kubelet on this machine runs pods beside the KWOK nodes.

Pods here run code: the stack's own probe image (a static program), and the product's images
(hack/build-images.sh) when the tests ask for them. The node's removal is checked where the session's
stack stops (tests/integration/test_local_stack.py, last test).
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import localstack
import localstack_node
import pytest

from tests.conftest import Stack

pytestmark = pytest.mark.integration


def get_json(stack: Stack, *args: str) -> Any:
    return json.loads(stack.kubectl("get", *args, "-o", "json").stdout)


def wait_for(what: str, predicate: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if last := predicate():
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def ns(stack: Stack, real_node: dict[str, Any]) -> Iterator[str]:
    name = f"node-{uuid.uuid4().hex[:8]}"
    stack.kubectl("create", "namespace", name)
    wait_for("the namespace's default ServiceAccount", lambda: stack.kubectl(
        "get", "serviceaccount/default", "-n", name, check=False).returncode == 0)  # fmt: skip
    yield name
    stack.kubectl("delete", "namespace", name, "--wait=false", check=False)


def pod(name: str, image: str, args: list[str], *, labels: dict[str, str] | None = None,
        command: list[str] | None = None, **container: Any) -> dict[str, Any]:  # fmt: skip
    """A pod for the real node (pool `local`): images come from the node's containerd, never pulled."""
    c: dict[str, Any] = {
        "name": "main",
        "image": image,
        "imagePullPolicy": "Never",
        "args": args,
        **container,
    }
    if command:
        c["command"] = command
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "nodeSelector": {localstack.POOL_LABEL: "local"},
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "automountServiceAccountToken": False,
            "containers": [c],
        },
    }


def apply(stack: Stack, ns: str, *objs: dict[str, Any]) -> None:
    stack.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                  "items": list(objs)}))  # fmt: skip


def finished(stack: Stack, ns: str, name: str, timeout: float = 120) -> tuple[str, str]:
    """(phase, logs) of a pod once it has Succeeded or Failed."""
    phase = wait_for(f"pod {name} to finish", lambda: get_json(stack, "pod", name, "-n", ns)["status"].get(
        "phase") in ("Succeeded", "Failed") and get_json(stack, "pod", name, "-n", ns)["status"]["phase"], timeout)  # fmt: skip
    return phase, stack.kubectl("logs", "-n", ns, name, check=False).stdout


def test_the_real_node_is_ready_beside_the_kwok_nodes(stack: Stack, real_node: dict[str, Any]) -> None:
    nodes = {n["metadata"]["name"]: n for n in get_json(stack, "nodes")["items"]}
    node = nodes[real_node["name"]]
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert ready["Ready"] == "True"
    assert node["metadata"]["labels"][localstack.POOL_LABEL] == "local"
    assert node["spec"].get("taints", []) == []
    # KWOK leaves it alone: it manages only nodes with its annotation.
    assert localstack.KWOK_ANNOTATION not in node["metadata"].get("annotations", {})
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == real_node["gateway"]
    assert not ipaddress.ip_address(addresses["InternalIP"]).is_loopback
    assert node["status"]["nodeInfo"]["kubeletVersion"] == localstack.versions()["K8S_VERSION"]
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://1.")
    kwok = [n for n in nodes.values() if n["metadata"]["labels"].get("type") == "kwok"]
    assert len(kwok) == 6
    assert all({c["type"]: c["status"] for c in n["status"]["conditions"]}["Ready"] == "True" for n in kwok)
    table = stack.kubectl("get", "nodes").stdout
    assert re.search(rf"^{real_node['name']}\s+Ready\s", table, re.M), table


def test_a_pod_serves_the_host_and_another_pod_reaches_it_by_its_service_dns_name(
    stack: Stack, real_node: dict[str, Any], ns: str
) -> None:
    image = real_node["probe_image"]
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
        "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }  # fmt: skip
    echo = pod("echo", image, ["serve", "8080"], labels={"app": "echo"},
               readinessProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 1})  # fmt: skip
    apply(stack, ns, service, echo)
    stack.kubectl("wait", "-n", ns, "--for=condition=Ready", "--timeout=90s", "pod/echo")
    running = get_json(stack, "pod", "echo", "-n", ns)
    assert running["spec"]["nodeName"] == real_node["name"]
    pod_ip = running["status"]["podIP"]
    assert ipaddress.ip_address(pod_ip) in ipaddress.ip_network(real_node["pod_cidr"])

    # The host reaches the pod at its address; the API server reaches the kubelet (exec) by InternalIP.
    with urllib.request.urlopen(f"http://{pod_ip}:8080/", timeout=10) as r:
        assert r.read() == b"hello from echo\n"
    out = stack.kubectl("exec", "-n", ns, "echo", "--", "/probe", "get", "http://127.0.0.1:8080/", "5").stdout
    assert out == "200 hello from echo\n"

    # Another pod: cluster DNS (CoreDNS) resolves the Service's name, kube-proxy forwards its ClusterIP.
    # The probe retries until it gets an answer (kube-proxy may program the new Service a moment
    # after the pod is ready: "connection refused" lines first) and succeeds only on a 200.
    apply(stack, ns, pod("client", image, ["get", f"http://echo.{ns}.svc.cluster.local/", "60"]))
    phase, logs = finished(stack, ns, "client")
    *retries, answer = logs.splitlines()
    assert (phase, answer) == ("Succeeded", "200 hello from echo"), logs
    assert all(line.startswith("retrying: ") for line in retries), logs
    # The short name works too (the pod's search domains come from the cluster, not the host).
    apply(stack, ns, pod("short", image, ["get", "http://echo/", "30"]))
    phase, logs = finished(stack, ns, "short")
    *retries, answer = logs.splitlines()
    assert (phase, answer) == ("Succeeded", "200 hello from echo"), logs
    assert all(line.startswith("retrying: ") for line in retries), logs


def test_pods_reach_only_the_stacks_own_addresses(stack: Stack, real_node: dict[str, Any], ns: str) -> None:
    listing = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    addrs = [ipaddress.ip_address(a) for a in re.findall(r"inet ([0-9.]+)", listing)]
    outside = [a for a in addrs if not a.is_loopback and a not in ipaddress.ip_network(real_node["pod_cidr"])]
    image = real_node["probe_image"]
    objs = [pod("by-name", image, ["get", "http://example.com/", "0"])]
    if outside:  # the machine's own address on its outside network: pods have no route there
        objs.append(pod("by-address", image, ["get", f"http://{outside[0]}:9/", "0"]))
    apply(stack, ns, *objs)
    phase, _ = finished(stack, ns, "by-name")
    err = stack.kubectl("logs", "-n", ns, "by-name").stdout
    assert phase == "Failed"
    assert "no such host" in err or "server misbehaving" in err or "refused" in err, err
    if outside:
        phase, _ = finished(stack, ns, "by-address")
        err = stack.kubectl("logs", "-n", ns, "by-address").stdout
        assert phase == "Failed" and "network is unreachable" in err, err


@pytest.mark.timeout(5400)
def test_the_job_image_imports_the_training_stack_and_starts_a_ray_head(
    stack: Stack, product_image: Callable[[str], str], ns: str
) -> None:
    script = (
        "set -e; python -c 'import instructune_jobs, torch, ray, deepspeed, peft, transformers; "
        'print("imports", ray.__version__, torch.__version__)\'; '
        "ray start --head --num-cpus=1 --num-gpus=0 --disable-usage-stats --include-dashboard=false; "
        'python -c \'import ray; ray.init(address="auto"); print("cpus", ray.cluster_resources().get("CPU"))\'; '
        "ray stop --force >/dev/null"
    )
    job = pod("ray-head", product_image("job"), ["-c", script], command=["bash"],
              volumeMounts=[{"name": "shm", "mountPath": "/dev/shm"}])  # fmt: skip
    job["spec"]["volumes"] = [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}]
    apply(stack, ns, job)
    phase, logs = finished(stack, ns, "ray-head", timeout=600)
    assert phase == "Succeeded", logs[-3000:]
    assert re.search(r"^imports 2\.60\.", logs, re.M), logs[-3000:]
    assert "cpus 1.0" in logs, logs[-3000:]


@pytest.mark.timeout(5400)
def test_the_operator_image_runs_as_non_root_with_a_read_only_root_filesystem(
    stack: Stack, product_image: Callable[[str], str], ns: str
) -> None:
    script = (
        "import os, instructune_operator\n"
        "try:\n    open('/probe', 'w')\n    print('writable')\nexcept OSError as e:\n    print('read-only', e.errno)\n"
        "print('uid', os.getuid())\n"
    )
    op = pod("operator", product_image("operator"), ["-c", script], command=["python"],
             securityContext={"readOnlyRootFilesystem": True, "runAsNonRoot": True,
                              "allowPrivilegeEscalation": False})  # fmt: skip
    apply(stack, ns, op)
    phase, logs = finished(stack, ns, "operator", timeout=180)
    assert phase == "Succeeded", logs
    assert "read-only 30" in logs and "uid 65532" in logs, logs


@pytest.mark.stack_teardown
def test_a_start_that_fails_with_a_pod_running_on_the_node_leaves_nothing_of_it(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs after the session's stack stopped (stack_teardown): its node is this machine's one node.
    if stack.owned:
        localstack.down(stack.dir)
    state_dir = tmp_path / "failing"
    # Another stack on this machine (say a `make demo` left running) may hold its one real node.
    held = localstack.node_wanted(state_dir)
    if held:
        pytest.skip(f"no real node to fail with: {held}")
    start_node_agents = localstack.start_node_agents

    # Right after the node's agents start (before the rest of the stack is waited for): the node
    # becomes Ready, a pod runs on it (placed directly: no scheduler yet), then the start fails.
    def agents_then_fail(sd: Path, layout: Any, launch: Any) -> None:
        start_node_agents(sd, layout, launch)
        wait_for("the node Ready", lambda: localstack.kubectl(
            sd, "wait", "--for=condition=Ready", "--timeout=5s", f"node/{layout.name}", check=False
        ).returncode == 0, 120)  # fmt: skip
        localstack.kubectl(sd, "create", "serviceaccount", "default", "-n", "default", check=False)
        spec = pod(
            "left-running",
            json.loads((sd / "stack.json").read_text())["node"]["probe_image"],
            ["serve", "8080"],
        )
        spec["spec"]["nodeName"] = layout.name
        localstack.kubectl(sd, "apply", "-n", "default", "-f", "-", input=json.dumps(spec))
        localstack.kubectl(
            sd, "wait", "-n", "default", "--for=condition=Ready", "--timeout=90s", "pod/left-running"
        )
        raise localstack.StackError("injected: the start fails with a pod running on the node")

    monkeypatch.setattr(localstack, "start_node_agents", agents_then_fail)
    failed_as_injected = False
    try:
        with pytest.raises(localstack.StackError, match="injected"):
            localstack.up(state_dir)
        failed_as_injected = True
    finally:
        if not failed_as_injected:  # up came back (or failed otherwise): stop what it started
            localstack.down(state_dir)
    record = json.loads((state_dir / "stack.json").read_text())["node"]
    if record is None:
        pytest.skip("no real node for a second stack here (another stack runs this machine's node)")
    assert localstack_node.leftovers(record) == []
