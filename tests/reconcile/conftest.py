"""The in-process reconcile tier: the operator's own passes, run in this process against a real API
server and etcd (`localstack.up(dir, api_only=True)`: no node, no controllers, no KubeRay, no Ray).

The Kube side is real: the operator's Kube client sends its server-side applies and reads to the
API server, which validates (and prunes) them against the real CRDs, KubeRay's RayCluster included.
The Ray side is a recording Jobs API (`RayJobsServer`) behind the operator's own RayJobs client.
`Operator.reconcile` does what a Kopf handler does around `reconcile_tune` (handlers._write): the
status keys in one merge patch of the status subresource, an Event per transition; it returns
every write the pass sent to the API server and every request it sent to Ray.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import kopf
import localstack  # hack/ is on sys.path through tests/conftest.py
import pytest
import yaml

from instructune_operator.api import API_VERSION, KIND
from instructune_operator.clients.bundle import Clients
from instructune_operator.clients.kube import Kube
from instructune_operator.clients.ray_jobs import RayJobs
from instructune_operator.naming import LABEL_TUNE
from instructune_operator.reconcile import Outcome, reconcile_tune
from instructune_operator.settings import Settings, load_settings
from tests.conftest import stopped_at_exit

ROOT = Path(__file__).resolve().parents[2]
# Not a secret: only derives the tunes' Ray tokens, which nothing outside this process sees.
FAKE_RAY_AUTH_KEY = "reconcile-tier-fake-ray-auth-key"
OPERATOR_NAMESPACE = "instructune-system"
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
# Every kind the operator may create in a tune's namespace (the Kube client's kinds, less the
# tune itself, its pods and events).
CHILD_KINDS = (
    ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "Service"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("apps/v1", "Deployment"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("ray.io/v1", "RayCluster"),
)


@dataclass(frozen=True)
class ApiServer:
    dir: Path
    kubeconfig: Path
    server: str
    info: dict[str, Any] = field(repr=False)

    def connection(self) -> kopf.ConnectionInfo:
        pki = self.dir / "pki"
        return kopf.ConnectionInfo(
            server=self.server,
            ca_path=str(pki / "ca.crt"),
            certificate_path=str(pki / "admin.crt"),
            private_key_path=str(pki / "admin.key"),
        )


@pytest.fixture(scope="package")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """etcd and kube-apiserver with the CRDs, for this tier's tests; stopped when the last of them
    ends (in `make test` too, before the next tier), or at exit or on SIGTERM/SIGHUP."""
    state_dir = tmp_path_factory.mktemp("api-only", numbered=True)
    info = localstack.up(state_dir, api_only=True)
    with stopped_at_exit(state_dir):
        yield ApiServer(
            dir=Path(info["dir"]),
            kubeconfig=Path(info["paths"]["kubeconfig"]),
            server=info["endpoints"]["apiserver"],
            info=info,
        )


# ---------------------------------------------------------------------------------------------------
# The Ray boundary: a recording Jobs API


@dataclass(frozen=True)
class RayRequest:
    method: str
    address: str  # the Ray head the client was made for: scheme://host:port
    path: str
    body: Any
    authorization: str | None


class RayJobsServer:
    """Ray's Jobs API as every tune's Ray head would answer it, in memory: a submission id is a job
    (PENDING until a test says otherwise); a second submission of an id is refused, as Ray does.
    `refusing` set: every submission is refused with that message, as a head short of resources
    or a runtime environment Ray cannot set up would."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.refusing: str | None = None
        self.requests: list[RayRequest] = []
        self._lock = threading.Lock()

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = yaml.safe_load(request.content) if request.content else None
        address = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        with self._lock:
            self.requests.append(
                RayRequest(
                    request.method, address, request.url.path, body, request.headers.get("authorization")
                )
            )
            return self._answer(request.method, request.url.path.rstrip("/"), body)

    def _answer(self, method: str, path: str, body: Any) -> httpx.Response:
        if method == "POST" and path == "/api/jobs":
            if self.refusing is not None:
                return httpx.Response(500, text=self.refusing)
            job_id = body["submission_id"]
            if job_id in self.jobs:
                return httpx.Response(400, text=f"Job with submission_id {job_id} already exists.")
            self.jobs[job_id] = {"status": "PENDING", "message": "", "driver_exit_code": None, **body}
            return httpx.Response(200, json={"job_id": job_id, "submission_id": job_id})
        parts = path.split("/")  # "", "api", "jobs", <id>, [stop | logs]
        if parts[1:3] == ["api", "jobs"] and len(parts) >= 4:
            job = self.jobs.get(parts[3])
            if job is None:
                return httpx.Response(404, text="not found")
            if method == "GET" and len(parts) == 4:
                return httpx.Response(200, json=job)
            if method == "GET" and parts[4:] == ["logs"]:
                return httpx.Response(200, json={"logs": ""})
            if method == "POST" and parts[4:] == ["stop"]:
                job["status"] = "STOPPED"
                return httpx.Response(200, json={"stopped": True})
        if method == "GET" and path == "/api/serve/applications":
            return httpx.Response(200, json={"applications": {}})
        return httpx.Response(404, text=f"{method} {path}: not part of the recorded Jobs API")


