"""The operator's metrics as its passes move them, read from its own /metrics endpoint: passes timed
by trigger, tunes counted by phase, a tune's progress, Ray submissions and gate verdicts counted by
outcome, the API server's refusals by verb and code, and a deleted tune's series gone. The passes
run against the real API server (tests/reconcile/conftest.py); Ray is the recording Jobs API."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from instructune_operator import metrics
from instructune_operator.api import API_VERSION, KIND
from instructune_operator.clients.kube import Kube, KubeError
from instructune_operator.naming import submission_id
from instructune_operator.reconcile import reconcile_tune, release_tune

from .conftest import ApiSeen, Operator
from .test_reconcile_passes import TUNE, _create_tune, _mark_cluster_ready, _tune

pytestmark = pytest.mark.reconcile

PROGRESS = {"step": 120, "totalSteps": 400, "loss": 1.25, "tokensPerSecond": 3456.5}


@dataclass(frozen=True)
class Scrape:
    """One read of the endpoint: sample (name, labels) -> value."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def get(self, metric: str, /, **labels: str) -> float | None:
        return self.samples.get((metric, frozenset(labels.items())))

    def since(self, before: Scrape, metric: str, /, **labels: str) -> float:
        """How much a counter (or a histogram's count) moved since `before`."""
        return (self.get(metric, **labels) or 0.0) - (before.get(metric, **labels) or 0.0)

    def tunes(self, namespace: str) -> dict[str, float]:
        """instructune_tunes of a namespace: phase -> count."""
        return {
            dict(labels)["phase"]: value
            for (name, labels), value in self.samples.items()
            if name == "instructune_tunes" and ("namespace", namespace) in labels
        }

    def of_namespace(self, namespace: str) -> list[str]:
        return sorted(name for name, labels in self.samples if ("namespace", namespace) in labels)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """The operator's /metrics endpoint (metrics.serve, as handlers.configure starts it)."""
    server = metrics.serve(0, address="127.0.0.1")
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()
    server.server_close()


def scrape(endpoint: str) -> Scrape:
    response = httpx.get(endpoint, timeout=10)
    response.raise_for_status()
    return Scrape(
        {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }
    )


PASSES = "instructune_reconcile_duration_seconds_count"
ERRORS = "instructune_reconcile_errors_total"
SUBMISSIONS = "instructune_ray_job_submissions_total"
VERDICTS = "instructune_gate_verdicts_total"


def test_a_tunes_passes_count_it_by_phase_time_each_pass_and_its_series_leave_with_it(
    kube: Kube, operator: Operator, namespace: str, endpoint: str
) -> None:
    tune = _create_tune(kube, namespace)
    created = scrape(endpoint)
    assert created.of_namespace(namespace) == []  # no pass has seen it yet

    operator.reconcile(namespace, TUNE)

    provisioning = scrape(endpoint)
    assert provisioning.since(created, PASSES, trigger="event") == 1
    assert provisioning.since(created, PASSES, trigger="timer") == 0
    assert provisioning.tunes(namespace) == {phase: 0 for phase in metrics.PHASES} | {"Provisioning": 1}
    assert provisioning.get("instructune_tune_step", namespace=namespace, name=TUNE) is None

    _mark_cluster_ready(kube, namespace)
    operator.reconcile(namespace, TUNE, periodic=True)

    training = scrape(endpoint)
    assert training.since(provisioning, PASSES, trigger="timer") == 1
    assert training.since(provisioning, SUBMISSIONS, outcome="submitted") == 1
    assert training.tunes(namespace)["Training"] == 1 and training.tunes(namespace)["Provisioning"] == 0

    # The job reports its progress into the status (a merge patch, as instructune_jobs.report does);
    # the next pass reads it.
    kube.patch_status(API_VERSION, KIND, namespace, TUNE, {"progress": PROGRESS})
    operator.reconcile(namespace, TUNE, periodic=True)

    progressed = scrape(endpoint)
    tune_labels = {"namespace": namespace, "name": TUNE}
    assert progressed.get("instructune_tune_step", **tune_labels) == 120
    assert progressed.get("instructune_tune_total_steps", **tune_labels) == 400
    assert progressed.get("instructune_tune_loss", **tune_labels) == 1.25
    assert progressed.get("instructune_tune_tokens_per_second", **tune_labels) == 3456.5
    assert progressed.since(training, SUBMISSIONS, outcome="submitted") == 0  # asked about, not sent again

    # The job succeeds having reported metrics the quickstart's gate (heldout.jsonSchema >= 0.8) refuses.
    kube.patch_status(
        API_VERSION, KIND, namespace, TUNE, {"evaluation": {"metrics": {"heldout.jsonSchema": 0.5}}}
    )
    operator.ray_server.jobs[submission_id(namespace, TUNE, tune["metadata"]["uid"], 1)]["status"] = (
        "SUCCEEDED"
    )
    operator.reconcile(namespace, TUNE, periodic=True)
    operator.reconcile(namespace, TUNE, periodic=True)  # the verdict is in the status now

    judged = scrape(endpoint)
    assert _tune(kube, namespace)["status"]["phase"] == "Failed"
    assert judged.since(progressed, VERDICTS, outcome="fail") == 1
    assert judged.since(progressed, VERDICTS, outcome="pass") == 0
    assert judged.tunes(namespace)["Failed"] == 1 and judged.tunes(namespace)["Training"] == 0
    assert judged.since(progressed, PASSES, trigger="timer") == 2
    assert (
        judged.since(created, ERRORS, trigger="timer") == judged.since(created, ERRORS, trigger="event") == 0
    )

    release_tune(_tune(kube, namespace), operator.clients)  # the delete handler's call

    assert scrape(endpoint).of_namespace(namespace) == []


