"""Observe -> decide -> act: the one module that mixes pure logic with I/O.

Level-based: every pass reads the world, asks the pure `lifecycle.decide` what should be, applies
that (server-side apply of deterministic children, an idempotent job submission) and returns the
status keys that changed. Running a pass twice, or after an operator restart, changes nothing.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from instructune_operator import metrics
from instructune_operator.api import (
    API_VERSION,
    KIND,
    PHASE_DEPLOYING,
    PHASE_SUSPENDED,
    TERMINAL_PHASES,
)
from instructune_operator.builders import Observed, Tune, desired
from instructune_operator.builders.desired import INDEPENDENT_KINDS
from instructune_operator.builders.submissions import RaySubmission
from instructune_operator.clients.bundle import Clients
from instructune_operator.clients.kube import Kube
from instructune_operator.lifecycle import Decision, Observation, decide, template_hash
from instructune_operator.naming import job_identity_name, ray_cluster_name
from instructune_operator.serving import (
    delete_serving,
    deployed_adapter,
    deployed_serving,
    observe_serving,
    ready_replicas,
)
from instructune_operator.status import Event, events, parse_status, status_changes, wire
from instructune_operator.validation import validate_spec

__all__ = ["Clients", "Outcome", "Seen", "reconcile_tune", "release_tune"]  # Clients: handlers, tests

log = logging.getLogger(__name__)
TOKEN_SECONDS = 48 * 3600
# The small children of a tune are independent of each other: applied together, a pass waits one
# round trip for them instead of four. Shared by all passes, so the API server sees a bounded number.
_APPLY_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="apply")


@dataclass
class Outcome:
    """What a reconcile pass wants written: status keys that changed and events to record."""

    status_patch: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)


class Seen(Protocol):
    """Where a pass reads the tune's Ray cluster and Ray pods from: the operator's watch caches."""

    def cluster(self, namespace: str, tune: str) -> dict[str, Any] | None: ...

    def pods(self, namespace: str, tune: str) -> list[dict[str, Any]]: ...


def observe(body: dict[str, Any], clients: Clients, now: datetime, seen: Seen) -> Observation:
    """Reads what the decision needs, and nothing more; it infers nothing (lifecycle.decide does)."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    status = parse_status(body.get("status") or {})
    # validate_spec builds the job's config too: what the job would refuse fails validation here.
    spec, errors = validate_spec(dict(body.get("spec") or {}), clients.settings)
    obs: dict[str, Any] = {}
    if spec is not None:
        kube = clients.kube
        obs["cluster"] = seen.cluster(ns, name)
        if obs["cluster"] is not None and obs["cluster"].get("status", {}).get("state") != "ready":
            obs["pods"] = seen.pods(ns, name)
        job_id = status.job_id
        # A finished tune's job is over and its Ray cluster usually gone; a suspended one's was
        # stopped when it was suspended: nothing to learn from Ray until it is resumed.
        settled = status.phase in TERMINAL_PHASES or (status.phase == PHASE_SUSPENDED and spec.suspend)
        if job_id and not settled:
            ray = clients.ray(meta)
            try:
                info = ray.get(job_id)
            except Exception as err:  # the head may be starting or gone; the next pass looks again
                log.info("Ray job %s not observable yet: %s", job_id, err)
                info = None
                obs["job_unreachable"] = True
            if info is not None:
                obs["job_status"], obs["job_message"] = info.status, info.message
                obs["job_exit_code"] = info.exit_code
                if info.status == "SUCCEEDED":
                    # The job patched its results just before it ended: read them fresh, not
                    # from a watch event that may not have arrived yet.
                    fresh = (kube.get(API_VERSION, KIND, ns, name) or {}).get("status")
                    status = parse_status(fresh) if fresh else status
                if info.status in ("FAILED", "STOPPED"):
                    obs["job_log_tail"] = ray.logs_tail(job_id)
        deploying = status.phase == PHASE_DEPLOYING
        # A rollout happens while Deploying, or right after a job that succeeded (if its gate
        # passes): the live Deployment says which adapter the rollout replaces.
        deployment = None
        if deploying or (spec.serving.enabled and obs.get("job_status") == "SUCCEEDED"):
            deployment = deployed_serving(clients, meta, spec)
            obs["deployed_adapter"] = deployed_adapter(deployment)
        if deploying:
            if spec.serving.runtime == "ray-serve":
                obs["serving_ready_replicas"] = observe_serving(clients, body, spec)
            else:
                obs["serving_ready_replicas"] = ready_replicas(meta, deployment)
    return Observation(
        namespace=ns,
        name=name,
        uid=meta["uid"],
        generation=meta.get("generation"),
        spec=spec,
        spec_errors=errors,
        status=status,
        now=now,
        **obs,
    )