class RecordingClients(Clients):
    """The operator's Clients, configured as in a cluster (Ray token authentication on, an operator
    namespace for the NetworkPolicy, jobs sent to each tune's own head Service), whose RayJobs
    clients reach the recording Jobs API instead of the network. Addresses and tokens are the
    operator's own (Clients.ray): the recording shows where each request would have gone."""

    def __init__(self, kube: Kube, settings: Settings, ray_server: RayJobsServer) -> None:
        super().__init__(kube, settings, ray_auth_key=FAKE_RAY_AUTH_KEY)
        self.operator_namespace = OPERATOR_NAMESPACE
        self._ray_server = ray_server
        self._wired: set[int] = set()

    def ray(self, meta: dict[str, Any]) -> RayJobs:
        jobs = super().ray(meta)
        if id(jobs) not in self._wired:
            real = jobs.http
            jobs.http = httpx.Client(
                base_url=real.base_url,
                headers=real.headers,
                transport=httpx.MockTransport(self._ray_server.handle),
            )
            real.close()
            self._wired.add(id(jobs))
        return jobs


# ---------------------------------------------------------------------------------------------------
# The Kube boundary: the real API server, every request recorded


class ApiSeen:
    """reconcile.Seen as the operator's watch indices hold it (handlers.ray_clusters and ray_pods),
    read from the API server at the time of the pass."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def cluster(self, namespace: str, tune: str) -> dict[str, Any] | None:
        found = self.kube.list("ray.io/v1", "RayCluster", namespace, f"{LABEL_TUNE}={tune}")
        return (
            {"metadata": {"name": found[0]["metadata"]["name"]}, "status": dict(found[0].get("status") or {})}
            if found
            else None
        )

    def pods(self, namespace: str, tune: str) -> list[dict[str, Any]]:
        kept = ("phase", "conditions", "containerStatuses")
        return [
            {
                "metadata": {"name": p["metadata"]["name"]},
                "status": {k: v for k, v in p["status"].items() if k in kept},
            }
            for p in self.kube.list("v1", "Pod", namespace, f"{LABEL_TUNE}={tune}")
        ]


@dataclass(frozen=True)
class Pass:
    """What one pass did: its outcome, the writes it sent to the API server (method, path; its
    children's applies, the status patch, the events) and every request it sent to Ray."""

    outcome: Outcome
    api_writes: list[tuple[str, str]]
    ray: list[RayRequest]

    def applied(self) -> list[str]:
        """The paths of the server-side applies of this pass (children), sorted."""
        return sorted(
            path for method, path in self.api_writes if method == "PATCH" and not path.endswith("/status")
        )

    def ray_submissions(self) -> list[RayRequest]:
        return [r for r in self.ray if r.method == "POST" and r.path.rstrip("/") == "/api/jobs"]


class Operator:
    """The operator's pass in this process, with the Kopf handler's writes around it."""

    def __init__(self, kube: Kube, settings: Settings) -> None:
        self.kube, self.settings = kube, settings
        self.ray_server = RayJobsServer()
        self.clients = RecordingClients(kube, settings, self.ray_server)
        self.requests: list[tuple[str, str]] = []
        kube.http.event_hooks["request"].append(self._record)

    def close(self) -> None:
        self.kube.http.event_hooks["request"].remove(self._record)

    def _record(self, request: httpx.Request) -> None:
        self.requests.append((request.method, request.url.path))  # from the apply threads too: atomic

    def reconcile(self, namespace: str, name: str, periodic: bool = False) -> Pass:
        """One pass over the tune as the API server holds it now: `periodic` is the timer's pass,
        otherwise a create/update/resume handler's (handlers.reconcile)."""
        body = self.kube.get(API_VERSION, KIND, namespace, name)
        assert body is not None, f"no tune {namespace}/{name}"
        api_start, ray_start = len(self.requests), len(self.ray_server.requests)
        outcome = reconcile_tune(body, self.clients, seen=ApiSeen(self.kube), periodic=periodic)
        if outcome.status_patch:
            self.kube.patch_status(API_VERSION, KIND, namespace, name, outcome.status_patch)
        for type_, reason, message in outcome.events:
            self._post_event(body, type_, reason, message)
        writes = [r for r in self.requests[api_start:] if r[0] in WRITE_METHODS]
        return Pass(outcome, writes, self.ray_server.requests[ray_start:])

    def _post_event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = body["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "kopf"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        response = self.kube.http.post(f"/api/v1/namespaces/{meta['namespace']}/events", json=event)
        response.raise_for_status()


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The local stack's operator settings, without its Ray override: jobs go to each tune's head."""
    return load_settings(str(ROOT / "hack" / "local-settings.yaml"), env={})


@pytest.fixture(scope="package")
def kube(api_server: ApiServer) -> Iterator[Kube]:
    """The operator's own Kube client, logged in as the stack's admin."""
    client = Kube(api_server.connection())
    yield client
    client.http.close()
    shutil.rmtree(client._folder, ignore_errors=True)


@pytest.fixture
def operator(kube: Kube, settings: Settings) -> Iterator[Operator]:
    """A fresh operator per test: its own recording of the wire and its own Ray."""
    op = Operator(kube, settings)
    yield op
    op.close()


@pytest.fixture
def namespace(kube: Kube) -> str:
    """A fresh namespace per test (never deleted: without a namespace controller it would stay
    Terminating; the whole etcd goes at the end of the session)."""
    name = f"r-{uuid.uuid4().hex[:8]}"
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    kube.http.post("/api/v1/namespaces", json=body).raise_for_status()
    return name
