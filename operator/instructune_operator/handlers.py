"""Kopf handlers: unpack arguments, call reconcile, write what it returns. Nothing else."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from instructune_operator.api import GROUP, PLURAL, VERSION
from instructune_operator.clock import now_rfc3339
from instructune_operator.reconcile import Outcome, reconcile_tune
from instructune_operator.settings import Settings, load_settings

SETTINGS: Settings = load_settings()


@kopf.on.startup(id="configure")
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Kopf's own bookkeeping goes to annotations: the status schema is ours and structural.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 120


def _write(outcome: Outcome, body: kopf.Body, patch: kopf.Patch) -> None:
    for key, value in outcome.status_patch.items():
        patch.status[key] = value
    for type_, reason, message in outcome.events:
        kopf.event(body, type=type_, reason=reason, message=message)


@kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile-resume")
@kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile-create")
@kopf.on.update(GROUP, VERSION, PLURAL, id="reconcile-update", field="spec")
def reconcile(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    _write(reconcile_tune(dict(body), SETTINGS, now_rfc3339()), body, patch)
