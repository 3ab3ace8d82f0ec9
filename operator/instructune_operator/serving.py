"""Serving rollout I/O after a passed gate: vLLM on Kubernetes, or Ray Serve on the tune's Ray.

What to roll out and what status.serving says are decided purely (builders.desired,
builders.submissions, lifecycle.rollout_status); this module reads the live rollout (for observe)
and removes a deleted tune's Ray Serve application.
"""

from __future__ import annotations

from typing import Any

from instructune_operator.api import InstructionTuneSpec, InstructionTuneStatus
from instructune_operator.builders import Observed, Tune, desired
from instructune_operator.builders.serving import ANNOTATION_ADAPTER, ANNOTATION_TUNE
from instructune_operator.builders.submissions import serve_delete_submission, serve_submission
from instructune_operator.clients.bundle import Clients
from instructune_operator.lifecycle import rollout_status, template_hash
from instructune_operator.naming import serving_name


def deployed_serving(
    clients: Clients, meta: dict[str, Any], spec: InstructionTuneSpec
) -> dict[str, Any] | None:
    """The live vLLM Deployment of the tune's serving target (any tune's rollout), if any."""
    if spec.serving.runtime == "ray-serve":
        return None
    name = serving_name(meta["name"], spec.serving.target)
    return clients.kube.get("apps/v1", "Deployment", meta["namespace"], name)


def deployed_adapter(deployment: dict[str, Any] | None) -> str | None:
    """The adapter a live vLLM Deployment serves (its annotation)."""
    return (deployment or {}).get("metadata", {}).get("annotations", {}).get(ANNOTATION_ADAPTER)


def ready_replicas(meta: dict[str, Any], deployment: dict[str, Any] | None) -> int | None:
    """Ready replicas of this tune's vLLM rollout; None when nothing is deployed yet."""
    if deployment is None:
        return None
    if deployment["metadata"].get("annotations", {}).get(ANNOTATION_TUNE) != meta["name"]:
        return 0  # another tune's rollout of the same target
    st = deployment.get("status", {})
    if st.get("observedGeneration", 0) < deployment["metadata"].get("generation", 0):
        return 0
    if st.get("updatedReplicas", 0) < deployment["spec"].get("replicas", 1):
        return 0
    return int(st.get("availableReplicas") or 0)


def observe_serving(clients: Clients, body: dict[str, Any], spec: InstructionTuneSpec) -> int | None:
    """Ready serving replicas of this tune's rollout, or None when nothing is deployed yet."""
    meta = body["metadata"]
    if spec.serving.runtime == "ray-serve":
        return clients.ray(meta).serve_ready_replicas(serving_name(meta["name"], spec.serving.target))
    return ready_replicas(meta, deployed_serving(clients, meta, spec))


def apply_serving(clients: Clients, body: dict[str, Any], spec: InstructionTuneSpec) -> dict[str, Any]:
    """One rollout outside a reconcile pass (the serving tests): reads the live rollout, applies
    what the builders want for it, and returns status.serving as a pass's decision records it."""
    meta, status = body["metadata"], InstructionTuneStatus.model_validate(body.get("status") or {})
    adapter = deployed_adapter(deployed_serving(clients, meta, spec))
    trained = template_hash(status)
    if spec.serving.runtime == "ray-serve":
        submission = serve_submission(meta, spec, clients.settings, trained)
        clients.ray(meta).submit(
            submission.submission_id,
            submission.entrypoint,
            env_vars=submission.env_vars,
            metadata=submission.metadata,
        )
    observed = Observed(training=False, serving=True, template_hash=trained)
    for manifest in desired(Tune(meta, spec), clients.settings, observed):
        clients.kube.apply(manifest)
    return rollout_status(meta, spec, clients.settings, status, adapter)


def delete_serving(clients: Clients, body: dict[str, Any], spec: InstructionTuneSpec) -> None:
    """Removes a Ray Serve application this tune rolled out (vLLM objects go by owner reference)."""
    if not spec.serving.enabled or spec.serving.runtime != "ray-serve":
        return
    if not ((body.get("status") or {}).get("serving") or {}).get("endpoint"):
        return  # never rolled out
    meta = body["metadata"]
    submission = serve_delete_submission(meta, spec)
    clients.ray(meta).submit(
        submission.submission_id, submission.entrypoint, env_vars={}, metadata=submission.metadata
    )
