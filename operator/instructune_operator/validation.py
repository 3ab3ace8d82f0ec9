"""Pure checks of a tune's spec: the schema (again, for objects that bypassed the CRD) and the
platform's limits, which only the operator knows (pools and their sizes)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from instructune_jobs.config import gate_metric_reported
from instructune_operator.api import InstructionTuneSpec
from instructune_operator.builders.train_config import build_evaluation_config, build_train_config
from instructune_operator.settings import Settings


def parse_spec(spec: dict[str, Any]) -> tuple[InstructionTuneSpec | None, list[str]]:
    try:
        return InstructionTuneSpec.model_validate(spec), []
    except ValidationError as err:
        return None, [
            f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors(include_url=False)
        ]


def check_against_settings(spec: InstructionTuneSpec, settings: Settings) -> list[str]:
    errors: list[str] = []
    res = spec.resources
    pool = settings.pools.get(res.gpu_pool)
    if pool is None:
        known = ", ".join(sorted(settings.pools)) or "none configured"
        errors.append(f"spec.resources.gpuPool: unknown pool {res.gpu_pool!r} (known: {known})")
    else:
        if res.gpus_per_worker > pool.gpus_per_node:
            errors.append(
                f"spec.resources.gpusPerWorker: {res.gpus_per_worker} exceeds the {pool.gpus_per_node} GPUs "
                f"per node of pool {res.gpu_pool!r}"
            )
        if res.workers > pool.max_workers:
            errors.append(
                f"spec.resources.workers: {res.workers} exceeds pool {res.gpu_pool!r}'s limit of {pool.max_workers}"
            )
        if res.cpus_per_worker > pool.cpus_per_node:
            errors.append(
                f"spec.resources.cpusPerWorker: {res.cpus_per_worker} exceeds the {pool.cpus_per_node} CPUs "
                f"per node of pool {res.gpu_pool!r}"
            )
    if spec.serving.enabled and spec.serving.gpu_pool and spec.serving.gpu_pool not in settings.pools:
        errors.append(f"spec.serving.gpuPool: unknown pool {spec.serving.gpu_pool!r}")
    return errors


def check_gate_metrics(spec: InstructionTuneSpec) -> list[str]:
    """A gate rule on a key the evaluation never reports fails every time: refuse it up front.
    (The CRD refuses forgetting.* rules without a probe; the rest needs the job's key scheme.)"""
    try:
        evaluation = build_evaluation_config(spec)
    except ValidationError:
        return []  # check_train_config reports it, naming the field
    names = ", ".join(d.name for d in spec.evaluation.datasets) or "none"
    return [
        f"spec.evaluation.gate[{i}].metric: {rule.metric!r} is never reported by this evaluation "
        f"(datasets: {names}; keys are <dataset>.<metric>, the mean <metric>, validation.loss, "
        "forgetting.* with a generalProbe, base.<key> with compareToBase, delta.<key>)"
        for i, rule in enumerate(spec.evaluation.gate)
        if not gate_metric_reported(rule.metric, evaluation)
    ]


# Where a TrainConfig path comes from in the spec when the names differ (train_config.py's mapping).
_SPEC_SECTION = {"output": "checkpointing", "run": "metadata"}
_METRIC_TAGS = frozenset({"loss", "json_valid", "json_schema", "regex", "exact_match"})


def _spec_path(loc: tuple[int | str, ...]) -> str:
    """A job-config error location as the spec's field: evaluation.metrics.3.regex.pattern ->
    spec.evaluation.metrics[3].pattern."""
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int) and parts:
            parts[-1] += f"[{part}]"
        elif i >= 2 and isinstance(loc[i - 1], int) and loc[i - 2] == "metrics" and part in _METRIC_TAGS:
            continue  # the discriminator pydantic puts in the path, not a field
        else:
            parts.append(_SPEC_SECTION.get(str(part), to_camel(str(part))) if i == 0 else to_camel(str(part)))
    return ".".join(["spec", *parts])


def check_train_config(spec: InstructionTuneSpec) -> list[str]:
    """What the job would refuse after its cluster is up (a regex that does not compile, a value
    the CRD cannot check), refused now, naming the spec's field."""
    try:
        build_train_config(spec, "validation", "validation", "validation", 1)
    except ValidationError as err:
        return [f"{_spec_path(e['loc'])}: {e['msg']}" for e in err.errors(include_url=False)]
    return []


def validate_spec(spec: dict[str, Any], settings: Settings) -> tuple[InstructionTuneSpec | None, list[str]]:
    parsed, errors = parse_spec(spec)
    if parsed is None:
        return None, errors
    errors = (
        check_against_settings(parsed, settings) + check_train_config(parsed) + check_gate_metrics(parsed)
    )
    return (parsed if not errors else None), errors
