"""Fixtures on top of the local stack: the CRD installed, the operator running as a process."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
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


@pytest.fixture(scope="session")
def operator(
    crd_installed: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen[bytes]]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    from demo import operator_env  # hack/ is on sys.path through tests/conftest.py

    env = operator_env(crd_installed.env, crd_installed.dir)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "instructune_operator"], env=env, stdout=out, stderr=out
        )
    time.sleep(1)
    if proc.poll() is not None:
        pytest.fail(f"operator exited at start:\n{log.read_text()[-3000:]}")
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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
