"""The `instructune` commands against a real API server (this tier's etcd and kube-apiserver).

The tune's status is written as in a cluster: by the operator's own passes (conftest.Operator) and
by the job's own reporter and status patcher (instructune_jobs.report), under the job's own
ServiceAccount token and the Role the operator gave it. The tests play KubeRay's part (a RayCluster
ready, the head's pod and Service) and, for `logs` and `ask`, a Ray head answering on an address of
this machine, which the CLI reaches through the API server's pod proxy as it would in a cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from instructune_cli.app import app
from instructune_jobs.report import ProgressReporter, StatusEndpoint, StatusPatcher
from instructune_jobs.storage import Storage
from instructune_operator.api import API_VERSION, KIND
from instructune_operator.clients.kube import Kube
from instructune_operator.naming import job_identity_name, ray_cluster_name
from instructune_operator.ray_auth import derive_token

from .conftest import FAKE_RAY_AUTH_KEY, ApiServer, Operator
from .test_reconcile_passes import TUNE, _create_tune, _mark_cluster_ready

pytestmark = pytest.mark.reconcile
ROOT = Path(__file__).resolve().parents[2]
STEPS = 400
PASSING = {"heldout.jsonSchema": 0.93, "jsonSchema": 0.93, "heldout.loss": 0.7}
FAILING = {"heldout.jsonSchema": 0.41, "jsonSchema": 0.41, "heldout.loss": 2.5}


def cli(api_server: ApiServer, *args: str) -> Any:
    """The command as a user runs it, with the stack's kubeconfig, in a wide terminal's columns."""
    env = {"KUBECONFIG": str(api_server.kubeconfig), "COLUMNS": "240", "RAY_AUTH_TOKEN": None}
    return CliRunner().invoke(app, list(args), env=env)  # type: ignore[arg-type]


def _status(kube: Kube, namespace: str) -> dict[str, Any]:
    tune = kube.get(API_VERSION, KIND, namespace, TUNE)
    assert tune is not None
    return dict(tune.get("status") or {})


@dataclass
class Job:
    """The tune's job as it reports: its reporter (metrics.jsonl, progress.json under the run's
    root) and status patches with a token of its own ServiceAccount, `<tune>-job`."""

    patcher: StatusPatcher
    reporter: ProgressReporter
    root: Path

    @classmethod
    def of(cls, kube: Kube, namespace: str, folder: Path, every_s: float = 3600) -> Job:
        """`every_s`: the reporter's interval between flushes (a checkpoint and the end flush at
        once, as in a run): the default flushes at those only."""
        token = folder / "job.token"
        token.write_text(kube.request_token(namespace, job_identity_name(TUNE), 3600))
        endpoint = StatusEndpoint(kube.server, namespace, TUNE, str(token), kube.ca_file)
        patcher = StatusPatcher(endpoint)
        root = folder / "run"
        reporter = ProgressReporter(
            str(root / "metrics.jsonl"), str(root / "progress.json"), STEPS, Storage().write_bytes,
            patcher=patcher, min_interval_s=every_s, keep_checkpoints=2, attempt_id="0badcafe",
        )  # fmt: skip
        return cls(patcher, reporter, root)

    def evaluated(self, metrics: dict[str, float]) -> None:
        """What __main__.report_evaluation patches once evaluation has run."""
        base = {key: 0.0 if "json" in key.lower() else 7.5 for key in metrics}
        assert self.patcher.patch({"evaluation": {"metrics": metrics, "baseMetrics": base}})


def run_tune(
    kube: Kube,
    operator: Operator,
    namespace: str,
    folder: Path,
    metrics: dict[str, float],
    pause: float = 0.0,
) -> Job:
    """The tune from its first pass to its end: the cluster comes up, the job trains 400 steps with
    a checkpoint every 100, reports its evaluation and ends; the operator passes after each."""

    def settle() -> None:
        time.sleep(pause)

    settle()
    operator.reconcile(namespace, TUNE)
    settle()
    _mark_cluster_ready(kube, namespace)
    operator.reconcile(namespace, TUNE)
    job_id = _status(kube, namespace)["jobId"]
    operator.ray_server.jobs[job_id]["status"] = "RUNNING"
    job = Job.of(kube, namespace, folder)
    job.reporter.start(0, data={"rows": 7600, "invalidRows": 0, "tokens": 400_000, "templateHash": "t0"},
                       lineage={"configHash": "c0ffee", "version": "0.1.0"})  # fmt: skip
    for step in range(1, STEPS + 1):
        job.reporter.step(step, step / STEPS, 2.0 - 1.5 * step / STEPS, 0.003, 1200.0)
        if step % 100 == 0:
            job.reporter.checkpoint(step, str(job.root / "checkpoints" / f"checkpoint_step_{step:09d}"), None)
            operator.reconcile(namespace, TUNE, periodic=True)
            settle()
    job.reporter.finish()
    job.evaluated(metrics)
    operator.ray_server.jobs[job_id]["status"] = "SUCCEEDED"
    operator.reconcile(namespace, TUNE, periodic=True)
    settle()
    return job


def in_background(work: Callable[[], Any]) -> Callable[[], None]:
    """Runs `work` in a thread; the returned join re-raises what it raised."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as err:
            failure.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(120)
        assert not thread.is_alive(), "the tune's run did not end"
        if failure:
            raise failure[0]

    return join


