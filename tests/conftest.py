"""The `stack` fixture: the local stack (hack/localstack.py), started only when a test asks for it.

INSTRUCTUNE_STACK_DIR=<dir> reuses (or starts) the stack in that directory; otherwise it starts in a
temporary directory. A stack this session started is always stopped at the end (finalizer, atexit,
SIGTERM/SIGHUP); a stack that was already running is left running.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack"))
import localstack


@dataclass(frozen=True)
class Stack:
    dir: Path
    kubeconfig: Path
    env: dict[str, str]
    s3_endpoint: str
    access_key: str
    secret_key: str
    ray_address: str
    ray_token: str
    info: dict[str, Any] = field(repr=False)
    owned: bool = True

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Runs kubectl as cluster admin; raises localstack.StackError (with stderr) when check and it fails."""
        return localstack.kubectl(self.dir, *args, input=input, check=check)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stack_teardown: stops the session's stack; always ordered last")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("stack_teardown") is not None)


@contextlib.contextmanager
def stopped_at_exit(state_dir: Path, owned: bool = True) -> Iterator[None]:
    """Stops the stack in state_dir (when this run started it) as the block ends, at interpreter
    exit, or on SIGTERM/SIGHUP: a killed test run leaves no stack behind."""
    stopped = False

    def stop(*_: object) -> None:
        nonlocal stopped
        if owned and not stopped:
            stopped = True
            localstack.down(state_dir)

    def on_signal(signum: int, _frame: object) -> None:
        stop()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    atexit.register(stop)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    given = os.environ.get("INSTRUCTUNE_STACK_DIR")
    state_dir = Path(given) if given else tmp_path_factory.mktemp("stack", numbered=True)
    info = localstack.up(state_dir)
    owned = not info["reused"]
    env = info["env"]
    with stopped_at_exit(state_dir, owned):
        yield Stack(
            dir=Path(info["dir"]),
            kubeconfig=Path(info["paths"]["kubeconfig"]),
            env=env,
            s3_endpoint=env["INSTRUCTUNE_S3_ENDPOINT"],
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            ray_address=env["RAY_ADDRESS"],
            ray_token=env["RAY_AUTH_TOKEN"],
            info=info,
            owned=owned,
        )
