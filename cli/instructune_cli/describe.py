"""Pure: `instructune describe`, a tune as sections of rows, from the object the API server holds.

`describe` reads only what the operator and the job wrote (status) and what the user asked for
(the gate rules of the spec); each gate rule is judged again by the operator's own gate
(`gate.evaluate_gate`), so the table says what the operator decided and why. `render` lays the
sections out with Rich.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from instructune_operator.api import GateRule
from instructune_operator.gate import evaluate_gate, metric_value, rule_bounds


@dataclass(frozen=True)
class Section:
    """A titled table: `columns` heads its rows, or, when empty, each row is a (field, value) pair."""

    title: str
    rows: Sequence[tuple[str, ...]]
    columns: tuple[str, ...] = ()


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _pairs(title: str, pairs: Sequence[tuple[str, Any]]) -> Section | None:
    rows = [(key, _num(value)) for key, value in pairs if value not in (None, "", {}, [])]
    return Section(title, rows) if rows else None


def _tune(tune: dict[str, Any]) -> Section:
    meta, status = tune.get("metadata") or {}, tune.get("status") or {}
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    attempts = status.get("attempts")
    resumes = status.get("resumes")
    return Section(
        "Tune",
        [
            ("name", f"{meta.get('namespace', '?')}/{meta.get('name', '?')}"),
            ("phase", status.get("phase") or "(no status yet)"),
            *(
                [("attempts", f"{attempts}" + (f" ({resumes} resumed)" if resumes else ""))]
                if attempts
                else []
            ),
            *([("job", status["jobId"])] if status.get("jobId") else []),
            *(
                [
                    (
                        "ray cluster",
                        f"{status['rayCluster'].get('name')} ({status['rayCluster'].get('dashboardUrl')})",
                    )
                ]
                if status.get("rayCluster")
                else []
            ),
            *([("started", status["startedAt"])] if status.get("startedAt") else []),
            *([("finished", status["finishedAt"])] if status.get("finishedAt") else []),
            *(
                [
                    (
                        "generation",
                        f"{generation}, observed {observed} (the operator has not acted on the change yet)",
                    )
                ]
                if observed is not None and generation is not None and observed < generation
                else []
            ),
        ],
    )


def _conditions(status: dict[str, Any]) -> Section | None:
    rows = [
        (
            c.get("type", ""),
            c.get("status", ""),
            c.get("reason", ""),
            c.get("message", ""),
            c.get("lastTransitionTime", ""),
        )
        for c in status.get("conditions") or []
    ]
    return Section("Conditions", rows, ("type", "status", "reason", "message", "since")) if rows else None


def progress_text(progress: dict[str, Any]) -> str:
    step, total = progress.get("step"), progress.get("totalSteps")
    if step is None:
        return "-"
    if not total:
        return str(step)
    return f"{step}/{total} ({100 * step / total:.0f}%)"


def _progress(status: dict[str, Any]) -> Section | None:
    progress = status.get("progress") or {}
    if not progress:
        return None
    return _pairs(
        "Progress",
        [
            ("step", progress_text(progress)),
            ("epoch", progress.get("epoch")),
            ("loss", progress.get("loss")),
            ("learning rate", progress.get("learningRate")),
            ("tokens/s", progress.get("tokensPerSecond")),
            ("eta", progress.get("eta")),
        ],
    )


def _checkpoints(status: dict[str, Any]) -> Section | None:
    rows = [
        (str(c.get("step")), _num(c.get("loss")), c.get("time") or "-", c.get("uri", ""))
        for c in sorted(status.get("checkpoints") or [], key=lambda c: c.get("step", 0))
    ]
    return Section("Checkpoints", rows, ("step", "loss", "written", "uri")) if rows else None


def _data(status: dict[str, Any]) -> Section | None:
    data = status.get("data") or {}
    padding = data.get("paddingFraction")
    return _pairs(
        "Data",
        [
            ("rows", data.get("rows")),
            ("invalid rows", data.get("invalidRows")),
            ("invalid rows report", data.get("invalidRowsReport")),
            ("duplicates dropped", data.get("duplicateRows")),
            ("contaminated dropped", data.get("contaminatedRows")),
            ("rows with personal data", data.get("piiRows")),
            ("audit report", data.get("auditReport")),
            ("training tokens", data.get("tokens")),
            ("padding", f"{100 * padding:.1f}%" if padding is not None else None),
            ("template hash", data.get("templateHash")),
        ],
    )


def _evaluation(status: dict[str, Any]) -> Section | None:
    evaluation = status.get("evaluation") or {}
    metrics, base = evaluation.get("metrics") or {}, evaluation.get("baseMetrics") or {}
    rows = []
    for key in sorted(set(metrics) | set(base)):
        tuned, before = metrics.get(key), base.get(key)
        delta = tuned - before if tuned is not None and before is not None else None
        rows.append((key, _num(tuned), _num(before), f"{delta:+.4g}" if delta is not None else "-"))
    if evaluation.get("summary"):
        rows.append(("verdict", evaluation["summary"], "", ""))
    return Section("Evaluation", rows, ("metric", "tuned", "base", "tuned - base")) if rows else None


def gate_rows(
    rules: Sequence[dict[str, Any]], metrics: dict[str, float], base: dict[str, float]
) -> list[tuple[str, ...]]:
    """Each gate rule of the spec: the value it reads, its bounds, and the operator's verdict."""
    rows: list[tuple[str, ...]] = []
    for raw in rules:
        try:
            rule = GateRule.model_validate(raw)
        except ValidationError:
            rows.append((str(raw.get("metric", "?")), "-", "?", "unreadable rule"))
            continue
        value = metric_value(rule.metric, metrics, base)
        bounds = rule_bounds(rule, " and ")
        if value is None:
            verdict = "FAIL (not reported)" if metrics else "not evaluated yet"
        else:
            verdict = "ok" if evaluate_gate([rule], metrics, base).passed else "FAIL"
        rows.append((rule.metric, _num(value), bounds, verdict))
    return rows


