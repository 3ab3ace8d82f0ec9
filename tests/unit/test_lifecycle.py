from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from instructune_jobs.contract import PERMANENT_EXIT_REASONS, ExitCode, permanent_reason
from instructune_operator.api import InstructionTuneSpec, InstructionTuneStatus
from instructune_operator.lifecycle import Observation, decide, diagnose_pods
from instructune_operator.naming import submission_id

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
READY = {"status": {"state": "ready"}}


def _spec(**changes: Any) -> InstructionTuneSpec:
    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    spec.update(changes)
    return InstructionTuneSpec.model_validate(spec)


def _obs(
    status: dict[str, Any] | None = None, spec: InstructionTuneSpec | None = None, **kw: Any
) -> Observation:
    return Observation(
        namespace="ns",
        name="tune",
        uid="0123456789ab",
        generation=1,
        spec=spec or _spec(),
        spec_errors=[],
        status=InstructionTuneStatus.model_validate(status or {}),
        now=kw.pop("now", NOW),
        **kw,
    )


def _cond(status: dict[str, Any], type_: str) -> tuple[str, str]:
    c = next(c for c in status["conditions"] if c["type"] == type_)
    return c["status"], c["reason"]


def test_new_tune_creates_children_and_waits_for_the_cluster() -> None:
    d = decide(_obs())
    assert d.ensure_children and d.submit is None
    assert d.status["phase"] == "Provisioning"
    assert _cond(d.status, "ClusterReady") == ("False", "Provisioning")


def test_ready_cluster_gets_exactly_one_deterministic_submission() -> None:
    d = decide(_obs(cluster=READY))
    assert d.submit == submission_id("ns", "tune", "0123456789ab", 1)
    assert d.status["attempts"] == 1 and d.status["jobId"] == d.submit
    again = decide(_obs(status=d.status, cluster=READY, job_status="RUNNING"))
    assert again.submit is None
    assert again.status["phase"] == "Training"


def test_job_unknown_to_ray_is_resubmitted_under_the_same_id() -> None:
    first = decide(_obs(cluster=READY))
    lost = decide(_obs(status=first.status, cluster=READY, job_status=None))
    assert lost.submit == first.submit and lost.status["attempts"] == 1


def test_unschedulable_worker_surfaces_the_scheduler_message() -> None:
    pods = [
        {
            "metadata": {"name": "w-0"},
            "status": {
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/6 nodes are available: 2 Insufficient nvidia.com/gpu.",
                    }
                ]
            },
        }
    ]
    d = decide(_obs(cluster={"status": {}}, pods=pods))
    status, reason = _cond(d.status, "ClusterReady")
    assert (status, reason) == ("False", "Unschedulable")
    assert (
        "Insufficient nvidia.com/gpu"
        in next(c for c in d.status["conditions"] if c["type"] == "ClusterReady")["message"]
    )


def test_image_pull_and_oom_are_diagnosed() -> None:
    pull = {
        "metadata": {"name": "h"},
        "status": {
            "containerStatuses": [
                {
                    "name": "ray-head",
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}},
                }
            ]
        },
    }
    oom = {
        "metadata": {"name": "w"},
        "status": {
            "containerStatuses": [
                {
                    "name": "ray-worker",
                    "state": {"running": {}},
                    "lastState": {"terminated": {"reason": "OOMKilled"}},
                }
            ]
        },
    }
    assert diagnose_pods([pull]) == ("ImagePullBackOff", "pod h: not found")
    assert diagnose_pods([oom])[0] == "OOMKilled"  # type: ignore[index]


def test_failed_job_is_retried_from_checkpoint_until_the_backoff_limit_then_fails_with_the_reason() -> None:
    spec = _spec(backoffLimit=1)
    d = decide(_obs(spec=spec, cluster=READY))
    d = decide(_obs(status=d.status, spec=spec, cluster=READY, job_status="FAILED", job_message="boom"))
    assert d.submit == submission_id("ns", "tune", "0123456789ab", 2)
    assert _cond(d.status, "Training") == ("True", "Retrying")  # why attempt 1 failed stays readable
    d = decide(
        _obs(
            status=d.status,
            spec=spec,
            cluster=READY,
            job_status="FAILED",
            job_message="boom again",
            job_log_tail="Traceback: ValueError: bad row",
        )
    )
    assert d.submit is None
    assert d.status["phase"] == "Failed"
    assert _cond(d.status, "Succeeded") == ("False", "BackoffLimitExceeded")
    assert (
        "ValueError: bad row" in next(c for c in d.status["conditions"] if c["type"] == "Training")["message"]
    )
    assert d.delete_cluster


