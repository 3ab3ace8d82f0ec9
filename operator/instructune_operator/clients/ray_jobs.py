"""The Ray Jobs API (dashboard HTTP) of a tune's Ray cluster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from instructune_operator.metrics import RAY_SUBMISSIONS, SubmissionOutcome

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class JobInfo:
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    message: str
    exit_code: int | None = None  # the entrypoint's, once it has exited


class RayJobs:
    def __init__(self, address: str, token: str | None = None, timeout: float = 10.0) -> None:
        # Ray's token authentication: the token travels only in this header, never in job info.
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=address.rstrip("/"), timeout=timeout, headers=headers)

    def get(self, submission_id: str) -> JobInfo | None:
        response = self.http.get(f"/api/jobs/{submission_id}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        body = response.json()
        return JobInfo(
            status=body["status"], message=body.get("message") or "", exit_code=body.get("driver_exit_code")
        )

    def submit(
        self,
        submission_id: str,
        entrypoint: str,
        env_vars: dict[str, str],
        metadata: dict[str, str],
        entrypoint_num_cpus: float = 0,
    ) -> None:
        """Submits once: the submission id is deterministic, so a repeat after a restart is a no-op.
        Counted by outcome: submitted, exists (Ray had the id already), failed (raised)."""
        try:
            outcome = self._submit(submission_id, entrypoint, env_vars, metadata, entrypoint_num_cpus)
        except Exception:
            RAY_SUBMISSIONS.labels("failed").inc()
            raise
        RAY_SUBMISSIONS.labels(outcome).inc()

    def _submit(
        self,
        submission_id: str,
        entrypoint: str,
        env_vars: dict[str, str],
        metadata: dict[str, str],
        entrypoint_num_cpus: float,
    ) -> SubmissionOutcome:
        if self.get(submission_id) is not None:
            return "exists"
        payload: dict[str, Any] = {
            "entrypoint": entrypoint,
            "submission_id": submission_id,
            "runtime_env": {"env_vars": env_vars},
            "metadata": metadata,
            "entrypoint_num_cpus": entrypoint_num_cpus,
        }
        response = self.http.post("/api/jobs/", json=payload)
        if response.status_code < 400:
            return "submitted"
        # Refused, but the job is there: a submission of the same id got in first.
        if self.get(submission_id) is None:
            raise RuntimeError(f"Ray job submission failed ({response.status_code}): {response.text[:500]}")
        return "exists"

    def stop(self, submission_id: str) -> None:
        response = self.http.post(f"/api/jobs/{submission_id}/stop")
        if response.status_code not in (200, 404):
            response.raise_for_status()

    def logs_tail(self, submission_id: str, lines: int = 20) -> str:
        response = self.http.get(f"/api/jobs/{submission_id}/logs")
        if response.status_code != 200:
            return ""
        return "\n".join(str(response.json().get("logs", "")).splitlines()[-lines:])

    def serve_ready_replicas(self, app: str) -> int | None:
        """Running replicas of a Ray Serve application, None when it does not exist."""
        response = self.http.get("/api/serve/applications/")
        if response.status_code != 200:
            return None
        application = response.json().get("applications", {}).get(app)
        if application is None:
            return None
        if application.get("status") != "RUNNING":
            return 0
        return sum(
            sum(1 for r in d.get("replicas", []) if r.get("state") == "RUNNING")
            for d in application.get("deployments", {}).values()
        )
