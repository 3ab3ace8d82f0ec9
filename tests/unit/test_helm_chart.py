"""The Helm chart: it lints, renders, runs the operator restricted, and grants least privilege.

The RBAC checks are tied to the code: every kind the builders produce must be creatable and
patchable (server-side apply), and the per-tune job Role must be covered by the operator's own
rules (RBAC refuses to let anyone create a Role granting more than it holds).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

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
from instructune_operator.ray_auth import derive_token
from instructune_operator.settings import Settings, parse_settings
from tests.unit.conftest import generated_files_drift

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "instructune"
CACHE = Path(os.environ.get("INSTRUCTUNE_CACHE", str(Path.home() / ".cache" / "instructune")))
RELEASE, NAMESPACE = "itune", "instructune-system"


def _helm_version() -> str:
    for line in (ROOT / "hack" / "versions.env").read_text().splitlines():
        if line.startswith("HELM_VERSION="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("hack/versions.env has no HELM_VERSION")


HELM = CACHE / "bin" / f"helm-{_helm_version()}"


@pytest.fixture(scope="module")
def helm() -> Path:
    if not os.access(HELM, os.X_OK):
        reason = f"helm not built at {HELM}: run `hack/build-stack.sh helm` (make test builds it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return HELM


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # A private HOME-like config keeps helm away from the user's repositories and plugins.
    env = {"PATH": os.environ.get("PATH", ""), "HELM_CACHE_HOME": "/nonexistent-cache",
           "HELM_CONFIG_HOME": "/nonexistent-config", "HELM_DATA_HOME": "/nonexistent-data"}  # fmt: skip
    res = subprocess.run([str(helm), *args], capture_output=True, text=True, env=env, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({res.returncode}):\n{res.stderr}{res.stdout}")
    return res


def render(helm: Path, *args: str) -> list[dict[str, Any]]:
    out = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def grants(
    rules: list[dict[str, Any]], group: str, resource: str, verb: str, name: str | None = None
) -> bool:
    return any(
        group in r.get("apiGroups", [])
        and resource in r.get("resources", [])
        and verb in r.get("verbs", [])
        and (not r.get("resourceNames") or (name is not None and name in r["resourceNames"]))
        for r in rules
    )


def settings_of(docs: list[dict[str, Any]]) -> Any:
    cm = one(docs, "ConfigMap")
    return parse_settings(yaml.safe_load(cm["data"]["settings.yaml"]), env={})


@pytest.fixture(scope="module")
def default_docs(helm: Path) -> list[dict[str, Any]]:
    return render(helm)


def test_lint_passes(helm: Path) -> None:
    run_helm(helm, "lint", "--strict", str(CHART))
    run_helm(helm, "lint", "--strict", str(CHART), "--set", "settings.namespaces={team-a,team-b}")


def test_the_values_schema_is_generated_from_the_operator_settings_and_up_to_date() -> None:
    assert not (drift := generated_files_drift("gen_values_schema.py")), drift


def _closed_everywhere(node: Any, path: str = "") -> list[str]:
    """Paths of the schema's objects that would let a mistyped key through."""
    if isinstance(node, list):
        return [p for i, n in enumerate(node) for p in _closed_everywhere(n, f"{path}/{i}")]
    if not isinstance(node, dict):
        return []
    found = [path] if "properties" in node and node.get("additionalProperties") is not False else []
    return found + [p for k, v in node.items() for p in _closed_everywhere(v, f"{path}/{k}")]


def test_every_object_of_the_values_schema_refuses_unknown_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert not _closed_everywhere(schema)
    # Every value of values.yaml is described (helm lint of the defaults proves each one valid).
    assert set(yaml.safe_load((CHART / "values.yaml").read_text())) <= set(schema["properties"])