def test_suspend_tears_the_cluster_down_and_stops_the_job() -> None:
    running = decide(_obs(cluster=READY)).status
    d = decide(_obs(status=running, spec=_spec(suspend=True), cluster=READY, job_status="RUNNING"))
    assert d.status["phase"] == "Suspended"
    assert d.delete_cluster and d.stop_job == running["jobId"] and not d.ensure_children


def test_resume_after_suspend_submits_the_next_attempt() -> None:
    running = decide(_obs(cluster=READY)).status
    suspended = decide(_obs(status=running, spec=_spec(suspend=True), job_status="STOPPED")).status
    d = decide(_obs(status=suspended, cluster=READY, job_status="STOPPED"))
    assert d.submit == submission_id("ns", "tune", "0123456789ab", 2)


def test_active_deadline_fails_the_tune() -> None:
    running = decide(_obs(cluster=READY, spec=_spec(activeDeadlineSeconds=600))).status
    later = NOW + timedelta(seconds=601)
    d = decide(
        _obs(
            status=running,
            spec=_spec(activeDeadlineSeconds=600),
            cluster=READY,
            job_status="RUNNING",
            now=later,
        )
    )
    assert d.status["phase"] == "Failed" and d.stop_job == running["jobId"]
    assert _cond(d.status, "Succeeded") == ("False", "DeadlineExceeded")


def _succeeded(metrics: dict[str, float], spec: InstructionTuneSpec | None = None) -> dict[str, Any]:
    status = decide(_obs(cluster=READY, spec=spec)).status
    status["evaluation"] = {"metrics": metrics, "baseMetrics": {"heldout.jsonSchema": 0.0}}
    return decide(_obs(status=status, cluster=READY, job_status="SUCCEEDED", spec=spec)).status


def test_failed_gate_never_deploys() -> None:
    status = _succeeded({"heldout.jsonSchema": 0.5})
    assert status["phase"] == "Failed"
    assert _cond(status, "EvalPassed") == ("False", "GateFailed")
    assert (
        "heldout.jsonSchema=0.5 (needs >= 0.8) FAIL"
        in next(c for c in status["conditions"] if c["type"] == "EvalPassed")["message"]
    )


def test_passed_gate_deploys_then_succeeds_when_serving_is_available() -> None:
    status = _succeeded({"heldout.jsonSchema": 0.95})
    assert status["phase"] == "Deploying" and status["evaluation"]["passed"] is True
    d = decide(_obs(status=status, serving_ready_replicas=0))
    assert d.deploy and d.status["phase"] == "Deploying"
    d = decide(_obs(status=d.status, serving_ready_replicas=1))
    assert d.status["phase"] == "Succeeded"
    assert _cond(d.status, "Serving") == ("True", "Available")


def test_finished_tune_is_deleted_after_its_ttl() -> None:
    spec = _spec(ttlSecondsAfterFinished=60, serving={"enabled": False})
    status = _succeeded({"heldout.jsonSchema": 0.95}, spec)
    assert status["phase"] == "Succeeded"
    assert not decide(_obs(status=status, spec=spec, now=NOW + timedelta(seconds=30))).delete_tune
    assert decide(_obs(status=status, spec=spec, now=NOW + timedelta(seconds=61))).delete_tune


def test_a_tune_served_by_ray_serve_keeps_its_ray_cluster_but_a_failed_one_does_not() -> None:
    status = _succeeded({"heldout.jsonSchema": 0.95})
    d = decide(_obs(status=status, cluster=READY, serving_ready_replicas=1))
    assert d.status["phase"] == "Succeeded" and not d.delete_cluster
    failed = _succeeded({"heldout.jsonSchema": 0.1})
    assert decide(_obs(status=failed, cluster=READY)).delete_cluster


