"""The tuning job's entrypoint, as the operator submits it through the Ray Jobs API:

    python -m instructune_jobs --config-file PATH      (default: $INSTRUCTUNE_CONFIG_FILE)
    python -m instructune_jobs --config-json '{...}'

1. train (finetune.run_training): skipped when <root>/manifest.json already records a finished run
   of this very configuration, so a retried job goes straight to evaluation;
2. evaluate (evaluate.run_evaluation) when the config names evaluation datasets or a probe. It
   runs as a Ray task on a worker (the head node may have no GPU, nor the CPUs for it);
3. print `INSTRUCTUNE_RESULT {json}` as the last stdout line: training summary and evaluation
   result (metrics, baseMetrics, reportURI, templateHash).

Exit codes: 0 done; 2 the config is invalid or asks for what cannot run here; 3 the checkpoint
root belongs to another configuration; 4 the data was refused (the row report is in the log);
5 the job's image runs another instructune version than the operator that submitted it;
1 anything else (the operator retries from the latest checkpoint, up to backoffLimit). The
operator fails a tune at once on 2, 3, 4 and 5: a retry would end the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from instructune_jobs.config import TrainConfig
from instructune_jobs.contract import DataPayload, ExitCode, PermanentJobError

log = logging.getLogger("instructune")

RESULT_PREFIX = "INSTRUCTUNE_RESULT "
# The fields of the tune's status.data a finished run's manifest can fill (a test holds it to the CRD).
DATA_STATUS_KEYS = tuple(DataPayload.__annotations__)


def own_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("instructune")
    except PackageNotFoundError:
        return "unknown"


def version_mismatch(operator_version: str | None, job_version: str) -> str | None:
    """Why this job must not run the operator's config, or None. The config is the contract between
    one operator version and the same job version: another version may read it differently."""
    if not operator_version or operator_version == job_version:
        return None
    return (
        f"the job's image runs instructune {job_version} but the operator that submitted it is "
        f"{operator_version}: set the operator's rayImage (or spec.resources.image) to the job image "
        f"of version {operator_version}"
    )


def read_config(args: argparse.Namespace) -> TrainConfig:
    if args.config_json:
        return TrainConfig.from_json(args.config_json)
    path = args.config_file or os.environ.get("INSTRUCTUNE_CONFIG_FILE")
    if not path:
        raise SystemExit("give --config-file, --config-json or INSTRUCTUNE_CONFIG_FILE")
    return TrainConfig.from_json(Path(path).read_text())


def wants_evaluation(cfg: TrainConfig) -> bool:
    return bool(cfg.evaluation.datasets) or cfg.evaluation.general_probe is not None


def evaluate_on_worker(cfg: TrainConfig) -> dict[str, Any]:
    """run_evaluation as a Ray task with one worker's resources (a GPU when training had them)."""
    import ray

    def evaluate(config_json: str) -> dict[str, Any]:
        from instructune_jobs.evaluate import run_evaluation

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return run_evaluation(TrainConfig.from_json(config_json))

    gpus = 1 if cfg.resources.gpus_per_worker > 0 else 0
    cpus = cfg.resources.cpus_per_worker / max(1, cfg.resources.gpus_per_worker)
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(evaluate)
    result: dict[str, Any] = ray.get(task.remote(cfg.to_json()))
    return result


def report_evaluation(cfg: TrainConfig, evaluation: dict[str, Any]) -> None:
    """Patches the evaluation into the tune's status, where the operator's gate reads it."""
    from instructune_jobs.report import StatusPatcher, status_endpoint_from_env

    endpoint = status_endpoint_from_env(cfg.run)
    if endpoint is None:
        return
    status = {
        "metrics": evaluation.get("metrics", {}),
        "baseMetrics": evaluation.get("baseMetrics", {}),
        "reportUri": evaluation.get("reportURI") or evaluation.get("reportUri"),
    }
    if not StatusPatcher(endpoint).patch({"evaluation": status}):
        raise RuntimeError("could not report the evaluation into the tune's status")