@pytest.mark.parametrize(
    ("value", "refusal"),
    [
        ("replicas=-1", "at '/replicas': minimum: got -1, want 0"),
        ("replicas=one", "at '/replicas': got string, want integer"),
        ("rbac.creat=false", "at '/rbac': additional properties 'creat' not allowed"),
        ("image.pullPolicy=Sometimes", "at '/image/pullPolicy': value must be one of"),
        ("resources.limits.memory=lots", "at '/resources/limits/memory': 'lots' does not match pattern"),
        ("rayAuthTokenSecretRef.key=token", "at '/rayAuthTokenSecretRef': properties 'name' required"),
        # The operator's settings, held to its own model.
        ("settings.namespace={team-a}", "at '/settings': additional properties 'namespace' not allowed"),
        ("settings.namespaces={Team_A}", "at '/settings/namespaces/0': 'Team_A' does not match pattern"),
        ("settings.pools.l4.gpusPerNode=-1", "at '/settings/pools/l4/gpusPerNode': minimum: got -1, want 0"),
        ("settings.reconcileIntervalSeconds=0", "at '/settings/reconcileIntervalSeconds': exclusiveMinimum"),
        ("settings.pools.l4.tolerations[0].operator=Exist", "at '/settings/pools/l4/tolerations/0/operator'"),
        ("settings.pools.A100.nodeSelector.gpu=a100", "invalid propertyName 'A100'"),
        ("settings.metricsPort=70000", "at '/settings/metricsPort': maximum: got 70,000, want 65,535"),
        ("metrics.serviceMonitor.interval=half-a-minute", "at '/metrics/serviceMonitor/interval'"),
        ("metrics.grafanaDashboard.enable=true", "at '/metrics/grafanaDashboard': additional properties"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field(helm: Path, value: str, refusal: str) -> None:
    for command in ("template", "lint"):
        args = [RELEASE] if command == "template" else []
        res = run_helm(helm, command, *args, str(CHART), "--set", value, check=False)
        assert res.returncode != 0 and refusal in res.stderr + res.stdout, (command, res.stderr, res.stdout)


def test_the_operator_refuses_the_settings_the_schema_refuses() -> None:
    """One source: the settings' schema is the operator's model, so neither lets these through."""
    for bad in (
        {"namespaces": ["Team_A"]},
        {"pools": {"A100": {"nodeSelector": {"gpu": "a100"}}}},
        {"pools": {"l4": {"nodeSelector": {}, "gpusPerNode": -1}}},
        {"rayServeHttpPort": 0},
        {"metricsPort": 70000},
        {"namespace": ["team-a"]},
    ):
        with pytest.raises(ValueError):
            parse_settings(bad, env={})


def test_renders_the_operator_objects(default_docs: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in default_docs)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "ConfigMap",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Secret",
            "Service",
        ]
    )
    for doc in default_docs:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE


def test_crds_ship_with_the_chart(helm: Path) -> None:
    docs = render(helm, "--include-crds")
    crd = one(docs, "CustomResourceDefinition")
    assert crd["metadata"]["name"] == "instructiontunes.instructune.io"


def test_cluster_role_may_write_but_never_read_secrets_and_has_no_wildcards(
    default_docs: list[dict[str, Any]],
) -> None:
    rules = one(default_docs, "ClusterRole")["rules"]
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(key, []), rule
        if {"secrets", "secrets/*"} & set(rule["resources"]):
            # Each tune's Ray token Secret is applied, never read back (instructune_operator.ray_auth).
            assert rule["resources"] == ["secrets"] and sorted(rule["verbs"]) == ["create", "patch"], rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
        assert not rule.get("nonResourceURLs"), rule
    # Kopf runs standalone: no peering objects, no CRD or namespace observation granted.
    resources = {res for r in rules for res in r["resources"]}
    assert not {"kopfpeerings", "clusterkopfpeerings", "customresourcedefinitions", "namespaces"} & resources
    # TokenRequest only when the settings ask for file tokens (the local stack).
    assert "serviceaccounts/token" not in resources


def test_rules_are_exactly_what_the_operator_calls(default_docs: list[dict[str, Any]]) -> None:
    rules = one(default_docs, "ClusterRole")["rules"]
    granted = {
        (g, res, v) for r in rules for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]
    }
    expected = {
        # Kopf: list+watch the tunes, patch finalizers/annotations and status, post events.
        ("instructune.io", "instructiontunes", "get"),  # reconcile: the tune afresh after its job succeeded
        ("instructune.io", "instructiontunes", "list"),
        ("instructune.io", "instructiontunes", "watch"),
        ("instructune.io", "instructiontunes", "patch"),
        ("instructune.io", "instructiontunes", "delete"),  # ttlSecondsAfterFinished
        ("instructune.io", "instructiontunes/status", "patch"),
        ("instructune.io", "instructiontunes/status", "get"),  # held to grant it to the job
        ("", "events", "create"),
        # reconcile: server-side apply = patch, plus create when the object does not exist yet.
        # Kopf indices follow the tunes' RayClusters and Ray pods (no GET per pass).
        ("ray.io", "rayclusters", "list"),
        ("ray.io", "rayclusters", "watch"),
        ("ray.io", "rayclusters", "create"),
        ("ray.io", "rayclusters", "patch"),
        ("ray.io", "rayclusters", "delete"),
        *(("", res, v) for res in ("serviceaccounts", "configmaps", "services") for v in ("create", "patch")),
        *(
            ("rbac.authorization.k8s.io", res, v)
            for res in ("roles", "rolebindings")
            for v in ("create", "patch")
        ),
        ("apps", "deployments", "get"),
        ("apps", "deployments", "create"),
        ("apps", "deployments", "patch"),
        ("", "pods", "list"),  # diagnosing unschedulable / crashing Ray pods
        ("", "pods", "watch"),
        ("networking.k8s.io", "networkpolicies", "create"),  # each Ray cluster's NetworkPolicy
        ("networking.k8s.io", "networkpolicies", "patch"),
        # rayAuth: each tune's Ray token Secret is applied, never read.
        ("", "secrets", "create"),
        ("", "secrets", "patch"),
    }
    assert granted == expected