def test_resuming_after_a_suspension_does_not_use_up_the_backoff_limit() -> None:
    spec = {"backoffLimit": 0}
    status = decide(_obs(cluster=READY, spec=_spec(**spec))).status
    for resume in (1, 2, 3):
        status = decide(_obs(status=status, spec=_spec(suspend=True, **spec), job_status="RUNNING")).status
        d = decide(_obs(status=status, spec=_spec(**spec), cluster=READY, job_status="STOPPED"))
        assert d.submit == submission_id("ns", "tune", "0123456789ab", resume + 1)
        assert d.status["resumes"] == resume and _cond(d.status, "Training") == ("True", "Resumed")
        status = decide(_obs(status=d.status, spec=_spec(**spec), cluster=READY, job_status="RUNNING")).status
    failed = decide(_obs(status=status, spec=_spec(**spec), cluster=READY, job_status="FAILED"))
    assert failed.status["phase"] == "Failed", "the one real failure still fails a backoffLimit-0 tune"


def test_a_job_stopped_by_someone_else_counts_as_a_failure() -> None:
    running = decide(_obs(cluster=READY, spec=_spec(backoffLimit=0))).status
    d = decide(_obs(status=running, spec=_spec(backoffLimit=0), cluster=READY, job_status="STOPPED"))
    assert d.status["phase"] == "Failed" and d.submit is None


def test_a_job_that_says_a_retry_would_fail_the_same_way_is_not_retried() -> None:
    running = decide(_obs(cluster=READY, spec=_spec(backoffLimit=3))).status
    d = decide(
        _obs(
            status=running,
            spec=_spec(backoffLimit=3),
            cluster=READY,
            job_status="FAILED",
            job_exit_code=3,
            job_message="Job entrypoint command failed with exit code 3",
            job_log_tail="the checkpoint at s3://a/checkpoints/... was written by config 1234",
        )
    )
    assert d.submit is None and d.status["phase"] == "Failed" and d.delete_cluster
    assert _cond(d.status, "Succeeded") == ("False", "CheckpointConfigMismatch")
    assert (
        "written by config" in next(c for c in d.status["conditions"] if c["type"] == "Training")["message"]
    )


def test_a_job_that_crashed_is_retried_from_its_checkpoint() -> None:
    running = decide(_obs(cluster=READY, spec=_spec(backoffLimit=3))).status
    d = decide(
        _obs(
            status=running,
            spec=_spec(backoffLimit=3),
            cluster=READY,
            job_status="FAILED",
            job_exit_code=1,
            job_message="Job entrypoint command failed with exit code 1",
            job_log_tail="RuntimeError: Connection reset by peer",
        )
    )
    assert d.submit == submission_id("ns", "tune", "0123456789ab", 2)
    assert d.status["attempts"] == 2 and d.status["phase"] == "Training"
    # Why the attempt failed stays in status (and in the Retrying event), not only in Ray's log.
    training = next(c for c in d.status["conditions"] if c["type"] == "Training")
    assert (training["status"], training["reason"]) == ("True", "Retrying")
    assert "Connection reset by peer" in training["message"] and "attempt 2 resumes" in training["message"]


def test_a_job_failing_with_a_permanent_exit_code_fails_the_tune_without_a_retry() -> None:
    for code, reason in PERMANENT_EXIT_REASONS.items():
        assert permanent_reason(int(code)) == reason
    assert permanent_reason(int(ExitCode.FAILED)) is None and permanent_reason(None) is None
    assert permanent_reason(137) is None  # killed: worth a retry


def test_the_diagnosis_does_not_depend_on_the_order_pods_are_listed_in() -> None:
    def unschedulable(name: str, message: str) -> dict[str, Any]:
        condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
        return {"metadata": {"name": name}, "status": {"conditions": [condition]}}

    head = unschedulable("tune-head-x", "0/6 nodes are available: 6 node(s) didn't match selector.")
    worker = unschedulable("tune-worker-y", "0/6 nodes are available: 2 Insufficient nvidia.com/gpu.")
    assert diagnose_pods([head, worker]) == diagnose_pods([worker, head])


def test_a_job_gone_with_the_cluster_its_suspension_deleted_resumes_as_the_next_attempt() -> None:
    running = decide(_obs(cluster=READY)).status
    suspended = decide(_obs(status=running, spec=_spec(suspend=True), job_status="RUNNING")).status
    # Resumed: the new cluster is not ready yet, and Ray knows nothing of the old job.
    waiting = decide(_obs(status=suspended, cluster=None, job_status=None))
    assert waiting.submit is None and waiting.ensure_children
    d = decide(_obs(status=suspended, cluster=READY, job_status=None))
    assert d.submit == submission_id("ns", "tune", "0123456789ab", 2)
    assert d.status["attempts"] == 2 and d.status["resumes"] == 1
    assert _cond(d.status, "Training") == ("True", "Resumed")


