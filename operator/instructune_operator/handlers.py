"""Kopf handlers: unpack arguments, call reconcile, write what it returns. Nothing else.

Each tune's Ray cluster and Ray pods are followed through watches into two in-memory indices
(only the fields a pass reads): a pass then costs the API server nothing unless something must
change. Polling them with a GET and a list per tune and pass starved the operator at 500 tunes.
"""

from __future__ import annotations

import logging
from typing import Any
from wsgiref.simple_server import WSGIServer

import kopf

from instructune_operator import metrics
from instructune_operator.api import GROUP, PLURAL, VERSION
from instructune_operator.clients.kube import Kube
from instructune_operator.naming import LABEL_TUNE
from instructune_operator.reconcile import Clients, Outcome, reconcile_tune, release_tune
from instructune_operator.settings import Settings, load_settings

SETTINGS: Settings = load_settings()
_clients: Clients | None = None
_metrics_server: WSGIServer | None = None


def clients() -> Clients:
    global _clients
    if _clients is None:
        _clients = Clients(Kube(), SETTINGS)
    return _clients


@kopf.on.login(id="login")
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # Named explicitly: with none, Kopf would log in through the `kubernetes` package if installed.
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup(id="configure")
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Kopf's own bookkeeping goes to annotations: the status schema is ours and structural.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/cleanup"
    # Kopf would post every handler log line as a Kubernetes event; the operator posts its own
    # events on transitions, so only warnings and errors of Kopf's go there.
    settings.posting.level = logging.WARNING
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings.watching.server_timeout = 120
    settings.execution.max_workers = 8
    # The operator needs no cluster-wide reads of CRDs or namespaces (least privilege); without
    # scanning Kopf serves the configured namespaces at once instead of retrying 403s.
    settings.scanning.disabled = True
    # A deletion waits for a running timer pass; poll for its end often, not every minute.
    settings.background.cancellation_polling = 2
    # Filter the Ray pod and cluster watches on the API server, not after the fact: a namespace may
    # hold thousands of other pods that the operator should neither receive nor parse.
    settings.watching.label_selectors["v1", "pods"] = LABEL_TUNE
    settings.watching.label_selectors["ray.io", "v1", "rayclusters"] = LABEL_TUNE
    _serve_metrics()


def _serve_metrics() -> None:
    """/metrics from start-up on (metrics.serve), unless settings.metricsPort is 0."""
    global _metrics_server
    if SETTINGS.metrics_port and _metrics_server is None:
        try:
            _metrics_server = metrics.serve(SETTINGS.metrics_port)
        except OSError as err:  # a port taken is a setting to fix, not something a retry mends
            raise kopf.PermanentError(f"metrics endpoint on port {SETTINGS.metrics_port}: {err}") from err


@kopf.on.cleanup(id="stop-metrics")
def stop_metrics(**_: Any) -> None:
    global _metrics_server
    if _metrics_server is not None:
        _metrics_server.shutdown()
        _metrics_server.server_close()
        _metrics_server = None


@kopf.index("ray.io", "v1", "rayclusters", id="ray_clusters", labels={LABEL_TUNE: kopf.PRESENT})
def ray_clusters(namespace: str | None, name: str, labels: kopf.Labels, status: kopf.Status, **_: Any) -> Any:
    return {(namespace, labels[LABEL_TUNE]): {"metadata": {"name": name}, "status": dict(status)}}


@kopf.index("v1", "pods", id="ray_pods", labels={LABEL_TUNE: kopf.PRESENT})
def ray_pods(namespace: str | None, name: str, labels: kopf.Labels, status: kopf.Status, **_: Any) -> Any:
    kept = {key: status[key] for key in ("phase", "conditions", "containerStatuses") if key in status}
    return {(namespace, labels[LABEL_TUNE]): {"metadata": {"name": name}, "status": kept}}


class Watched:
    """reconcile.Seen over the two indices."""

    def __init__(self, clusters: kopf.Index[Any, Any], pods: kopf.Index[Any, Any]) -> None:
        self._clusters, self._pods = clusters, pods

    def cluster(self, namespace: str, tune: str) -> dict[str, Any] | None:
        found = list(self._clusters.get((namespace, tune), []))
        return found[0] if found else None

    def pods(self, namespace: str, tune: str) -> list[dict[str, Any]]:
        return list(self._pods.get((namespace, tune), []))


def _write(outcome: Outcome, body: kopf.Body, patch: kopf.Patch) -> None:
    for key, value in outcome.status_patch.items():
        patch.status[key] = value
    for type_, reason, message in outcome.events:
        kopf.event(body, type=type_, reason=reason, message=message)


@kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile-resume")
@kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile-create")
@kopf.on.update(GROUP, VERSION, PLURAL, id="reconcile-update", field="spec")
def reconcile(body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
    seen = Watched(kwargs["ray_clusters"], kwargs["ray_pods"])  # Kopf passes indices by their ids
    _write(reconcile_tune(dict(body), clients(), seen=seen), body, patch)


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    id="reconcile-timer",
    interval=SETTINGS.reconcile_interval_seconds,
    initial_delay=SETTINGS.reconcile_interval_seconds,
)
def reconcile_periodically(body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
    seen = Watched(kwargs["ray_clusters"], kwargs["ray_pods"])  # Kopf passes indices by their ids
    _write(reconcile_tune(dict(body), clients(), periodic=True, seen=seen), body, patch)


@kopf.on.delete(GROUP, VERSION, PLURAL, id="release")
def release(body: kopf.Body, **_: Any) -> None:
    # Children go with the tune through their owner references; what they cannot take along
    # (a job on a shared Ray head, artifacts when asked) is released here.
    release_tune(dict(body), clients())
