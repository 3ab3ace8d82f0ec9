"""Progress reporting of a running tune: to S3 (progress.json, metrics.jsonl) and to its status.

Only rank 0 reports. Two sinks:

- S3, always: `<root>/metrics.jsonl` (one line per optimizer step) and `<root>/progress.json`
  (the latest progress and checkpoints). S3 has no append, so the metrics file is rewritten whole;
  it is small (one short line per step) and rewriting it at most every few seconds is cheap.
- The tune's status subresource, when the environment names an API server (the in-cluster
  service env, or INSTRUCTUNE_K8S_SERVER): a JSON merge patch of `status.progress`,
  `status.checkpoints`, `status.data` and `status.lineage` (camelCase, as operator/api.py
  defines them) on `instructiontunes/{name}/status`, and nowhere else: the job's Role may patch
  only that. A failed patch is logged (never with the token) and training goes on.

Both sinks are rate-limited (`min_interval_s`) except at checkpoints and at the end.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructune_jobs.config import RunIdentity
from instructune_jobs.contract import GROUP, PLURAL, VERSION, CheckpointPayload, ProgressPayload

log = logging.getLogger("instructune.report")

STATUS_GROUP_VERSION = f"{GROUP}/{VERSION}"
STATUS_PLURAL = PLURAL
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
IN_CLUSTER_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
MERGE_PATCH = "application/merge-patch+json"


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def format_eta(seconds: float | None) -> str | None:
    """ "1h02m", "3m05s", "42s": what `kubectl get` can show in a column."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


# ---------------------------------------------------------------------------------------------
# The status subresource
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusEndpoint:
    """Where this tune's status lives and how to authenticate; never holds the token itself, so
    that a rotated (projected) token is picked up and the token never lands in a repr or log."""

    server: str
    namespace: str
    name: str
    token_file: str
    ca_file: str | None

    @property
    def url(self) -> str:
        return (
            f"{self.server.rstrip('/')}/apis/{STATUS_GROUP_VERSION}/namespaces/{self.namespace}/"
            f"{STATUS_PLURAL}/{self.name}/status"
        )


def status_endpoint_from_env(run: RunIdentity, env: dict[str, str] | None = None) -> StatusEndpoint | None:
    """The tune's status endpoint when the environment gives an API server and the config names
    the tune; None otherwise (a job run by hand or in a test without a cluster)."""
    env = dict(os.environ) if env is None else env
    if not run.name:
        return None
    server = env.get("INSTRUCTUNE_K8S_SERVER")
    if not server and env.get("KUBERNETES_SERVICE_HOST"):
        host = env["KUBERNETES_SERVICE_HOST"]
        host = f"[{host}]" if ":" in host else host  # IPv6 service address
        server = f"https://{host}:{env.get('KUBERNETES_SERVICE_PORT', '443')}"
    if not server:
        return None
    ca_file = env.get("INSTRUCTUNE_K8S_CA_FILE", IN_CLUSTER_CA)
    return StatusEndpoint(
        server=server,
        namespace=run.namespace,
        name=run.name,
        token_file=env.get("INSTRUCTUNE_K8S_TOKEN_FILE", IN_CLUSTER_TOKEN),
        ca_file=ca_file if ca_file and Path(ca_file).is_file() else None,
    )


class StatusPatcher:
    """JSON merge patches of the tune's status; errors are logged and swallowed."""

    def __init__(self, endpoint: StatusEndpoint, timeout_s: float = 10.0):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.failures = 0
        self.successes = 0
        # The cluster CA when given (in-cluster, or INSTRUCTUNE_K8S_CA_FILE), else the system's.
        self._tls = ssl.create_default_context(cafile=endpoint.ca_file) if endpoint.ca_file else True

    def patch(self, status: dict[str, Any]) -> bool:
        import httpx

        try:
            token = Path(self.endpoint.token_file).read_text().strip()
        except OSError as err:
            self.failures += 1
            log.warning(
                "status patch skipped: cannot read token file %s: %s", self.endpoint.token_file, err.strerror
            )
            return False
        try:
            response = httpx.patch(
                self.endpoint.url,
                content=json.dumps({"status": status}, allow_nan=False).encode(),
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": MERGE_PATCH,
                    "Accept": "application/json",
                },
                verify=self._tls,
                timeout=self.timeout_s,
            )
        except (httpx.HTTPError, OSError, ValueError) as err:
            self.failures += 1
            # The exception text names the URL at most, never the headers.
            log.warning(
                "status patch of %s/%s failed: %s",
                self.endpoint.namespace,
                self.endpoint.name,
                type(err).__name__ + ": " + str(err),
            )
            return False
        if response.status_code >= 300:
            self.failures += 1
            log.warning(
                "status patch of %s/%s refused: HTTP %s %s",
                self.endpoint.namespace,
                self.endpoint.name,
                response.status_code,
                response.text[:300],
            )
            return False
        self.successes += 1
        return True


# ---------------------------------------------------------------------------------------------
# The reporter the training loop calls
# ---------------------------------------------------------------------------------------------