def _example_children(settings: Any) -> list[dict[str, Any]]:
    """Every object the builders make for the serving example: what reconcile applies."""
    tune = yaml.safe_load((ROOT / "examples" / "lora-with-serving.yaml").read_text())
    spec = InstructionTuneSpec.model_validate(tune["spec"])
    meta = {"name": tune["metadata"]["name"], "namespace": "ml-team", "uid": "0123456789abcdef"}
    config = build_train_config(spec, meta["namespace"], meta["name"], meta["uid"], 1)
    return [
        *build_job_identity(meta),
        build_config_map(meta, config),
        build_ray_auth_secret(meta, derive_token("key", meta["uid"])),
        build_ray_cluster(meta, spec, settings, ray_auth=True),
        build_network_policy(meta, "instructune-system", {"app.kubernetes.io/name": "instructune"}, 8000),
        *build_serving(meta, spec, settings, "0" * 64),
    ]


def _plural(kind: str) -> str:
    return {"RayCluster": "rayclusters", "NetworkPolicy": "networkpolicies"}.get(kind, kind.lower() + "s")


def test_every_built_child_can_be_server_side_applied(default_docs: list[dict[str, Any]]) -> None:
    rules = one(default_docs, "ClusterRole")["rules"]
    children = _example_children(settings_of(default_docs))
    assert {c["kind"] for c in children} == {
        "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret", "RayCluster", "Deployment", "Service",
        "NetworkPolicy",
    }  # fmt: skip
    for child in children:
        group = child["apiVersion"].rpartition("/")[0]
        for verb in ("create", "patch"):
            assert grants(rules, group, _plural(child["kind"]), verb), (child["kind"], verb)


def test_operator_holds_what_the_job_role_grants(default_docs: list[dict[str, Any]]) -> None:
    """RBAC escalation prevention: creating the job Role (and binding it) needs these permissions."""
    rules = one(default_docs, "ClusterRole")["rules"]
    role = next(c for c in _example_children(settings_of(default_docs)) if c["kind"] == "Role")
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [None]:
                        assert grants(rules, group, resource, verb, name), (group, resource, verb)


def _service_link_variables(service: dict[str, Any]) -> set[str]:
    """What the kubelet puts into a pod for a Service of its namespace (service links)."""
    name = service["metadata"]["name"].upper().replace("-", "_")
    names = {f"{name}_SERVICE_HOST", f"{name}_SERVICE_PORT", f"{name}_PORT"}
    for port in service["spec"]["ports"]:
        protocol = port.get("protocol", "TCP")
        names |= {
            f"{name}_PORT_{port['port']}_{protocol}" + suffix for suffix in ("", "_PROTO", "_PORT", "_ADDR")
        }
    return names


def test_no_service_of_the_chart_can_set_an_operator_setting(helm: Path) -> None:
    """Installed as `instructune` (as docs/operations.md does), the metrics Service's link variable
    INSTRUCTUNE_METRICS_PORT=tcp://... is an environment override of the settings (it crash-looped
    the operator pod): service links are off."""
    from instructune_operator.settings import ENV_OVERRIDES

    out = run_helm(helm, "template", "instructune", str(CHART), "--namespace", NAMESPACE).stdout
    docs = [doc for doc in yaml.safe_load_all(out) if doc]
    linked = set().union(*(_service_link_variables(s) for s in by_kind(docs, "Service")))
    assert linked & set(ENV_OVERRIDES)  # the collision exists without the switch below
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False