def _gate(tune: dict[str, Any]) -> Section | None:
    rules = ((tune.get("spec") or {}).get("evaluation") or {}).get("gate") or []
    evaluation = (tune.get("status") or {}).get("evaluation") or {}
    rows = gate_rows(rules, evaluation.get("metrics") or {}, evaluation.get("baseMetrics") or {})
    return Section("Gate", rows, ("rule", "value", "needs", "result")) if rows else None


def _lineage(status: dict[str, Any]) -> list[Section]:
    lineage = status.get("lineage") or {}
    sections = [
        s
        for s in [
            _pairs(
                "Lineage",
                [
                    ("base model revision", lineage.get("baseModelRevision")),
                    ("config hash", lineage.get("configHash")),
                    ("image", lineage.get("image")),
                    ("version", lineage.get("version")),
                ],
            )
        ]
        if s is not None
    ]
    etags = lineage.get("dataEtags") or {}
    if etags:
        sections.append(Section("Data read", sorted(etags.items()), ("object", "etag")))
    return sections


def _serving(status: dict[str, Any]) -> Section | None:
    serving = status.get("serving") or {}
    if not serving:
        return None
    trained = (status.get("data") or {}).get("templateHash")
    served = serving.get("templateHash")
    template = served
    if served and trained:
        template = f"{served} ({'the one trained with' if served == trained else 'NOT the one trained with'})"
    return _pairs(
        "Serving",
        [
            ("endpoint", serving.get("endpoint")),
            ("model", serving.get("model")),
            ("ready replicas", serving.get("readyReplicas")),
            ("template hash", template),
            ("previous adapter", serving.get("previousAdapterUri")),
        ],
    )


def describe(tune: dict[str, Any]) -> list[Section]:
    """The sections of `instructune describe`, in order; a section with nothing to say is left out."""
    status = tune.get("status") or {}
    found = [
        _tune(tune),
        _conditions(status),
        _progress(status),
        _checkpoints(status),
        _data(status),
        _evaluation(status),
        _gate(tune),
        *_lineage(status),
        _serving(status),
    ]
    return [section for section in found if section is not None]


def render(sections: Sequence[Section]) -> RenderableType:
    parts: list[RenderableType] = []
    for section in sections:
        table = Table(title=section.title, title_justify="left", title_style="bold", expand=False)
        if section.columns:
            for column in section.columns:
                table.add_column(column, overflow="fold")
        else:
            table.show_header = False
            table.add_column(style="bold")
            table.add_column(overflow="fold")
        for row in section.rows:
            table.add_row(*(Text(cell) for cell in row))
        parts.append(table)
    return Group(*parts)
