from __future__ import annotations

from pathlib import Path
from typing import Literal

import gen_api_docs
import pytest
from pydantic import Field

from instructune_operator.api import Model, cel
from tests.unit.conftest import generated_files_drift

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_committed_api_docs_match_the_models() -> None:
    assert not (drift := generated_files_drift("gen_api_docs.py")), drift


class _Leaf(Model):
    """A nested object."""

    max_count: int = Field(default=3, ge=1, le=9, description="How many | at most.")


class _Root(Model):
    """The root."""

    model_config = {"json_schema_extra": {"x-kubernetes-validations": [cel("has(self.kind)", "set kind")]}}
    kind: Literal["a", "b"] = Field(description="The kind.")
    schema_: dict[str, object] | None = Field(default=None, alias="schema", description="Free-form.")
    leaves: list[_Leaf] = Field(default_factory=list, max_length=4, description="Leaves.")
    only_leaf: _Leaf | None = Field(default=None, description="One leaf.")


def test_sections_follow_the_models_with_wire_names_types_defaults_and_rules() -> None:
    sections = gen_api_docs.collect([("spec", _Root)])
    assert [s.model for s in sections] == [_Root, _Leaf]
    assert sections[1].paths == ["spec.leaves[]", "spec.onlyLeaf"]
    links = gen_api_docs.anchors("# Title\n\n## _leaf\n", sections)
    assert links == {_Root: "_root", _Leaf: "_leaf-1"}  # numbered past the guide's own heading
    root = gen_api_docs.render_section(sections[0], links)
    assert "| `kind` | one of `a`, `b` | yes |  |  | The kind. |" in root
    assert "| `schema` | object (any fields) |  |  |  | Free-form. |" in root
    assert "| `leaves` | list of [_Leaf](#_leaf-1) |  | `[]` | `<= 4 items` | Leaves. |" in root
    assert "| `onlyLeaf` | [_Leaf](#_leaf-1) |  |  |  | One leaf. |" in root
    assert "- set kind (`has(self.kind)`)" in root
    leaf = gen_api_docs.render_section(sections[1], links)
    assert "`spec.leaves[]`, `spec.onlyLeaf`: A nested object." in leaf
    assert "| `maxCount` | integer |  | `3` | `>= 1`, `<= 9` | How many \\| at most. |" in leaf