# ------------------------------------------------------------------------------------------ watch


@pytest.mark.parametrize(("metrics", "outcome", "code"), [(PASSING, "Succeeded", 0), (FAILING, "Failed", 1)])
def test_watch_follows_the_tune_through_its_phases_and_exits_with_its_outcome(
    api_server: ApiServer,
    kube: Kube,
    operator: Operator,
    namespace: str,
    tmp_path: Path,
    metrics: dict[str, float],
    outcome: str,
    code: int,
) -> None:
    _create_tune(kube, namespace, serving={"enabled": False})
    join = in_background(lambda: run_tune(kube, operator, namespace, tmp_path, metrics, pause=0.4))

    result = cli(api_server, "watch", TUNE, "-n", namespace, "--interval", "0.05", "--timeout", "90")
    join()

    lines = result.stdout.splitlines()
    assert result.exit_code == code, result.output
    phases = list(dict.fromkeys(line.split()[0] for line in lines))
    assert phases == ["Pending", "Provisioning", "Training", "Evaluating", outcome], lines
    assert any(line.startswith("Training  step 100/400  loss 1.625  1200 tokens/s") for line in lines), lines
    assert lines[-1].startswith(f"{outcome}  step 400/400  loss 0.5  1200 tokens/s  ")
    if outcome == "Failed":
        assert lines[-1].endswith("(needs >= 0.8) FAIL")


def test_watch_of_a_tune_that_does_not_exist_fails_at_once(api_server: ApiServer, namespace: str) -> None:
    result = cli(api_server, "watch", "nope", "-n", namespace, "--timeout", "30")
    assert result.exit_code == 4
    assert result.stderr.strip() == f"error: instructiontunes.instructune.io {namespace}/nope not found"


