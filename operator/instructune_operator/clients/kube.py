"""The operator's only door to the API server for its children (Kopf handles the tune itself)."""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

FIELD_MANAGER = "instructune-operator"

_PATHS = {
    ("v1", "ServiceAccount"): "/api/v1/namespaces/{ns}/serviceaccounts",
    ("v1", "ConfigMap"): "/api/v1/namespaces/{ns}/configmaps",
    ("v1", "Service"): "/api/v1/namespaces/{ns}/services",
    ("v1", "Pod"): "/api/v1/namespaces/{ns}/pods",
    ("v1", "Event"): "/api/v1/namespaces/{ns}/events",
    ("rbac.authorization.k8s.io/v1", "Role"): "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    (
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
    ): "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
    ("apps/v1", "Deployment"): "/apis/apps/v1/namespaces/{ns}/deployments",
    ("ray.io/v1", "RayCluster"): "/apis/ray.io/v1/namespaces/{ns}/rayclusters",
    (
        "instructune.io/v1alpha1",
        "InstructionTune",
    ): "/apis/instructune.io/v1alpha1/namespaces/{ns}/instructiontunes",
}


class Kube:
    """Server-side apply, get, list and delete of a fixed set of kinds, by raw paths (no discovery)."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api = api_client

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, Any]] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        try:
            data = self.api.call_api(
                path,
                method,
                query_params=query or [],
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
            )
        except ApiException as err:
            if err.status == 404 and method in ("GET", "DELETE"):
                return None
            raise
        raw = data.data
        return json.loads(raw) if raw else {}

    @staticmethod
    def _path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
        base = _PATHS[(api_version, kind)].format(ns=namespace)
        return f"{base}/{name}" if name else base

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        path = self._path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        result = self._call(
            "PATCH",
            path,
            body=manifest,
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )
        assert result is not None
        return result

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call("GET", self._path(api_version, kind, namespace, name))

    def list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        result = self._call(
            "GET", self._path(api_version, kind, namespace), query=[("labelSelector", selector)]
        )
        return (result or {}).get("items", [])

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """True when something was deleted (or is being deleted)."""
        body = {"propagationPolicy": "Background"}
        return self._call("DELETE", self._path(api_version, kind, namespace, name), body=body) is not None

    def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, patch: dict[str, Any]
    ) -> None:
        path = self._path(api_version, kind, namespace, name) + "/status"
        self._call("PATCH", path, body={"status": patch}, content_type="application/merge-patch+json")

    def request_token(self, namespace: str, service_account: str, seconds: int) -> str:
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds},
        }
        result = self._call("POST", path, body=body)
        assert result is not None
        return str(result["status"]["token"])

    @property
    def server(self) -> str:
        return str(self.api.configuration.host)

    @property
    def ca_file(self) -> str | None:
        return self.api.configuration.ssl_ca_cert
