"""The operator's Prometheus metrics: their definitions, the pure mapping of a tune's status to its
gauges, and the HTTP endpoint (`/metrics` on Settings.metrics_port, started by handlers.configure).

Every series is bounded: the per-tune gauges carry a tune's namespace and name and leave with the
tune (`forget`, on its deletion), the tune counts carry a namespace and a phase, and every other
label takes a handful of values. Counters whose label values are known are created at zero, so a
dashboard shows a flat line instead of "no data" until the first event.

The registry is the operator's own (not prometheus_client's global one): it exposes exactly these
metrics and the process' own (CPU, memory, file descriptors), whatever else is imported.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from instructune_operator.api import Phase

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

Trigger = Literal["event", "timer"]
SubmissionOutcome = Literal["submitted", "exists", "failed"]
GateOutcome = Literal["pass", "fail"]

RECONCILE_SECONDS = Histogram(
    "instructune_reconcile_duration_seconds",
    "Duration of the operator's reconcile passes of a tune; trigger: event (create, spec update, "
    "resume) or timer.",
    ["trigger"],
    # A pass that changes nothing costs milliseconds; one that applies children or asks Ray waits for
    # round trips; the API client gives up after 30 s.
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "instructune_reconcile_errors_total",
    "Reconcile passes that raised (Kopf retries them).",
    ["trigger"],
    registry=REGISTRY,
)
KUBE_API_ERRORS = Counter(
    "instructune_kube_api_errors_total",
    "Requests of the operator's own API client (children, reads, deletes, tokens) that failed, by "
    "Kubernetes verb and HTTP status code ('<error>': no answer).",
    ["verb", "code"],
    registry=REGISTRY,
)
RAY_SUBMISSIONS = Counter(
    "instructune_ray_job_submissions_total",
    "Ray job submissions (training attempts, Ray Serve rollouts and removals) by outcome: submitted, "
    "exists (Ray already had the deterministic id: a repeat after a restart), failed.",
    ["outcome"],
    registry=REGISTRY,
)
GATE_VERDICTS = Counter(
    "instructune_gate_verdicts_total",
    "Evaluation gate verdicts reached by the operator, pass or fail.",
    ["outcome"],
    registry=REGISTRY,
)
for _trigger in get_args(Trigger):
    RECONCILE_SECONDS.labels(_trigger)
    RECONCILE_ERRORS.labels(_trigger)
for _outcome in get_args(SubmissionOutcome):
    RAY_SUBMISSIONS.labels(_outcome)
for _verdict in get_args(GateOutcome):
    GATE_VERDICTS.labels(_verdict)

# A tune's gauges: metric name -> (status.progress key, help).
PROGRESS_GAUGES = {
    "instructune_tune_step": ("step", "Optimizer steps done (status.progress.step)."),
    "instructune_tune_total_steps": ("totalSteps", "Optimizer steps planned (status.progress.totalSteps)."),
    "instructune_tune_loss": ("loss", "Latest training loss (status.progress.loss)."),
    "instructune_tune_tokens_per_second": (
        "tokensPerSecond",
        "Training throughput in tokens per second (status.progress.tokensPerSecond).",
    ),
}
TUNES = "instructune_tunes"
PHASES: tuple[str, ...] = get_args(Phase)


@dataclass(frozen=True)
class TuneGauges:
    """What a tune contributes to the gauges: its phase (None before its first pass) and its
    progress values by metric name."""

    phase: str | None
    progress: dict[str, float]


def tune_gauges(status: Mapping[str, Any]) -> TuneGauges:
    """Pure: a tune's status (wire form, as the API server holds it) to its gauge values. A value
    the job has not reported yet is absent, not zero: a loss of 0 would be a lie."""
    progress = status.get("progress") or {}
    values = {
        metric: float(progress[key])
        for metric, (key, _) in PROGRESS_GAUGES.items()
        if isinstance(progress.get(key), int | float) and not isinstance(progress.get(key), bool)
    }
    phase = status.get("phase")
    return TuneGauges(phase=phase if isinstance(phase, str) else None, progress=values)


def gate_outcome(old: Mapping[str, Any], new: Mapping[str, Any]) -> GateOutcome | None:
    """Pure: the verdict a pass reached, if it reached one: status.evaluation.passed set where it
    was not. A verdict already in the status (every later pass) is not counted again."""
    before = (old.get("evaluation") or {}).get("passed")
    after = (new.get("evaluation") or {}).get("passed")
    if before is not None or after is None:
        return None
    return "pass" if after else "fail"


class TuneCollector:
    """The tune gauges, computed at scrape time from the last status each pass saw: a deleted
    tune's series go with `forget`, a namespace's count series with its last tune."""

    def __init__(self) -> None:
        self._tunes: dict[tuple[str, str], TuneGauges] = {}
        self._lock = threading.Lock()  # Kopf runs passes on a thread pool

    def record(self, namespace: str, name: str, gauges: TuneGauges) -> None:
        with self._lock:
            self._tunes[(namespace, name)] = gauges

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._tunes.pop((namespace, name), None)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            tunes = dict(self._tunes)
        counts = GaugeMetricFamily(
            TUNES,
            "Tunes by namespace and phase (every phase of a namespace with tunes, zeros included).",
            labels=["namespace", "phase"],
        )
        for namespace in sorted({ns for ns, _ in tunes}):
            phases = [g.phase for (ns, _), g in tunes.items() if ns == namespace]
            for phase in PHASES:
                counts.add_metric([namespace, phase], phases.count(phase))
        yield counts
        for metric, (_, help_) in PROGRESS_GAUGES.items():
            family = GaugeMetricFamily(metric, help_, labels=["namespace", "name"])
            for (namespace, name), gauges in sorted(tunes.items()):
                if metric in gauges.progress:
                    family.add_metric([namespace, name], gauges.progress[metric])
            yield family


TUNE_COLLECTOR = TuneCollector()
REGISTRY.register(TUNE_COLLECTOR)


@contextmanager
def reconcile_pass(trigger: Trigger) -> Iterator[None]:
    """Times one pass into the histogram (failed ones too) and counts it when it raises."""
    start = time.perf_counter()
    try:
        yield
    except Exception:
        RECONCILE_ERRORS.labels(trigger).inc()
        raise
    finally:
        RECONCILE_SECONDS.labels(trigger).observe(time.perf_counter() - start)


def record_pass(namespace: str, name: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """What a pass changed, from the status it found (`old`) and the one it decided (`new`)."""
    verdict = gate_outcome(old, new)
    if verdict is not None:
        GATE_VERDICTS.labels(verdict).inc()
    TUNE_COLLECTOR.record(namespace, name, tune_gauges(new))


def forget(namespace: str, name: str) -> None:
    """Removes a deleted tune's series."""
    TUNE_COLLECTOR.forget(namespace, name)


def serve(port: int, address: str = "0.0.0.0") -> WSGIServer:
    """Starts the `/metrics` endpoint on a daemon thread; the caller shuts the server down."""
    server, _ = start_http_server(port, addr=address, registry=REGISTRY)
    return server