def test_watch_gives_up_after_its_timeout_with_exit_3(
    api_server: ApiServer, kube: Kube, operator: Operator, namespace: str
) -> None:
    _create_tune(kube, namespace)
    operator.reconcile(namespace, TUNE)

    result = cli(api_server, "watch", TUNE, "-n", namespace, "--interval", "0.1", "--timeout", "1")

    assert result.exit_code == 3
    assert result.stdout.startswith("Provisioning  Provisioning: waiting for the Ray cluster to become ready")
    assert result.stderr.strip() == f"error: {namespace}/{TUNE} had not ended after 1s"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_watch_in_a_terminal_is_a_live_display_that_ends_with_the_outcome(
    api_server: ApiServer, kube: Kube, operator: Operator, namespace: str, tmp_path: Path
) -> None:
    """The live display in a real terminal (tmux), captured as a user would see it."""
    _create_tune(kube, namespace, serving={"enabled": False})
    session, rc = f"itune-watch-{uuid.uuid4().hex[:8]}", tmp_path / "rc"
    env = {
        "KUBECONFIG": str(api_server.kubeconfig),
        "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("operator", "jobs", "cli")),
        "TERM": "xterm-256color",
    }
    command = (
        f"sleep 0.5; {sys.executable} -m instructune_cli watch {TUNE} -n {namespace} --interval 0.1; "
        f"echo exit=$? > {rc}; sleep 60"
    )
    settings = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "12", *settings, command], check=True
    )
    # A detached session started without a terminal of its own may get tmux's default 80x24 anyway.
    subprocess.run(["tmux", "set-option", "-t", session, "window-size", "manual"], check=True)
    subprocess.run(["tmux", "resize-window", "-t", session, "-x", "150", "-y", "12"], check=True)

    def pane() -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=True
        ).stdout

    def until(what: Callable[[str], bool], timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if what(text := pane()):
                return text
            time.sleep(0.2)
        raise AssertionError(f"not seen in {timeout}s:\n{pane()}")

    try:
        until(lambda text: f"{namespace}/{TUNE}" in text)  # the program has started and shows the tune
        operator.reconcile(namespace, TUNE)
        _mark_cluster_ready(kube, namespace)
        operator.reconcile(namespace, TUNE)
        job_id = _status(kube, namespace)["jobId"]
        operator.ray_server.jobs[job_id]["status"] = "RUNNING"
        operator.reconcile(namespace, TUNE, periodic=True)
        job = Job.of(kube, namespace, tmp_path, every_s=0)
        job.reporter.start(0)
        for step in range(1, 121):
            job.reporter.step(step, step / STEPS, 1.0, 0.003, 900.0)
        training = until(lambda text: "120/400" in text)
        line = next(row for row in training.splitlines() if "120/400" in row)
        assert f"{namespace}/{TUNE}" in line and "Training" in line and "loss 1" in line and "eta " in line
        assert "━" in line  # the progress bar
        assert f"Running: attempt 1 (backoffLimit 2): job {job_id}" in training

        for step in range(121, STEPS + 1):
            job.reporter.step(step, step / STEPS, 0.5, 0.003, 900.0)
        job.reporter.finish()
        job.evaluated(PASSING)
        operator.ray_server.jobs[job_id]["status"] = "SUCCEEDED"
        operator.reconcile(namespace, TUNE, periodic=True)
        final = until(lambda text: rc.is_file() and "exit=" in rc.read_text(), timeout=30)
        assert rc.read_text().strip() == "exit=0"
        assert "Succeeded" in final and "400/400" in final
        assert "Completed: training and evaluation finished" in final
        (tmp_path / "watch-terminal.txt").write_text(training + "\n---\n" + final)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


# --------------------------------------------------------------------------------------- describe


def _row(text: str, *cells: str) -> bool:
    """Whether a line of the rendered tables holds these cells, in this order."""
    for line in text.splitlines():
        at = 0
        for cell in cells:
            at = line.find(cell, at)
            if at < 0:
                break
            at += len(cell)
        else:
            return True
    return False


def test_describe_shows_what_the_operator_and_the_job_wrote_and_the_gates_verdict(
    api_server: ApiServer, kube: Kube, operator: Operator, namespace: str, tmp_path: Path
) -> None:
    _create_tune(kube, namespace, serving={"enabled": False})
    job = run_tune(kube, operator, namespace, tmp_path, PASSING)

    result = cli(api_server, "describe", TUNE, "-n", namespace)

    assert result.exit_code == 0, result.output
    text = result.stdout
    assert _row(text, "name", f"{namespace}/{TUNE}") and _row(text, "phase", "Succeeded")
    assert _row(text, "Succeeded", "True", "Completed", "training and evaluation finished")
    assert _row(text, "EvalPassed", "True", "GatePassed", "heldout.jsonSchema=0.93 (needs >= 0.8) ok")
    assert _row(text, "step", "400/400 (100%)") and _row(text, "loss", "0.5")
    assert _row(text, "300", str(job.root / "checkpoints" / "checkpoint_step_000000300"))
    assert _row(text, "400", str(job.root / "checkpoints" / "checkpoint_step_000000400"))
    assert _row(text, "heldout.jsonSchema", "0.93", "0", "+0.93")
    assert _row(text, "heldout.jsonSchema", "0.93", ">= 0.8", "ok")
    assert _row(text, "config hash", "c0ffee") and _row(text, "training tokens", "400000")

    missing = cli(api_server, "describe", "nope", "-n", namespace)
    assert missing.exit_code == 4
    assert missing.stderr.strip() == f"error: instructiontunes.instructune.io {namespace}/nope not found"


def test_a_kubeconfig_naming_its_files_relative_to_itself_is_read_as_kubectl_reads_it(
    api_server: ApiServer, kube: Kube, operator: Operator, namespace: str, tmp_path: Path
) -> None:
    _create_tune(kube, namespace)
    operator.reconcile(namespace, TUNE)
    config = json.loads(api_server.kubeconfig.read_text())
    (tmp_path / "certs").mkdir()
    for entry, fields in (
        ("clusters", ("certificate-authority",)),
        ("users", ("client-certificate", "client-key")),
    ):
        for item in config[entry]:
            for name in fields:
                copied = Path(shutil.copy(item[entry[:-1]][name], tmp_path / "certs"))
                item[entry[:-1]][name] = f"certs/{copied.name}"
    (tmp_path / "kubeconfig").write_text(json.dumps(config))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    result = _in(elsewhere, "--kubeconfig", str(tmp_path / "kubeconfig"), "describe", TUNE, "-n", namespace)

    assert result.exit_code == 0, result.output
    assert _row(result.stdout, "phase", "Provisioning")


def _in(folder: Path, *args: str) -> Any:
    """The command run from `folder`, KUBECONFIG restored after it (--kubeconfig sets it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("KUBECONFIG", "")
        return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


# ------------------------------------------------------------------------------------- logs, ask


def _host_address() -> str:
    """An address of this machine that the API server proxies to (it refuses loopback)."""
    found = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
    )
    for line in found.stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            return fields[fields.index("inet") + 1].split("/")[0]
    pytest.skip("this machine has no global IPv4 address for the API server to proxy to")


@dataclass
class RayHead:
    """The tune's Ray head as the CLI meets it: Ray's Jobs API (with Ray's token authentication:
    401 without a token, 403 with another) and the Ray Serve application (jobs/serve.py's API)."""

    token: str
    job_id: str
    route: str
    chunks: list[str]
    served: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    log_reads: int = 0

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        if path.startswith(f"/{self.route}/v1/"):  # Ray Serve's port has no token
            if method == "POST" and path == f"/{self.route}/v1/chat/completions":
                request = json.loads(body)
                self.served.append((path, request))
                reply = {
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": '{"party": "Acme"}'}}
                    ]
                }
                return 200, reply
            return 404, {"error": {"message": "not found"}}
        sent = headers.get("X-Ray-Authorization") or headers.get("Authorization")
        if not sent:
            return 401, "Unauthorized: Missing authentication token"
        if sent != f"Bearer {self.token}":
            return 403, "Forbidden: Invalid authentication token"
        if path == f"/api/jobs/{self.job_id}":
            done = self.log_reads >= len(self.chunks)
            return 200, {"submission_id": self.job_id, "status": "SUCCEEDED" if done else "RUNNING"}
        if path == f"/api/jobs/{self.job_id}/logs":
            self.log_reads = min(self.log_reads + 1, len(self.chunks))
            return 200, {"logs": "".join(self.chunks[: self.log_reads])}
        return 404, "not found"


@pytest.fixture
def ray_head_server() -> Iterator[tuple[str, int, list[RayHead]]]:
    """An HTTP server on this machine's address answering as `RayHead` (set into the list)."""
    heads: list[RayHead] = []

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            code, answer = heads[0].answer(self.command, self.path, self.headers, body)
            data = (json.dumps(answer) if not isinstance(answer, str) else answer).encode()
            self.send_response(code)
            self.send_header(
                "Content-Type", "application/json" if not isinstance(answer, str) else "text/plain"
            )
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _reply

        def log_message(self, *_: Any) -> None:
            pass

    address = _host_address()
    server = ThreadingHTTPServer((address, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield address, server.server_address[1], heads
    server.shutdown()
    server.server_close()


def _play_kuberay_head(kube: Kube, namespace: str, address: str, port: int) -> None:
    """The head pod and its Service, as KubeRay makes them (its labels and names), the pod running
    at `address`. The Service maps the Ray ports to the port the test's head listens on (a ClusterIP
    Service: a headless one may not map ports)."""
    cluster = ray_cluster_name(TUNE)
    selector = {"ray.io/cluster": cluster, "ray.io/node-type": "head"}
    post = [
        ("serviceaccounts", {"metadata": {"name": "default"}}),  # admission wants it for a pod
        ("pods", {"metadata": {"name": f"{cluster}-head-x7k2p", "labels": selector},
                  "spec": {"automountServiceAccountToken": False,
                           "containers": [{"name": "ray-head", "image": "job:0.1.0"}]}}),
        ("services", {"metadata": {"name": f"{cluster}-head-svc"},
                      "spec": {"selector": selector, "ports": [
                          {"name": "dashboard", "port": 8265, "targetPort": port},
                          {"name": "serve", "port": 8000, "targetPort": port}]}}),
    ]  # fmt: skip
    for resource, body in post:
        response = kube.http.post(f"/api/v1/namespaces/{namespace}/{resource}", json=body)
        assert response.status_code == 201, response.text
    running = {"phase": "Running", "podIP": address, "podIPs": [{"ip": address}],
               "conditions": [{"type": "Ready", "status": "True"}]}  # fmt: skip
    response = kube.http.patch(
        f"/api/v1/namespaces/{namespace}/pods/{cluster}-head-x7k2p/status",
        json={"status": running},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert response.status_code == 200, response.text


def test_logs_and_ask_reach_the_ray_head_and_the_served_model_through_the_api_server(
    api_server: ApiServer,
    kube: Kube,
    operator: Operator,
    namespace: str,
    tmp_path: Path,
    ray_head_server: tuple[str, int, list[RayHead]],
) -> None:
    tune = _create_tune(kube, namespace)  # serving: ray-serve, on the tune's own Ray cluster
    run_tune(kube, operator, namespace, tmp_path, PASSING)
    status = _status(kube, namespace)
    assert status["phase"] == "Deploying" and status["serving"]["endpoint"] == (
        f"http://{ray_cluster_name(TUNE)}-head-svc.{namespace}.svc:8000/quickstart-serve/v1"
    )
    address, port, heads = ray_head_server
    token = derive_token(FAKE_RAY_AUTH_KEY, tune["metadata"]["uid"])  # what the operator's Secret holds
    chunks = ["prepared 7200 training examples\n", "step 100/400 loss 1.62\n", "resuming from step 300\n"]
    heads.append(RayHead(token, status["jobId"], "quickstart-serve", chunks))
    _play_kuberay_head(kube, namespace, address, port)

    logs = cli(api_server, "logs", TUNE, "-n", namespace)
    assert logs.exit_code == 0, logs.output
    assert logs.stdout == chunks[0]  # the job's logs as Ray has them now

    heads[0].log_reads = 0
    followed = cli(api_server, "logs", TUNE, "-n", namespace, "--follow", "--interval", "0.05")
    assert followed.exit_code == 0, followed.output
    assert followed.stdout == "".join(chunks)  # each part once, until the job ended

    answer = cli(api_server, "ask", TUNE, "Who are the parties?", "-n", namespace, "--max-tokens", "48")
    assert answer.exit_code == 0, answer.output
    assert answer.stdout == '{"party": "Acme"}\n'
    assert heads[0].served == [
        (
            "/quickstart-serve/v1/chat/completions",
            {
                "model": "quickstart",
                "messages": [{"role": "user", "content": "Who are the parties?"}],
                "max_tokens": 48,
                "temperature": 0.0,
            },
        )
    ]


def test_logs_with_another_token_are_refused_by_ray_and_say_so(
    api_server: ApiServer,
    kube: Kube,
    operator: Operator,
    namespace: str,
    tmp_path: Path,
    ray_head_server: tuple[str, int, list[RayHead]],
) -> None:
    _create_tune(kube, namespace)
    operator.reconcile(namespace, TUNE)
    _mark_cluster_ready(kube, namespace)
    operator.reconcile(namespace, TUNE)
    address, port, heads = ray_head_server
    heads.append(
        RayHead("the-clusters-own-token", _status(kube, namespace)["jobId"], "quickstart-serve", ["x"])
    )
    _play_kuberay_head(kube, namespace, address, port)

    refused = cli(api_server, "logs", TUNE, "-n", namespace)

    assert refused.exit_code == 4
    assert refused.stderr.strip() == (
        "error: the Ray cluster refused the request (HTTP 403): Forbidden: Invalid authentication token"
    )
    not_served = cli(api_server, "ask", TUNE, "hello", "-n", namespace)
    assert not_served.exit_code == 4
    assert not_served.stderr.strip() == (
        f"error: {namespace}/{TUNE} is not served (phase Training; status.serving names no endpoint)"
    )
