"""Kopf handlers: unpack arguments, call reconcile, write what it returns. Nothing else."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from instructune_operator.api import GROUP, PLURAL, VERSION
from instructune_operator.clients.kube import Kube
from instructune_operator.reconcile import Clients, Outcome, reconcile_tune, release_tune
from instructune_operator.settings import Settings, load_settings

SETTINGS: Settings = load_settings()
_clients: Clients | None = None


def clients() -> Clients:
    global _clients
    if _clients is None:
        _clients = Clients(Kube(), SETTINGS)
    return _clients


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


def _write(outcome: Outcome, body: kopf.Body, patch: kopf.Patch) -> None:
    for key, value in outcome.status_patch.items():
        patch.status[key] = value
    for type_, reason, message in outcome.events:
        kopf.event(body, type=type_, reason=reason, message=message)


@kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile-resume")
@kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile-create")
@kopf.on.update(GROUP, VERSION, PLURAL, id="reconcile-update", field="spec")
def reconcile(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    _write(reconcile_tune(dict(body), clients()), body, patch)


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    id="reconcile-timer",
    interval=SETTINGS.reconcile_interval_seconds,
    initial_delay=SETTINGS.reconcile_interval_seconds,
)
def reconcile_periodically(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    _write(reconcile_tune(dict(body), clients(), periodic=True), body, patch)


@kopf.on.delete(GROUP, VERSION, PLURAL, id="release")
def release(body: kopf.Body, **_: Any) -> None:
    # Children go with the tune through their owner references; what they cannot take along
    # (a job on a shared Ray head, artifacts when asked) is released here.
    release_tune(dict(body), clients())
