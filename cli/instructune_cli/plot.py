"""`instructune plot`: a PNG of the run's training loss and of the tuned model against its base.

The run's files are read where the job wrote them (artifacts.ArtifactLayout under
`spec.checkpointing.uri`), through the job's own storage (S3 credentials and endpoint from the
environment, as for the job: AWS_*, AWS_ENDPOINT_URL or INSTRUCTUNE_S3_ENDPOINT). The figure is
drawn on matplotlib's Agg canvas, no display and no pyplot state.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from instructune_cli.connect import CliError
from instructune_cli.curves import Comparison, LossCurve, comparisons, loss_curves
from instructune_jobs.artifacts import ArtifactLayout
from instructune_jobs.storage import Storage


@dataclass
class RunData:
    """What was read of a run: its loss curves and evaluation, and where they came from."""

    curves: list[LossCurve]
    scores: list[Comparison] = field(default_factory=list)
    losses: list[Comparison] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def read_run(root: str, status: dict[str, Any] | None = None, storage: Storage | None = None) -> RunData:
    """The run under `root`: metrics.jsonl, and the evaluation from eval/report.json (the tune's
    status.evaluation when the report cannot be read: it holds the same metrics)."""
    storage = storage or Storage()
    layout = ArtifactLayout(root.rstrip("/"))
    blob = storage.read_bytes(layout.metrics)
    if blob is None:
        raise CliError(f"no training metrics at {layout.metrics}: has the run started training?")
    data = RunData(loss_curves(blob.decode("utf-8", errors="replace")), sources=[layout.metrics])
    evaluation = (status or {}).get("evaluation") or {}
    report_uri = evaluation.get("reportUri") or layout.eval_report
    report = storage.read_bytes(report_uri)
    if report is not None:
        evaluation = json.loads(report)
        data.sources.append(report_uri)
    data.scores, data.losses = comparisons(
        evaluation.get("metrics") or {}, evaluation.get("baseMetrics") or {}
    )
    return data


def _bars(axes: Any, entries: Sequence[Comparison], title: str) -> None:
    positions = list(range(len(entries)))
    width = 0.4
    axes.barh(
        [p - width / 2 for p in positions],
        [e.tuned for e in entries],
        height=width,
        label="tuned",
        color="tab:blue",
    )
    axes.barh(
        [p + width / 2 for p in positions],
        [e.base if e.base is not None else 0.0 for e in entries],
        height=width,
        label="base",
        color="tab:gray",
    )
    axes.set_yticks(positions, [e.metric for e in entries])
    axes.invert_yaxis()
    axes.set_title(title)
    axes.legend(loc="lower right")


def draw(run: RunData, title: str) -> Figure:
    """Training loss per step (a line per attempt), then the tuned-vs-base scores and losses."""
    panels = 1 + bool(run.scores) + bool(run.losses)
    figure = Figure(figsize=(6 * panels, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    loss = axes[0]
    for index, curve in enumerate(run.curves, start=1):
        # The job names an attempt by a random id; their order is the attempts' order.
        label = f"attempt {index}" + (f" ({curve.attempt})" if curve.attempt else "")
        loss.plot(curve.steps, curve.losses, label=label, linewidth=1.2)
    loss.set_xlabel("step")
    loss.set_ylabel("training loss")
    loss.set_title("training loss")
    if len(run.curves) > 1:
        loss.legend()
    rest = list(axes[1:])
    if run.scores:
        _bars(rest.pop(0), run.scores, "scores (higher is better)")
    if run.losses:
        _bars(rest.pop(0), run.losses, "losses (lower is better)")
    figure.suptitle(title)
    return figure


def save(figure: Figure, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=100)
