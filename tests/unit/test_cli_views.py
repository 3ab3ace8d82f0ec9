"""The CLI's pure parts and the plot, on what the product itself writes: statuses from the operator's
decision (`lifecycle.decide`), progress, checkpoints and metrics lines from the job's own reporter
(`report.ProgressReporter`), data statistics from the job's packing."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from instructune_cli.app import app
from instructune_cli.curves import Comparison, comparisons, loss_curves
from instructune_cli.datareport import length_stats, packed_padding_fraction, percentile
from instructune_cli.describe import describe, gate_rows, render
from instructune_cli.plot import RunData, draw, read_run, save
from instructune_cli.progress import Sample, estimate_eta, view
from instructune_cli.proxy import parse_service_url, ready_pod, target_port
from instructune_cli.remote import chat_body, job_of
from instructune_cli.watch import WatchTimeout, follow
from instructune_jobs.data.packing import pack_examples, packing_padding_fraction
from instructune_jobs.data.types import TokenizedExample
from instructune_jobs.report import ProgressReporter
from instructune_jobs.storage import Storage
from instructune_operator.api import InstructionTuneSpec, InstructionTuneStatus
from instructune_operator.lifecycle import Observation, decide
from instructune_operator.naming import submission_id

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
READY = {"status": {"state": "ready"}}
QUICKSTART = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
SPEC = {**QUICKSTART["spec"], "serving": {"enabled": True, "runtime": "ray-serve"}}
METRICS = {"heldout.jsonSchema": 0.9792, "jsonSchema": 0.9792, "heldout.loss": 0.61, "loss": 0.61}
BASE = {"heldout.jsonSchema": 0.0, "jsonSchema": 0.0, "heldout.loss": 7.58, "loss": 7.58}


def step(status: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """The status the operator writes after one pass over this observation."""
    obs = Observation(
        namespace="demo",
        name="quickstart",
        uid="0123456789ab",
        generation=1,
        spec=InstructionTuneSpec.model_validate(kw.pop("spec", SPEC)),
        spec_errors=[],
        status=InstructionTuneStatus.model_validate(status or {}),
        now=NOW,
        **kw,
    )
    return decide(obs).status


class JobSide:
    """The job's own reporter: its status patches merged as the API server merges them, and the
    files it writes (metrics.jsonl, progress.json) kept by name."""

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.files: dict[str, bytes] = {}

    def patch(self, status: dict[str, Any]) -> bool:
        self.patches.append(json.loads(json.dumps(status)))
        return True

    def write(self, uri: str, body: bytes, _content_type: str) -> None:
        self.files[uri] = body

    def onto(self, status: dict[str, Any]) -> dict[str, Any]:
        merged = dict(status)
        for patch in self.patches:
            merged.update(patch)
        return merged


def trained(steps: int = 400, total: int = 400) -> tuple[dict[str, Any], JobSide]:
    """A tune whose job trained `steps` steps: the operator's passes and the job's reports."""
    job = JobSide()
    reporter = ProgressReporter(
        "s3://artifacts/quickstart/metrics.jsonl", "s3://artifacts/quickstart/progress.json", total,
        job.write, patcher=job, min_interval_s=0, keep_checkpoints=2, attempt_id="a1b2c3d4",
    )  # fmt: skip
    reporter.start(0, data={"rows": 7600, "invalidRows": 0, "duplicateRows": 750, "tokens": 123456,
                            "paddingFraction": 0.031, "templateHash": "abc123"},
                   lineage={"configHash": "cfg9", "image": "job:0.1.0", "version": "0.1.0",
                            "dataEtags": {"s3://datasets/extraction/train.jsonl": "e1"}})  # fmt: skip
    for i in range(1, steps + 1):
        reporter.step(i, i / total, 2.0 - i / total, 0.003, 1500.0)
        if i % 100 == 0:
            reporter.checkpoint(
                i, f"s3://artifacts/quickstart/checkpoints/checkpoint_step_{i:09d}", 2.0 - i / total
            )
    running = step(step(cluster=READY), cluster=READY, job_status="RUNNING")
    return step(job.onto(running), cluster=READY, job_status="RUNNING"), job


def evaluated(metrics: dict[str, float], base: dict[str, float]) -> dict[str, Any]:
    status, _ = trained()
    status["evaluation"] = {
        "metrics": metrics,
        "baseMetrics": base,
        "reportUri": "s3://artifacts/quickstart/eval/report.json",
    }
    return step(status, cluster=READY, job_status="SUCCEEDED")


def tune(status: dict[str, Any] | None, spec: dict[str, Any] = SPEC) -> dict[str, Any]:
    return {
        "metadata": {"name": "quickstart", "namespace": "demo", "uid": "0123456789ab", "generation": 1},
        "spec": spec,
        "status": status,
    }


def _section(sections: Any, title: str) -> list[tuple[str, ...]]:
    return list(next(s for s in sections if s.title == title).rows)


# ---------------------------------------------------------------------------------------- describe


def test_describe_shows_the_conditions_progress_and_checkpoints_the_operator_and_job_wrote() -> None:
    status, _ = trained(steps=250)

    sections = describe(tune(status))

    assert [s.title for s in sections] == [
        "Tune", "Conditions", "Progress", "Checkpoints", "Data", "Gate", "Lineage", "Data read",
    ]  # fmt: skip
    assert ("phase", "Training") in _section(sections, "Tune")
    conditions = {row[0]: row[1:4] for row in _section(sections, "Conditions")}
    job = submission_id("demo", "quickstart", "0123456789ab", 1)
    assert conditions["Training"] == ("True", "Running", f"attempt 1 (backoffLimit 2): job {job}")
    assert conditions["ClusterReady"] == ("True", "RayClusterReady", "the Ray cluster is ready")
    progress = dict(_section(sections, "Progress"))
    assert (
        progress["step"] == "250/400 (62%)" and progress["loss"] == "1.375" and progress["tokens/s"] == "1500"
    )
    assert [row[0] for row in _section(sections, "Checkpoints")] == ["100", "200"]
    assert ("duplicates dropped", "750") in _section(sections, "Data")
    assert ("padding", "3.1%") in _section(sections, "Data")
    # Not evaluated yet: the gate's rule waits.
    assert _section(sections, "Gate") == [("heldout.jsonSchema", "-", ">= 0.8", "not evaluated yet")]


def test_describe_judges_each_gate_rule_as_the_operator_did_and_shows_tuned_against_base() -> None:
    status = evaluated(METRICS, BASE)

    sections = describe(tune(status))

    assert status["phase"] == "Deploying"
    evaluation = {row[0]: row[1:] for row in _section(sections, "Evaluation")}
    assert evaluation["heldout.jsonSchema"] == ("0.9792", "0", "+0.9792")
    assert evaluation["heldout.loss"] == ("0.61", "7.58", "-6.97")
    assert evaluation["verdict"][0] == "passed heldout.jsonSchema=0.9792"
    assert _section(sections, "Gate") == [("heldout.jsonSchema", "0.9792", ">= 0.8", "ok")]
    serving = dict(_section(sections, "Serving"))
    assert serving["endpoint"] == "http://quickstart-ray-head-svc.demo.svc:8000/quickstart-serve/v1"
    assert serving["template hash"] == "abc123 (the one trained with)"


def test_a_failed_gate_and_a_missing_metric_read_fail_as_the_operator_decided() -> None:
    spec = {**SPEC, "evaluation": {**SPEC["evaluation"], "gate": [
        {"metric": "heldout.jsonSchema", "min": 0.99}, {"metric": "delta.heldout.loss", "max": -1},
        {"metric": "heldout.exactMatch", "min": 0.5},
    ]}}  # fmt: skip
    status, _ = trained()
    status["evaluation"] = {"metrics": METRICS, "baseMetrics": BASE}
    failed = step(status, cluster=READY, job_status="SUCCEEDED", spec=spec)

    rows = gate_rows(spec["evaluation"]["gate"], METRICS, BASE)

    assert failed["phase"] == "Failed"
    assert rows == [
        ("heldout.jsonSchema", "0.9792", ">= 0.99", "FAIL"),
        ("delta.heldout.loss", "-6.97", "<= -1", "ok"),
        ("heldout.exactMatch", "-", ">= 0.5", "FAIL (not reported)"),
    ]
    text = _text(render(describe(tune(failed, spec))))
    assert "GateFailed" in text and "heldout.exactMatch=missing" in text


def test_describe_of_a_tune_without_status_says_so() -> None:
    sections = describe(tune(None))
    assert [s.title for s in sections] == ["Tune", "Gate"]
    assert ("phase", "(no status yet)") in _section(sections, "Tune")


def _text(renderable: Any) -> str:
    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


# ----------------------------------------------------------------------------------- watch, ETA


def test_the_watch_view_takes_phase_numbers_and_eta_from_the_status() -> None:
    status, _ = trained(steps=120)

    current = view(status)

    assert (current.phase, current.step, current.total, current.loss) == ("Training", 120, 400, 1.7)
    assert current.eta is not None  # the job's own estimate
    assert current.message.startswith("Running: attempt 1 (backoffLimit 2)")
    assert not current.ended


def test_without_the_jobs_eta_it_is_estimated_from_the_steps_seen_recently() -> None:
    status = {"phase": "Training", "progress": {"step": 150, "totalSteps": 400}}
    samples = [Sample(0.0, 10), Sample(100.0, 50), Sample(200.0, 100), Sample(300.0, 150)]
    assert estimate_eta(samples, 400) == pytest.approx(250 / 0.5)  # 100 steps in the last 200 s
    assert view(status, samples).eta == "8m20s"
    # A retried attempt restarts from its checkpoint: the steps before it say nothing.
    retried = [Sample(0.0, 300), Sample(10.0, 320), Sample(20.0, 200), Sample(40.0, 220)]
    assert estimate_eta(retried, 400) == pytest.approx(180)
    assert estimate_eta([Sample(0.0, 5)], 400) is None and estimate_eta(samples, None) is None


def test_an_ended_tune_says_why_failed_or_succeeded() -> None:
    failed = evaluated({"heldout.jsonSchema": 0.2}, {})
    assert view(failed).ended and not view(failed).succeeded
    assert view(failed).message.startswith("GateFailed: heldout.jsonSchema=0.2 (needs >= 0.8) FAIL")
    served = step(evaluated(METRICS, BASE), serving_ready_replicas=1)
    assert view(served).succeeded and view(served).message == "Serving: tuned, evaluated and serving"


def test_follow_prints_a_line_per_change_and_returns_the_ended_view() -> None:
    status, _ = trained(steps=100)
    done = step(evaluated(METRICS, BASE), serving_ready_replicas=1)
    reads = iter([tune({}), tune(status), tune(status), tune(done)])
    console = Console(file=open("/dev/null", "w"), record=True, width=300)  # noqa: SIM115

    last = follow("demo/quickstart", lambda: next(reads), console, interval=0, sleep=lambda _: None)

    lines = console.export_text().splitlines()
    assert last.succeeded
    assert lines[0] == "Pending"
    assert lines[1].startswith("Training  step 100/400  loss 1.75  1500 tokens/s  eta ")
    assert lines[2].startswith("Succeeded  step 400/400") and lines[2].endswith(
        "Serving: tuned, evaluated and serving"
    )
    assert len(lines) == 3  # the unchanged read printed nothing


def test_follow_gives_up_after_its_timeout_and_stops_when_the_tune_is_deleted() -> None:
    status, _ = trained(steps=10)
    clock = iter(float(t) for t in range(100))
    quiet = Console(file=open("/dev/null", "w"))  # noqa: SIM115
    with pytest.raises(WatchTimeout, match="had not ended after 5s"):
        follow("t", lambda: tune(status), quiet, timeout=5, clock=lambda: next(clock), sleep=lambda _: None)
    with pytest.raises(Exception, match="was deleted while it was watched"):
        follow("t", lambda: None, quiet, sleep=lambda _: None)


# ---------------------------------------------------------------------------------- data report


def test_percentiles_are_lengths_rows_really_have() -> None:
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.5) == 5
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.95) == 10
    assert length_stats([30, 10, 20]) == length_stats([10, 20, 30])
    assert (length_stats([7]).p50, length_stats([]).max) == (7, 0)


def test_packing_efficiency_is_what_the_jobs_packing_gives() -> None:
    lengths = [5, 17, 3, 30, 12, 12, 9, 1, 25, 8]
    examples = [TokenizedExample(list(range(n)), list(range(n))) for n in lengths]
    packs = pack_examples(examples, 32)
    assert packed_padding_fraction(lengths, 32) == (
        len(packs),
        pytest.approx(packing_padding_fraction(packs, 32)),
    )


# ------------------------------------------------------------------------------------- plot


def test_loss_curves_are_one_per_attempt_from_the_jobs_metrics_lines() -> None:
    _, job = trained(steps=30, total=60)
    first = job.files["s3://artifacts/quickstart/metrics.jsonl"].decode()
    resumed = (
        first
        + '{"step": 21, "loss": 1.9, "attempt": "ffff0000"}\n{"step": 22, "loss": null, "attempt": "ffff0000"}\nnot json\n'
    )

    curves = loss_curves(resumed)

    assert [c.attempt for c in curves] == ["a1b2c3d4", "ffff0000"]
    assert curves[0].steps == list(range(1, 31)) and curves[0].losses[0] == pytest.approx(2.0 - 1 / 60)
    assert (curves[1].steps, curves[1].losses) == ([21], [1.9])


def test_comparisons_split_scores_from_losses_and_leave_out_means_and_derived_metrics() -> None:
    metrics = {**METRICS, "heldout.perplexity": 1.84, "heldout.fieldMatch.party": 0.02, "fieldMatch.party": 0.02,
               "forgetting.probeLoss": 2.1, "forgetting.lossIncrease": 0.1, "validation.loss": 0.6}  # fmt: skip
    base = {**BASE, "forgetting.probeLoss": 2.0, "validation.loss": 7.6}

    scores, losses = comparisons(metrics, base)

    assert scores == [
        Comparison("heldout.fieldMatch.party", 0.02, None),
        Comparison("heldout.jsonSchema", 0.9792, 0.0),
    ]
    assert [c.metric for c in losses] == ["forgetting.probeLoss", "heldout.loss", "validation.loss"]


def test_the_plot_draws_each_attempts_loss_and_tuned_against_base_and_writes_a_png(tmp_path: Path) -> None:
    _, job = trained(steps=40, total=40)
    root = tmp_path / "run"
    Storage().write_bytes(str(root / "metrics.jsonl"), job.files["s3://artifacts/quickstart/metrics.jsonl"])
    report = {"metrics": {**METRICS, "validation.loss": 0.6}, "baseMetrics": {**BASE, "validation.loss": 7.6}}
    Storage().write_bytes(str(root / "eval" / "report.json"), json.dumps(report).encode())

    run = read_run(str(root))
    figure = draw(run, "demo/quickstart")
    save(figure, tmp_path / "out" / "loss.png")

    loss, scores, losses = figure.axes[:3]
    (line,) = loss.get_lines()
    assert list(line.get_xdata()) == list(range(1, 41)) and line.get_label() == "attempt 1 (a1b2c3d4)"
    assert [t.get_text() for t in scores.get_yticklabels()] == ["heldout.jsonSchema"]
    assert [p.get_width() for p in scores.patches] == [pytest.approx(0.9792), 0.0]
    assert [t.get_text() for t in losses.get_yticklabels()] == ["heldout.loss", "validation.loss"]
    assert [p.get_width() for p in losses.patches] == [0.61, 0.6, 7.58, 7.6]
    png = (tmp_path / "out" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert run.sources == [str(root / "metrics.jsonl"), str(root / "eval" / "report.json")]


def test_the_plot_command_reads_a_run_root_without_a_cluster(tmp_path: Path) -> None:
    _, job = trained(steps=10, total=10)
    Storage().write_bytes(
        str(tmp_path / "metrics.jsonl"), job.files["s3://artifacts/quickstart/metrics.jsonl"]
    )

    result = CliRunner().invoke(
        app, ["plot", "run", "--artifacts", str(tmp_path), "-o", str(tmp_path / "p.png")]
    )

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"wrote {tmp_path / 'p.png'}: 10 steps in 1 attempt(s), 0 metrics tuned vs base "
        f"(from {tmp_path / 'metrics.jsonl'})"
    )
    assert len(draw(RunData([]), "empty").axes) == 1


def test_plotting_a_run_that_has_not_trained_says_so() -> None:
    result = CliRunner().invoke(app, ["plot", "x", "--artifacts", "/nonexistent/run", "-o", "/tmp/never.png"])
    assert result.exit_code == 4
    assert "no training metrics at /nonexistent/run/metrics.jsonl" in result.stderr


# ------------------------------------------------------------------------------- remote, proxy


def test_cluster_addresses_are_recognised_and_other_addresses_are_left_alone() -> None:
    url = parse_service_url(
        "http://quickstart-ray-head-svc.demo.svc:8000/quickstart-serve/v1/chat/completions"
    )
    assert url is not None
    assert (url.namespace, url.service, url.port, url.path) == (
        "demo", "quickstart-ray-head-svc", 8000, "/quickstart-serve/v1/chat/completions",
    )  # fmt: skip
    long_form = parse_service_url("http://x.ns.svc.cluster.local/api?q=1")
    assert long_form is not None and (long_form.port, long_form.path) == (80, "/api?q=1")
    assert parse_service_url("http://10.0.0.5:8265") is None
    assert parse_service_url("http://localhost:8265/api/jobs/") is None


def test_the_pod_port_behind_a_service_port_and_the_pod_chosen() -> None:
    service = {
        "spec": {"ports": [{"port": 8000, "targetPort": "serve"}, {"port": 8265, "targetPort": 18265}]}
    }
    pod = {
        "metadata": {"name": "b"},
        "spec": {"containers": [{"ports": [{"name": "serve", "containerPort": 18000}]}]},
    }
    assert [target_port(service, pod, p) for p in (8000, 8265, 6379)] == [18000, 18265, 6379]
    ready = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    pods = [
        {"metadata": {"name": "c"}, "status": ready},
        {"metadata": {"name": "a"}, "status": {"phase": "Pending"}},
        {"metadata": {"name": "b"}, "status": ready},
    ]
    assert ready_pod(pods) == pods[2] and ready_pod(pods[1:2]) is None


def test_the_job_of_an_attempt_and_the_question_as_sent() -> None:
    status, _ = trained(steps=1)
    assert job_of(tune(status), None) == submission_id("demo", "quickstart", "0123456789ab", 1)
    assert job_of(tune(status), 3) == "itune-demo-quickstart-01234567-a3"
    assert chat_body("quickstart", "Who pays?", None, 48, 0.0) == {
        "model": "quickstart",
        "messages": [{"role": "user", "content": "Who pays?"}],
        "max_tokens": 48,
        "temperature": 0.0,
    }


# --------------------------------------------------------------------------------- the program


def test_the_console_script_is_the_apps_entry_point_and_lists_every_command() -> None:
    import tomllib

    from instructune_cli.__main__ import main

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"instructune": "instructune_cli.__main__:main"} and callable(main)
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("validate", "describe", "watch", "plot", "logs", "ask"):
        assert f" {command} " in result.stdout