def test_a_submission_ray_already_has_counts_as_exists_and_one_it_refuses_fails_the_pass(
    kube: Kube, operator: Operator, namespace: str, endpoint: str
) -> None:
    tune = _create_tune(kube, namespace)
    operator.reconcile(namespace, TUNE)
    _mark_cluster_ready(kube, namespace)
    # A pass that submits but whose status never reaches the API server (the operator died before
    # Kopf wrote it): Ray has the job, the tune does not say so.
    reconcile_tune(_tune(kube, namespace), operator.clients, seen=ApiSeen(kube), periodic=True)
    lost = scrape(endpoint)

    operator.reconcile(namespace, TUNE, periodic=True)

    again = scrape(endpoint)
    assert again.since(lost, SUBMISSIONS, outcome="exists") == 1
    assert again.since(lost, SUBMISSIONS, outcome="submitted") == 0
    assert len(operator.ray_server.jobs) == 1

    # The attempt fails; Ray refuses the retry's submission.
    operator.ray_server.jobs[submission_id(namespace, TUNE, tune["metadata"]["uid"], 1)]["status"] = "FAILED"
    operator.ray_server.refusing = "Failed to set up the runtime environment"
    with pytest.raises(RuntimeError, match="Ray job submission failed"):
        operator.reconcile(namespace, TUNE, periodic=True)

    refused = scrape(endpoint)
    assert refused.since(again, SUBMISSIONS, outcome="failed") == 1
    assert refused.since(again, ERRORS, trigger="timer") == 1
    assert refused.since(again, PASSES, trigger="timer") == 1  # a failed pass is timed too


def test_an_api_server_refusal_counts_under_its_verb_and_code_and_fails_the_pass(
    kube: Kube, operator: Operator, namespace: str, endpoint: str
) -> None:
    _create_tune(kube, namespace)
    # Without a namespace controller the namespace stays Terminating: the API server refuses to
    # create anything in it (NamespaceLifecycle), the tune's children included.
    kube.http.delete(f"/api/v1/namespaces/{namespace}").raise_for_status()
    before, sent = scrape(endpoint), len(operator.requests)

    with pytest.raises(KubeError, match="HTTP 403"):
        operator.reconcile(namespace, TUNE)

    after = scrape(endpoint)
    applies = [r for r in operator.requests[sent:] if r[0] == "PATCH"]
    assert applies  # every child apply of the pass was sent, and each was refused
    assert after.since(before, "instructune_kube_api_errors_total", verb="apply", code="403") == len(applies)
    assert after.since(before, ERRORS, trigger="event") == 1
    assert after.since(before, PASSES, trigger="event") == 1