def finished_run_status(manifest: dict[str, Any]) -> dict[str, Any]:
    """The status a skipped training reports from the finished run's manifest: the data statistics
    (templateHash among them: serving refuses a tune without it), lineage and the final progress.
    The tune may be new (deleted and applied again) and have none of it yet."""
    recorded = manifest.get("data") or {}
    data = {k: recorded[k] for k in DATA_STATUS_KEYS if recorded.get(k) is not None}
    data["templateHash"] = data.get("templateHash") or manifest.get("templateHash")
    training = manifest.get("training") or {}
    steps = training.get("steps")
    status: dict[str, Any] = {
        "data": data,
        "lineage": {
            "baseModelRevision": (manifest.get("baseModel") or {}).get("revision"),
            "dataEtags": recorded.get("etags") or {},
            "configHash": manifest.get("configHash"),
            "image": manifest.get("image"),
            "version": (manifest.get("packages") or {}).get("instructune"),
        },
    }
    if isinstance(steps, int) and steps > 0:
        status["progress"] = {
            "step": steps,
            "totalSteps": steps,
            "percent": 100,
            "loss": training.get("finalLoss"),
        }
    return status


def report_finished_run(cfg: TrainConfig, manifest: dict[str, Any]) -> None:
    from instructune_jobs.report import StatusPatcher, status_endpoint_from_env

    endpoint = status_endpoint_from_env(cfg.run)
    if endpoint is not None and not StatusPatcher(endpoint).patch(finished_run_status(manifest)):
        raise RuntimeError("could not report the finished run into the tune's status")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructune_jobs", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config-file", help="TrainConfig JSON file (the operator's ConfigMap)")
    source.add_argument("--config-json", help="TrainConfig JSON text")
    parser.add_argument("--ray-address", help="Ray cluster to use (default: the job's own, or RAY_ADDRESS)")
    parser.add_argument("--skip-evaluation", action="store_true", help="train only")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )

    mismatch = version_mismatch(os.environ.get("INSTRUCTUNE_OPERATOR_VERSION"), own_version())
    if mismatch:
        log.error("%s", mismatch)
        return ExitCode.VERSION_MISMATCH
    try:
        cfg = read_config(args)
    except (ValidationError, ValueError, OSError) as err:
        log.error("invalid training config: %s", err)
        return ExitCode.BAD_CONFIG

    from instructune_jobs.finetune import PreemptedError, run_training, training_already_done

    result: dict[str, Any] = {"configHash": cfg.config_hash()}
    try:
        done = training_already_done(cfg)
        if done is not None:
            log.info("training of config %s already finished: skipping to evaluation", cfg.config_hash()[:12])
            result["training"] = {"skipped": True, **done.get("training", {})}
            report_finished_run(cfg, done)
        else:
            outcome = run_training(cfg, ray_address=args.ray_address)
            result["training"] = {
                "steps": outcome.steps,
                "finalLoss": outcome.final_loss,
                "resumedFromStep": outcome.resumed_from_step,
                "seconds": round(outcome.seconds, 1),
                "root": outcome.root,
            }
        if wants_evaluation(cfg) and not args.skip_evaluation:
            import ray

            if not ray.is_initialized():
                from instructune_jobs.finetune import ray_address_from_env

                ray.init(address=args.ray_address or ray_address_from_env())
            result["evaluation"] = evaluate_on_worker(cfg)
            report_evaluation(cfg, result["evaluation"])
    except PermanentJobError as err:
        # A retry would end the same way: the exit code tells the operator so.
        log.error("%s", f"{err.what}: {err}" if err.what else err)
        return err.exit_code
    except PreemptedError as err:
        log.error("a node was preempted: %s", err)
        return ExitCode.PREEMPTED

    sys.stdout.write(RESULT_PREFIX + json.dumps(result, allow_nan=False, default=str) + "\n")
    sys.stdout.flush()
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
