"""The quickstart through the real operator, KubeRay, MinIO and Ray: apply, survive operator
SIGKILLs, suspend and resume from a checkpoint, evaluate, pass the gate, serve, clean up."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import yaml
from demo import service_ip, service_url  # hack/ is on sys.path through tests/conftest.py

from instructune_jobs.quickstart import held_out_question, seed_quickstart
from tests.e2e.conftest import OperatorPod
from tests.integration.conftest import get_tune, wait_for
from tests.integration.test_real_node import finished as real_node_finished
from tests.integration.test_real_node import pod as real_node_pod

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
STEPS = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]["training"]["maxSteps"]


def _status(stack: Any, ns: str, name: str) -> dict[str, Any]:
    return get_tune(stack, ns, name).get("status") or {}


def _ray_head(stack: Any, ns: str, tune: str) -> tuple[str, dict[str, str]]:
    """The Jobs API of the tune's Ray head, through its Service (headless: the head pod's address),
    and the header its token authentication wants."""
    ip = service_ip(stack.dir, ns, f"{tune}-ray-head-svc")
    token = stack.kubectl(
        "get", "secret", f"{tune}-ray-auth", "-n", ns, "-o", "jsonpath={.data.RAY_AUTH_TOKEN}", check=False
    ).stdout  # fmt: skip
    headers = {"Authorization": f"Bearer {base64.b64decode(token).decode()}"} if token else {}
    return f"http://{ip}:8265", headers


def _ray_jobs(stack: Any, ns: str, tune: str) -> list[dict[str, Any]]:
    """The Ray jobs of the tune's current Ray cluster."""
    address, headers = _ray_head(stack, ns, tune)
    jobs = httpx.get(f"{address}/api/jobs/", headers=headers, timeout=10).json()
    return [j for j in jobs if (j.get("metadata") or {}).get("tune") == f"{ns}/{tune}"]


def _ray_pods(stack: Any, ns: str) -> list[str]:
    return stack.kubectl("get", "pods", "-n", ns, "-l", "ray.io/cluster", "-o", "name").stdout.split()


def _clusters(stack: Any, ns: str) -> list[str]:
    return stack.kubectl("get", "rayclusters", "-n", ns, "-o", "name").stdout.split()


