"""Pure: a tune that passed its gate -> the vLLM Deployment and Service that serve it."""

from __future__ import annotations

from typing import Any

from instructune_operator.api import InstructionTuneSpec
from instructune_operator.builders.children import job_env, owner_reference, restricted_security_context
from instructune_operator.naming import labels, serving_name
from instructune_operator.settings import Settings

PORT = 8000
ARTIFACTS = "/artifacts"
ANNOTATION_ADAPTER = "instructune.io/adapter-uri"
ANNOTATION_TEMPLATE = "instructune.io/template-hash"
ANNOTATION_TUNE = "instructune.io/tune"

# The init container refuses to start serving with a template other than the one trained on.
FETCH_SCRIPT = """set -eu
python - <<'PY'
import hashlib, os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
def sync(uri, dest):
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            path = os.path.join(dest, obj["Key"][len(prefix):].lstrip("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            s3.download_file(bucket, obj["Key"], path)
for pair in os.environ["FETCH"].split():
    uri, dest = pair.split("=", 1)
    sync(uri, dest)
template = open(os.environ["TEMPLATE_FILE"], "rb").read()
digest = hashlib.sha256(template).hexdigest()
if digest != os.environ["EXPECTED_TEMPLATE_HASH"]:
    sys.exit(f"chat template hash {digest} differs from the trained one {os.environ['EXPECTED_TEMPLATE_HASH']}")
PY
"""


def artifact_layout(spec: InstructionTuneSpec) -> dict[str, str]:
    root = spec.checkpointing.uri.rstrip("/")
    full = spec.method.type == "full"
    return {
        "weights": f"{root}/final/model/" if full else f"{root}/final/adapter/",
        "tokenizer": f"{root}/final/tokenizer/",
    }


def build_serving(
    meta: dict[str, Any], spec: InstructionTuneSpec, settings: Settings, template_hash: str
) -> list[dict[str, Any]]:
    serving = spec.serving
    name = serving_name(meta["name"], serving.target)
    layout = artifact_layout(spec)
    full = spec.method.type == "full"
    fetch = [f"{layout['weights']}={ARTIFACTS}/weights", f"{layout['tokenizer']}={ARTIFACTS}/tokenizer"]
    base = spec.base_model.uri
    if not full and base.startswith("s3://"):
        fetch.append(f"{base}={ARTIFACTS}/base")
    model = (
        f"{ARTIFACTS}/weights"
        if full
        else (f"{ARTIFACTS}/base" if base.startswith("s3://") else base.removeprefix("hf://").split("@")[0])
    )
    served = serving.target or meta["name"]
    args = [
        "--model",
        model,
        "--tokenizer",
        f"{ARTIFACTS}/tokenizer",
        "--port",
        str(PORT),
        "--host",
        "0.0.0.0",
        "--chat-template",
        f"{ARTIFACTS}/tokenizer/chat_template.jinja",
    ]
    if full:
        args += ["--served-model-name", served]
    else:
        args += [
            "--served-model-name",
            f"{served}-base",
            "--enable-lora",
            "--max-lora-rank",
            str(spec.method.lora.r if spec.method.lora else 16),
            "--lora-modules",
            f"{served}={ARTIFACTS}/weights",
        ]
    pool = settings.pools.get(serving.gpu_pool or spec.resources.gpu_pool)
    gpu_resource = pool.gpu_resource if pool else "nvidia.com/gpu"
    select = labels(meta["name"], "serving") | {"instructune.io/serving": name}
    select.pop("instructune.io/tune")  # successive tunes share the Deployment's selector
    env = job_env(spec, settings)
    annotations = {
        ANNOTATION_ADAPTER: layout["weights"],
        ANNOTATION_TEMPLATE: template_hash,
        ANNOTATION_TUNE: meta["name"],
    }
    metadata = {
        "name": name,
        "namespace": meta["namespace"],
        "labels": labels(meta["name"], "serving"),
        "annotations": annotations,
        "ownerReferences": [owner_reference(meta)],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": serving.replicas,
            "selector": {"matchLabels": {"instructune.io/serving": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": select, "annotations": annotations},
                "spec": {
                    "serviceAccountName": "default",
                    "automountServiceAccountToken": False,
                    "nodeSelector": dict(pool.node_selector) if pool else {},
                    "tolerations": [t.model_dump(exclude_none=True) for t in pool.tolerations]
                    if pool
                    else [],
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "initContainers": [
                        {
                            "name": "fetch-artifacts",
                            "image": settings.ray_image,
                            "command": ["bash", "-c", FETCH_SCRIPT],
                            "env": [
                                *env,
                                {"name": "FETCH", "value": " ".join(fetch)},
                                {
                                    "name": "TEMPLATE_FILE",
                                    "value": f"{ARTIFACTS}/tokenizer/chat_template.jinja",
                                },
                                {"name": "EXPECTED_TEMPLATE_HASH", "value": template_hash},
                            ],
                            "securityContext": restricted_security_context(),
                            "volumeMounts": [{"name": "artifacts", "mountPath": ARTIFACTS}],
                        }
                    ],
                    "containers": [
                        {
                            "name": "vllm",
                            "image": settings.serving_image,
                            "args": args,
                            "env": [{"name": "HOME", "value": "/tmp"}],
                            "ports": [{"name": "http", "containerPort": PORT}],
                            "readinessProbe": {
                                "httpGet": {"path": "/health", "port": PORT},
                                "periodSeconds": 10,
                                "failureThreshold": 3,
                            },
                            "startupProbe": {
                                "httpGet": {"path": "/health", "port": PORT},
                                "periodSeconds": 10,
                                "failureThreshold": 60,
                            },
                            "resources": {"requests": {gpu_resource: "1"}, "limits": {gpu_resource: "1"}},
                            "securityContext": restricted_security_context(),
                            "volumeMounts": [
                                {"name": "artifacts", "mountPath": ARTIFACTS, "readOnly": True},
                                {"name": "dshm", "mountPath": "/dev/shm"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "artifacts", "emptyDir": {}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {k: v for k, v in metadata.items() if k != "annotations"},
        "spec": {
            "selector": {"instructune.io/serving": name},
            "ports": [{"name": "http", "port": PORT, "targetPort": PORT}],
        },
    }
    return [deployment, service]


def endpoint(meta: dict[str, Any], spec: InstructionTuneSpec) -> str:
    name = serving_name(meta["name"], spec.serving.target)
    return f"http://{name}.{meta['namespace']}.svc:{PORT}/v1"
