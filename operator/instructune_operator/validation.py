"""Pure checks of a tune's spec: the schema (again, for objects that bypassed the CRD) and the
platform's limits, which only the operator knows (pools and their sizes)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from instructune_operator.api import InstructionTuneSpec
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


def validate_spec(spec: dict[str, Any], settings: Settings) -> tuple[InstructionTuneSpec | None, list[str]]:
    parsed, errors = parse_spec(spec)
    if parsed is None:
        return None, errors
    errors = check_against_settings(parsed, settings)
    return (parsed if not errors else None), errors
