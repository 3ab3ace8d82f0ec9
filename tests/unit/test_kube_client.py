"""The operator's API client: errors carry the API server's words; credentials land in private files."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from instructune_operator.clients.kube import KubeError, _materialise

pytestmark = pytest.mark.unit


def test_a_refusal_names_the_api_servers_reason_and_message() -> None:
    body = json.dumps(
        {
            "kind": "Status",
            "reason": "Forbidden",
            "message": 'rayclusters.ray.io "x" is forbidden: User "op" cannot patch resource',
        }
    )
    err = KubeError(403, "PATCH", "/apis/ray.io/v1/namespaces/a/rayclusters/x", body)
    assert err.status == 403
    assert "HTTP 403 Forbidden" in str(err) and "cannot patch resource" in str(err)


def test_a_refusal_without_a_status_body_keeps_the_raw_text() -> None:
    assert "upstream connect error" in str(KubeError(503, "GET", "/api", "upstream connect error"))


def test_inline_kubeconfig_credentials_are_written_readable_only_by_the_operator(tmp_path: Path) -> None:
    data = base64.b64encode(b"-----BEGIN PRIVATE KEY-----\n").decode()
    path = _materialise(data, None, ".key", str(tmp_path))
    assert path is not None and Path(path).read_bytes() == b"-----BEGIN PRIVATE KEY-----\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_credential_given_as_a_path_is_used_where_it_is() -> None:
    assert _materialise(None, "/var/run/secrets/ca.crt", ".crt", "/nonexistent") == "/var/run/secrets/ca.crt"
    assert _materialise(None, None, ".crt", "/nonexistent") is None


def test_the_clients_key_material_folder_is_removed_with_the_client(tmp_path: Path) -> None:
    import gc

    import kopf

    from instructune_operator.clients.kube import Kube

    # No connection is made; insecure, so the CA written for it need not be a real one.
    info = kopf.ConnectionInfo(
        server="https://127.0.0.1:1", ca_data=base64.b64encode(b"ca").decode(), insecure=True
    )
    kube = Kube(info)
    folder = Path(kube._folder)
    assert folder.is_dir() and any(folder.iterdir())
    del kube
    gc.collect()
    assert not folder.exists()
