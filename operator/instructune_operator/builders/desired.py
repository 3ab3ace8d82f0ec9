"""Pure: every Kubernetes object a tune should own right now, in the order they must be applied."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from instructune_operator.api import InstructionTuneSpec
from instructune_operator.builders.children import (
    build_config_map,
    build_job_identity,
    build_network_policy,
    build_ray_auth_secret,
    build_ray_cluster,
)
from instructune_operator.builders.serving import build_serving
from instructune_operator.builders.train_config import build_train_config
from instructune_operator.settings import Settings

# The chart's selector label of the operator pod (charts/instructune/templates/_helpers.tpl).
OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "instructune"}
# Kinds nothing else of the tune's must exist for: `act` may apply a leading run of them at once.
INDEPENDENT_KINDS = frozenset({"ServiceAccount", "Role", "ConfigMap", "Secret", "NetworkPolicy"})


@dataclass(frozen=True)
class Tune:
    meta: dict[str, Any]  # namespace, name, uid
    spec: InstructionTuneSpec


@dataclass(frozen=True)
class Observed:
    """What the children depend on beyond the tune and the settings, and which of them this pass
    keeps applied (the decision's `ensure_children` and `deploy`)."""

    training: bool = True  # the Ray cluster, the job's identity and configuration
    serving: bool = False  # the vLLM objects of a rollout
    attempt: int = 1
    ray_auth_token: str | None = None  # derived from the operator's key, never read back
    operator_namespace: str = ""  # "" (outside a pod): no NetworkPolicy
    template_hash: str = ""  # status.data.templateHash, what the job trained with


def desired(tune: Tune, settings: Settings, observed: Observed) -> list[dict[str, Any]]:
    """The manifests to apply, in order: the Ray pods name the ServiceAccount and the token's
    Secret, so those come first; the RoleBinding after its Role (RBAC checks the Role's rules
    against the operator's own before it lets the operator bind it, and answers NotFound while the
    Role does not exist yet); the RayCluster last of the training objects."""
    meta, spec = tune.meta, tune.spec
    out: list[dict[str, Any]] = []
    if observed.training:
        config = build_train_config(spec, meta["namespace"], meta["name"], meta["uid"], observed.attempt)
        *identity, binding = build_job_identity(meta)
        out += [*identity, build_config_map(meta, config)]
        if observed.ray_auth_token:
            out.append(build_ray_auth_secret(meta, observed.ray_auth_token))
        if observed.operator_namespace and not settings.ray_address_override:
            out.append(
                build_network_policy(
                    meta, observed.operator_namespace, OPERATOR_POD_LABELS, settings.ray_serve_http_port
                )
            )
        out += [
            binding,
            build_ray_cluster(meta, spec, settings, ray_auth=observed.ray_auth_token is not None),
        ]
    if observed.serving and spec.serving.runtime == "vllm":
        out += build_serving(meta, spec, settings, observed.template_hash)
    return out