def _gone(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 404
    except httpx.HTTPError:
        return True  # nothing listens any more


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


@pytest.fixture(scope="module")
def seeded(crd_installed: Any) -> dict[str, str]:
    client = boto3.client(
        "s3",
        endpoint_url=crd_installed.s3_endpoint,
        aws_access_key_id=crd_installed.access_key,
        aws_secret_access_key=crd_installed.secret_key,
    )
    return seed_quickstart(client)


# Three Ray clusters' worth of pods and ~500 training steps on 2 cores: 640 s on a good run, over
# pytest's default 900 s on a slow one (the machine ran at half speed then; its own waits have bounds).
@pytest.mark.timeout(2400)
def test_quickstart_runs_to_a_served_model_through_kills_and_a_suspension(
    crd_installed: Any,
    operator: OperatorPod,
    namespace: str,
    seeded: dict[str, str],
    real_node: dict[str, Any],
    tmp_path: Path,
) -> None:
    stack, ns = crd_installed, namespace
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["serving"]["target"] = f"qs-{ns}"  # a Serve application name of this test's own
    stack.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))

    # 1. SIGKILL the operator right after the job was submitted; a new one must not submit again.
    # Ray pods start in a minute or two on 2 cores (three at once, each a ~6 GB image's Ray).
    wait_for(lambda: _status(stack, ns, "quickstart").get("jobId"), 420, "the first submission")
    operator.kill()
    operator.start()

    # 2. Suspend after the first checkpoint: the cluster goes, the checkpoint stays.
    first = wait_for(lambda: _status(stack, ns, "quickstart").get("checkpoints"), 600, "the first checkpoint")
    stack.kubectl("patch", "itune", "quickstart", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for(lambda: _status(stack, ns, "quickstart").get("phase") == "Suspended", 60, "phase Suspended")
    wait_for(lambda: not _clusters(stack, ns), 60, "the RayCluster to be removed while suspended")
    # Nothing of the attempt runs any more: its Ray pods are gone with their cluster.
    wait_for(lambda: not _ray_pods(stack, ns), 120, "the Ray pods to be removed while suspended")

    # 3. Resume: a new attempt continues from the latest checkpoint, not from step 0.
    stack.kubectl(
        "patch", "itune", "quickstart", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    resumed_at = max(c["step"] for c in first)
    wait_for(lambda: (_status(stack, ns, "quickstart").get("attempts") or 0) >= 2, 420, "the second attempt")
    operator.kill()  # 4. and once more while the resumed attempt trains
    time.sleep(2)
    operator.start()

    # 5. A Ray worker pod dies once the resumed attempt has written a checkpoint of its own: the
    # attempt ends (Ray sees the node preempted, or a worker crashed), and the next resumes from
    # that checkpoint (no more steps lost than an interval).
    latest = wait_for(
        lambda: (
            max((c["step"] for c in _status(stack, ns, "quickstart").get("checkpoints") or []), default=0)
            > resumed_at
            and max(c["step"] for c in _status(stack, ns, "quickstart")["checkpoints"])
        ),
        600,
        "a checkpoint of the resumed attempt",
    )
    worker = stack.kubectl(
        "get", "pods", "-n", ns, "-l", "ray.io/node-type=worker", "-o", "jsonpath={.items[0].metadata.name}"
    ).stdout  # fmt: skip
    stack.kubectl("delete", "pod", worker, "-n", ns, "--grace-period=0", "--force")
    wait_for(lambda: (_status(stack, ns, "quickstart").get("attempts") or 0) >= 3, 420, "the third attempt")

    final = wait_for(
        lambda: (s := _status(stack, ns, "quickstart")).get("phase") in ("Succeeded", "Failed") and s,
        1200,
        "the tune to finish",
    )
    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)[-3000:]

    # No duplicate submission: the second cluster (the first went with the suspension) ran one job
    # per attempt (2, then 3 after the worker's death), although the operator was killed during 2.
    jobs = _ray_jobs(stack, ns, "quickstart")
    train_jobs = [j for j in jobs if "serving" not in (j.get("metadata") or {})]
    assert final["attempts"] == 3
    # Ray's job list has no order: the attempts are told apart by their ids (deterministic, -a<N>).
    submissions = sorted(j["submission_id"] for j in train_jobs)
    assert len(submissions) == len(set(submissions)) == 2  # attempts 2 and 3
    assert [s.rsplit("-", 1)[-1] for s in submissions] == ["a2", "a3"] and submissions[-1] == final["jobId"]
    address, headers = _ray_head(stack, ns, "quickstart")
    response = httpx.get(f"{address}/api/jobs/{final['jobId']}/logs", headers=headers, timeout=10)
    job_logs = response.json()["logs"]
    resumed = [int(m) for m in re.findall(r"resuming from step (\d+)", job_logs)]
    assert resumed and resumed[0] >= latest, (latest, job_logs[-2000:])

    # The resumed attempt started from the checkpoint: its first reported step is past it.
    assert final["progress"]["step"] == final["progress"]["totalSteps"] == STEPS
    assert min(c["step"] for c in final["checkpoints"]) >= resumed_at
    assert _condition(final, "Training")["reason"] == "Completed"

    # Data, lineage and evaluation are in status; the gate passed on measured values.
    assert final["data"]["templateHash"] and final["data"]["rows"] > 0
    lineage = final["lineage"]
    assert (
        lineage["configHash"]
        and seeded["s3://datasets/extraction/train.jsonl"] in lineage["dataEtags"].values()
    )
    evaluation = final["evaluation"]
    assert evaluation["passed"] is True
    assert evaluation["metrics"]["heldout.jsonSchema"] >= 0.8
    assert evaluation["baseMetrics"]["heldout.jsonSchema"] < evaluation["metrics"]["heldout.jsonSchema"]
    # The 5% split training set aside is scored too, on the tokens it was prepared as.
    assert evaluation["metrics"]["validation.loss"] < evaluation["baseMetrics"]["validation.loss"]
    assert "heldout.jsonSchema=" in _condition(final, "EvalPassed")["message"]

    # Ray Serve serves from the tune's own Ray cluster, so a served tune keeps it (a failed tune
    # loses it: see the next test). Its pods ran on the real node, from the job image.
    assert _clusters(stack, ns) == ["raycluster.ray.io/quickstart-ray"]
    pods = json.loads(stack.kubectl("get", "pods", "-n", ns, "-l", "ray.io/cluster", "-o", "json").stdout)
    assert {p["spec"]["nodeName"] for p in pods["items"]} == {"local-0"}
    assert {p["spec"]["containers"][0]["image"] for p in pods["items"]} == {operator.refs["job"]}
    assert final["lineage"]["image"] == operator.refs["job"] and final["lineage"]["version"]

    # Ray's dashboard is not open: a pod of the tenant's own namespace without the token is refused
    # by the Jobs API (the operator and this test hold the token; the whole run above used it).
    stack.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(
        real_node_pod("no-token", real_node["probe_image"], ["get", "http://quickstart-ray-head-svc:8265/api/jobs/", "30"])
    ))  # fmt: skip
    phase, logs = real_node_finished(stack, ns, "no-token")
    assert phase == "Failed" and logs.startswith("401"), logs

    # Served with the template it was trained on, answering in the trained format.
    serving = final["serving"]
    assert serving["templateHash"] == final["data"]["templateHash"]
    assert _condition(final, "Serving")["status"] == "True"
    assert sorted(_ask(stack, serving)) == ["amount", "date", "party"]

    _the_cli_on_the_finished_tune(stack, ns, job_logs, tmp_path)

    # Deleting the tune removes its serving with its Ray cluster.
    url = service_url(stack.dir, serving["endpoint"])
    stack.kubectl("delete", "itune", "quickstart", "-n", ns, "--timeout=120s")
    wait_for(lambda: _gone(f"{url}/models"), 180, "the Serve application to be removed")


