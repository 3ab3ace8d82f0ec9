"""The chart's Grafana dashboard as the tests read it: its PromQL queries, the metric names they use,
and its variables. Shared by the unit test (every name is one the operator defines) and the
integration test (Prometheus, scraping the running operator, answers every query with data)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "charts" / "instructune" / "dashboards" / "instructune.json"

# PromQL words that are neither metrics nor followed by "(" where they appear.
_KEYWORDS = {
    *("by", "without", "on", "ignoring", "group_left", "group_right"),
    *("offset", "bool", "and", "or", "unless", "inf", "nan"),
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$"
)


@dataclass(frozen=True)
class Query:
    panel: str
    expr: str


@dataclass(frozen=True)
class Variable:
    """A query variable `label_values(metric, label)`."""

    name: str
    metric: str
    label: str


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows too."""
    return [q for p in panels for q in [p, *_panels(p.get("panels", []))]]


def queries(dashboard: Mapping[str, Any]) -> list[Query]:
    """Every PromQL expression of every panel."""
    return [
        Query(panel["title"], target["expr"])
        for panel in _panels(dashboard.get("panels", []))
        for target in panel.get("targets", [])
    ]


def data_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [p for p in _panels(dashboard.get("panels", [])) if p.get("type") != "row"]


def variables(dashboard: Mapping[str, Any]) -> list[Variable]:
    """The query variables; a query variable that is not `label_values(metric, label)` is refused."""
    found = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = _LABEL_VALUES.match(query)
        if not match:
            raise ValueError(f"variable {var['name']}: not label_values(metric, label): {query!r}")
        found.append(Variable(var["name"], match[1], match[2]))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: every identifier that is not a function or
    aggregation (followed by "("), a keyword, a label (in matchers and groupings), a string, a
    duration, or a Grafana variable."""
    text = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables: inside strings or ranges
    text = _STRING.sub('""', text)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = _GROUPING.sub("", text)
    return {name for name, call in _IDENTIFIER.findall(text) if not call and name not in _KEYWORDS}


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """The expression as Grafana sends it, with these values for its variables ($name, ${name})."""

    def value(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)
