"""Pure lifecycle decision: what the tune's status should say and what the operator must do next.

`decide` looks at one observation (spec, current status, the Ray cluster and its pods, the Ray
job, the serving rollout) and returns the whole new status plus the actions to take. It is the one
writer of the status: `reconcile.act` carries the actions out and never edits it. It never talks to
anything, so every transition is unit-tested, and running it twice on the same observation gives
the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from instructune_jobs.contract import ExitCode, permanent_reason
from instructune_operator.api import (
    CONDITION_CLUSTER_READY,
    CONDITION_EVAL_PASSED,
    CONDITION_EVALUATED,
    CONDITION_READY,
    CONDITION_SERVING,
    CONDITION_SUCCEEDED,
    CONDITION_TRAINING,
    PHASE_DEPLOYING,
    PHASE_EVALUATING,
    PHASE_FAILED,
    PHASE_PROVISIONING,
    PHASE_SUCCEEDED,
    PHASE_SUSPENDED,
    PHASE_TRAINING,
    TERMINAL_PHASES,
    ConditionStatus,
    ConditionType,
    EvaluationStatus,
    InstructionTuneSpec,
    InstructionTuneStatus,
    Phase,
    RayClusterRef,
    Reason,
    ServingStatus,
)
from instructune_operator.builders.serving import artifact_layout, endpoint
from instructune_operator.builders.submissions import RaySubmission, serve_submission, train_submission
from instructune_operator.gate import evaluate_gate
from instructune_operator.naming import ray_address, ray_cluster_name, serving_name, submission_id
from instructune_operator.settings import Settings
from instructune_operator.status import compute_validation_status, get_condition, set_condition, wire

# Ray's job states (ray.job_submission.JobStatus).
JobStatus = Literal["PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"]
JOB_RUNNING: tuple[JobStatus, ...] = ("PENDING", "RUNNING")


@dataclass(frozen=True)
class Observation:
    """What one pass saw; nothing in it is inferred (that is `decide`'s job)."""

    namespace: str
    name: str
    uid: str
    generation: int | None
    spec: InstructionTuneSpec | None
    spec_errors: list[str]
    status: InstructionTuneStatus
    now: datetime
    cluster: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    job_status: JobStatus | None = None  # Ray job status of status.jobId; None: unknown to Ray
    job_unreachable: bool = False  # Ray's Jobs API did not answer: job_status is not known
    job_message: str = ""
    job_log_tail: str = ""
    job_exit_code: int | None = None  # the job driver's exit code, once it has ended
    serving_ready_replicas: int | None = None  # None: no serving Deployment observed
    # The adapter the live serving Deployment of the target serves (any tune's): what a rollout
    # replaces, recorded for a rollback. None: no Deployment, or not read this pass.
    deployed_adapter: str | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """The tune's metadata as the builders take it."""
        return {"namespace": self.namespace, "name": self.name, "uid": self.uid}


@dataclass
class Decision:
    desired: InstructionTuneStatus  # the whole status the tune should show: its one writer
    ensure_children: bool = False
    delete_cluster: bool = False
    submit: str | None = None  # submission id of the training attempt to submit (idempotent)
    attempt: int = 0
    submissions: list[RaySubmission] = field(default_factory=list)  # what act sends to Ray, in order
    stop_job: str | None = None
    delete_tune: bool = False
    deploy: bool = False

    @property
    def status(self) -> dict[str, Any]:
        """The desired status in its wire form (what reconcile compares and patches)."""
        return wire(self.desired)


def _ts(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class _Status:
    """Small helper that keeps condition bookkeeping readable in `decide`."""

    def __init__(self, obs: Observation, status: InstructionTuneStatus, settings: Settings) -> None:
        self.obs, self.s, self.settings = obs, status, settings

    def cond(self, type_: ConditionType, status: ConditionStatus, reason: Reason, message: str = "") -> None:
        self.s.conditions = set_condition(
            self.s.conditions,
            type_,
            status,
            reason,
            message,
            _ts(self.obs.now),
            self.obs.generation,
        )

    def phase(self, phase: Phase) -> None:
        self.s.phase = phase

    def finish(self, phase: Phase, reason: Reason, message: str) -> None:
        self.phase(phase)
        if self.s.finished_at is None:
            self.s.finished_at = _ts(self.obs.now)
        succeeded: ConditionStatus = "True" if phase == PHASE_SUCCEEDED else "False"
        self.cond(CONDITION_READY, succeeded, reason, message)
        self.cond(CONDITION_SUCCEEDED, succeeded, reason, message)


# The kubelet's container state reasons that stop a Ray pod; our reasons repeat the kubelet's names.
_PULL_FAILURES = ("ErrImagePull", Reason.IMAGE_PULL_BACK_OFF, "InvalidImageName")


def diagnose_pods(pods: list[dict[str, Any]]) -> tuple[Reason, str] | None:
    """The first reason a Ray pod cannot run, as (reason, message), e.g. unschedulable in the pool.
    Pods are taken in name order: a watch cache has none, and a message that flips between the
    head's and a worker's would rewrite the status and post an event on every pass."""
    for pod in sorted(pods, key=lambda p: str(p.get("metadata", {}).get("name", ""))):
        name = pod.get("metadata", {}).get("name", "?")
        for cond in pod.get("status", {}).get("conditions", []):
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return Reason.UNSCHEDULABLE, f"pod {name}: {cond.get('message', cond.get('reason', ''))}"
        for cs in pod.get("status", {}).get("containerStatuses", []):
            waiting = cs.get("state", {}).get("waiting") or {}
            if waiting.get("reason") in _PULL_FAILURES:
                return Reason.IMAGE_PULL_BACK_OFF, f"pod {name}: {waiting.get('message', waiting['reason'])}"
            if waiting.get("reason") == Reason.CRASH_LOOP_BACK_OFF:
                return Reason.CRASH_LOOP_BACK_OFF, f"pod {name}: container {cs.get('name')} keeps crashing"
            terminated = (
                cs.get("lastState", {}).get("terminated") or cs.get("state", {}).get("terminated") or {}
            )
            if terminated.get("reason") == Reason.OOM_KILLED:
                return (
                    Reason.OOM_KILLED,
                    f"pod {name}: container {cs.get('name')} was killed for exceeding its memory",
                )
    return None


def cluster_ready(cluster: dict[str, Any] | None) -> bool:
    return bool(cluster) and (cluster or {}).get("status", {}).get("state") == "ready"


def decide(obs: Observation, cleanup_cluster: bool = True, settings: Settings | None = None) -> Decision:
    """The whole desired status and the actions of one pass. `settings` shapes what the status
    records of the children (the Ray address, the serving endpoint); `cleanup_cluster` is
    Settings.delete_cluster_after_finish."""
    return _decide(_assume_job_status(obs), cleanup_cluster, settings or Settings())


def _assume_job_status(obs: Observation) -> Observation:
    """A Jobs API that does not answer (a head starting or gone) leaves a training tune's job
    running, until the next pass asks again; any other tune's job is unknown."""
    if not obs.job_unreachable:
        return obs
    running = obs.status.phase in (PHASE_TRAINING, PHASE_EVALUATING)
    return replace(obs, job_status="RUNNING" if running else None)


def template_hash(status: InstructionTuneStatus) -> str:
    """The chat template's hash the job trained with (status.data, written by the job)."""
    return (status.data.template_hash if status.data else None) or ""


def rollout_status(
    meta: dict[str, Any],
    spec: InstructionTuneSpec,
    settings: Settings,
    status: InstructionTuneStatus,
    deployed_adapter: str | None,
) -> dict[str, Any]:
    """status.serving of a rollout: where it serves, what, and (vLLM) the adapter it replaces."""
    name = serving_name(meta["name"], spec.serving.target)
    served = spec.serving.target or meta["name"]
    if spec.serving.runtime == "ray-serve":
        address = ray_address(settings, meta["namespace"], meta["name"])
        host = address.split("://", 1)[-1].split(":")[0]
        return {
            "endpoint": f"http://{host}:{settings.ray_serve_http_port}/{name}/v1",
            "model": served,
            "templateHash": template_hash(status),
        }
    previous = status.serving.previous_adapter_uri if status.serving else None
    if deployed_adapter and deployed_adapter != artifact_layout(spec)["weights"]:
        previous = deployed_adapter  # the adapter this rollout replaces: what a rollback goes back to
    return {
        "endpoint": endpoint(meta, spec),
        "model": served,
        "templateHash": template_hash(status),
        "previousAdapterUri": previous,
    }


@dataclass
class _Pass:
    """One decision in the making: what every step reads, and the decision the steps fill in."""

    obs: Observation
    st: _Status
    decision: Decision
    spec: InstructionTuneSpec
    cleanup_cluster: bool
    # Ray Serve serves from the tune's own Ray cluster: a tune it serves keeps it after success.
    cleanup_after_success: bool

    @property
    def status(self) -> InstructionTuneStatus:
        return self.st.s

    @property
    def job_active(self) -> bool:
        return self.status.job_id is not None and self.obs.job_status in JOB_RUNNING


def _decide(obs: Observation, cleanup_cluster: bool, settings: Settings) -> Decision:
    status = compute_validation_status(obs.status, obs.generation, obs.spec_errors, _ts(obs.now))
    decision = Decision(desired=status)
    spec = obs.spec
    if spec is None:
        return decision
    served_by_ray = spec.serving.enabled and spec.serving.runtime == "ray-serve"
    p = _Pass(
        obs,
        _Status(obs, status, settings),
        decision,
        spec,
        cleanup_cluster,
        cleanup_cluster and not served_by_ray,
    )
    # The steps of a pass in order (as KubeRay's reconcile list): the first that settles it ends it.
    steps = (
        _finished, _suspended, _past_deadline, _deploying_step, _provisioning, _first_submission,
        _resumed_after_suspension, _job_running, _job_succeeded, _job_ended,
    )  # fmt: skip
    for step in steps:
        if step(p):
            break
    return decision


def _finished(p: _Pass) -> bool:
    """Finished tunes keep their status; the cluster goes, and the tune itself after its TTL."""
    status, decision = p.status, p.decision
    if status.phase not in TERMINAL_PHASES:
        return False
    cleanup = p.cleanup_after_success if status.phase == PHASE_SUCCEEDED else p.cleanup_cluster
    decision.delete_cluster = cleanup and p.obs.cluster is not None
    if p.job_active:
        decision.stop_job = status.job_id
    ttl, finished = p.spec.ttl_seconds_after_finished, status.finished_at
    if ttl is not None and finished and p.obs.now >= _parse_ts(finished) + timedelta(seconds=ttl):
        decision.delete_tune = True
    return True


def _suspended(p: _Pass) -> bool:
    if not p.spec.suspend:
        return False
    p.st.phase(PHASE_SUSPENDED)
    p.st.cond(
        CONDITION_TRAINING,
        "False",
        Reason.SUSPENDED,
        "suspended: the Ray cluster is removed, checkpoints are kept",
    )
    p.st.cond(CONDITION_CLUSTER_READY, "False", Reason.SUSPENDED, "suspended")
    p.decision.delete_cluster = p.obs.cluster is not None
    if p.job_active:
        p.decision.stop_job = p.status.job_id
    return True


def _past_deadline(p: _Pass) -> bool:
    started, deadline = p.status.started_at, p.spec.active_deadline_seconds
    if not (started and deadline and p.obs.now >= _parse_ts(started) + timedelta(seconds=deadline)):
        return False
    p.st.cond(
        CONDITION_TRAINING,
        "False",
        Reason.DEADLINE_EXCEEDED,
        f"activeDeadlineSeconds={deadline} exceeded",
    )
    p.st.finish(PHASE_FAILED, Reason.DEADLINE_EXCEEDED, f"the run exceeded activeDeadlineSeconds={deadline}")
    p.decision.stop_job = p.status.job_id if p.job_active else None
    p.decision.delete_cluster = p.cleanup_cluster
    return True


def _deploying_step(p: _Pass) -> bool:
    if p.status.phase != PHASE_DEPLOYING:
        return False
    _deploying(p.obs, p.st, p.decision, p.spec, p.cleanup_after_success)
    return True


def _provisioning(p: _Pass) -> bool:
    """Keeps the children applied; settles the pass while the cluster is not ready and no job runs."""
    obs, st, status = p.obs, p.st, p.status
    p.decision.ensure_children = True
    status.ray_cluster = RayClusterRef(
        name=ray_cluster_name(obs.name), dashboard_url=ray_address(st.settings, obs.namespace, obs.name)
    )
    if status.started_at is None:
        status.started_at = _ts(obs.now)
    if cluster_ready(obs.cluster):
        st.cond(CONDITION_CLUSTER_READY, "True", Reason.RAY_CLUSTER_READY, "the Ray cluster is ready")
        return False
    problem = diagnose_pods(obs.pods)
    reason, message = problem or (Reason.PROVISIONING, "waiting for the Ray cluster to become ready")
    st.cond(CONDITION_CLUSTER_READY, "False", reason, message)
    if p.job_active:
        return False
    st.phase(PHASE_PROVISIONING)
    return True


def _first_submission(p: _Pass) -> bool:
    attempts = p.status.attempts or 0
    if attempts and p.status.job_id is not None:
        return False
    _submit(p.obs, p.st, p.decision, p.spec, attempts + 1)
    return True


def _resumed_after_suspension(p: _Pass) -> bool:
    """STOPPED by a suspension, or gone with the Ray cluster the suspension deleted (Training=False/
    Suspended until the next submission): resuming is not a failure, so it does not use up the
    backoff limit. A cluster that is gone has no job to ask about: wait until the new one is ready."""
    obs, status = p.obs, p.status
    training = get_condition(status, CONDITION_TRAINING)
    if training is None or training.reason != Reason.SUSPENDED:
        return False
    if not (obs.job_status == "STOPPED" or (obs.job_status is None and cluster_ready(obs.cluster))):
        return False
    _resume(p, Reason.RESUMED, "resumes from the latest checkpoint")
    return True


def _resume(p: _Pass, reason: Reason, why: str) -> None:
    """The next attempt, not counted against the backoff limit."""
    attempts = p.status.attempts or 0
    p.status.resumes = (p.status.resumes or 0) + 1
    _submit(p.obs, p.st, p.decision, p.spec, attempts + 1)
    p.st.cond(CONDITION_TRAINING, "True", reason, f"attempt {attempts + 1} {why}")


def _job_running(p: _Pass) -> bool:
    obs, status = p.obs, p.status
    if obs.job_status is not None and obs.job_status not in JOB_RUNNING:
        return False
    attempts, job_id = status.attempts or 0, status.job_id or ""
    if obs.job_status is None:
        # Unknown to Ray (lost head, or the submission never landed): the same id again.
        _train(p.st, p.decision, p.spec, job_id, attempts)
    progress = status.progress
    evaluating = progress and progress.total_steps and (progress.step or 0) >= progress.total_steps
    p.st.phase(PHASE_EVALUATING if evaluating else PHASE_TRAINING)
    p.st.cond(
        CONDITION_TRAINING,
        "True",
        Reason.RUNNING,
        f"attempt {attempts} (backoffLimit {p.spec.backoff_limit}): job {job_id}",
    )
    return True


def _job_succeeded(p: _Pass) -> bool:
    if p.obs.job_status != "SUCCEEDED":
        return False
    _after_success(p.obs, p.st, p.decision, p.spec, p.cleanup_cluster, p.cleanup_after_success)
    return True


def _job_ended(p: _Pass) -> bool:
    """FAILED or STOPPED: retry from the latest checkpoint while the backoff limit allows, unless
    the job said a retry would end the same way."""
    obs, st, status = p.obs, p.st, p.status
    attempts = status.attempts or 0
    failed = obs.job_status == "FAILED"
    if failed and obs.job_exit_code == ExitCode.PREEMPTED:
        # A reclaimed node is not the run's failure: resume, as after a suspension.
        _resume(p, Reason.PREEMPTED, f"resumes from the latest checkpoint: attempt {attempts} lost a node")
        return True
    why = _failure_message(obs)
    exit_reason = permanent_reason(obs.job_exit_code) if failed else None
    if exit_reason:
        permanent = Reason(exit_reason)  # every permanent exit has its Reason (test_api)
        st.cond(CONDITION_TRAINING, "False", permanent, why)
        st.finish(PHASE_FAILED, permanent, f"attempt {attempts} failed and would fail again: {why}")
        p.decision.delete_cluster = p.cleanup_cluster
        return True
    failures = attempts - (status.resumes or 0)
    if failures <= p.spec.backoff_limit:
        _submit(obs, st, p.decision, p.spec, attempts + 1)
        # Set after the submission's own condition: why the attempt failed stays readable.
        st.cond(
            CONDITION_TRAINING,
            "True",
            Reason.RETRYING,
            f"attempt {attempts} failed ({why}); attempt {attempts + 1} resumes from the latest checkpoint",
        )
        return True
    st.cond(CONDITION_TRAINING, "False", Reason.JOB_FAILED, why)
    st.finish(PHASE_FAILED, Reason.BACKOFF_LIMIT_EXCEEDED, f"{failures} attempts failed; last: {why}")
    p.decision.delete_cluster = p.cleanup_cluster
    return True


def _failure_message(obs: Observation) -> str:
    parts = [obs.job_message.strip(), obs.job_log_tail.strip()]
    return " | ".join(p for p in parts if p)[-1500:] or f"job {obs.job_status}"


def _submit(
    obs: Observation, st: _Status, decision: Decision, spec: InstructionTuneSpec, attempt: int
) -> Decision:
    job_id = submission_id(obs.namespace, obs.name, obs.uid, attempt)
    st.s.attempts, st.s.job_id = attempt, job_id
    _train(st, decision, spec, job_id, attempt)
    st.phase(PHASE_TRAINING)
    st.cond(CONDITION_TRAINING, "True", Reason.SUBMITTED, f"attempt {attempt}: job {job_id} submitted")
    return decision


def _train(st: _Status, decision: Decision, spec: InstructionTuneSpec, job_id: str, attempt: int) -> None:
    """Submits a training attempt (again, under the same id, when Ray lost it)."""
    decision.submit, decision.attempt = job_id, attempt
    decision.submissions.append(train_submission(st.obs.meta, spec, st.settings, job_id, attempt))


def _roll_out(st: _Status, decision: Decision, spec: InstructionTuneSpec) -> None:
    """Keeps the serving rollout applied (vLLM's objects are builders.desired's, Ray Serve's
    application a submission) and records where it serves in status.serving."""
    decision.deploy = True
    obs, current = st.obs, st.s.serving
    rollout = rollout_status(obs.meta, spec, st.settings, obs.status, obs.deployed_adapter)
    st.s.serving = ServingStatus.model_validate({**(wire(current) if current else {}), **rollout})
    if spec.serving.runtime == "ray-serve":
        decision.submissions.append(serve_submission(obs.meta, spec, st.settings, template_hash(obs.status)))


def _after_success(
    obs: Observation,
    st: _Status,
    decision: Decision,
    spec: InstructionTuneSpec,
    cleanup: bool,
    cleanup_after_success: bool,
) -> Decision:
    st.cond(CONDITION_TRAINING, "False", Reason.COMPLETED, "training finished")
    evaluation = st.s.evaluation.model_copy() if st.s.evaluation else EvaluationStatus()
    metrics = evaluation.metrics
    if spec.evaluation.datasets or spec.evaluation.general_probe:
        if not metrics:
            why = "the job finished without reporting evaluation metrics"
            st.cond(CONDITION_EVALUATED, "False", Reason.NO_METRICS, why)
            st.finish(PHASE_FAILED, Reason.NO_METRICS, why)
            decision.delete_cluster = cleanup
            return decision
        st.cond(CONDITION_EVALUATED, "True", Reason.EVALUATED, f"{len(metrics)} metrics reported")
    verdict = evaluate_gate(spec.evaluation.gate, metrics, evaluation.base_metrics)
    evaluation.passed, evaluation.summary = verdict.passed, verdict.summary
    st.s.evaluation = evaluation
    if spec.evaluation.gate:
        if verdict.passed:
            st.cond(CONDITION_EVAL_PASSED, "True", Reason.GATE_PASSED, verdict.message)
        else:
            st.cond(CONDITION_EVAL_PASSED, "False", Reason.GATE_FAILED, verdict.message)
    if not verdict.passed:
        decision.delete_cluster = cleanup
        st.finish(PHASE_FAILED, Reason.GATE_FAILED, verdict.message)
        return decision
    decision.delete_cluster = cleanup_after_success
    if spec.serving.enabled:
        _roll_out(st, decision, spec)
        st.phase(PHASE_DEPLOYING)
        st.cond(CONDITION_SERVING, "False", Reason.ROLLING_OUT, "the serving deployment is rolling out")
        return decision
    st.finish(PHASE_SUCCEEDED, Reason.COMPLETED, "training and evaluation finished")
    return decision


def _deploying(
    obs: Observation, st: _Status, decision: Decision, spec: InstructionTuneSpec, cleanup: bool
) -> Decision:
    """After a passed gate: keep the serving objects applied until they are available."""
    decision.delete_cluster = cleanup and obs.cluster is not None
    ready = obs.serving_ready_replicas or 0
    serving = st.s.serving.model_copy() if st.s.serving else ServingStatus()
    serving.ready_replicas = ready
    st.s.serving = serving
    if not spec.serving.enabled:
        st.finish(PHASE_SUCCEEDED, Reason.COMPLETED, "serving was disabled before it rolled out")
    elif ready >= max(1, min(spec.serving.replicas, 1)):
        st.cond(
            CONDITION_SERVING,
            "True",
            Reason.AVAILABLE,
            f"{ready} serving replica(s) ready at {serving.endpoint or '?'}",
        )
        st.finish(PHASE_SUCCEEDED, Reason.SERVING, "tuned, evaluated and serving")
    if spec.serving.enabled:
        _roll_out(st, decision, spec)
    return decision
