"""The job's progress reporting against the real kube-apiserver, as the job's own identity.

A ServiceAccount whose Role may get/patch only `instructiontunes/status` of its own tune (what the
operator grants the job) reports progress, checkpoints, data and lineage; the status validates
against the API's own models; patches are rate-limited; a patch the Role does not allow is
refused, logged without the token, and does not raise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from instructune_jobs.config import RunIdentity
from instructune_jobs.report import ProgressReporter, StatusPatcher, status_endpoint_from_env
from instructune_operator.api import InstructionTuneStatus

pytestmark = pytest.mark.integration

TUNE = """
apiVersion: instructune.io/v1alpha1
kind: InstructionTune
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  baseModel: {{uri: "s3://models/tiny-llama/"}}
  dataset: {{train: [{{uri: "s3://datasets/extraction/train.jsonl"}}]}}
  training: {{maxSteps: 10}}
  resources: {{gpuPool: cpu, gpusPerWorker: 0}}
  checkpointing: {{uri: "s3://artifacts/{name}/"}}
"""

IDENTITY = """
apiVersion: v1
kind: ServiceAccount
metadata: {{name: job-ident, namespace: {namespace}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: job-ident, namespace: {namespace}}}
rules:
  - apiGroups: [instructune.io]
    resources: [instructiontunes/status]
    resourceNames: [{name}]
    verbs: [get, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: job-ident, namespace: {namespace}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: job-ident}}
subjects: [{{kind: ServiceAccount, name: job-ident, namespace: {namespace}}}]
"""


def test_progress_reaches_only_the_tunes_own_status(
    crd_installed: Any, namespace: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stack = crd_installed
    for name in ("mine", "other"):
        stack.kubectl("apply", "-f", "-", input=TUNE.format(name=name, namespace=namespace))
    stack.kubectl("apply", "-f", "-", input=IDENTITY.format(name="mine", namespace=namespace))
    token = stack.kubectl("create", "token", "job-ident", "-n", namespace, "--duration=10m").stdout.strip()
    token_file = tmp_path / "token"
    token_file.write_text(token)
    env = {
        "INSTRUCTUNE_K8S_SERVER": stack.info["endpoints"]["apiserver"],
        "INSTRUCTUNE_K8S_TOKEN_FILE": str(token_file),
        "INSTRUCTUNE_K8S_CA_FILE": str(Path(stack.info["paths"]["pki"]) / "ca.crt"),
    }
    endpoint = status_endpoint_from_env(RunIdentity(namespace=namespace, name="mine"), env)
    assert endpoint is not None and endpoint.ca_file
    written: dict[str, bytes] = {}
    patcher = StatusPatcher(endpoint)
    reporter = ProgressReporter(
        metrics_uri="mem://metrics.jsonl",
        progress_uri="mem://progress.json",
        total_steps=10,
        write=lambda uri, data, _type: written.__setitem__(uri, data),
        patcher=patcher,
        min_interval_s=3600,
        keep_checkpoints=2,
        attempt_id="a1",
    )
    data = {
        "rows": 2000,
        "invalidRows": 3,
        "tokens": 123456,
        "paddingFraction": 0.02,
        "templateHash": "ab" * 32,
    }
    lineage = {
        "baseModelRevision": "sha256:" + "cd" * 32,
        "dataEtags": {"s3://datasets/x.jsonl": "etag-1"},
        "configHash": "ef" * 32,
        "image": None,
        "version": "0.1.0",
    }
    reporter.start(0, data=data, lineage=lineage)
    for step in range(1, 11):
        reporter.step(step, step / 5, 2.0 - step / 10, 1e-4, 2500.0)
        if step in (5, 10):
            reporter.checkpoint(
                step, f"s3://artifacts/mine/checkpoints/checkpoint_step_{step:09d}", 2.0 - step / 10
            )
    reporter.finish()

    # start + 2 checkpoints + finish; the 10 steps in between were rate-limited away.
    assert (patcher.successes, patcher.failures) == (4, 0)
    tune = yaml.safe_load(stack.kubectl("get", "itune", "mine", "-n", namespace, "-o", "yaml").stdout)
    status = tune["status"]
    InstructionTuneStatus.model_validate(status)  # camelCase keys and types as the CRD has them
    assert status["progress"] == {
        "step": 10,
        "totalSteps": 10,
        "epoch": 2.0,
        "loss": 1.0,
        "learningRate": 0.0001,
        "tokensPerSecond": 2500.0,
        "percent": 100,
        "eta": "0s",
    }
    assert [c["step"] for c in status["checkpoints"]] == [5, 10]
    assert status["data"] == data
    assert status["lineage"]["configHash"] == lineage["configHash"]
    assert status["lineage"]["dataEtags"] == lineage["dataEtags"]
    assert len(written["mem://metrics.jsonl"].decode().splitlines()) == 10
    assert json.loads(written["mem://progress.json"])["progress"]["step"] == 10

    # The Role names only "mine": patching another tune is refused, logged, and not raised.
    other = StatusPatcher(status_endpoint_from_env(RunIdentity(namespace=namespace, name="other"), env))  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="instructune.report"):
        assert other.patch({"progress": {"step": 1}}) is False
    assert "403" in caplog.text
    assert token not in caplog.text
    untouched = yaml.safe_load(stack.kubectl("get", "itune", "other", "-n", namespace, "-o", "yaml").stdout)
    assert "progress" not in (untouched.get("status") or {})
