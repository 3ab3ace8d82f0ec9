"""Serving rollout I/O after a passed gate: vLLM on Kubernetes, or Ray Serve on the tune's Ray.

What to roll out and what status.serving says are decided purely (builders.serving,
lifecycle.rollout_status); this module only reads the live rollout and carries one out.
"""

from __future__ import annotations

import shlex
from typing import Any

from instructune_operator.api import InstructionTuneSpec
from instructune_operator.builders.serving import (
    ANNOTATION_ADAPTER,
    ANNOTATION_TUNE,
    artifact_layout,
    build_serving,
)
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


def roll_out(clients: Clients, meta: dict[str, Any], spec: InstructionTuneSpec, trained_hash: str) -> None:
    """Applies the vLLM objects, or submits the Ray Serve application (idempotent by its id)."""
    if spec.serving.runtime == "ray-serve":
        _submit_ray_serve(clients, meta, spec, trained_hash)
        return
    for manifest in build_serving(meta, spec, clients.settings, trained_hash):
        clients.kube.apply(manifest)


def apply_serving(clients: Clients, body: dict[str, Any], spec: InstructionTuneSpec) -> dict[str, Any]:
    """One rollout outside a reconcile pass: reads the live rollout, applies, returns status.serving."""
    meta, status = body["metadata"], body.get("status") or {}
    adapter = deployed_adapter(deployed_serving(clients, meta, spec))
    roll_out(clients, meta, spec, template_hash(status))
    return rollout_status(meta, spec, clients.settings, status, adapter)


def _submit_ray_serve(
    clients: Clients, meta: dict[str, Any], spec: InstructionTuneSpec, trained_hash: str
) -> None:
    settings = clients.settings
    name = serving_name(meta["name"], spec.serving.target)
    layout = artifact_layout(spec)
    args = {
        "name": name,
        "model": spec.serving.target or meta["name"],
        "base": spec.base_model.uri,
        "weights": layout["weights"],
        "tokenizer": layout["tokenizer"],
        "template_hash": trained_hash,
        "system_prompt": spec.template.system_prompt or "",
        "http_port": str(settings.ray_serve_http_port),
        # In a cluster the proxy is reached through the head's Service (KubeRay's `serve` port);
        # a Ray head on the operator's own machine keeps it on loopback.
        "http_host": "127.0.0.1" if settings.ray_address_override else "0.0.0.0",
    }
    entrypoint = "python -m instructune_jobs.serve " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(v)}" for k, v in args.items()
    )
    env = {
        "INSTRUCTUNE_S3_ENDPOINT": settings.s3_endpoint or "",
        "AWS_ENDPOINT_URL": settings.s3_endpoint or "",
    }
    clients.ray(meta).submit(
        f"serve-{meta['namespace']}-{name}-{meta['uid'][:8]}",
        entrypoint,
        env_vars=env,
        metadata={"tune": f"{meta['namespace']}/{meta['name']}", "serving": name},
    )


def delete_serving(clients: Clients, body: dict[str, Any], spec: InstructionTuneSpec) -> None:
    """Removes a Ray Serve application this tune rolled out (vLLM objects go by owner reference)."""
    if not spec.serving.enabled or spec.serving.runtime != "ray-serve":
        return

    meta = body["metadata"]
    name = serving_name(meta["name"], spec.serving.target)
    serving = (body.get("status") or {}).get("serving") or {}
    if not serving.get("endpoint"):
        return  # never rolled out
    ray = clients.ray(meta)
    ray.submit(
        f"serve-delete-{meta['namespace']}-{name}-{meta['uid'][:8]}",
        f"python -m instructune_jobs.serve --delete --name {shlex.quote(name)}",
        env_vars={},
        metadata={"tune": f"{meta['namespace']}/{meta['name']}", "serving": name},
    )
