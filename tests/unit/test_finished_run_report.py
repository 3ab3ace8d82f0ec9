"""A retried or re-applied tune whose configuration already finished training skips it: the job then
reports what the finished run's manifest recorded, so serving finds the template hash it needs."""

from __future__ import annotations

from typing import Any

import pytest

from instructune_jobs.__main__ import DATA_STATUS_KEYS, finished_run_status
from instructune_operator.crd import crd

pytestmark = pytest.mark.unit


def manifest(**data: Any) -> dict[str, Any]:
    return {
        "baseModel": {"uri": "s3://models/tiny/", "revision": "sha256:abc"},
        "data": {
            "etags": {"s3://d/train.jsonl": "e1"},
            "rows": 2400,
            "invalidRows": 0,
            "tokens": 91000,
            "templateHash": "t" * 64,
            "trainExamples": 2280,
            "preparedUri": "s3://a/data/prepared-x.npz",
            **data,
        },
        "configHash": "c" * 64,
        "templateHash": "t" * 64,
        "training": {"steps": 400, "finalLoss": 0.33},
        "packages": {"instructune": "0.1.0"},
        "image": None,
    }


def test_a_skipped_training_reports_the_template_hash_serving_needs() -> None:
    status = finished_run_status(manifest())
    assert status["data"]["templateHash"] == "t" * 64
    assert status["data"]["rows"] == 2400


def test_the_manifests_own_template_hash_fills_in_for_older_data_records() -> None:
    status = finished_run_status(manifest(templateHash=""))
    assert status["data"]["templateHash"] == "t" * 64


def test_lineage_and_final_progress_come_from_the_finished_run() -> None:
    status = finished_run_status(manifest())
    assert status["lineage"] == {
        "baseModelRevision": "sha256:abc",
        "dataEtags": {"s3://d/train.jsonl": "e1"},
        "configHash": "c" * 64,
        "image": None,
        "version": "0.1.0",
    }
    assert status["progress"] == {"step": 400, "totalSteps": 400, "percent": 100, "loss": 0.33}


def test_only_fields_of_status_data_are_reported() -> None:
    status = finished_run_status(manifest())
    assert set(status["data"]) <= set(DATA_STATUS_KEYS)
    assert "preparedUri" not in status["data"] and "etags" not in status["data"]


def test_the_reported_data_fields_are_the_crds() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    data = schema["properties"]["status"]["properties"]["data"]["properties"]
    assert set(DATA_STATUS_KEYS) == set(data)
    lineage = schema["properties"]["status"]["properties"]["lineage"]["properties"]
    assert set(finished_run_status(manifest())["lineage"]) <= set(lineage)
    progress = schema["properties"]["status"]["properties"]["progress"]["properties"]
    assert set(finished_run_status(manifest())["progress"]) <= set(progress)


def test_a_job_of_another_version_than_its_operator_says_which_image_to_use() -> None:
    from instructune_jobs.__main__ import version_mismatch

    assert version_mismatch("0.1.0", "0.1.0") is None
    assert version_mismatch(None, "0.1.0") is None  # submitted by hand, without an operator
    why = version_mismatch("0.2.0", "0.1.0")
    assert why is not None and "runs instructune 0.1.0" in why and "version 0.2.0" in why


def test_the_job_refuses_a_config_from_another_operator_version_before_reading_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from instructune_jobs import __main__ as job

    monkeypatch.setenv("INSTRUCTUNE_OPERATOR_VERSION", "99.0.0")
    # A config this job version could not even parse: the version is checked first.
    assert job.main(["--config-json", '{"fromTheFuture": true}']) == job.ExitCode.VERSION_MISMATCH