@dataclass
class ProgressReporter:
    """Rank 0's reporter. `metrics_uri`/`progress_uri` are S3 (or local) locations; `write` is
    artifacts.write_bytes (injected so this module needs no S3 client of its own)."""

    metrics_uri: str
    progress_uri: str
    total_steps: int
    write: Any  # Callable[[str, bytes, str], None]
    patcher: StatusPatcher | None = None
    min_interval_s: float = 10.0
    keep_checkpoints: int = 3
    attempt_id: str = ""
    metric_lines: list[str] = field(default_factory=list)
    checkpoints: list[CheckpointPayload] = field(default_factory=list)
    progress: ProgressPayload = field(default_factory=lambda: ProgressPayload())
    _last_flush: float = 0.0
    _dirty: bool = False
    _started: float = field(default_factory=time.monotonic)
    _start_step: int = 0
    _pending_status: dict[str, Any] = field(default_factory=dict)

    def start(
        self,
        start_step: int,
        previous_metrics: str = "",
        previous_checkpoints: list[CheckpointPayload] | None = None,
        data: dict[str, Any] | None = None,
        lineage: dict[str, Any] | None = None,
    ) -> None:
        """A (re)started run: keep the metrics lines of earlier attempts (the file is the run's
        history; a resumed run repeats at most the steps after its checkpoint, and the lines say
        which attempt wrote them), and publish data statistics and lineage once."""
        self.metric_lines = [line for line in previous_metrics.splitlines() if line.strip()]
        self.checkpoints = list(previous_checkpoints or [])[-self.keep_checkpoints :]
        self._start_step = start_step
        self._started = time.monotonic()
        self.progress = {
            "step": start_step,
            "totalSteps": self.total_steps,
            "percent": self._percent(start_step),
        }
        status: dict[str, Any] = {"progress": self.progress, "checkpoints": self.checkpoints}
        if data is not None:
            status["data"] = data
        if lineage is not None:
            status["lineage"] = lineage
        self._pending_status.update(status)
        self._dirty = True
        self.flush()

    def _percent(self, step: int) -> int:
        return int(100 * step / self.total_steps) if self.total_steps else 0

    def step(
        self, step: int, epoch: float, loss: float, learning_rate: float, tokens_per_second: float
    ) -> None:
        """One optimizer step done: a metrics line always, S3/status at most every min_interval_s."""
        line = {
            "step": step,
            "epoch": round(epoch, 4),
            "loss": round(loss, 6),
            "lr": learning_rate,
            "tokens_per_s": round(tokens_per_second, 1),
            "time": utc_now(),
            "attempt": self.attempt_id,
        }
        self.metric_lines.append(
            json.dumps(line, allow_nan=False) if math.isfinite(loss) else json.dumps({**line, "loss": None})
        )
        elapsed = time.monotonic() - self._started
        done_here = step - self._start_step
        eta = elapsed / done_here * (self.total_steps - step) if done_here > 0 else None
        self.progress = {
            "step": step,
            "totalSteps": self.total_steps,
            "epoch": round(epoch, 4),
            "loss": round(loss, 6) if math.isfinite(loss) else None,
            "learningRate": learning_rate,
            "tokensPerSecond": round(tokens_per_second, 1),
            "percent": self._percent(step),
            "eta": format_eta(eta),
        }
        self._pending_status["progress"] = self.progress
        self._dirty = True
        if time.monotonic() - self._last_flush >= self.min_interval_s:
            self.flush()

    def checkpoint(self, step: int, uri: str, loss: float | None) -> None:
        """A checkpoint is persisted: listed in progress.json and status.checkpoints at once."""
        ref: CheckpointPayload = {
            "step": step,
            "uri": uri,
            "loss": round(loss, 6) if loss is not None and math.isfinite(loss) else None,
            "time": utc_now(),
        }
        self.checkpoints = [c for c in self.checkpoints if c["step"] != step] + [ref]
        self.checkpoints = self.checkpoints[-self.keep_checkpoints :]
        self._pending_status["checkpoints"] = self.checkpoints
        self._pending_status["progress"] = self.progress
        self._dirty = True
        self.flush()

    def finish(self, extra_status: dict[str, Any] | None = None) -> None:
        if extra_status:
            self._pending_status.update(extra_status)
        self.progress["eta"] = format_eta(0)
        self._pending_status["progress"] = self.progress
        self._dirty = True
        self.flush()

    def flush(self) -> None:
        """Write metrics.jsonl and progress.json, then patch the status; neither may fail training."""
        if not self._dirty:
            return
        self._last_flush = time.monotonic()
        self._dirty = False
        try:
            self.write(
                self.metrics_uri, ("\n".join(self.metric_lines) + "\n").encode(), "application/x-ndjson"
            )
            document = {"progress": self.progress, "checkpoints": self.checkpoints, "updated": utc_now()}
            self.write(self.progress_uri, json.dumps(document, indent=2).encode(), "application/json")
        except Exception as err:  # reporting must never stop training
            log.warning("writing progress to %s failed: %s", self.progress_uri, err)
        if self.patcher is not None and self._pending_status:
            status = {k: v for k, v in self._pending_status.items()}
            if self.patcher.patch(status):
                self._pending_status.clear()
