"""`instructune logs` and `instructune ask`: the tune's Ray job and its served model.

logs   the Ray Jobs API of the tune's Ray head (status.rayCluster.dashboardUrl), as the operator
       calls it (clients/ray_jobs.py), for the submission of the current attempt (status.jobId) or
       of an earlier one (naming.submission_id). The cluster's Ray token is read from the Secret
       the operator wrote for it (`<tune>-ray-auth`), or taken from RAY_AUTH_TOKEN (a Ray head
       outside the cluster, as the operator's own rayAddressOverride).
ask    the served model's OpenAI-style chat endpoint (status.serving.endpoint; jobs/serve.py or
       vLLM). The question goes as a user message; the server renders it with the template the
       model was trained with.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections.abc import Callable
from typing import Any

from instructune_cli.connect import CliError
from instructune_cli.proxy import ClusterHttp
from instructune_operator.builders.children import RAY_AUTH_KEY
from instructune_operator.clients.kube import Kube, KubeError
from instructune_operator.clients.ray_jobs import TERMINAL
from instructune_operator.naming import ray_auth_secret_name, ray_cluster_name, submission_id

# Ray's token header for requests that come through a proxy, which keeps Authorization for itself
# (ray/_private/authentication/authentication_constants.py).
RAY_TOKEN_HEADER = "X-Ray-Authorization"


def ray_token(kube: Kube, namespace: str, tune: str) -> str | None:
    """The token of the tune's Ray cluster: RAY_AUTH_TOKEN when set, else the cluster's Secret
    (none when the operator runs without Ray token authentication)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    name = ray_auth_secret_name(tune)
    try:
        secret = kube.get("v1", "Secret", namespace, name)
    except KubeError as err:
        raise CliError(
            f"cannot read Secret {namespace}/{name}, the token of the tune's Ray cluster ({err}); "
            "ask for `get` on it, or set RAY_AUTH_TOKEN"
        ) from err
    if secret is None:
        return None
    try:
        return base64.b64decode((secret.get("data") or {}).get(RAY_AUTH_KEY, "")).decode() or None
    except (binascii.Error, UnicodeDecodeError) as err:
        raise CliError(f"Secret {namespace}/{name} holds no readable {RAY_AUTH_KEY}") from err


class RayJob:
    """One Ray job of a tune, through its head's Jobs API."""

    def __init__(self, http: ClusterHttp, address: str, job_id: str, token: str | None) -> None:
        self.http, self.address, self.job_id = http, address.rstrip("/"), job_id
        self.headers = {RAY_TOKEN_HEADER: f"Bearer {token}"} if token else {}

    def _get(self, path: str) -> dict[str, Any]:
        url = f"{self.address}/api/jobs/{self.job_id}{path}"
        response = self.http.request("GET", url, headers=self.headers)
        if response.status_code == 404:
            raise CliError(
                f"the Ray cluster knows no job {self.job_id} (a suspension or a new cluster loses earlier attempts' jobs)"
            )
        if response.status_code in (401, 403):
            raise CliError(
                f"the Ray cluster refused the request (HTTP {response.status_code}): {response.text[:200]}"
            )
        if response.is_error:
            raise CliError(f"GET {url}: HTTP {response.status_code} {response.text[:300]}")
        body: dict[str, Any] = response.json()
        return body

    def status(self) -> str:
        return str(self._get("").get("status", ""))

    def logs(self) -> str:
        return str(self._get("/logs").get("logs") or "")


def job_of(tune: dict[str, Any], attempt: int | None) -> str:
    """The submission id of the tune's current attempt, or of `attempt`."""
    meta, status = tune["metadata"], tune.get("status") or {}
    if attempt is not None:
        return submission_id(meta["namespace"], meta["name"], meta["uid"], attempt)
    if not status.get("jobId"):
        raise CliError(
            f"{meta['namespace']}/{meta['name']} has no job yet (phase {status.get('phase') or 'none'})"
        )
    return str(status["jobId"])


def ray_address_of(tune: dict[str, Any]) -> str:
    meta, status = tune["metadata"], tune.get("status") or {}
    recorded = (status.get("rayCluster") or {}).get("dashboardUrl")
    return str(recorded or f"http://{ray_cluster_name(meta['name'])}-head-svc.{meta['namespace']}.svc:8265")


def follow_logs(
    job: RayJob,
    write: Callable[[str], None],
    follow: bool,
    interval: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Writes the job's logs; with `follow`, what is appended until the job ends. Returns the job's
    last status."""
    written = 0
    while True:
        state = job.status() if follow else ""
        text = job.logs()
        if len(text) < written:  # a new driver under the same id (not expected): start again
            written = 0
        write(text[written:])
        written = len(text)
        if not follow or state in TERMINAL:
            return state
        sleep(interval)


def chat_body(
    model: str | None, question: str, system: str | None, max_tokens: int, temperature: float
) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    body: dict[str, Any] = {
        "messages": [*messages, {"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    if model:
        body["model"] = model
    return body


def ask(http: ClusterHttp, tune: dict[str, Any], body: dict[str, Any], timeout: float) -> str:
    """The served model's answer (the first choice's message)."""
    meta, status = tune["metadata"], tune.get("status") or {}
    endpoint = (status.get("serving") or {}).get("endpoint")
    if not endpoint:
        raise CliError(
            f"{meta['namespace']}/{meta['name']} is not served (phase {status.get('phase') or 'none'}; "
            "status.serving names no endpoint)"
        )
    url = f"{str(endpoint).rstrip('/')}/chat/completions"
    response = http.request("POST", url, json=body, timeout=timeout)
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    if response.is_error:
        error = (answer.get("error") or {}) if isinstance(answer, dict) else {}
        raise CliError(
            f"POST {url}: HTTP {response.status_code} {error.get('message') or response.text[:300]}"
        )
    try:
        return str(answer["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError) as err:
        raise CliError(f"POST {url}: not a chat completion: {response.text[:300]}") from err
