"""The API server, reached as kubectl reaches it: the kubeconfig (KUBECONFIG, else ~/.kube/config),
else the pod's service account. The client is the operator's own (clients/kube.py, plain httpx);
kopf's kubeconfig reader takes the current context's server, CA, client certificate or token
(not exec plugins: for those, run a `kubectl proxy` and point a kubeconfig at it)."""

from __future__ import annotations

from typing import Any

import kopf

from instructune_operator.api import API_VERSION, GROUP, KIND, PLURAL
from instructune_operator.clients.kube import Kube


class CliError(RuntimeError):
    """A command could not do its work (no such tune, no serving, refused by the API server)."""


def connect() -> tuple[Kube, str]:
    """A Kube client and the namespace of the current context ("default" when it names none)."""
    settings = kopf.OperatorSettings()
    try:
        info = kopf.login_with_kubeconfig(settings=settings) or kopf.login_with_service_account(
            settings=settings
        )
    except (OSError, KeyError, kopf.LoginError) as err:
        raise CliError(f"cannot read the kubeconfig: {err}") from err
    if info is None:
        raise CliError("no kubeconfig (KUBECONFIG or ~/.kube/config) and no in-cluster service account")
    return Kube(info), info.default_namespace or "default"


def get_tune(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    tune = kube.get(API_VERSION, KIND, namespace, name)
    if tune is None:
        raise CliError(f"{PLURAL}.{GROUP} {namespace}/{name} not found")
    return tune
