"""The operator's output for every example is pinned in tests/golden (hack/gen_golden.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.conftest import generated_files_drift

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_what_the_operator_applies_and_submits_for_every_example_matches_its_golden_file() -> None:
    assert not (drift := generated_files_drift("gen_golden.py")), drift


def test_every_example_has_a_golden_file() -> None:
    examples = {p.name for p in (ROOT / "examples").glob("*.yaml")}
    assert examples == {p.name for p in (ROOT / "tests" / "golden").glob("*.yaml")}


@pytest.mark.parametrize("golden", sorted((ROOT / "tests" / "golden").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_passes_the_operators_validation_and_gets_a_ray_cluster(golden: Path) -> None:
    text = golden.read_text()
    assert "InvalidSpec" not in text and "kind: RayCluster" in text, golden.name