def test_deployment_is_restricted(default_docs: list[dict[str, Any]]) -> None:
    deployment = one(default_docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two standalone operators
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == one(default_docs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert not sc["capabilities"].get("add")
        assert sc.get("privileged") is not True
        assert sc["readOnlyRootFilesystem"] is True
        assert sc.get("runAsNonRoot", pod["securityContext"]["runAsNonRoot"]) is True
        assert sc.get("runAsUser", pod["securityContext"].get("runAsUser")) != 0
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
    (operator,) = pod["containers"]
    assert operator["command"] == ["python", "-m", "instructune_operator"]
    assert operator["image"].endswith(":0.1.0")


def test_settings_are_mounted_where_instructune_settings_points(default_docs: list[dict[str, Any]]) -> None:
    pod = one(default_docs, "Deployment")["spec"]["template"]["spec"]
    (operator,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in operator["env"]}
    path = Path(env["INSTRUCTUNE_SETTINGS"])
    mount = next(m for m in operator["volumeMounts"] if m["mountPath"] == str(path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = one(default_docs, "ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert path.name in cm["data"]


def test_values_pools_reach_the_operator_settings(
    helm: Path, default_docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    settings = settings_of(default_docs)
    assert set(settings.pools) == {"a100-80g", "l4"} == set(values["settings"]["pools"])
    a100 = settings.pools["a100-80g"]
    assert a100.gpus_per_node == 8 and a100.gpu_resource == "nvidia.com/gpu"
    assert a100.tolerations[0].key == "nvidia.com/gpu"
    assert settings.namespaces == [] and settings.s3_endpoint is None
    assert settings.ray_image == values["settings"]["rayImage"]
    assert settings.serving_image == values["settings"]["servingImage"]

    custom = {
        "pools": {"h100": {"nodeSelector": {"pool": "h100"}, "gpusPerNode": 8, "maxWorkers": 32}},
        "s3Endpoint": "https://s3.internal:9000",
        "deleteClusterAfterFinish": False,
    }
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump({"settings": custom}))
    docs = render(helm, "--values", str(values_file))
    settings = settings_of(docs)
    assert set(settings.pools) == {"a100-80g", "l4", "h100"}  # maps merge with the defaults
    assert settings.pools["h100"].max_workers == 32
    assert settings.s3_endpoint == "https://s3.internal:9000"
    assert settings.delete_cluster_after_finish is False
    # The operator's own S3 client (deleteArtifactsOnDelete) reads the endpoint from its env.
    (operator,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert {"name": "INSTRUCTUNE_S3_ENDPOINT", "value": "https://s3.internal:9000"} in operator["env"]


def test_settings_change_rolls_the_operator(helm: Path, default_docs: list[dict[str, Any]]) -> None:
    def checksum(docs: list[dict[str, Any]]) -> str:
        return one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/settings"]

    assert checksum(default_docs) != checksum(render(helm, "--set", "settings.reconcileIntervalSeconds=30"))


def test_namespaced_mode_renders_roles_per_namespace(helm: Path) -> None:
    docs = render(helm, "--set", "settings.namespaces={team-a,team-b}")
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    roles, bindings = by_kind(docs, "Role"), by_kind(docs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    sa = one(docs, "ServiceAccount")["metadata"]
    for binding in bindings:
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": roles[0]["metadata"]["name"]}  # fmt: skip
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": NAMESPACE}]
    cluster_rules = one(render(helm), "ClusterRole")["rules"]
    for role in roles:
        assert role["rules"] == cluster_rules
    assert settings_of(docs).namespaces == ["team-a", "team-b"]


def test_token_request_only_with_local_job_identity_dir(helm: Path) -> None:
    docs = render(helm, "--set", "settings.localJobIdentityDir=/tmp/job-identity")
    rules = one(docs, "ClusterRole")["rules"]
    assert grants(rules, "", "serviceaccounts/token", "create")
    assert settings_of(docs).local_job_identity_dir == "/tmp/job-identity"


def test_owner_reference_enforcement_adds_only_finalizers_and_child_deletes(helm: Path) -> None:
    base = one(render(helm), "ClusterRole")["rules"]
    rules = one(render(helm, "--set", "rbac.ownerReferencesPermissionEnforcement=true"), "ClusterRole")[
        "rules"
    ]
    extra = [r for r in rules if r not in base]
    assert grants(extra, "instructune.io", "instructiontunes/finalizers", "update")
    for group, resource in [
        ("", "configmaps"),
        ("apps", "deployments"),
        ("rbac.authorization.k8s.io", "roles"),
    ]:
        assert grants(extra, group, resource, "delete")
    assert {v for r in extra for v in r["verbs"]} == {"update", "delete"}


def test_the_argo_cd_health_check_is_rendered_from_the_charts_one_lua_file_only_when_enabled(
    helm: Path, default_docs: list[dict[str, Any]]
) -> None:
    assert not [d for d in default_docs if d["metadata"]["name"].endswith("-argocd-health")]
    docs = render(
        helm, "--set", "argocd.healthCheck.enabled=true", "--show-only", "templates/argocd-health.yaml"
    )
    (cm,) = docs
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["namespace"] == NAMESPACE
    # Byte for byte the file tests/unit/test_argocd_health.py runs, under the key argocd-cm reads.
    assert cm["data"] == {
        "resource.customizations.health.instructune.io_InstructionTune": (
            CHART / "argocd" / "health.lua"
        ).read_text()
    }


def test_more_than_one_replica_is_refused(helm: Path) -> None:
    res = run_helm(helm, "template", RELEASE, str(CHART), "--set", "replicas=2", check=False)
    assert res.returncode != 0 and "replicas must be 0 or 1" in res.stderr
    assert one(render(helm, "--set", "replicas=0"), "Deployment")["spec"]["replicas"] == 0


def test_rbac_can_be_left_to_the_platform(helm: Path) -> None:
    docs = render(helm, "--set", "rbac.create=false")
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & {d["kind"] for d in docs}


def test_credentials_reach_the_operator_only_by_secret_key_ref(helm: Path) -> None:
    docs = render(helm, "--set", "rayAuthTokenSecretRef.name=ray-auth")
    (operator,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    token = next(e for e in operator["env"] if e["name"] == "RAY_AUTH_TOKEN")
    assert token == {
        "name": "RAY_AUTH_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "ray-auth", "key": "RAY_AUTH_TOKEN"}},
    }
    assert not any(
        grants(one(docs, "ClusterRole")["rules"], "", "secrets", verb) for verb in ("get", "list", "watch")
    )


def test_ray_auth_key_is_generated_once_and_reaches_the_operator_by_secret_key_ref(
    default_docs: list[dict[str, Any]], helm: Path
) -> None:
    key = next(
        d for d in default_docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-ray-auth-key")
    )
    assert (
        len(key["data"]["key"]) >= 64 and key["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    )
    (operator,) = one(default_docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = next(e for e in operator["env"] if e["name"] == "INSTRUCTUNE_RAY_AUTH_KEY")
    assert env["valueFrom"]["secretKeyRef"] == {"name": key["metadata"]["name"], "key": "key"}
    off = render(helm, "--set", "rayAuth.enabled=false")
    assert not [d for d in off if d["kind"] == "Secret"]
    assert not any(grants(one(off, "ClusterRole")["rules"], "", "secrets", v) for v in ("create", "patch"))


def test_the_local_stack_values_run_the_operator_on_the_real_node_with_the_job_image(
    helm: Path, tmp_path: Path
) -> None:
    import operator_release  # hack/ is on sys.path through tests/conftest.py

    settings = yaml.safe_load((ROOT / "hack" / "local-settings.yaml").read_text())
    values = operator_release.stack_values(
        settings, "ghcr.io/instructune/instructune-operator:0.1.0", "ghcr.io/instructune/instructune-job:0.1.0",
        "http://198.18.0.1:9000", build="abc123",
    )  # fmt: skip
    path = tmp_path / "values.json"
    path.write_text(json.dumps(values))
    docs = render(helm, "--values", str(path))
    pod = one(docs, "Deployment")["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"instructune.io/pool": "local"}
    assert pod["spec"]["containers"][0]["imagePullPolicy"] == "Never"
    assert pod["metadata"]["annotations"]["instructune.io/image-build"] == "abc123"
    parsed = settings_of(docs)
    assert parsed.ray_image == "ghcr.io/instructune/instructune-job:0.1.0"
    assert parsed.s3_endpoint == "http://198.18.0.1:9000"
    assert parsed.pools["local"].cpu_overcommit == 2 and parsed.ray_address_override is None


def test_a_process_run_operator_gets_the_charts_rbac_and_no_pod(helm: Path, tmp_path: Path) -> None:
    import operator_release

    path = tmp_path / "values.json"
    path.write_text(json.dumps(operator_release.process_values("/tmp/identity")))
    docs = render(helm, "--values", str(path))
    assert one(docs, "Deployment")["spec"]["replicas"] == 0
    rules = one(docs, "ClusterRole")["rules"]
    assert grants(rules, "", "serviceaccounts/token", "create")  # token files for its jobs
    assert not any(grants(rules, "", "secrets", v) for v in ("create", "patch", "get"))


def _metrics_port(docs: list[dict[str, Any]]) -> dict[str, Any] | None:
    (operator,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return next((p for p in operator.get("ports", []) if p["name"] == "metrics"), None)


def test_the_metrics_service_reaches_the_operators_metrics_port_by_name(
    default_docs: list[dict[str, Any]],
) -> None:
    service = one(default_docs, "Service")
    deployment = one(default_docs, "Deployment")
    assert service["metadata"]["name"] == f"{RELEASE}-instructune-metrics"
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    # The port the operator listens on (its settings) is the one the pod declares under that name.
    assert settings_of(default_docs).metrics_port == 8080 == Settings().metrics_port
    assert _metrics_port(default_docs) == {"name": "metrics", "containerPort": 8080, "protocol": "TCP"}


def test_the_metrics_port_setting_moves_the_operator_its_pod_and_the_service_together(helm: Path) -> None:
    docs = render(helm, "--set", "settings.metricsPort=9102")
    assert settings_of(docs).metrics_port == 9102
    assert _metrics_port(docs) == {"name": "metrics", "containerPort": 9102, "protocol": "TCP"}
    assert one(docs, "Service")["spec"]["ports"][0]["port"] == 9102
    # Unset (null drops it), the chart falls back to the operator's own default.
    unset = render(helm, "--set", "settings.metricsPort=null")
    assert "metricsPort" not in yaml.safe_load(one(unset, "ConfigMap")["data"]["settings.yaml"])
    assert _metrics_port(unset)["containerPort"] == Settings().metrics_port  # type: ignore[index]
    # 0 turns the endpoint off: no port, no Service.
    off = render(helm, "--set", "settings.metricsPort=0")
    assert settings_of(off).metrics_port == 0
    assert _metrics_port(off) is None and not by_kind(off, "Service")


def test_the_service_monitor_is_rendered_only_when_enabled_and_refused_without_its_crd(
    helm: Path, default_docs: list[dict[str, Any]]
) -> None:
    assert not by_kind(default_docs, "ServiceMonitor")
    enable = ("--set", "metrics.serviceMonitor.enabled=true")
    missing = run_helm(helm, "template", RELEASE, str(CHART), *enable, check=False)
    assert (
        missing.returncode != 0 and "needs the ServiceMonitor CRD (monitoring.coreos.com/v1" in missing.stderr
    )
    off = run_helm(
        helm, "template", RELEASE, str(CHART), *enable, "--set", "settings.metricsPort=0",
        "--api-versions", "monitoring.coreos.com/v1", check=False,
    )  # fmt: skip
    assert off.returncode != 0 and "settings.metricsPort is 0" in off.stderr

    docs = render(
        helm, *enable, "--api-versions", "monitoring.coreos.com/v1",
        "--set", "metrics.serviceMonitor.labels.release=kube-prometheus-stack",
        "--set", "metrics.serviceMonitor.interval=15s",
    )  # fmt: skip
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    # It selects the metrics Service by its labels and scrapes its port by name.
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    assert service["spec"]["ports"][0]["name"] == "metrics"


def test_the_grafana_dashboard_is_rendered_from_the_charts_one_json_file_only_when_enabled(
    helm: Path, default_docs: list[dict[str, Any]]
) -> None:
    assert not [d for d in default_docs if d["metadata"]["name"].endswith("-dashboard")]
    docs = render(
        helm,
        "--set",
        "metrics.grafanaDashboard.enabled=true",
        "--show-only",
        "templates/grafana-dashboard.yaml",
    )
    (cm,) = docs
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["namespace"] == NAMESPACE
    # Grafana's dashboard sidecar loads the ConfigMaps with this label (kube-prometheus-stack's default).
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = (CHART / "dashboards" / "instructune.json").read_text()
    assert cm["data"] == {"instructune.json": dashboard}  # byte for byte the file the unit tests check
    assert json.loads(cm["data"]["instructune.json"])["uid"] == "instructune-operator"
