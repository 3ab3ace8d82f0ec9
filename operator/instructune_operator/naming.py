"""Deterministic names and labels of a tune's children: a restarted operator finds what it made."""

from __future__ import annotations

import hashlib

from instructune_operator.api import GROUP
from instructune_operator.settings import Settings

MAX_NAME = 63
LABEL_TUNE = f"{GROUP}/tune"
LABEL_COMPONENT = f"{GROUP}/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "instructune"


def child_name(tune: str, suffix: str, limit: int = MAX_NAME) -> str:
    """`<tune>-<suffix>`, shortened with a stable hash when it would exceed `limit` characters."""
    name = f"{tune}-{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 2
    return f"{tune[:keep].rstrip('-')}-{digest}-{suffix}"


def ray_cluster_name(tune: str) -> str:
    # KubeRay derives pod and service names from the cluster name; 47 leaves room for its suffixes.
    return child_name(tune, "ray", limit=47)


def job_identity_name(tune: str) -> str:
    return child_name(tune, "job")


def ray_auth_secret_name(tune: str) -> str:
    return child_name(tune, "ray-auth")


def config_map_name(tune: str) -> str:
    return child_name(tune, "config")


def serving_name(tune: str, target: str | None) -> str:
    return child_name(target or tune, "serve", limit=53)


def submission_id(namespace: str, tune: str, uid: str, attempt: int) -> str:
    """The Ray job submission id of one attempt: re-submitting after an operator restart is a no-op."""
    return f"itune-{namespace}-{tune}-{uid[:8]}-a{attempt}"


def labels(tune: str, component: str) -> dict[str, str]:
    return {LABEL_TUNE: tune, LABEL_COMPONENT: component, LABEL_MANAGED_BY: MANAGER}


def ray_address(settings: Settings, namespace: str, tune: str) -> str:
    if settings.ray_address_override:
        return settings.ray_address_override
    return f"http://{ray_cluster_name(tune)}-head-svc.{namespace}.svc:8265"
