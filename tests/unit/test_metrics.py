"""The operator's metrics: the pure mapping of a tune's status to its gauges, the gate verdict a pass
reached, bounded series that leave with their tune, API failures counted by verb, and a dashboard
that names only metrics the operator defines."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import kopf
import pytest
from prometheus_client import CollectorRegistry

from instructune_operator import metrics
from instructune_operator.api import PHASE_FAILED, PHASE_TRAINING
from instructune_operator.clients.kube import Kube
from instructune_operator.metrics import TuneCollector, TuneGauges, gate_outcome, tune_gauges
from instructune_operator.settings import load_settings
from tests import dashboard

pytestmark = pytest.mark.unit

PROGRESS = {"step": 120, "totalSteps": 400, "loss": 1.25, "tokensPerSecond": 3456.5, "percent": 30}


def test_a_tunes_progress_becomes_its_four_gauges_and_its_phase_counts_it() -> None:
    gauges = tune_gauges({"phase": PHASE_TRAINING, "progress": PROGRESS, "attempts": 1})

    assert gauges == TuneGauges(
        phase="Training",
        progress={
            "instructune_tune_step": 120.0,
            "instructune_tune_total_steps": 400.0,
            "instructune_tune_loss": 1.25,
            "instructune_tune_tokens_per_second": 3456.5,
        },
    )


def test_a_value_the_job_has_not_reported_is_absent_not_zero() -> None:
    assert tune_gauges({"phase": "Provisioning"}) == TuneGauges("Provisioning", {})
    assert tune_gauges({"progress": {"step": 0, "totalSteps": 400, "loss": None}}) == TuneGauges(
        None, {"instructune_tune_step": 0.0, "instructune_tune_total_steps": 400.0}
    )
    assert tune_gauges({}) == TuneGauges(None, {})


def test_a_gate_verdict_counts_in_the_pass_that_reached_it_only() -> None:
    unjudged = {"evaluation": {"metrics": {"heldout.jsonValid": 0.99}}}
    passed = {"evaluation": {"metrics": {"heldout.jsonValid": 0.99}, "passed": True}}
    failed = {"evaluation": {"metrics": {}, "passed": False}}

    assert gate_outcome(unjudged, passed) == "pass"
    assert gate_outcome({}, failed) == "fail"
    # Every later pass finds the verdict in the status: not counted again.
    assert gate_outcome(passed, passed) is None
    assert gate_outcome(failed, failed) is None
    assert gate_outcome({}, unjudged) is None


def _samples(collector: TuneCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
    }


def test_tunes_are_counted_by_namespace_and_every_phase_and_leave_with_their_tune() -> None:
    collector = TuneCollector()
    collector.record("team-a", "one", tune_gauges({"phase": PHASE_TRAINING, "progress": PROGRESS}))
    collector.record("team-a", "two", tune_gauges({"phase": PHASE_TRAINING}))
    collector.record("team-b", "three", tune_gauges({"phase": PHASE_FAILED}))

    samples = _samples(collector)
    tunes = {labels: v for (name, labels), v in samples.items() if name == "instructune_tunes"}
    # Every phase of a namespace with tunes, zeros included: sums and rates need no gaps.
    assert len(tunes) == 2 * len(metrics.PHASES)
    assert tunes[(("namespace", "team-a"), ("phase", "Training"))] == 2
    assert tunes[(("namespace", "team-a"), ("phase", "Failed"))] == 0
    assert tunes[(("namespace", "team-b"), ("phase", "Failed"))] == 1
    assert samples[("instructune_tune_loss", (("name", "one"), ("namespace", "team-a")))] == 1.25
    assert not [key for key in samples if key[0] == "instructune_tune_loss" and ("name", "two") in key[1]]

    collector.forget("team-a", "one")
    collector.forget("team-b", "three")
    collector.forget("team-b", "never-seen")  # a tune deleted before its first pass

    after = _samples(collector)
    assert not [key for key in after if ("name", "one") in key[1] or ("namespace", "team-b") in key[1]]
    assert after[("instructune_tunes", (("namespace", "team-a"), ("phase", "Training")))] == 1


def test_a_tunes_later_pass_replaces_its_gauges_rather_than_adding_series() -> None:
    collector = TuneCollector()
    collector.record("team-a", "one", tune_gauges({"phase": PHASE_TRAINING, "progress": PROGRESS}))
    collector.record("team-a", "one", tune_gauges({"phase": PHASE_FAILED, "progress": {"step": 130}}))

    samples = _samples(collector)
    assert samples[("instructune_tunes", (("namespace", "team-a"), ("phase", "Failed")))] == 1
    assert samples[("instructune_tunes", (("namespace", "team-a"), ("phase", "Training")))] == 0
    assert {k[0] for k in samples if k[0].startswith("instructune_tune_")} == {"instructune_tune_step"}


@pytest.fixture
def unreachable_server() -> Iterator[str]:
    """An address nothing listens on: the connection is refused by this machine's kernel."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


