"""The operator's only door to the API server for its children (Kopf handles the tune itself).

Plain HTTPS (httpx) with the credentials Kopf's own login finds: the pod's service account in a
cluster, else the kubeconfig. The `kubernetes` client package would cost ~55 MB of operator
memory for the six calls below, and it is not needed to make them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import tempfile
import threading
import weakref
from typing import Any

import httpx
import kopf

from instructune_operator.metrics import KUBE_API_ERRORS

FIELD_MANAGER = "instructune-operator"

_PATHS = {
    ("v1", "ServiceAccount"): "/api/v1/namespaces/{ns}/serviceaccounts",
    ("v1", "ConfigMap"): "/api/v1/namespaces/{ns}/configmaps",
    ("v1", "Secret"): "/api/v1/namespaces/{ns}/secrets",
    ("v1", "Service"): "/api/v1/namespaces/{ns}/services",
    ("v1", "Pod"): "/api/v1/namespaces/{ns}/pods",
    ("v1", "Event"): "/api/v1/namespaces/{ns}/events",
    ("rbac.authorization.k8s.io/v1", "Role"): "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    (
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
    ): "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
    ("apps/v1", "Deployment"): "/apis/apps/v1/namespaces/{ns}/deployments",
    (
        "networking.k8s.io/v1",
        "NetworkPolicy",
    ): "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
    ("ray.io/v1", "RayCluster"): "/apis/ray.io/v1/namespaces/{ns}/rayclusters",
    (
        "instructune.io/v1alpha1",
        "InstructionTune",
    ): "/apis/instructune.io/v1alpha1/namespaces/{ns}/instructiontunes",
}


# The HTTP method of each Kubernetes verb the client uses (server-side apply is a PATCH).
_METHODS = {
    "get": "GET",
    "list": "GET",
    "create": "POST",
    "apply": "PATCH",
    "patch": "PATCH",
    "delete": "DELETE",
}


class KubeError(RuntimeError):
    """A refused request, with the API server's own reason and message (a Status object)."""

    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        self.status = status
        try:
            detail = json.loads(body)
            message = f"{detail.get('reason', '')}: {detail.get('message', body)}"
        except (ValueError, AttributeError):  # not JSON, or JSON that is not a Status object
            message = body[:500]
        super().__init__(f"{method} {path}: HTTP {status} {message}")


def login() -> kopf.ConnectionInfo:
    """The same order Kopf logs in with when no client library is used."""
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no service account token and no kubeconfig (KUBECONFIG or ~/.kube/config)")
    return info


def _materialise(data: str | bytes | None, path: Any, suffix: str, folder: str) -> str | None:
    """A file path for a kubeconfig's file-or-base64-data field (ssl wants files for client certs)."""
    if path:
        return os.fspath(path) if not isinstance(path, bytes) else path.decode()
    if not data:
        return None
    raw = base64.b64decode(data)
    fd, name = tempfile.mkstemp(suffix=suffix, dir=folder)  # 0600
    with os.fdopen(fd, "wb") as handle:
        handle.write(raw)
    return name


def _ssl_context(info: kopf.ConnectionInfo, ca_file: str | None, folder: str) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    context = ssl.create_default_context(cafile=ca_file)
    cert = _materialise(info.certificate_data, info.certificate_path, ".crt", folder)
    key = _materialise(info.private_key_data, info.private_key_path, ".key", folder)
    if cert:
        context.load_cert_chain(cert, key)
    return context


class Kube:
    """Server-side apply, get, list and delete of a fixed set of kinds, by raw paths (no discovery).
    Thread-safe: Kopf runs sync handlers on a thread pool and one pass may apply in parallel."""

    def __init__(self, info: kopf.ConnectionInfo | None = None, timeout: float = 30.0) -> None:
        self._timeout = timeout
        self._lock = threading.Lock()
        self._folder = tempfile.mkdtemp(prefix="instructune-kube-")  # 0700
        # It may hold a client key from a kubeconfig: removed with the client (or at exit).
        self._remove_folder = weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        self._connect(info or login())

    def _connect(self, info: kopf.ConnectionInfo) -> None:
        self.info = info
        self.ca_file = _materialise(info.ca_data, info.ca_path, ".ca.crt", self._folder)
        self.http = httpx.Client(
            base_url=info.server.rstrip("/"),
            verify=_ssl_context(info, self.ca_file, self._folder),
            headers={"Accept": "application/json", **info.as_http_headers()},
            timeout=self._timeout,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        )

    def _call(
        self,
        verb: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        """One request of a Kubernetes verb (metrics count a failed one under it)."""
        method = _METHODS[verb]
        for attempt in (1, 2):
            try:
                response = self.http.request(
                    method, path, params=query, json=body, headers={"Content-Type": content_type}
                )
            except httpx.HTTPError:
                KUBE_API_ERRORS.labels(verb, "<error>").inc()
                raise
            # A service account token is rotated under a running pod: log in again once.
            if response.status_code == 401 and attempt == 1:
                with self._lock:
                    self._connect(login())
                continue
            break
        if response.status_code == 404 and method in ("GET", "DELETE"):
            return None
        if response.is_error:
            KUBE_API_ERRORS.labels(verb, str(response.status_code)).inc()
            raise KubeError(response.status_code, method, path, response.text)
        return response.json() if response.content else {}

    @staticmethod
    def _path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
        base = _PATHS[(api_version, kind)].format(ns=namespace)
        return f"{base}/{name}" if name else base

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        path = self._path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        result = self._call(
            "apply",
            path,
            body=manifest,
            query={"fieldManager": FIELD_MANAGER, "force": "true"},
            content_type="application/apply-patch+yaml",
        )
        assert result is not None
        return result

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call("get", self._path(api_version, kind, namespace, name))

    def list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        result = self._call(
            "list", self._path(api_version, kind, namespace), query={"labelSelector": selector}
        )
        return list((result or {}).get("items", []))

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """True when something was deleted (or is being deleted)."""
        body = {"propagationPolicy": "Background"}
        path = self._path(api_version, kind, namespace, name)
        return self._call("delete", path, body=body) is not None

    def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, patch: dict[str, Any]
    ) -> None:
        path = self._path(api_version, kind, namespace, name) + "/status"
        self._call("patch", path, body={"status": patch}, content_type="application/merge-patch+json")

    def request_token(self, namespace: str, service_account: str, seconds: int) -> str:
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds},
        }
        result = self._call("create", path, body=body)
        assert result is not None
        return str(result["status"]["token"])

    @property
    def server(self) -> str:
        return str(self.info.server)
