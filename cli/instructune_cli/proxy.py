"""HTTP to a Service inside the cluster, from wherever the CLI runs.

The addresses a tune's status names are cluster DNS names (`http://<service>.<namespace>.svc:<port>`:
the Ray head's Jobs API, the serving endpoint), which resolve only inside the cluster. Like
`kubectl port-forward`, the CLI goes through the API server instead: it picks a ready pod behind
the Service and calls the API server's pod proxy,
`/api/v1/namespaces/<ns>/pods/<pod>:<port>/proxy/<path>`, with the kubeconfig's credentials (RBAC:
`get` on services, `list` on pods, `get` and `create` on `pods/proxy`). The pod proxy rather than
the service proxy: the latter needs the port declared on the Service, and KubeRay's head Service
declares only the ports it knows of.

The API server drops the Authorization header of a request it proxies (it authenticated the
request with it), so credentials meant for the pod travel in another header (Ray's
`X-Ray-Authorization`). Any other address (a Ray head outside the cluster, `--direct` inside it)
is called as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from instructune_cli.connect import CliError
from instructune_operator.clients.kube import Kube


class ServiceNotFound(CliError):
    """The Service a cluster address names does not exist (any more)."""


@dataclass(frozen=True)
class ServiceUrl:
    namespace: str
    service: str
    port: int
    path: str  # from the first "/", query included
    scheme: str


def parse_service_url(url: str) -> ServiceUrl | None:
    """`scheme://<service>.<namespace>.svc[.<cluster domain>][:port]/path` as its parts; None for
    any other address."""
    parts = urlsplit(url)
    labels = (parts.hostname or "").split(".")
    if len(labels) < 3 or labels[2] != "svc" or not all(labels[:2]):
        return None
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return ServiceUrl(labels[1], labels[0], port, path, parts.scheme or "http")


def _ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    return (
        status.get("phase") == "Running"
        and ready
        and not (pod.get("metadata") or {}).get("deletionTimestamp")
    )


def target_port(service: dict[str, Any], pod: dict[str, Any], port: int) -> int:
    """The pod's port behind the Service's `port`: its targetPort (a number, or a container port's
    name), or the port itself when the Service does not declare it."""
    for declared in (service.get("spec") or {}).get("ports") or []:
        if declared.get("port") != port:
            continue
        target = declared.get("targetPort", port)
        if isinstance(target, int):
            return target
        for container in (pod.get("spec") or {}).get("containers") or []:
            for named in container.get("ports") or []:
                if named.get("name") == target:
                    return int(named["containerPort"])
        raise CliError(f"no container port named {target!r} in pod {pod['metadata']['name']}")
    return port


def ready_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first ready pod (by name, so that repeated calls reach the same one)."""
    ready = sorted((p for p in pods if _ready(p)), key=lambda p: str(p["metadata"]["name"]))
    return ready[0] if ready else None


class ClusterHttp:
    """Requests to cluster addresses through the API server's pod proxy (`direct`: as they are)."""

    def __init__(self, kube: Kube | None, direct: bool = False, timeout: float = 30.0) -> None:
        self.kube, self.direct, self.timeout = kube, direct, timeout

    @staticmethod
    def proxy_path(kube: Kube, target: ServiceUrl) -> str:
        where = f"{target.namespace}/{target.service}"
        service = kube.get("v1", "Service", target.namespace, target.service)
        if service is None:
            raise ServiceNotFound(f"service {where} not found")
        selector = (service.get("spec") or {}).get("selector") or {}
        if not selector:
            raise CliError(f"service {where} selects no pods")
        pods = kube.list(
            "v1", "Pod", target.namespace, ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        )
        pod = ready_pod(pods)
        if pod is None:
            raise CliError(f"no ready pod behind service {where}")
        port = target_port(service, pod, target.port)
        scheme = "https:" if target.scheme == "https" else ""
        return f"/api/v1/namespaces/{target.namespace}/pods/{scheme}{pod['metadata']['name']}:{port}/proxy{target.path}"

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        json: Any = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        kube = None if self.direct else self.kube
        target = parse_service_url(url) if kube is not None else None
        timeout = timeout or self.timeout
        try:
            if kube is None or target is None:
                return httpx.request(method, url, headers=headers, json=json, timeout=timeout)
            path = self.proxy_path(kube, target)
            return kube.http.request(method, path, headers=headers, json=json, timeout=timeout)
        except httpx.TransportError as err:
            raise CliError(f"{method} {url}: {type(err).__name__}: {err}") from err
