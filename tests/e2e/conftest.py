"""End-to-end fixtures: the operator as users install it (the chart, with helm, in a pod on the
stack's real node, under the chart's ServiceAccount), on top of the integration fixtures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

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
