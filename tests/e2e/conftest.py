"""End-to-end fixtures: the operator as users install it (the chart, with helm, in a pod on the
stack's real node, under the chart's ServiceAccount), on top of the integration fixtures."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import crd_installed, namespace, real_node, wait_for  # noqa: F401


class OperatorPod:
    """The chart's operator Deployment. `kill` force-deletes its pod (no grace: nothing of the
    operator runs after it, as when its node dies); the Deployment starts the next one itself."""

    def __init__(self, stack: Any) -> None:
        import operator_release  # hack/ is on sys.path through tests/conftest.py

        self.stack, self.release = stack, operator_release
        self.refs = operator_release.install(stack.dir)

    def _pods(self) -> list[str]:
        out = self.stack.kubectl(
            "get", "pods", "-n", self.release.NAMESPACE, "-l", "app.kubernetes.io/name=instructune",
            "-o", "jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.metadata.deletionTimestamp}{'\\n'}{end}",
        ).stdout  # fmt: skip
        return [
            line.split()[0]
            for line in out.splitlines()
            if line.split()[1:2] == ["Running"] and len(line.split()) == 2
        ]

    def start(self) -> None:
        """Waits for a running operator pod (the Deployment replaces a killed one by itself)."""
        wait_for(self._pods, 180, "a running operator pod", interval=1)

    def kill(self) -> None:
        for pod in self._pods():
            self.stack.kubectl(
                "delete",
                "pod",
                pod,
                "-n",
                self.release.NAMESPACE,
                "--grace-period=0",
                "--force",
                "--wait=false",
            )

    def scale(self, replicas: int) -> None:
        self.stack.kubectl(
            "scale",
            f"deployment/{self.release.DEPLOYMENT}",
            "-n",
            self.release.NAMESPACE,
            f"--replicas={replicas}",
        )

    def logs(self) -> str:
        return str(self.release.operator_logs(self.stack.dir))


@pytest.fixture(scope="module")
def operator(crd_installed: Any, real_node: dict[str, Any]) -> Iterator[OperatorPod]:  # noqa: F811
    """The chart-installed operator for one test module; scaled to zero after it, so that the
    integration tests' own operators never share a tune with it."""
    pod = OperatorPod(crd_installed)
    pod.scale(1)
    pod.start()
    yield pod
    pod.scale(0)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and pod._pods():
        time.sleep(1)


def diagnostics(stack: Any, ns: str) -> str:
    """What a failed end-to-end test needs to be understood from CI's log alone: the tunes' status,
    the namespace's pods and events, the Ray jobs of each tune's cluster, and the operator's log."""
    import operator_release

    parts: list[str] = []

    def section(title: str, get: Any) -> None:
        try:
            text = str(get())
        except Exception as e:  # a diagnostic that fails must not hide the others
            text = f"({type(e).__name__}: {e})"
        parts.append(f"--- {title}\n{text.strip()}")

    def tunes() -> str:
        items = json.loads(stack.kubectl("get", "itune", "-n", ns, "-o", "json").stdout)["items"]
        lines = []
        for t in items:
            s = t.get("status") or {}
            lines.append(
                f"{t['metadata']['name']}: phase={s.get('phase')} attempts={s.get('attempts')} "
                f"resumes={s.get('resumes')} jobId={s.get('jobId')} progress={s.get('progress')}"
            )
            lines += [
                f"  {c['type']}={c['status']} {c.get('reason')}: {c.get('message', '')[:300]}"
                for c in s.get("conditions") or []
            ]
        return "\n".join(lines)

    def ray_jobs() -> str:
        lines = []
        for name in stack.kubectl("get", "itune", "-n", ns, "-o", "name").stdout.split():
            tune = name.split("/")[-1]
            ip = stack.kubectl(
                "get",
                "pods",
                "-n",
                ns,
                "-l",
                f"ray.io/cluster={tune}-ray,ray.io/node-type=head",
                "-o",
                "jsonpath={.items[0].status.podIP}",
                check=False,
            ).stdout
            token = stack.kubectl(
                "get",
                "secret",
                f"{tune}-ray-auth",
                "-n",
                ns,
                "-o",
                "jsonpath={.data.RAY_AUTH_TOKEN}",
                check=False,
            ).stdout
            if not ip:
                lines.append(f"{tune}: no head pod")
                continue
            headers = {"Authorization": f"Bearer {base64.b64decode(token).decode()}"} if token else {}
            jobs = httpx.get(f"http://{ip}:8265/api/jobs/", headers=headers, timeout=10).json()
            for j in jobs:
                lines.append(
                    f"{tune}: {j.get('submission_id')} {j.get('status')} {(j.get('message') or '')[:300]}"
                )
                if j.get("status") not in ("SUCCEEDED",):
                    logs = (
                        httpx.get(
                            f"http://{ip}:8265/api/jobs/{j['submission_id']}/logs",
                            headers=headers,
                            timeout=10,
                        )
                        .json()
                        .get("logs", "")
                    )
                    noise = ("HTTP Request:", "it/s]", "FutureWarning", "warnings.warn")
                    kept = [
                        line
                        for line in logs.splitlines()
                        if line.strip() and not any(n in line for n in noise)
                    ]
                    lines += ["    " + line for line in kept[-40:]]
        return "\n".join(lines)

    section("tunes", tunes)
    section("pods", lambda: stack.kubectl("get", "pods", "-n", ns, "-o", "wide", check=False).stdout)
    section(
        "events",
        lambda: "\n".join(
            stack.kubectl(
                "get", "events", "-n", ns, "--sort-by=.lastTimestamp", check=False
            ).stdout.splitlines()[-30:]
        ),
    )
    section("ray jobs", ray_jobs)
    section(
        "operator log",
        lambda: "\n".join(
            line
            for line in operator_release.operator_logs(stack.dir, tail=400).splitlines()
            if "Timer 'reconcile-timer' succeeded" not in line
        )[-6000:],
    )
    return "\n".join(parts)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    funcargs = getattr(item, "funcargs", {})
    if report.when == "call" and report.failed and "crd_installed" in funcargs and "namespace" in funcargs:
        report.sections.append(("diagnostics", diagnostics(funcargs["crd_installed"], funcargs["namespace"])))
