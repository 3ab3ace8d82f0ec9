"""Pure: an InstructionTune spec -> the TrainConfig the job runs (camelCase API -> job contract)."""

from __future__ import annotations

from typing import Any

from instructune_jobs.config import EvaluationConfig, TrainConfig
from instructune_operator.api import InstructionTuneSpec, MetricSpec

_METRIC_TYPES = {
    "loss": "loss",
    "jsonValid": "json_valid",
    "jsonSchema": "json_schema",
    "regex": "regex",
    "exactMatch": "exact_match",
}


def _metric(metric: MetricSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"type": _METRIC_TYPES[metric.type]}
    if metric.type == "jsonSchema":
        out["schema"] = metric.schema_
    if metric.type == "regex":
        out["pattern"] = metric.pattern
    if metric.type == "exactMatch":
        out["fields"] = metric.fields or []
    return out


def _field_mapping(spec: InstructionTuneSpec) -> dict[str, str]:
    mapping = spec.dataset.field_mapping
    if mapping is None:
        return {}
    return {k: v for k, v in mapping.model_dump().items() if v}


def _evaluation(spec: InstructionTuneSpec) -> dict[str, Any]:
    evaluation = spec.evaluation
    return {
        "datasets": [{"name": d.name, "uri": d.uri} for d in evaluation.datasets],
        "metrics": [_metric(m) for m in evaluation.metrics] or [{"type": "loss"}],
        "compare_to_base": evaluation.compare_to_base,
        "general_probe": {"uri": evaluation.general_probe.uri} if evaluation.general_probe else None,
        "max_new_tokens": evaluation.max_new_tokens,
    }


def build_evaluation_config(spec: InstructionTuneSpec) -> EvaluationConfig:
    """The job's evaluation config alone: what the gate's metric keys are checked against."""
    return EvaluationConfig.model_validate(_evaluation(spec))


def build_train_config(
    spec: InstructionTuneSpec, namespace: str, name: str, uid: str, attempt: int
) -> TrainConfig:
    ds, tr, lora = spec.dataset, spec.training, spec.method.lora
    validation: dict[str, Any] = {}
    if ds.validation is not None:
        validation = {"uri": ds.validation.uri} if ds.validation.uri else {"fraction": ds.validation.fraction}
    invalid = ds.invalid_rows
    config: dict[str, Any] = {
        "base_model": {"uri": spec.base_model.uri},
        "dataset": {
            "train": [{"uri": s.uri, "weight": s.weight} for s in ds.train],
            "validation": validation,
            "format": ds.format,
            "field_mapping": _field_mapping(spec),
            "invalid_rows": {"policy": invalid.policy, "max_fraction": invalid.max_fraction}
            if invalid
            else {},
            "audit": ds.audit.model_dump() if ds.audit else {},
        },
        "template": {
            "chat_template": spec.template.chat_template,
            "system_prompt": spec.template.system_prompt,
        },
        "method": {"type": spec.method.type},
        "training": {
            "epochs": tr.epochs or 1,
            "max_steps": tr.max_steps,
            "learning_rate": tr.learning_rate,
            "lr_scheduler": tr.lr_scheduler,
            "warmup_ratio": tr.warmup_ratio,
            "batch_size_per_device": tr.batch_size_per_device,
            "gradient_accumulation": tr.gradient_accumulation,
            "max_seq_length": tr.max_seq_length,
            "packing": tr.packing,
            "precision": tr.precision,
            "gradient_checkpointing": tr.gradient_checkpointing,
            "seed": tr.seed,
        },
        "distributed": {
            "strategy": spec.distributed.strategy,
            "zero_stage": spec.distributed.zero_stage or 2,
            "offload": spec.distributed.offload or "none",
        },
        "resources": {
            "workers": spec.resources.workers,
            "gpus_per_worker": spec.resources.gpus_per_worker,
            "cpus_per_worker": spec.resources.cpus_per_worker,
        },
        "checkpointing": {
            "uri": spec.checkpointing.uri,
            "every_steps": spec.checkpointing.every_steps,
            "keep_last": spec.checkpointing.keep_last,
        },
        "evaluation": _evaluation(spec),
        "output": {"uri": spec.checkpointing.uri, "merge": spec.method.type == "full"},
        "run": {"namespace": namespace, "name": name, "uid": uid, "attempt": attempt},
    }
    if lora is not None:
        config["method"]["lora"] = {
            "r": lora.r,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "target_modules": "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules,
            "modules_to_save": lora.modules_to_save,
        }
    return TrainConfig.model_validate(config)
