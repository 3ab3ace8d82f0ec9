"""The chart's Argo CD health check (charts/instructune/argocd/health.lua), run by a real Lua 5.1.

Every status it is given is written by the operator's own decision (`lifecycle.decide`) from an
observation, so the fixtures cannot drift from what the operator writes; a phase added to the API
fails `test_every_phase_of_the_api_has_a_health` until the check maps it. The Lua runs as Argo CD
runs it: Lua 5.1 (gopher-lua), the object as the global `obj`, only the base and table libraries.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

import pytest
from lupa import lua51

from instructune_jobs.contract import ExitCode
from instructune_operator.api import API_VERSION, KIND, InstructionTuneSpec, InstructionTuneStatus, Phase
from instructune_operator.lifecycle import Observation, decide
from instructune_operator.status import compute_validation_status, wire

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
HEALTH_LUA = ROOT / "charts" / "instructune" / "argocd" / "health.lua"
# The statuses Argo CD accepts from a health check (any other becomes Unknown).
ARGO_CD_HEALTH = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}

# Argo CD opens the base, table, package and a safe os library for a custom health check, never
# string, math, io or debug (util/lua/lua.go, unless useOpenLibs): the check gets what it would get
# there, and strings lose their methods (("x"):sub needs the string library).
_SANDBOX = """
local script, obj = ...
local chunk = assert(loadstring(script, "=health.lua"))
local env = {obj = obj, table = table, _VERSION = _VERSION}
for _, name in ipairs({"assert", "error", "getmetatable", "ipairs", "next", "pairs", "pcall", "print",
    "rawequal", "rawget", "rawset", "select", "setmetatable", "tonumber", "tostring", "type", "unpack",
    "xpcall"}) do
  env[name] = _G[name]
