"""Operator settings: what the platform team decides (GPU pools, images, endpoints, namespaces).

Loaded from a YAML file (INSTRUCTUNE_SETTINGS, the Helm chart mounts one) with a few environment
overrides; tenants only name a pool, they never set node selectors or tolerations themselves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from instructune_operator.api import DNS_LABEL

# Tenants name a pool in spec.resources.gpuPool, which the CRD holds to a DNS label: a pool named
# otherwise could never be used. Namespaces are DNS labels too.
PoolName = Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]
NamespaceName = Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Toleration(_Model):
    key: str
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class GpuPool(_Model):
    """A set of nodes with one GPU type that tunes may name in spec.resources.gpuPool."""

    node_selector: dict[str, str]
    tolerations: list[Toleration] = Field(default_factory=list)
    gpu_resource: str = "nvidia.com/gpu"
    gpus_per_node: int = Field(default=8, ge=0)
    max_workers: int = Field(default=16, ge=1)
    cpus_per_node: int = Field(default=64, ge=1)
    # CPU requests are limits / cpuOvercommit: above 1, a (development) pool packs more CPU-bound
    # pods than it has cores, as Burstable pods. 1 (the default) keeps Guaranteed pods.
    cpu_overcommit: float = Field(default=1.0, ge=1.0, le=16.0)


class Settings(_Model):
    pools: dict[PoolName, GpuPool] = Field(default_factory=dict)
    # The project's job image (jobs/Dockerfile; hack/build-images.sh): Ray 2.60, the pinned training
    # stack and instructune_jobs, tagged with the package version.
    ray_image: str = "ghcr.io/instructune/instructune-job:0.1.0"
    serving_image: str = "vllm/vllm-openai:v0.33.0"
    s3_endpoint: str | None = None
    # When set, jobs are submitted here instead of the RayCluster's head service: the local
    # stack points it at its local Ray head, since a Ray cluster on fake nodes never runs.
    ray_address_override: str | None = None
    # The local stack's jobs run on a Ray head outside any pod, so they get the tune's
    # ServiceAccount token as a file here instead of a projected volume.
    local_job_identity_dir: str | None = None
    namespaces: list[NamespaceName] = Field(
        default_factory=list, description="Watched namespaces; empty means all."
    )
    # The timer follows jobs and pods; changes of the tune itself arrive by watch at once.
    reconcile_interval_seconds: float = Field(default=10.0, gt=0)
    # Port of Ray Serve's HTTP proxy for runtime ray-serve (the embedded local serving).
    ray_serve_http_port: int = Field(default=8000, ge=1, le=65535)
    delete_cluster_after_finish: bool = True
    # The operator's Prometheus endpoint (/metrics, instructune_operator.metrics): the chart's
    # metrics Service and ServiceMonitor point at it.
    metrics_port: int = Field(
        default=8080, ge=0, le=65535, description="Port of the operator's /metrics endpoint; 0 turns it off."
    )


ENV_OVERRIDES = {
    "INSTRUCTUNE_S3_ENDPOINT": "s3_endpoint",
    "INSTRUCTUNE_RAY_ADDRESS": "ray_address_override",
    "INSTRUCTUNE_RAY_IMAGE": "ray_image",
    "INSTRUCTUNE_LOCAL_JOB_IDENTITY_DIR": "local_job_identity_dir",
    "INSTRUCTUNE_RAY_SERVE_HTTP_PORT": "ray_serve_http_port",
    "INSTRUCTUNE_METRICS_PORT": "metrics_port",
}


def parse_settings(data: Mapping[str, Any], env: Mapping[str, str]) -> Settings:
    settings = Settings.model_validate(dict(data))
    updates: dict[str, Any] = {field: env[var] for var, field in ENV_OVERRIDES.items() if env.get(var)}
    if env.get("INSTRUCTUNE_NAMESPACES"):
        updates["namespaces"] = [n.strip() for n in env["INSTRUCTUNE_NAMESPACES"].split(",") if n.strip()]
    # Validated with the file's values, as they are: an override is held to the same types and
    # ranges (a port from the environment is a string until then).
    return Settings.model_validate({**settings.model_dump(), **updates})


def load_settings(path: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    path = path or env.get("INSTRUCTUNE_SETTINGS")
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    return parse_settings(data or {}, env)