def _value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_request_that_gets_no_answer_counts_under_its_verb_as_error(unreachable_server: str) -> None:
    kube = Kube(kopf.ConnectionInfo(server=unreachable_server), timeout=2.0)
    before = _value("instructune_kube_api_errors_total", verb="list", code="<error>")

    with pytest.raises(httpx.ConnectError):
        kube.list("v1", "Pod", "team-a", "instructune.io/tune=one")

    assert _value("instructune_kube_api_errors_total", verb="list", code="<error>") == before + 1


def _defined_names() -> set[str]:
    """The sample names the operator's registry can expose: every family, with its type's suffixes
    (a counter with labels exposes nothing before its first increment)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("", "_count", "_sum", "_created"), "gauge": ("",), "info": ("_info",)}  # fmt: skip
    return {
        f"{family.name}{suffix}" for family in metrics.REGISTRY.collect() for suffix in suffixes[family.type]
    }


def test_the_metric_names_of_a_query_are_found_and_nothing_else() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, trigger) (rate(instructune_reconcile_duration_seconds_bucket"
        '{job=~"$job", trigger!="timer"}[$__rate_interval] offset 1m))) / on(trigger) group_left '
        "instructune_reconcile_errors_total > bool 1e3 or vector(0)"
    )
    assert dashboard.metric_names(expr) == {
        "instructune_reconcile_duration_seconds_bucket",
        "instructune_reconcile_errors_total",
    }
    assert dashboard.metric_names("up == 1 unless process_open_fds") == {"up", "process_open_fds"}


def test_every_dashboard_query_names_only_metrics_the_operator_defines() -> None:
    board = dashboard.load()
    defined = _defined_names()
    queries = dashboard.queries(board)
    assert queries
    for query in queries:
        names = dashboard.metric_names(query.expr)
        assert names, f"{query.panel}: names no metric: {query.expr}"
        assert names <= defined, f"{query.panel}: {sorted(names - defined)} are not the operator's metrics"
    for variable in dashboard.variables(board):
        assert variable.metric in defined, variable
    # Every panel shows something, and every metric of the operator's own is on the dashboard.
    assert all(panel.get("targets") for panel in dashboard.data_panels(board))
    used = {name for query in queries for name in dashboard.metric_names(query.expr)}
    families = {f.name for f in metrics.REGISTRY.collect() if f.name.startswith("instructune_")}
    assert families <= {
        name.removesuffix("_total").removesuffix("_count").removesuffix("_bucket") for name in used
    }


def test_the_dashboard_variables_resolve_to_what_the_queries_use() -> None:
    board = dashboard.load()
    names = {v.name for v in dashboard.variables(board)} | {"datasource"}
    grafana = {"__rate_interval": "1m", "__range": "1h", "__interval": "15s"}
    for query in dashboard.queries(board):
        dashboard.substitute(
            query.expr, {**grafana, **dict.fromkeys(names, ".*")}
        )  # raises on an unknown one


def test_a_metrics_port_from_the_environment_is_held_to_a_port_as_the_file_is() -> None:
    assert load_settings(env={"INSTRUCTUNE_METRICS_PORT": "9102"}).metrics_port == 9102
    # The Ray Serve port's override went through unchecked as a string before: now an int too.
    assert load_settings(env={"INSTRUCTUNE_RAY_SERVE_HTTP_PORT": "8001"}).ray_serve_http_port == 8001
    for bad in ("70000", "-1", "metrics"):
        with pytest.raises(ValueError):
            load_settings(env={"INSTRUCTUNE_METRICS_PORT": bad})