def _instructune(stack: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """The `instructune` command as a tenant runs it: the stack's kubeconfig (the API server's pod
    proxy takes it to the tune's pods), MinIO's credentials for the run's files; the Ray token comes
    from the cluster's Secret, not from this environment."""
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"},
        "KUBECONFIG": str(stack.kubeconfig),
        "PYTHONPATH": os.pathsep.join(str(ROOT / part) for part in ("operator", "jobs", "cli")),
        "AWS_ACCESS_KEY_ID": stack.access_key,
        "AWS_SECRET_ACCESS_KEY": stack.secret_key,
        "AWS_ENDPOINT_URL": stack.s3_endpoint,
        "COLUMNS": "200",
    }
    command = [sys.executable, "-m", "instructune_cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _the_cli_on_the_finished_tune(stack: Any, ns: str, ray_logs: str, tmp_path: Path) -> None:
    """watch, describe, logs, plot and ask on the served quickstart, against the real Ray head,
    Ray Serve and MinIO (the reconcile tier runs them against a real API server only)."""
    watched = _instructune(stack, "watch", "quickstart", "-n", ns, "--timeout", "60")
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.startswith(f"Succeeded  step {STEPS}/{STEPS}"), watched.stdout

    described = _instructune(stack, "describe", "quickstart", "-n", ns)
    assert described.returncode == 0, described.stderr
    assert "GatePassed" in described.stdout and "heldout.jsonSchema" in described.stdout

    # The Ray job's logs of the current attempt, through the pod proxy with the Secret's token:
    # what the Jobs API gave this test directly.
    logs = _instructune(stack, "logs", "quickstart", "-n", ns)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == ray_logs

    # The loss of all three attempts (suspension, worker loss) from metrics.jsonl in MinIO, and the
    # evaluation from eval/report.json.
    png = tmp_path / "loss.png"
    plotted = _instructune(stack, "plot", "quickstart", "-n", ns, "--out", str(png))
    assert plotted.returncode == 0, plotted.stderr
    assert (
        " in 3 attempt(s), " in plotted.stdout
        and "s3://artifacts/quickstart/eval/report.json" in plotted.stdout
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A held-out question to the served model, rendered by the server with the trained template.
    row = held_out_question()
    asked = _instructune(
        stack, "ask", "quickstart", f"{row['instruction']}\n\n{row['input']}", "-n", ns, "--max-tokens", "48"
    )
    assert asked.returncode == 0, asked.stderr
    assert sorted(json.loads(asked.stdout)) == ["amount", "date", "party"]


def _ask(stack: Any, serving: dict[str, Any]) -> dict[str, Any]:
    """Asks the served model a held-out question through its Service (the endpoint in status)."""
    row = held_out_question()
    response = httpx.post(
        f"{service_url(stack.dir, serving['endpoint'])}/chat/completions",
        timeout=120,
        json={
            "model": serving["model"],
            "messages": [{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"}],
            "max_tokens": 48,
            "temperature": 0,
        },
    )
    response.raise_for_status()
    answer: dict[str, Any] = json.loads(response.json()["choices"][0]["message"]["content"])
    return answer


@pytest.mark.timeout(1800)
def test_the_quickstart_applied_again_skips_training_and_is_served(
    crd_installed: Any, operator: OperatorPod, namespace: str, seeded: dict[str, str]
) -> None:
    """As a second `make demo` does: the finished run of the same configuration is in S3, so the
    job goes straight to evaluation, and serving still gets the template hash it checks."""
    stack, ns = crd_installed, namespace
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["serving"]["target"] = f"qs-{ns}"
    stack.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
    final = wait_for(
        lambda: (s := _status(stack, ns, "quickstart")).get("phase") in ("Succeeded", "Failed") and s,
        1200,
        "the re-applied tune to finish",
    )
    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)[-3000:]
    jobs = [j for j in _ray_jobs(stack, ns, "quickstart") if "serving" not in (j.get("metadata") or {})]
    assert len(jobs) == final["attempts"] == 1
    address, headers = _ray_head(stack, ns, "quickstart")
    logs = httpx.get(
        f"{address}/api/jobs/{jobs[0]['submission_id']}/logs", headers=headers, timeout=10
    ).json()["logs"]
    assert "already finished: skipping to evaluation" in logs, logs[-3000:]
    assert final["data"]["templateHash"] and final["serving"]["templateHash"] == final["data"]["templateHash"]
    assert final["progress"]["step"] == final["progress"]["totalSteps"] == STEPS
    assert final["lineage"]["configHash"]
    assert sorted(_ask(stack, final["serving"])) == ["amount", "date", "party"]
    url = service_url(stack.dir, final["serving"]["endpoint"])
    stack.kubectl("delete", "itune", "quickstart", "-n", ns, "--timeout=120s")
    wait_for(lambda: _gone(f"{url}/models"), 180, "the Serve application to go")


def _broken_tune(name: str, **changes: Any) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["serving"] = {"enabled": False}
    doc["spec"]["checkpointing"]["uri"] = f"s3://artifacts/{name}/"
    for path, value in changes.items():
        parent, leaf = path.split(".")
        doc["spec"][parent][leaf] = value
    return doc


def _ended(stack: Any, ns: str, name: str) -> dict[str, Any]:
    return wait_for(
        lambda: (s := _status(stack, ns, name)).get("phase") in ("Succeeded", "Failed") and s,
        600,
        f"the {name} tune to end",
    )


def test_a_failing_job_is_retried_up_to_the_backoff_limit_then_fails_with_the_reason(
    crd_installed: Any, operator: OperatorPod, namespace: str, seeded: dict[str, str]
) -> None:
    stack, ns = crd_installed, namespace
    # No model under the URI: maybe not uploaded yet, so each attempt is worth a retry.
    doc = _broken_tune("broken", **{"baseModel.uri": "s3://models/not-uploaded/"})
    doc["spec"]["backoffLimit"] = 1
    stack.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
    final = _ended(stack, ns, "broken")
    assert final["phase"] == "Failed"
    assert final["attempts"] == 2
    succeeded = _condition(final, "Succeeded")
    assert succeeded["reason"] == "BackoffLimitExceeded"
    assert "no model files under s3://models/not-uploaded/" in succeeded["message"]
    assert final["jobId"].endswith("-a2")
    wait_for(lambda: not _clusters(stack, ns), 60, "the RayCluster to be deleted after the failure")


def test_refused_data_fails_the_tune_at_once_naming_the_row(
    crd_installed: Any, operator: OperatorPod, namespace: str, seeded: dict[str, str]
) -> None:
    stack, ns = crd_installed, namespace
    # Alpaca rows read as dolly: every row misses `response`, and the policy is to fail. A retry
    # would read the same rows, so there is none, whatever backoffLimit allows.
    doc = _broken_tune(
        "refused",
        **{
            "dataset.train": [{"uri": "s3://datasets/general/general.jsonl"}],
            "dataset.format": "dolly",
            "dataset.invalidRows": {"policy": "fail"},
        },
    )
    doc["spec"]["backoffLimit"] = 3
    stack.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
    final = _ended(stack, ns, "refused")
    assert final["phase"] == "Failed"
    assert final["attempts"] == 1
    succeeded = _condition(final, "Succeeded")
    assert succeeded["reason"] == "InvalidData"
    assert "s3://datasets/general/general.jsonl:1: missing field 'response'" in succeeded["message"]
    assert "progress" not in final, "no training step ran"
    assert final["jobId"].endswith("-a1")
    wait_for(lambda: not _clusters(stack, ns), 60, "the RayCluster to be deleted after the failure")


# ---------------------------------------------------------------------------------------------------
# Least privilege, proven from the API server's audit log of the calls made by the tests above
# (the stack logs every ServiceAccount request: hack/localstack_components.AUDIT_POLICY).

# Granted by the chart but not called in these tests, each with the code path that needs it.
GRANTED_UNUSED = {
    # Server-side apply of an object that does not exist yet is a PATCH, authorized as create too.
    **{
        ("create", group, resource, ""): "reconcile.act: server-side apply of a new child (builders.desired)"
        for group, resource in (
            ("", "serviceaccounts"),
            ("", "configmaps"),
            ("", "services"),
            ("", "secrets"),
            ("rbac.authorization.k8s.io", "roles"),
            ("rbac.authorization.k8s.io", "rolebindings"),
            ("ray.io", "rayclusters"),
            ("apps", "deployments"),
            ("networking.k8s.io", "networkpolicies"),
        )
    },
    (
        "delete",
        "instructune.io",
        "instructiontunes",
        "",
    ): "lifecycle: ttlSecondsAfterFinished deletes the tune",
    ("get", "instructune.io", "instructiontunes", "status"): "held so that it may grant it to job Roles",
    ("get", "apps", "deployments", ""): "reconcile.observe: runtime vllm reads its Deployment",
    ("patch", "apps", "deployments", ""): "reconcile.act: runtime vllm's Deployment (builders.desired)",
    ("patch", "", "services", ""): "reconcile.act: runtime vllm's Service (builders.desired)",
    (
        "get",
        "instructune.io",
        "instructiontunes",
        "",
    ): "reconcile.observe: the tune afresh after its job succeeded",
}


def _granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    return {
        (verb, group, *[*resource.split("/", 1), ""][:2])
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _used(events: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    return {
        (
            e["verb"],
            e["objectRef"].get("apiGroup", ""),
            e["objectRef"]["resource"],
            e["objectRef"].get("subresource", ""),
        )
        for e in events
    }


def test_every_call_of_the_operator_and_its_jobs_was_granted_and_every_grant_is_used_or_explained(
    crd_installed: Any, operator: OperatorPod
) -> None:
    stack = crd_installed
    time.sleep(2)  # the audit log is written in batches of at most a second
    user = f"system:serviceaccount:{operator.release.NAMESPACE}:{operator.release.DEPLOYMENT}"
    events = [e for e in _audit_all(stack) if e["user"]["username"] == user]
    assert events, "no audited call of the operator: did the tests above run?"
    refused = [
        (e["verb"], e["requestURI"], e["responseStatus"]["code"])
        for e in events
        if e["responseStatus"]["code"] == 403
    ]
    assert not refused, refused

    role = json.loads(stack.kubectl("get", "clusterrole", operator.release.DEPLOYMENT, "-o", "json").stdout)
    granted, used = _granted(role["rules"]), _used(events)
    assert used <= granted, used - granted
    unexplained = granted - used - set(GRANTED_UNUSED)
    assert not unexplained, f"granted, never called, no reason given: {sorted(unexplained)}"

    # The table of the closing note and docs/operations.md: every grant, used or why not.
    table = [
        "| verb | apiGroup | resource | used by the operator in these tests |",
        "| --- | --- | --- | --- |",
    ]
    for verb, group, resource, sub in sorted(granted):
        key = (verb, group, resource, sub)
        table.append(
            f"| {verb} | {group or 'core'} | {resource}{'/' + sub if sub else ''} | "
            f"{'yes' if key in used else 'no: ' + GRANTED_UNUSED[key]} |"
        )
    (Path(stack.info["paths"]["logs"]) / "operator-rbac-table.md").write_text("\n".join(table) + "\n")

    # Each tune's job: its pods' projected token may get and patch its own tune's status, and did.
    job_events = [
        e
        for e in _audit_all(stack)
        if e["user"]["username"].endswith("-job")
        and e["user"]["username"].startswith("system:serviceaccount:")
    ]
    assert job_events, "no audited call of a job"
    for e in job_events:
        _, _, ns, sa = e["user"]["username"].split(":")
        ref = e["objectRef"]
        assert (e["verb"], ref.get("apiGroup"), ref["resource"], ref.get("subresource")) in {
            ("patch", "instructune.io", "instructiontunes", "status"),
            ("get", "instructune.io", "instructiontunes", "status"),
        }, e
        assert ref["namespace"] == ns and f"{ref['name']}-job" == sa, e
        assert e["responseStatus"]["code"] != 403, e


def _audit_all(stack: Any) -> list[dict[str, Any]]:
    path = Path(stack.info["paths"]["audit_log"])
    return [
        e
        for line in path.read_text().splitlines()
        if line.strip() and (e := json.loads(line)).get("objectRef")
    ]
