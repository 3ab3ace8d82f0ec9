"""The tune's Ray cluster as built: token authentication, the image it reports, CPU overcommit."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from instructune_operator.api import InstructionTuneSpec
from instructune_operator.builders.children import build_ray_auth_secret, build_ray_cluster
from instructune_operator.ray_auth import derive_token
from instructune_operator.settings import parse_settings

ROOT = Path(__file__).resolve().parents[2]
META = {"name": "quickstart", "namespace": "team-a", "uid": "6f1c2a3b-0000-4000-8000-000000000001"}


def _spec() -> InstructionTuneSpec:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    return InstructionTuneSpec.model_validate(doc["spec"])


def _settings(**pool: Any) -> Any:
    data = yaml.safe_load((ROOT / "hack" / "local-settings.yaml").read_text())
    data["pools"]["local"].update(pool)
    return parse_settings(data, {})


def _containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_the_token_is_one_per_tune_uid_and_needs_a_key() -> None:
    token = derive_token("operator-key", META["uid"])
    assert len(token) == 64 and token == derive_token("operator-key", META["uid"])
    assert token != derive_token("operator-key", "6f1c2a3b-0000-4000-8000-000000000002")
    assert token != derive_token("another-key", META["uid"])
    with pytest.raises(ValueError):
        derive_token("", META["uid"])


def test_every_ray_container_authenticates_with_the_clusters_secret() -> None:
    token = derive_token("operator-key", META["uid"])
    secret = build_ray_auth_secret(META, token)
    assert base64.b64decode(secret["data"]["RAY_AUTH_TOKEN"]).decode() == token
    assert secret["metadata"]["ownerReferences"][0]["uid"] == META["uid"]
    cluster = build_ray_cluster(META, _spec(), _settings(), ray_auth=True)
    for container in _containers(cluster):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        # The token reaches the pods by reference only: never in the RayCluster object itself.
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": secret["metadata"]["name"],
            "key": "RAY_AUTH_TOKEN",
        }
    assert token not in yaml.safe_dump(cluster)


def test_without_a_key_the_cluster_runs_no_token_authentication() -> None:
    cluster = build_ray_cluster(META, _spec(), _settings(), ray_auth=False)
    for container in _containers(cluster):
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & {e["name"] for e in container["env"]}


def test_pods_tell_the_job_which_image_they_run() -> None:
    settings = _settings()
    for container in _containers(build_ray_cluster(META, _spec(), settings)):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["INSTRUCTUNE_IMAGE"] == container["image"] == settings.ray_image


def test_an_overcommitted_pool_requests_a_share_of_the_cpu_limit() -> None:
    packed = build_ray_cluster(META, _spec(), _settings(cpuOvercommit=2))
    for container in _containers(packed):
        assert container["resources"]["limits"]["cpu"] == "1"
        assert container["resources"]["requests"]["cpu"] == "500m"
        assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"]
    guaranteed = build_ray_cluster(META, _spec(), _settings(cpuOvercommit=1))
    for container in _containers(guaranteed):
        assert container["resources"]["requests"] == container["resources"]["limits"]


def test_only_the_clusters_pods_and_the_operator_reach_rays_control_ports() -> None:
    from instructune_operator.builders.children import build_network_policy

    policy = build_network_policy(META, "instructune-system", {"app.kubernetes.io/name": "instructune"}, 8000)
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"ray.io/cluster": "quickstart-ray"}}
    own, operator, serve = spec["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {"ray.io/cluster": "quickstart-ray"}}}]}
    # The operator's pods in the operator's namespace (one peer: both selectors at once), dashboard only.
    (peer,) = operator["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "instructune-system"}
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "instructune"}
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]
    # Anyone may reach Ray Serve's port; nothing else is open to other pods (no GCS, no client port).
    assert serve == {"ports": [{"protocol": "TCP", "port": 8000}]}
    assert policy["metadata"]["ownerReferences"][0]["uid"] == META["uid"]
