"""Fixtures on top of the local stack: the CRD installed, the operator running as a process."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def crd_installed(stack: Any) -> Any:
    stack.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    stack.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/instructiontunes.instructune.io"
    )
    return stack


@pytest.fixture
def namespace(crd_installed: Any) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    crd_installed.kubectl("create", "namespace", name)
    env = crd_installed.env
    crd_installed.kubectl(
        "create",
        "secret",
        "generic",
        "quickstart-s3",
        "-n",
        name,
        f"--from-literal=AWS_ACCESS_KEY_ID={env['AWS_ACCESS_KEY_ID']}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={env['AWS_SECRET_ACCESS_KEY']}",
    )
    yield name
    crd_installed.kubectl("delete", "namespace", name, "--wait=false", check=False)


class OperatorProcess:
    """`python -m instructune_operator` run on this machine against the stack, killable at will, under
    the chart's ServiceAccount and RBAC (never the stack's admin rights). Its jobs run on the stack's
    Ray head outside the cluster (rayAddressOverride): fast enough for the many small tunes of the
    integration tests; tests/e2e runs the operator as users do, in a pod."""

    def __init__(self, stack: Any, log: Path) -> None:
        import operator_release  # hack/ is on sys.path through tests/conftest.py

        self.env = operator_release.process_env(stack.dir)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "instructune_operator"], env=self.env, stdout=out, stderr=out
            )
        time.sleep(1)
        if self.proc.poll() is not None:
            pytest.fail(f"operator exited at start:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no cleanup handlers run, as when a node dies under the operator."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def operator(crd_installed: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """One operator per test module: modules never have two operators reconciling the same tunes."""
    process = OperatorProcess(crd_installed, tmp_path_factory.mktemp("operator") / "operator.log")
    process.start()
    yield process
    process.stop()


def get_tune(stack: Any, namespace: str, name: str) -> dict[str, Any]:
    out = stack.kubectl("get", "itune", name, "-n", namespace, "-o", "yaml").stdout
    return yaml.safe_load(out)


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


# ---------------------------------------------------------------------------------------------------
# The real node (a kubelet with containerd on this machine; see hack/localstack_node.py)


@pytest.fixture(scope="session")
def real_node(stack: Any) -> dict[str, Any]:
    """The stack's real node record (stack.json's "node"); skips when the stack runs without one."""
    record = stack.info.get("node")
    if not record:
        pytest.skip(f"the stack runs no real node: {stack.info.get('node_absent') or 'unknown reason'}")
    return dict(record)


@pytest.fixture(scope="session")
def product_image(real_node: dict[str, Any]) -> Callable[[str], str]:
    """`product_image("operator" | "job")`: the product's image (hack/build-images.sh: built once,
    cached outside the clone) imported into the node's containerd; returns its reference."""
    import localstack_node  # hack/ is on sys.path through tests/conftest.py

    refs: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in refs:
            res = subprocess.run(
                ["bash", str(ROOT / "hack" / "build-images.sh"), name],
                capture_output=True, text=True, check=False, timeout=5400,
            )  # fmt: skip
            assert res.returncode == 0, f"hack/build-images.sh {name} failed:\n{res.stderr[-4000:]}"
            ref, archive = res.stdout.split()[:2]
            localstack_node.import_archive(Path(real_node["dir"]) / "containerd.sock", ref, Path(archive))
            refs[name] = ref
        return refs[name]

    return get