end
env._G = env
setfenv(chunk, env)
getmetatable("").__index = nil
return chunk()
"""


def run_lua(script: str, obj: dict[str, Any]) -> dict[str, Any]:
    """What Argo CD would make of `obj` with `script`: the returned table as a dict."""
    lua = lua51.LuaRuntime(register_eval=False, register_builtins=False)
    result = lua.execute(_SANDBOX, script, lua.table_from(obj, recursive=True))
    assert lua.eval("type")(result) == "table", f"the check returned {result!r}, not a table"
    return dict(result.items())


def health(obj: dict[str, Any]) -> tuple[str, str]:
    result = run_lua(HEALTH_LUA.read_text(), obj)
    assert result["status"] in ARGO_CD_HEALTH, result
    assert isinstance(result.get("message"), str) and result["message"], result
    return result["status"], result["message"]


# ------------------------------------------------------------------- statuses the operator writes

NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
READY = {"status": {"state": "ready"}}
SPEC: dict[str, Any] = {
    "baseModel": {"uri": "s3://models/base/"},
    "dataset": {"train": [{"uri": "s3://datasets/train.jsonl"}]},
    "training": {"maxSteps": 400},
    "resources": {"gpuPool": "a100-80g", "workers": 2, "gpusPerWorker": 8},
    "checkpointing": {"uri": "s3://artifacts/ml-team/tune/"},
    "evaluation": {
        "datasets": [{"name": "heldout", "uri": "s3://datasets/heldout.jsonl"}],
        "metrics": [{"type": "jsonValid"}],
        "gate": [{"metric": "heldout.jsonValid", "min": 0.9}],
    },
    "serving": {"enabled": True, "runtime": "vllm", "target": "extractor"},
}


def spec(**changes: Any) -> InstructionTuneSpec:
    return InstructionTuneSpec.model_validate({**SPEC, **changes})


def observe(status: dict[str, Any] | None = None, **kw: Any) -> Observation:
    return Observation(
        namespace="ml-team",
        name="tune",
        uid="0123456789ab",
        generation=1,
        spec=kw.pop("spec", None) or spec(),
        spec_errors=[],
        status=InstructionTuneStatus.model_validate(status or {}),
        now=kw.pop("now", NOW),
        **kw,
    )


def step(status: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """The status the operator writes after one pass over this observation."""
    return decide(observe(status, **kw)).status


def tune(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    """The InstructionTune as Argo CD sees it."""
    obj: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "tune", "namespace": "ml-team", "generation": generation},
        "spec": SPEC,
    }
    if status is not None:
        obj["status"] = status
    return obj


def pod(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"name": "tune-ray-head-x"},
        "status": {"containerStatuses": [{"name": "ray-head", **state}]},
    }


def training(**progress: int) -> dict[str, Any]:
    running = step(step(cluster=READY), cluster=READY, job_status="RUNNING")
    return (
        step({**running, "progress": progress}, cluster=READY, job_status="RUNNING") if progress else running
    )


def after_the_job(metrics: dict[str, float], **kw: Any) -> dict[str, Any]:
    status = training(step=400, totalSteps=400, percent=100)
    if metrics:
        status["evaluation"] = {"metrics": metrics}
    return step(status, cluster=READY, job_status="SUCCEEDED", **kw)


def pending() -> dict[str, Any]:
    """Validated and nothing else yet: the status compute_validation_status starts a tune with (the
    same pass usually moves it on to Provisioning)."""
    return wire(compute_validation_status(InstructionTuneStatus(), 1, [], "2026-11-21T12:00:00Z"))


def deploying() -> dict[str, Any]:
    return step(after_the_job({"heldout.jsonValid": 0.97}), serving_ready_replicas=0)


def served() -> dict[str, Any]:
    return step(deploying(), serving_ready_replicas=1)


def suspended() -> dict[str, Any]:
    return step(training(), spec=spec(suspend=True), cluster=READY, job_status="RUNNING")


def failed_by(why: str) -> dict[str, Any]:
    if why == "InvalidSpec":
        return decide(
            replace(
                observe(), spec=None, spec_errors=["resources.gpuPool: no pool h100 in the operator settings"]
            )
        ).status
    if why == "BackoffLimitExceeded":
        running = step(step(cluster=READY, spec=spec(backoffLimit=0)), cluster=READY, job_status="RUNNING")
        return step(
            running, spec=spec(backoffLimit=0), cluster=READY, job_status="FAILED", job_message="boom"
        )
    if why == "GateFailed":
        return after_the_job({"heldout.jsonValid": 0.4})
    if why == "NoMetrics":
        return after_the_job({})
    if why == "DeadlineExceeded":
        deadline = spec(activeDeadlineSeconds=600)
        running = step(step(cluster=READY, spec=deadline), cluster=READY, job_status="RUNNING", spec=deadline)
        later = NOW + timedelta(seconds=601)
        return step(running, cluster=READY, job_status="RUNNING", spec=deadline, now=later)
    if why == "CheckpointConfigMismatch":
        return step(
            training(), cluster=READY, job_status="FAILED", job_exit_code=ExitCode.CONFIG_MISMATCH,
            job_log_tail="the checkpoint was written by config 1234",
        )  # fmt: skip
    raise AssertionError(why)


# ------------------------------------------------------------------------------------------ tests


def test_a_tune_without_a_status_is_progressing_until_the_operator_writes_one() -> None:
    assert health(tune(None)) == ("Progressing", "Waiting for the operator to validate the tune")
    assert health(tune({}))[0] == "Progressing"


def test_a_valid_tune_waiting_for_its_ray_cluster_is_progressing() -> None:
    status, message = health(tune(step()))
    assert status == "Progressing" and message == "Provisioning: waiting for the Ray cluster to become ready"


def test_a_tune_the_operator_only_validated_is_pending_and_progressing() -> None:
    assert pending()["phase"] == "Pending"
    assert health(tune(pending())) == ("Progressing", "Pending: SpecValid: spec is valid")


def test_an_unschedulable_ray_cluster_is_progressing_and_says_why() -> None:
    unschedulable = {
        "metadata": {"name": "tune-ray-worker-0"},
        "status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                   "message": "0/6 nodes are available: 2 Insufficient nvidia.com/gpu."}]},
    }  # fmt: skip
    status, message = health(tune(step(cluster={"status": {}}, pods=[unschedulable])))
    assert status == "Progressing"
    assert (
        message.startswith("Unschedulable: pod tune-ray-worker-0:")
        and "Insufficient nvidia.com/gpu" in message
    )


@pytest.mark.parametrize(
    ("reason", "state"),
    [
        ("ImagePullBackOff", {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}),
        ("CrashLoopBackOff", {"state": {"waiting": {"reason": "CrashLoopBackOff"}}}),
        ("OOMKilled", {"state": {"running": {}}, "lastState": {"terminated": {"reason": "OOMKilled"}}}),
    ],
)
def test_a_ray_pod_that_cannot_run_makes_the_tune_degraded(reason: str, state: dict[str, Any]) -> None:
    provisioning = step(cluster={"status": {}}, pods=[pod(state)])
    status, message = health(tune(provisioning))
    assert status == "Degraded" and message.startswith(f"{reason}: pod tune-ray-head-x")
    # The same while a job runs on a cluster that is no longer ready.
    assert health(tune(step(training(), cluster={"status": {}}, pods=[pod(state)], job_status="RUNNING")))[
        0
    ] == ("Degraded")


def test_a_training_tune_is_progressing_with_its_step_and_attempt() -> None:
    status, message = health(tune(training(step=120, totalSteps=400, percent=30)))
    assert status == "Progressing"
    assert message.startswith("Training step 120/400 (30%): Running: attempt 1 (backoffLimit 3): job ")


def test_a_submitted_attempt_is_progressing() -> None:
    status, message = health(tune(step(cluster=READY)))
    assert status == "Progressing" and message.startswith("Training: Submitted: attempt 1: job ")


def test_a_retried_attempt_is_progressing_and_says_why_the_last_one_failed() -> None:
    retried = step(training(), cluster=READY, job_status="FAILED", job_message="worker died")
    status, message = health(tune(retried))
    assert status == "Progressing"
    assert message.startswith("Training: Retrying: attempt 1 failed (worker died); attempt 2 resumes")


def test_an_evaluating_tune_is_progressing() -> None:
    status, message = health(tune(training(step=400, totalSteps=400, percent=100)))
    assert status == "Progressing" and message.startswith("Evaluating step 400/400 (100%): Running: ")


def test_a_tune_rolling_out_its_serving_is_progressing() -> None:
    assert health(tune(deploying())) == (
        "Progressing",
        "Deploying: RollingOut: the serving deployment is rolling out",
    )


def test_a_served_tune_is_healthy_and_names_its_endpoint() -> None:
    tuned = served()
    assert health(tune(tuned)) == ("Healthy", f"1 serving replica(s) ready at {tuned['serving']['endpoint']}")


def test_a_tune_that_succeeded_without_serving_is_healthy() -> None:
    succeeded = after_the_job({"heldout.jsonValid": 0.97}, spec=spec(serving={"enabled": False}))
    assert health(tune(succeeded)) == ("Healthy", "Completed: training and evaluation finished")


@pytest.mark.parametrize(
    ("why", "detail"),
    [
        ("InvalidSpec", "no pool h100"),
        ("BackoffLimitExceeded", "1 attempts failed; last: boom"),
        ("GateFailed", "heldout.jsonValid=0.4"),
        ("NoMetrics", "without reporting evaluation metrics"),
        ("DeadlineExceeded", "activeDeadlineSeconds=600"),
        ("CheckpointConfigMismatch", "written by config 1234"),
    ],
)
def test_a_failed_tune_is_degraded_with_its_reason_and_message(why: str, detail: str) -> None:
    failed = failed_by(why)
    assert failed["phase"] == "Failed"
    status, message = health(tune(failed))
    assert status == "Degraded" and message.startswith(f"{why}: ") and detail in message, message


def test_a_suspended_tune_is_suspended() -> None:
    assert health(tune(suspended())) == (
        "Suspended",
        "suspended: the Ray cluster is removed, checkpoints are kept",
    )


def test_a_generation_the_operator_has_not_observed_yet_is_progressing() -> None:
    # A served tune whose spec just changed (e.g. suspend set), and a failed one whose spec was fixed.
    for status in (served(), failed_by("InvalidSpec")):
        assert status["observedGeneration"] == 1
        assert health(tune(status, generation=2)) == (
            "Progressing",
            "Waiting for the operator to observe generation 2",
        )


def test_every_phase_of_the_api_has_a_health() -> None:
    statuses = [
        pending(), step(), training(), training(step=400, totalSteps=400),
        deploying(), served(), failed_by("GateFailed"), suspended(),
    ]  # fmt: skip
    assert {s["phase"] for s in statuses} == set(get_args(Phase)), "a new phase needs a health in health.lua"
    for status in statuses:
        assert health(tune(status))[0] != "Unknown", status["phase"]


def test_a_phase_the_check_does_not_know_is_unknown() -> None:
    assert health(tune({"phase": "Distilling", "observedGeneration": 1})) == (
        "Unknown",
        "Unknown phase Distilling",
    )


def test_the_check_runs_without_the_libraries_argo_cd_does_not_open() -> None:
    """The sandbox is Argo CD's: a check that needed the string library would fail here too."""
    for script in (
        'return {status = string.format("%s", "Healthy")}',
        'return {status = ("Healthy"):lower()}',
    ):
        with pytest.raises(lua51.LuaError, match=r"attempt to (call|index)"):
            run_lua(script, tune(None))
    assert run_lua('return {status = table.concat({"Hea", "lthy"})}', tune(None)) == {"status": "Healthy"}
