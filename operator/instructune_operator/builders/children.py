"""Pure: a tune -> the Kubernetes objects it owns (RayCluster, job identity, config)."""

from __future__ import annotations

import base64
from typing import Any

from instructune_jobs.config import TrainConfig
from instructune_operator.api import API_VERSION, GROUP, KIND, PLURAL, InstructionTuneSpec
from instructune_operator.naming import (
    config_map_name,
    job_identity_name,
    labels,
    ray_auth_secret_name,
    ray_cluster_name,
)
from instructune_operator.settings import GpuPool, Settings

RAY_VERSION = "2.60.0"
RAY_UID = 1000  # the `ray` user of the rayproject images
CONFIG_KEY = "train-config.json"
CONFIG_MOUNT = "/etc/instructune"


def owner_reference(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(meta: dict[str, Any], name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": labels(meta["name"], component),
        "ownerReferences": [owner_reference(meta)],
    }


def restricted_security_context() -> dict[str, Any]:
    """Pod Security Standards 'restricted' for every container the operator creates."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


RAY_AUTH_KEY = "RAY_AUTH_TOKEN"


def job_env(
    spec: InstructionTuneSpec, settings: Settings, tune: str = "", ray_auth: bool = False, image: str = ""
) -> list[dict[str, Any]]:
    """Environment of Ray pods: endpoints in clear, credentials only by secretKeyRef."""
    env: list[dict[str, Any]] = [{"name": "INSTRUCTUNE_CONFIG_FILE", "value": f"{CONFIG_MOUNT}/{CONFIG_KEY}"}]
    if image:
        # What the job reports as status.lineage.image: the image its pods run.
        env.append({"name": "INSTRUCTUNE_IMAGE", "value": image})
    if ray_auth:
        # Every Ray process of the cluster (head, workers, the job's driver) checks and sends it.
        env += [
            {"name": "RAY_AUTH_MODE", "value": "token"},
            {
                "name": "RAY_AUTH_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": ray_auth_secret_name(tune), "key": RAY_AUTH_KEY}},
            },
        ]
    if settings.s3_endpoint:
        env += [
            {"name": "AWS_ENDPOINT_URL", "value": settings.s3_endpoint},
            {"name": "INSTRUCTUNE_S3_ENDPOINT", "value": settings.s3_endpoint},
        ]
    secret = spec.credentials.s3_secret_ref
    if secret is not None:
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        ]
    hf = spec.credentials.hf_token_secret_ref
    if hf is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": hf.name, "key": "HF_TOKEN"}}})
    return env


def _pod_template(
    spec: InstructionTuneSpec,
    settings: Settings,
    pool: GpuPool,
    meta: dict[str, Any],
    role: str,
    gpus: int,
    ray_auth: bool,
) -> dict[str, Any]:
    res = spec.resources
    limits: dict[str, Any] = {"cpu": str(res.cpus_per_worker), "memory": res.memory_per_worker}
    if gpus:
        limits[pool.gpu_resource] = str(gpus)
    requests = dict(limits)
    if pool.cpu_overcommit > 1:
        requests["cpu"] = f"{int(res.cpus_per_worker * 1000 / pool.cpu_overcommit)}m"
    return {
        "metadata": {"labels": labels(meta["name"], f"ray-{role}")},
        "spec": {
            "serviceAccountName": job_identity_name(meta["name"]),
            "nodeSelector": dict(pool.node_selector),
            "tolerations": [t.model_dump(exclude_none=True) for t in pool.tolerations],
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": f"ray-{role}",
                    "image": res.image or settings.ray_image,
                    "env": job_env(spec, settings, meta["name"], ray_auth, res.image or settings.ray_image),
                    "resources": {"requests": requests, "limits": limits},
                    "securityContext": restricted_security_context(),
                    "volumeMounts": [
                        {"name": "dshm", "mountPath": "/dev/shm"},
                        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                    ],
                }
            ],
            "volumes": [
                # NCCL and DeepSpeed need far more shared memory than the 64 MiB default.
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi" if gpus else "1Gi"}},
                {"name": "config", "configMap": {"name": config_map_name(meta["name"])}},
            ],
        },
    }


def build_ray_cluster(
    meta: dict[str, Any], spec: InstructionTuneSpec, settings: Settings, ray_auth: bool = False
) -> dict[str, Any]:
    """The tune's RayCluster. With `ray_auth`, every Ray container gets token authentication from
    the cluster's Secret (build_ray_auth_secret)."""
    pool = settings.pools[spec.resources.gpu_pool]
    workers = spec.resources.workers
    head = _pod_template(spec, settings, pool, meta, "head", gpus=0, ray_auth=ray_auth)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": _metadata(meta, ray_cluster_name(meta["name"]), "ray-cluster"),
        "spec": {
            "rayVersion": RAY_VERSION,
            "enableInTreeAutoscaling": False,
            "headGroupSpec": {
                # The head runs the driver only: no training work is scheduled on it.
                "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0", "num-gpus": "0"},
                "template": head,
            },
            "workerGroupSpecs": [
                {
                    "groupName": "train",
                    "replicas": workers,
                    "minReplicas": workers,
                    "maxReplicas": workers,
                    "rayStartParams": {},
                    "template": _pod_template(
                        spec, settings, pool, meta, "worker", spec.resources.gpus_per_worker, ray_auth
                    ),
                }
            ],
        },
    }


def build_job_identity(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """ServiceAccount + Role + RoleBinding: the job may get and patch its own tune's status, no more."""
    name = job_identity_name(meta["name"])
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(meta, name, "job-identity")},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(meta, name, "job-identity"),
            "rules": [
                {
                    "apiGroups": [GROUP],
                    "resources": [f"{PLURAL}/status"],
                    "resourceNames": [meta["name"]],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(meta, name, "job-identity"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": meta["namespace"]}],
        },
    ]


def build_config_map(meta: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(meta, config_map_name(meta["name"]), "train-config"),
        "data": {CONFIG_KEY: config.to_json()},
    }


def build_ray_auth_secret(meta: dict[str, Any], token: str) -> dict[str, Any]:
    """The Ray token of the tune's cluster (instructune_operator.ray_auth), owned by the tune."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(meta, ray_auth_secret_name(meta["name"]), "ray-auth"),
        "type": "Opaque",
        "data": {RAY_AUTH_KEY: base64.b64encode(token.encode()).decode()},
    }


RAY_DASHBOARD_PORT = 8265  # the Jobs API, which the operator calls


def build_network_policy(
    meta: dict[str, Any], operator_namespace: str, operator_labels: dict[str, str], serve_port: int
) -> dict[str, Any]:
    """Who may reach the tune's Ray pods: each other (Ray's own traffic, every port), the operator
    (the Jobs API), and anyone Ray Serve's port (the serving endpoint of runtime ray-serve). Ray's
    dashboard, GCS and client ports are closed to every other pod, tenant's or not. Kubelet probes
    come from the node and are not subject to it."""
    cluster = {"ray.io/cluster": ray_cluster_name(meta["name"])}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(meta, ray_cluster_name(meta["name"]), "ray-network-policy"),
        "spec": {
            "podSelector": {"matchLabels": cluster},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": cluster}}]},
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": operator_namespace}
                            },
                            "podSelector": {"matchLabels": dict(operator_labels)},
                        }
                    ],
                    "ports": [{"protocol": "TCP", "port": RAY_DASHBOARD_PORT}],
                },
                {"ports": [{"protocol": "TCP", "port": serve_port}]},
            ],
        },
    }