def act(decision: Decision, obs: Observation, clients: Clients, apply_children: bool = True) -> None:
    """Carries the decision out: stops, applies, submits, deletes. The status is the decision's alone."""
    spec = obs.spec
    if spec is None:
        return
    meta = obs.meta
    if decision.stop_job:
        clients.ray(meta).stop(decision.stop_job)
    observed = Observed(
        training=decision.ensure_children and apply_children,
        serving=decision.deploy,
        attempt=max(decision.attempt, 1),
        ray_auth_token=clients.ray_token(meta["uid"]) if clients.cluster_auth else None,
        operator_namespace=clients.operator_namespace,
        template_hash=template_hash(obs.status),
    )
    apply_in_order(clients.kube, desired(Tune(meta, spec), clients.settings, observed))
    for submission in decision.submissions:
        submit(clients, meta, submission)
    if decision.delete_cluster:
        clients.kube.delete("ray.io/v1", "RayCluster", obs.namespace, ray_cluster_name(obs.name))
    if decision.delete_tune:
        clients.kube.delete(API_VERSION, KIND, obs.namespace, obs.name)


def apply_in_order(kube: Kube, manifests: list[dict[str, Any]]) -> None:
    """Applies the manifests in order, a leading run of independent ones together: a pass waits one
    round trip for them instead of four."""
    lead = next((i for i, m in enumerate(manifests) if m["kind"] not in INDEPENDENT_KINDS), len(manifests))
    list(_APPLY_POOL.map(kube.apply, manifests[:lead]))
    for manifest in manifests[lead:]:
        kube.apply(manifest)


def submit(clients: Clients, meta: dict[str, Any], submission: RaySubmission) -> None:
    env = dict(submission.env_vars)
    if submission.job_identity:
        env.update(_job_identity_env(clients, meta["namespace"], meta["name"]))
    clients.ray(meta).submit(
        submission.submission_id, submission.entrypoint, env_vars=env, metadata=submission.metadata
    )


def _job_identity_env(clients: Clients, namespace: str, name: str) -> dict[str, str]:
    """In a cluster the pods carry credentials (secretKeyRef) and the tune's ServiceAccount token; a
    job on the local stack's Ray head gets a token file instead."""
    settings = clients.settings
    if not settings.local_job_identity_dir:
        return {}
    token = clients.kube.request_token(namespace, job_identity_name(name), TOKEN_SECONDS)
    folder = Path(settings.local_job_identity_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    token_file = folder / f"{namespace}.{name}.token"
    token_file.touch(mode=0o600)
    token_file.write_text(token)
    env = {"INSTRUCTUNE_K8S_SERVER": clients.kube.server, "INSTRUCTUNE_K8S_TOKEN_FILE": str(token_file)}
    if clients.kube.ca_file:
        env["INSTRUCTUNE_K8S_CA_FILE"] = os.path.abspath(clients.kube.ca_file)
    return env


def reconcile_tune(
    body: dict[str, Any],
    clients: Clients,
    seen: Seen,
    now: datetime | None = None,
    periodic: bool = False,
) -> Outcome:
    """One pass. A periodic pass re-applies the children only when the RayCluster is missing: the
    children are deterministic and the spec that shapes them is immutable, so re-applying them
    every few seconds would only load the API server (measured: 7 calls a pass at 500 tunes)."""
    with metrics.reconcile_pass("timer" if periodic else "event"):
        now = now or datetime.now(UTC)
        obs = observe(body, clients, now, seen)
        settings = clients.settings
        decision = decide(obs, cleanup_cluster=settings.delete_cluster_after_finish, settings=settings)
        act(decision, obs, clients, apply_children=not periodic or obs.cluster is None)
        old, new = wire(obs.status), decision.status
        metrics.record_pass(obs.namespace, obs.name, old, new)
        return Outcome(status_patch=status_changes(old, new), events=events(old, new))


def release_tune(body: dict[str, Any], clients: Clients) -> None:
    meta, status = body["metadata"], body.get("status") or {}
    metrics.forget(meta["namespace"], meta["name"])
    job_id = status.get("jobId")
    if job_id:
        try:
            clients.ray(meta).stop(job_id)
        except Exception as err:  # the cluster may already be gone with the job
            log.info("could not stop Ray job %s on delete: %s", job_id, err)
    spec, _ = validate_spec(dict(body.get("spec") or {}), clients.settings)
    if spec is not None:
        try:
            delete_serving(clients, body, spec)
        except Exception as err:  # the Ray cluster may be gone, and the app with it
            log.info("could not remove the Ray Serve application on delete: %s", err)
    if clients.settings.local_job_identity_dir:
        Path(clients.settings.local_job_identity_dir, f"{meta['namespace']}.{meta['name']}.token").unlink(
            missing_ok=True
        )
    if (body.get("spec") or {}).get("deleteArtifactsOnDelete"):
        from instructune_operator.clients.s3 import delete_prefix

        delete_prefix(body["spec"]["checkpointing"]["uri"], clients.settings.s3_endpoint)
