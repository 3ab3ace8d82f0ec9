"""The operator's reconcile passes, in this process, against the real API server and etcd: what a
pass applies, that a pass with nothing changed writes nothing, one Ray job per attempt, and a
spec the CRD accepts but the operator refuses. No KubeRay, no Ray: the tests play KubeRay's part
(a RayCluster's status) and a recording Jobs API plays Ray's (tests/reconcile/conftest.py)."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from instructune_operator.api import API_VERSION, KIND, InstructionTuneSpec
from instructune_operator.builders import Observed, Tune, desired
from instructune_operator.builders.children import owner_reference
from instructune_operator.clients.kube import FIELD_MANAGER, Kube
from instructune_operator.naming import (
    labels,
    ray_address,
    ray_auth_secret_name,
    ray_cluster_name,
    submission_id,
)
from instructune_operator.ray_auth import derive_token

from .conftest import CHILD_KINDS, FAKE_RAY_AUTH_KEY, OPERATOR_NAMESPACE, Operator, Pass

pytestmark = pytest.mark.reconcile
ROOT = Path(__file__).resolve().parents[2]
TUNE = "quickstart"


def _create_tune(kube: Kube, namespace: str, **spec: Any) -> dict[str, Any]:
    """The quickstart example as a user creates it (a POST the CRD validates), spec keys replaced."""
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["namespace"] = namespace
    doc["spec"] = {**doc["spec"], **spec}
    response = kube.http.post(
        f"/apis/instructune.io/v1alpha1/namespaces/{namespace}/instructiontunes", json=doc
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def _tune(kube: Kube, namespace: str) -> dict[str, Any]:
    body = kube.get(API_VERSION, KIND, namespace, TUNE)
    assert body is not None
    return body


def _everything_in(kube: Kube, namespace: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object of every kind the operator may create in the namespace, whoever made
    it (no controller runs that would add its own: no default ServiceAccount, no root CA)."""
    return {
        (kind, item["metadata"]["name"]): item
        for api_version, kind in CHILD_KINDS
        for item in kube.list(api_version, kind, namespace, "")
    }


def _versions(kube: Kube, namespace: str) -> dict[tuple[str, str], str]:
    """resourceVersion of the tune and of every object beside it."""
    objects = {(KIND, TUNE): _tune(kube, namespace), **_everything_in(kube, namespace)}
    return {key: obj["metadata"]["resourceVersion"] for key, obj in objects.items()}


def _desired(operator: Operator, tune: dict[str, Any]) -> list[dict[str, Any]]:
    """What builders.desired says a new tune owns, with the pass's own inputs."""
    meta = {k: tune["metadata"][k] for k in ("namespace", "name", "uid")}
    spec = InstructionTuneSpec.model_validate(tune["spec"])
    observed = Observed(
        training=True,
        attempt=1,
        ray_auth_token=operator.clients.ray_token(meta["uid"]),
        operator_namespace=OPERATOR_NAMESPACE,
    )
    return desired(Tune(meta, spec), operator.settings, observed)


def _path(manifest: dict[str, Any]) -> str:
    meta = manifest["metadata"]
    return Kube._path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])


def _not_kept(want: Any, have: Any, where: str = "") -> list[str]:
    """Where the live object lacks or differs from what was applied (the API server adds defaults
    and bookkeeping; it must drop or change nothing the operator set, e.g. by schema pruning)."""
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return [f"{where}: not an object"]
        return [
            miss
            for key, value in want.items()
            for miss in (
                _not_kept(value, have[key], f"{where}.{key}") if key in have else [f"{where}.{key}: missing"]
            )
        ]
    if isinstance(want, list):
        if not isinstance(have, list) or len(have) != len(want):
            return [f"{where}: {len(want)} items applied, {have!r} kept"]
        return [
            miss
            for i, (w, h) in enumerate(zip(want, have, strict=True))
            for miss in _not_kept(w, h, f"{where}[{i}]")
        ]
    return [] if want == have else [f"{where}: {want!r} applied, {have!r} kept"]


def _condition(tune: dict[str, Any], type_: str) -> tuple[str, str, str]:
    found = next(c for c in tune["status"]["conditions"] if c["type"] == type_)
    return found["status"], found["reason"], found["message"]


