"""The lock files (hack/lock.sh) agree with pyproject.toml's pins and with each other, and every
requirement in them is pinned with hashes, so `pip install --require-hashes` installs exactly them."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "hack"))
from split_lock import split_lock  # noqa: E402

pytestmark = pytest.mark.unit
LOCKS = {
    "dev": ROOT / "requirements.lock",
    "operator": ROOT / "operator" / "requirements.lock",
    "jobs": ROOT / "jobs" / "requirements.lock",
}


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    return {
        _name(m.group(1)): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", path.read_text(), re.M)
    }


def pyproject_pins(*groups: str) -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for group in groups:
        specs += project["optional-dependencies"][group]
    out = {}
    for spec in specs:
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)$", spec)
        if m:
            out[_name(m.group(1))] = m.group(2)
    return out


@pytest.mark.parametrize(
    ("lock", "groups"),
    [("dev", ("train", "dev", "bench", "cli")), ("operator", ()), ("jobs", ("train",))],
)
def test_every_pin_of_pyproject_is_locked_at_that_version(lock: str, groups: tuple[str, ...]) -> None:
    locked = pins(LOCKS[lock])
    wanted = pyproject_pins(*groups)
    assert wanted, "pyproject.toml pins nothing?"
    drift = {n: (v, locked.get(n)) for n, v in wanted.items() if locked.get(n) != v}
    assert not drift, f"{LOCKS[lock].name} disagrees with pyproject.toml (run `make lock`): {drift}"


def test_the_image_locks_take_the_development_lock_versions() -> None:
    dev = pins(LOCKS["dev"])
    for lock in ("operator", "jobs"):
        other = {n: (v, dev.get(n)) for n, v in pins(LOCKS[lock]).items() if dev.get(n) != v}
        assert not other, f"{lock} lock differs from requirements.lock: {other}"


def test_the_operator_lock_carries_no_training_stack() -> None:
    assert not {"torch", "ray", "transformers", "deepspeed", "peft"} & set(pins(LOCKS["operator"]))
    assert {"torch", "ray", "transformers", "deepspeed", "peft", "boto3"} <= set(pins(LOCKS["jobs"]))


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_locked_requirement_has_a_hash(lock: str) -> None:
    blocks = re.split(r"\n(?=[A-Za-z0-9])", LOCKS[lock].read_text().strip())
    unhashed = [b.split()[0] for b in blocks if "--hash=sha256:" not in b]
    assert not unhashed, unhashed
    assert "--index-url" not in LOCKS[lock].read_text()


def test_splitting_a_lock_keeps_each_requirement_with_its_hashes() -> None:
    text = LOCKS["dev"].read_text()
    rest, named = split_lock(text, {"deepspeed"})
    assert named.startswith("deepspeed==") and "--hash=sha256:" in named
    assert "deepspeed==" not in rest
    assert sorted((rest + named).splitlines()) == sorted(text.splitlines())
