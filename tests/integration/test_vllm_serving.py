"""vLLM serving objects on the real API server: arguments, volumes, probes, placement, rollout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from instructune_operator.api import InstructionTuneSpec
from instructune_operator.clients.kube import Kube
from instructune_operator.reconcile import Clients
from instructune_operator.serving import apply_serving, observe_serving
from instructune_operator.settings import load_settings

from .conftest import wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_HASH = "a" * 64


def _create_tune(stack: Any, namespace: str, name: str) -> dict[str, Any]:
    """A real tune object (owner of the serving objects) that already passed training."""
    doc = yaml.safe_load((ROOT / "examples" / "lora-with-serving.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": namespace}
    doc["spec"]["checkpointing"]["uri"] = f"s3://artifacts/{name}/"
    doc["spec"]["suspend"] = True  # no operator runs in this module; keep it inert regardless
    # One replica: the l4 pool has two GPUs, and a zero-downtime roll surges one extra pod.
    doc["spec"]["serving"]["replicas"] = 1
    stack.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(doc))
    tune = yaml.safe_load(stack.kubectl("get", "itune", name, "-n", namespace, "-o", "yaml").stdout)
    tune["status"] = {"data": {"templateHash": TEMPLATE_HASH}}
    return tune


def _clients(stack: Any) -> Clients:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KUBECONFIG", str(stack.kubeconfig))  # the operator's own login, as in a run
        kube = Kube()
    return Clients(kube, load_settings(str(ROOT / "hack" / "local-settings.yaml"), env={}))


def test_vllm_deployment_serves_the_adapter_with_the_trained_template_on_its_pool(
    crd_installed: Any, namespace: str
) -> None:
    clients = _clients(crd_installed)
    tune = _create_tune(crd_installed, namespace, "extractor-v1")
    spec = InstructionTuneSpec.model_validate(tune["spec"])
    status = apply_serving(clients, tune, spec)

    deployment = clients.kube.get("apps/v1", "Deployment", namespace, "invoice-extractor-serve")
    assert deployment is not None
    pod = deployment["spec"]["template"]["spec"]
    vllm = pod["containers"][0]
    args = vllm["args"]
    assert args[args.index("--chat-template") + 1] == "/artifacts/tokenizer/chat_template.jinja"
    assert args[args.index("--lora-modules") + 1] == "invoice-extractor=/artifacts/weights"
    assert "--enable-lora" in args and args[args.index("--model") + 1] == "/artifacts/base"
    assert vllm["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000, "scheme": "HTTP"}
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"instructune.io/pool": "l4"}
    assert {v["name"] for v in pod["volumes"]} == {"artifacts", "dshm"}
    fetch = pod["initContainers"][0]
    env = {e["name"]: e for e in fetch["env"]}
    assert env["EXPECTED_TEMPLATE_HASH"]["value"] == TEMPLATE_HASH  # the init container refuses others
    assert "s3://artifacts/extractor-v1/final/adapter/=/artifacts/weights" in env["FETCH"]["value"]
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "ml-team-s3"
    assert deployment["metadata"]["ownerReferences"][0]["name"] == "extractor-v1"
    assert status["templateHash"] == TEMPLATE_HASH and status["model"] == "invoice-extractor"
    assert status["endpoint"] == f"http://invoice-extractor-serve.{namespace}.svc:8000/v1"
    service = clients.kube.get("v1", "Service", namespace, "invoice-extractor-serve")
    assert service is not None and service["spec"]["ports"][0]["port"] == 8000

    # KWOK runs the pods: the deployment becomes available and the tune sees its replicas.
    ready = wait_for(lambda: observe_serving(clients, tune, spec), 120, "available serving replicas")
    assert ready == spec.serving.replicas


def test_a_later_tune_rolls_the_deployment_to_its_adapter_and_records_the_previous_one(
    crd_installed: Any, namespace: str
) -> None:
    clients = _clients(crd_installed)
    first = _create_tune(crd_installed, namespace, "extractor-v1")
    apply_serving(clients, first, InstructionTuneSpec.model_validate(first["spec"]))
    second = _create_tune(crd_installed, namespace, "extractor-v2")
    spec = InstructionTuneSpec.model_validate(second["spec"])
    status = apply_serving(clients, second, spec)

    assert status["previousAdapterUri"] == "s3://artifacts/extractor-v1/final/adapter/"
    deployment = clients.kube.get("apps/v1", "Deployment", namespace, "invoice-extractor-serve")
    assert deployment is not None
    assert deployment["metadata"]["annotations"]["instructune.io/adapter-uri"] == (
        "s3://artifacts/extractor-v2/final/adapter/"
    )
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert deployment["metadata"]["ownerReferences"][0]["name"] == "extractor-v2"
    assert wait_for(lambda: observe_serving(clients, second, spec), 120, "the rolled-out replicas") == 1
    assert observe_serving(clients, first, InstructionTuneSpec.model_validate(first["spec"])) == 0
