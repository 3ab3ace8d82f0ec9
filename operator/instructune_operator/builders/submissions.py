"""Pure: the Ray job submissions of a tune (its training attempts, its Ray Serve application).

A submission is a field of the decision (lifecycle.Decision.submissions): `reconcile.act` only
sends it. Ids are deterministic, so sending one again after an operator restart is a no-op.
"""

from __future__ import annotations

import importlib.metadata
import shlex
from dataclasses import dataclass, field
from typing import Any

from instructune_operator.api import InstructionTuneSpec
from instructune_operator.builders.serving import artifact_layout
from instructune_operator.builders.train_config import build_train_config
from instructune_operator.naming import serving_name
from instructune_operator.settings import Settings

try:
    VERSION = importlib.metadata.version("instructune")  # the job checks it against its own
except importlib.metadata.PackageNotFoundError:
    VERSION = ""


@dataclass(frozen=True)
class RaySubmission:
    submission_id: str
    entrypoint: str
    metadata: dict[str, str]
    env_vars: dict[str, str] = field(default_factory=dict)
    # A training job patches its tune's status: on a Ray head outside the cluster it needs the
    # tune's ServiceAccount token as a file, which only the I/O side can write (reconcile._job_env).
    job_identity: bool = False


def train_submission(
    meta: dict[str, Any], spec: InstructionTuneSpec, settings: Settings, submission_id: str, attempt: int
) -> RaySubmission:
    """One training attempt: the job gets its whole configuration on the command line."""
    ns, name = meta["namespace"], meta["name"]
    config = build_train_config(spec, ns, name, meta["uid"], attempt)
    env: dict[str, str] = {"INSTRUCTUNE_TUNE": f"{ns}/{name}", "INSTRUCTUNE_OPERATOR_VERSION": VERSION}
    if settings.s3_endpoint:
        env.update(INSTRUCTUNE_S3_ENDPOINT=settings.s3_endpoint, AWS_ENDPOINT_URL=settings.s3_endpoint)
    return RaySubmission(
        submission_id=submission_id,
        entrypoint=f"python -m instructune_jobs --config-json {shlex.quote(config.to_json())}",
        metadata={"tune": f"{ns}/{name}", "attempt": str(attempt)},
        env_vars=env,
        job_identity=True,
    )


def serve_submission(
    meta: dict[str, Any], spec: InstructionTuneSpec, settings: Settings, template_hash: str
) -> RaySubmission:
    """The Ray Serve application of a tune served by runtime ray-serve, on the tune's own Ray."""
    name = serving_name(meta["name"], spec.serving.target)
    layout = artifact_layout(spec)
    args = {
        "name": name,
        "model": spec.serving.target or meta["name"],
        "base": spec.base_model.uri,
        "weights": layout["weights"],
        "tokenizer": layout["tokenizer"],
        "template_hash": template_hash,
        "system_prompt": spec.template.system_prompt or "",
        "http_port": str(settings.ray_serve_http_port),
        # In a cluster the proxy is reached through the head's Service (KubeRay's `serve` port);
        # a Ray head on the operator's own machine keeps it on loopback.
        "http_host": "127.0.0.1" if settings.ray_address_override else "0.0.0.0",
    }
    entrypoint = "python -m instructune_jobs.serve " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(v)}" for k, v in args.items()
    )
    return RaySubmission(
        submission_id=f"serve-{meta['namespace']}-{name}-{meta['uid'][:8]}",
        entrypoint=entrypoint,
        metadata={"tune": f"{meta['namespace']}/{meta['name']}", "serving": name},
        env_vars={
            "INSTRUCTUNE_S3_ENDPOINT": settings.s3_endpoint or "",
            "AWS_ENDPOINT_URL": settings.s3_endpoint or "",
        },
    )


def serve_delete_submission(meta: dict[str, Any], spec: InstructionTuneSpec) -> RaySubmission:
    """Removes the tune's Ray Serve application (a deleted tune's)."""
    name = serving_name(meta["name"], spec.serving.target)
    return RaySubmission(
        submission_id=f"serve-delete-{meta['namespace']}-{name}-{meta['uid'][:8]}",
        entrypoint=f"python -m instructune_jobs.serve --delete --name {shlex.quote(name)}",
        metadata={"tune": f"{meta['namespace']}/{meta['name']}", "serving": name},
    )
