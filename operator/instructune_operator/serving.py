"""Serving rollout after a passed gate: vLLM on Kubernetes, or Ray Serve on the tune's Ray."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from instructune_operator.api import InstructionTuneSpec
from instructune_operator.builders.serving import ANNOTATION_ADAPTER, artifact_layout, build_serving, endpoint
from instructune_operator.naming import ray_address, serving_name

if TYPE_CHECKING:
    from instructune_operator.reconcile import Clients


def _template_hash(body: dict[str, Any]) -> str:
    return str(((body.get("status") or {}).get("data") or {}).get("templateHash") or "")


def apply_serving(clients: Clients, body: dict[str, Any], spec: InstructionTuneSpec) -> dict[str, Any]:
    """Applies the serving objects and returns status.serving (endpoint, model, rollback info)."""
    meta = body["metadata"]
    ns = meta["namespace"]
    name = serving_name(meta["name"], spec.serving.target)
    served = spec.serving.target or meta["name"]
    previous = (body.get("status") or {}).get("serving", {}).get("previousAdapterUri")
    if spec.serving.runtime == "ray-serve":
        return _apply_ray_serve(clients, body, spec, name, served)
    existing = clients.kube.get("apps/v1", "Deployment", ns, name)
    current = (existing or {}).get("metadata", {}).get("annotations", {}).get(ANNOTATION_ADAPTER)
    layout = artifact_layout(spec)
    if current and current != layout["weights"]:
        previous = current  # the adapter this rollout replaces: what a rollback goes back to
    for manifest in build_serving(meta, spec, clients.settings, _template_hash(body)):
        clients.kube.apply(manifest)
    return {
        "endpoint": endpoint(meta, spec),
        "model": served,
        "templateHash": _template_hash(body),
        "previousAdapterUri": previous,
    }


def _apply_ray_serve(
    clients: Clients, body: dict[str, Any], spec: InstructionTuneSpec, name: str, served: str
) -> dict[str, Any]:

    meta = body["metadata"]
    settings = clients.settings
    address = ray_address(settings, meta["namespace"], meta["name"])
    layout = artifact_layout(spec)
    args = {
        "name": name,
        "model": served,
        "base": spec.base_model.uri,
        "weights": layout["weights"],
        "tokenizer": layout["tokenizer"],
        "template_hash": _template_hash(body),
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
    host = address.split("://", 1)[-1].split(":")[0]
    return {
        "endpoint": f"http://{host}:{settings.ray_serve_http_port}/{name}/v1",
        "model": served,
        "templateHash": _template_hash(body),
    }


def observe_serving(clients: Clients, body: dict[str, Any], spec: InstructionTuneSpec) -> int | None:
    """Ready serving replicas of this tune's rollout, or None when nothing is deployed yet."""
    meta = body["metadata"]
    name = serving_name(meta["name"], spec.serving.target)
    if spec.serving.runtime == "ray-serve":
        return clients.ray(meta).serve_ready_replicas(name)
    deployment = clients.kube.get("apps/v1", "Deployment", meta["namespace"], name)
    if deployment is None:
        return None
    if deployment["metadata"].get("annotations", {}).get("instructune.io/tune") != meta["name"]:
        return 0  # another tune's rollout of the same target
    st = deployment.get("status", {})
    if st.get("observedGeneration", 0) < deployment["metadata"].get("generation", 0):
        return 0
    if st.get("updatedReplicas", 0) < deployment["spec"].get("replicas", 1):
        return 0
    return int(st.get("availableReplicas") or 0)


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