def _mark_cluster_ready(kube: Kube, namespace: str) -> None:
    """What KubeRay writes once the head and every worker run: the RayCluster's status.state."""
    path = Kube._path("ray.io/v1", "RayCluster", namespace, ray_cluster_name(TUNE)) + "/status"
    response = kube.http.patch(
        path,
        json={"status": {"state": "ready", "readyWorkerReplicas": 2}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert response.status_code == 200, response.text


def _status_and_events_only(p: Pass, namespace: str) -> None:
    """The pass wrote the tune's status (one merge patch) and its events, nothing else."""
    status_path = Kube._path(API_VERSION, KIND, namespace, TUNE) + "/status"
    events_path = f"/api/v1/namespaces/{namespace}/events"
    assert p.api_writes == [("PATCH", status_path)] + [("POST", events_path)] * len(p.outcome.events)


def test_a_new_tune_gets_in_one_pass_exactly_the_children_builders_desired_says_owned_and_labelled(
    kube: Kube, operator: Operator, namespace: str
) -> None:
    tune = _create_tune(kube, namespace)
    want = _desired(operator, tune)
    kinds = sorted(m["kind"] for m in want)
    assert kinds == sorted(
        ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret", "NetworkPolicy", "RayCluster"]
    )

    first = operator.reconcile(namespace, TUNE)

    # Exactly one server-side apply per desired child, then the status and its events.
    assert first.applied() == sorted(_path(m) for m in want)
    assert [w for w in first.api_writes if w[0] != "PATCH" or w[1].endswith("/status")] == [
        ("PATCH", Kube._path(API_VERSION, KIND, namespace, TUNE) + "/status"),
        *[("POST", f"/api/v1/namespaces/{namespace}/events")] * len(first.outcome.events),
    ]
    assert first.ray == []  # no cluster is ready: nothing is asked of Ray

    live = _everything_in(kube, namespace)
    assert set(live) == {(m["kind"], m["metadata"]["name"]) for m in want}
    owner = owner_reference(tune["metadata"])
    for manifest in want:
        obj = live[(manifest["kind"], manifest["metadata"]["name"])]
        key = f"{manifest['kind']}/{manifest['metadata']['name']}"
        assert obj["metadata"]["ownerReferences"] == [owner], key
        assert obj["metadata"]["labels"] == labels(
            TUNE, manifest["metadata"]["labels"]["instructune.io/component"]
        )
        assert [(f["manager"], f["operation"]) for f in obj["metadata"]["managedFields"]] == [
            (FIELD_MANAGER, "Apply")
        ], key
        # A list answers without apiVersion and kind on its items.
        body = {k: v for k, v in manifest.items() if k not in ("apiVersion", "kind")}
        assert _not_kept(body, obj) == [], key
    token = base64.b64decode(live[("Secret", ray_auth_secret_name(TUNE))]["data"]["RAY_AUTH_TOKEN"]).decode()
    assert token == derive_token(FAKE_RAY_AUTH_KEY, tune["metadata"]["uid"])

    status = _tune(kube, namespace)["status"]
    assert status["phase"] == "Provisioning"
    assert status["observedGeneration"] == tune["metadata"]["generation"]
    assert _condition({"status": status}, "Validated")[:2] == ("True", "SpecValid")
    assert _condition({"status": status}, "ClusterReady")[:2] == ("False", "Provisioning")
    assert status["rayCluster"]["name"] == ray_cluster_name(TUNE)
    assert {e[1] for e in first.outcome.events} >= {"SpecValid", "Phase"}


def test_a_timer_pass_with_nothing_changed_sends_no_write_to_the_api_server(
    kube: Kube, operator: Operator, namespace: str
) -> None:
    _create_tune(kube, namespace)
    operator.reconcile(namespace, TUNE)
    before = _versions(kube, namespace)

    again = operator.reconcile(namespace, TUNE, periodic=True)

    assert again.api_writes == []
    assert (again.outcome.status_patch, again.outcome.events, again.ray) == ({}, [], [])
    assert _versions(kube, namespace) == before


def test_a_full_pass_again_after_a_restart_reapplies_the_children_but_changes_no_object(
    kube: Kube, operator: Operator, namespace: str
) -> None:
    tune = _create_tune(kube, namespace)
    first = operator.reconcile(namespace, TUNE)
    before = _versions(kube, namespace)

    # A resumed operator's first pass (handlers.reconcile on resume) is not periodic: it applies
    # every child again; identical server-side applies must leave every object as it was.
    again = operator.reconcile(namespace, TUNE)

    assert again.applied() == first.applied() == sorted(_path(m) for m in _desired(operator, tune))
    assert [w for w in again.api_writes if w[1] not in again.applied()] == []
    assert (again.outcome.status_patch, again.outcome.events, again.ray) == ({}, [], [])
    assert _versions(kube, namespace) == before


def test_a_ready_cluster_gets_exactly_one_ray_job_under_the_deterministic_submission_id(
    kube: Kube, operator: Operator, namespace: str
) -> None:
    tune = _create_tune(kube, namespace)
    uid = tune["metadata"]["uid"]
    operator.reconcile(namespace, TUNE)
    _mark_cluster_ready(kube, namespace)

    # The timer notices the ready cluster (a RayCluster's status does not trigger the tune's handlers).
    submitted = operator.reconcile(namespace, TUNE, periodic=True)

    job_id = submission_id(namespace, TUNE, uid, 1)
    [job] = submitted.ray_submissions()
    assert job.body["submission_id"] == job_id
    assert job.address == ray_address(operator.settings, namespace, TUNE).rstrip("/")
    assert job.address == f"http://{ray_cluster_name(TUNE)}-head-svc.{namespace}.svc:8265"
    assert job.authorization == f"Bearer {derive_token(FAKE_RAY_AUTH_KEY, uid)}"
    assert job.body["metadata"] == {"tune": f"{namespace}/{TUNE}", "attempt": "1"}
    assert job.body["entrypoint"].startswith("python -m instructune_jobs --config-json ")
    assert job.body["runtime_env"]["env_vars"]["INSTRUCTUNE_TUNE"] == f"{namespace}/{TUNE}"
    assert list(operator.ray_server.jobs) == [job_id]
    _status_and_events_only(submitted, namespace)  # the children stay as they are
    status = _tune(kube, namespace)["status"]
    assert (status["phase"], status["jobId"], status["attempts"]) == ("Training", job_id, 1)
    assert _condition({"status": status}, "ClusterReady")[:2] == ("True", "RayClusterReady")
    assert _condition({"status": status}, "Training")[:2] == ("True", "Submitted")

    # The next passes ask Ray about the job and never submit it again, not even a restarted
    # operator's full pass.
    passes = [
        operator.reconcile(namespace, TUNE, periodic=True),
        operator.reconcile(namespace, TUNE, periodic=True),
        operator.reconcile(namespace, TUNE),
    ]
    for p in passes:
        assert p.ray_submissions() == []
        assert {(r.method, r.path) for r in p.ray} == {("GET", f"/api/jobs/{job_id}")}
    assert list(operator.ray_server.jobs) == [job_id]
    assert _condition(_tune(kube, namespace), "Training")[:2] == ("True", "Running")
    # Once the status says Running, a pass with nothing changed writes nothing.
    assert passes[1].api_writes == []
    assert (passes[1].outcome.status_patch, passes[1].outcome.events) == ({}, [])


_QUICKSTART_EVALUATION = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"][
    "evaluation"
]
REFUSED = {
    "unknown pool": (
        {"resources": {"gpuPool": "h100-sxm", "workers": 1, "gpusPerWorker": 0, "cpusPerWorker": 1,
                       "memoryPerWorker": "1Gi"}},
        "spec.resources.gpuPool: unknown pool 'h100-sxm'",
    ),
    "more workers than the pool allows": (
        {"resources": {"gpuPool": "local", "workers": 3, "gpusPerWorker": 0, "cpusPerWorker": 1,
                       "memoryPerWorker": "1Gi"}},
        "spec.resources.workers: 3 exceeds pool 'local''s limit of 2",
    ),
    "a gate rule on a metric no evaluation reports": (
        {"evaluation": {**_QUICKSTART_EVALUATION, "gate": [{"metric": "support.jsonValid", "min": 0.9}]}},
        "spec.evaluation.gate[0].metric: 'support.jsonValid' is never reported",
    ),
    "a regex the job cannot compile": (
        {"evaluation": {**_QUICKSTART_EVALUATION,
                        "metrics": [*_QUICKSTART_EVALUATION["metrics"], {"type": "regex", "pattern": "(a"}]}},
        "spec.evaluation.metrics[4].pattern: Value error, regex does not compile",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSED), ids=lambda c: c.replace(" ", "-"))
def test_a_spec_the_crd_accepts_but_the_operator_refuses_fails_validation_before_any_child_exists(
    kube: Kube, operator: Operator, namespace: str, case: str
) -> None:
    spec, message = copy.deepcopy(REFUSED[case])
    tune = _create_tune(kube, namespace, **spec)  # the API server accepts it

    refused = operator.reconcile(namespace, TUNE)

    status = _tune(kube, namespace)["status"]
    validated = _condition({"status": status}, "Validated")
    assert validated[:2] == ("False", "InvalidSpec")
    assert message in validated[2]
    assert status["phase"] == "Failed"
    assert status["observedGeneration"] == tune["metadata"]["generation"]
    assert _everything_in(kube, namespace) == {}
    _status_and_events_only(refused, namespace)
    assert refused.ray == []

    again = operator.reconcile(namespace, TUNE)
    assert (again.api_writes, again.ray, again.outcome.status_patch) == ([], [], {})
    assert _everything_in(kube, namespace) == {}
