"""The API server, reached as kubectl reaches it: the kubeconfig (KUBECONFIG, else ~/.kube/config),
else the pod's service account. The client is the operator's own (clients/kube.py, plain httpx);
kopf's kubeconfig reader takes the current context's server, CA, client certificate or token
(relative paths read from the kubeconfig's folder, as kubectl reads them); not exec plugins: for
those, run `kubectl proxy` and point a kubeconfig at it."""

from __future__ import annotations

import dataclasses
import os
import ssl
from pathlib import Path
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
        info = kopf.login_with_kubeconfig(settings=settings)
        if info is not None:
            info = _paths_from(info, _kubeconfig_folder())
        else:
            info = kopf.login_with_service_account(settings=settings)
    except (OSError, KeyError, kopf.LoginError) as err:
        raise CliError(f"cannot read the kubeconfig: {err}") from err
    if info is None:
        raise CliError("no kubeconfig (KUBECONFIG or ~/.kube/config) and no in-cluster service account")
    try:
        kube = Kube(info)
    except (OSError, ssl.SSLError) as err:
        raise CliError(f"cannot use the kubeconfig's certificates or keys: {err}") from err
    return kube, info.default_namespace or "default"


def get_tune(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    tune = kube.get(API_VERSION, KIND, namespace, name)
    if tune is None:
        raise CliError(f"{PLURAL}.{GROUP} {namespace}/{name} not found")
    return tune


def _kubeconfig_folder() -> Path | None:
    """The folder of the kubeconfig in use when it is one file (KUBECONFIG may list several)."""
    files = [f for f in os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep) if f]
    return Path(files[0]).expanduser().absolute().parent if len(files) == 1 else None


def _paths_from(info: kopf.ConnectionInfo, folder: Path | None) -> kopf.ConnectionInfo:
    """Relative certificate and key paths read from the kubeconfig's folder, as kubectl reads them
    (kopf would read them from the working directory)."""
    if folder is None:
        return info

    def resolved(path: Any) -> Any:
        return str(folder / path) if path and not os.path.isabs(path) else path

    return dataclasses.replace(
        info,
        ca_path=resolved(info.ca_path),
        certificate_path=resolved(info.certificate_path),
        private_key_path=resolved(info.private_key_path),
    )