def test_a_preempted_attempt_resumes_without_using_up_the_backoff_limit() -> None:
    spec = _spec(backoffLimit=0)
    status = decide(_obs(cluster=READY, spec=spec)).status
    for attempt in (2, 3):
        d = decide(_obs(status=status, spec=spec, cluster=READY, job_status="FAILED", job_exit_code=6))
        assert (
            d.submit == submission_id("ns", "tune", "0123456789ab", attempt)
            and d.status["phase"] == "Training"
        )
        assert _cond(d.status, "Training") == ("True", "Preempted")
        status = decide(_obs(status=d.status, spec=spec, cluster=READY, job_status="RUNNING")).status
    crashed = decide(_obs(status=status, spec=spec, cluster=READY, job_status="FAILED", job_exit_code=1))
    assert crashed.status["phase"] == "Failed", "a crash still fails a backoffLimit-0 tune"


def test_a_training_tune_whose_ray_head_does_not_answer_keeps_training_and_submits_nothing() -> None:
    running = decide(_obs(cluster=READY)).status
    d = decide(_obs(status=running, cluster=READY, job_unreachable=True))
    assert d.submit is None and d.status["phase"] == "Training"
    assert _cond(d.status, "Training") == ("True", "Running")


def test_the_decision_records_the_ray_cluster_it_creates() -> None:
    d = decide(_obs())
    assert d.status["rayCluster"] == {
        "name": "tune-ray",
        "dashboardUrl": "http://tune-ray-head-svc.ns.svc:8265",
    }


def test_a_vllm_rollout_records_the_adapter_it_replaces_for_a_rollback() -> None:
    spec = _spec(serving={"enabled": True, "runtime": "vllm", "target": "shared"})
    deploying = {"phase": "Deploying", "data": {"templateHash": "h"}}
    earlier = "s3://artifacts/earlier/final/adapter/"
    d = decide(_obs(status=deploying, spec=spec, deployed_adapter=earlier, serving_ready_replicas=0))
    assert d.deploy
    assert d.status["serving"]["previousAdapterUri"] == earlier
    assert d.status["serving"]["templateHash"] == "h"
    assert d.status["serving"]["endpoint"] == "http://shared-serve.ns.svc:8000/v1"
    own = spec.checkpointing.uri.rstrip("/") + "/final/adapter/"
    again = decide(_obs(status=d.status, spec=spec, deployed_adapter=own, serving_ready_replicas=0))
    assert again.status["serving"]["previousAdapterUri"] == earlier, "its own adapter replaces nothing"


def test_the_training_submission_is_part_of_the_decision() -> None:
    d = decide(_obs(cluster=READY))
    [submission] = d.submissions
    assert submission.submission_id == d.submit and submission.metadata["attempt"] == "1"
    assert submission.entrypoint.startswith("python -m instructune_jobs --config-json ")
    assert submission.job_identity
    assert decide(_obs(status=d.status, cluster=READY, job_status="RUNNING")).submissions == []


def test_a_ray_serve_rollout_is_a_submission_of_the_decision() -> None:
    status = _succeeded({"heldout.jsonSchema": 0.95})
    d = decide(_obs(status=status, serving_ready_replicas=0))
    [submission] = d.submissions
    assert submission.submission_id == "serve-ns-tune-serve-01234567"
    assert "--name tune-serve" in submission.entrypoint and not submission.job_identity


def test_the_decision_holds_the_whole_status_as_the_api_models_and_patches_its_wire_form() -> None:
    from instructune_operator.api import InstructionTuneStatus, Reason

    d = decide(_obs(cluster=READY))
    assert isinstance(d.desired, InstructionTuneStatus)
    assert d.desired.phase == "Training" and d.desired.conditions[-1].reason is Reason.SUBMITTED
    assert d.status == InstructionTuneStatus.model_validate(d.status).model_dump(
        by_alias=True, exclude_unset=True, mode="json"
    )
    assert (
        d.status["conditions"][-1]["reason"] == "Submitted"
        and type(d.status["conditions"][-1]["reason"]) is str
    )
