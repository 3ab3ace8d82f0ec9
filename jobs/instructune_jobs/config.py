"""TrainConfig: the contract the operator hands to the tuning job.

The operator turns an InstructionTune spec (camelCase, Kubernetes style) into a `TrainConfig`
(snake_case), serialises it with `to_json()` into the job's ConfigMap, and the job reads it back
with `TrainConfig.from_json()`. This module imports no torch, ray, boto3 or transformers so that
the operator (and tests) can build and validate configs without the training stack.

`config_hash()` identifies "the same training run": a checkpoint may only be resumed by a job whose
config hash matches, and the hash is recorded in the tune's lineage.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

# s3://bucket/key-or-prefix ; hf://org/name@revision ; file:///abs/path or a plain local path
# (local paths exist for tests and the offline demo; the operator only emits s3:// and hf://).
_S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")
_HF_URI = re.compile(r"^hf://(?P<repo>[\w.\-]+/[\w.\-]+)(@(?P<revision>[\w.\-/]+))?$")

DataFormat = Literal["auto", "alpaca", "dolly", "messages", "prompt-completion"]

# Limits the InstructionTune CRD shares with this contract: the operator's api.py imports them, so a
# value the API server admits is one the job accepts (tests/unit/test_limits_drift.py holds every
# other bound of the CRD inside this contract's).
# Half the rows held out is the most that still leaves training the larger share.
VALIDATION_FRACTION_MAX = 0.5


def _check_data_uri(uri: str) -> str:
    """Data and artifacts live in object storage (or, for tests and the demo, a local path)."""
    if uri.startswith("s3://"):
        if not _S3_URI.match(uri):
            raise ValueError(f"not a valid s3 uri: {uri!r}")
        return uri
    if uri.startswith("file://") or uri.startswith("/"):
        return uri
    raise ValueError(f"unsupported uri {uri!r}: use s3://bucket/key, file:///path or an absolute path")


DataUri = Annotated[str, AfterValidator(_check_data_uri)]


class _Model(BaseModel):
    # extra="forbid": a typo in the operator's mapping must fail loudly, not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class ModelSource(_Model):
    """Where the base model's weights and tokenizer come from."""

    uri: str

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        if uri.startswith("hf://"):
            if not _HF_URI.match(uri):
                raise ValueError(f"not a valid hf uri (hf://org/name@revision): {uri!r}")
            return uri
        return _check_data_uri(uri)

    @property
    def scheme(self) -> str:
        if self.uri.startswith(("s3://", "hf://", "file://")):
            return self.uri.split("://", 1)[0]
        return "file"

    @property
    def hf_repo(self) -> str | None:
        match = _HF_URI.match(self.uri)
        return match.group("repo") if match else None

    @property
    def hf_revision(self) -> str | None:
        match = _HF_URI.match(self.uri)
        return match.group("revision") if match else None


class DataSource(_Model):
    uri: DataUri
    # Relative share of this source in the training mix (normalised over all sources).
    weight: float = Field(default=1.0, gt=0)


class ValidationSplit(_Model):
    """Validation rows come from their own uri, or else a seeded fraction of the training mix."""

    uri: DataUri | None = None
    fraction: float = Field(default=0.05, ge=0.0, le=VALIDATION_FRACTION_MAX)


class InvalidRowsPolicy(_Model):
    # skip: drop invalid rows, but fail when more than max_fraction of all rows are invalid.
    # fail: the first invalid row fails the data step with its report.
    policy: Literal["skip", "fail"] = "skip"
    max_fraction: float = Field(default=0.01, ge=0.0, le=1.0)


# Canonical field names a mapping may rename (canonical -> column name in the data).
CANONICAL_FIELDS = frozenset(
    {
        "instruction",
        "input",
        "output",
        "context",
        "response",
        "prompt",
        "completion",
        "messages",
        "role",
        "content",
        "system",
    }
)


class AuditConfig(_Model):
    """Audits of the training rows before tokenizing (data/audit.py)."""

    # Drop a conversation equal (case and whitespace aside) to one already kept.
    deduplicate: bool = True
    # Drop a training conversation whose prompt is one of the evaluation sets', the general
    # probe's or the validation source's.
    decontaminate: bool = True
    # Personal data (e-mail, phone, payment card, IBAN, US SSN): list it, replace it with a
    # placeholder, drop the row, or do not look.
    pii: Literal["off", "report", "redact", "drop"] = "redact"


class DatasetConfig(_Model):
    train: list[DataSource] = Field(min_length=1)
    validation: ValidationSplit = Field(default_factory=ValidationSplit)
    format: DataFormat = "auto"
    field_mapping: dict[str, str] = Field(default_factory=dict)
    invalid_rows: InvalidRowsPolicy = Field(default_factory=InvalidRowsPolicy)
    audit: AuditConfig = Field(default_factory=AuditConfig)

    @field_validator("field_mapping")
    @classmethod
    def _known_canonical_fields(cls, mapping: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(mapping) - CANONICAL_FIELDS)
        if unknown:
            raise ValueError(f"field_mapping keys must be among {sorted(CANONICAL_FIELDS)}; got {unknown}")
        return mapping


class TemplateConfig(_Model):
    # None: use the base model tokenizer's own chat template.
    chat_template: str | None = None
    system_prompt: str | None = None


class LoraConfig(_Model):
    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    # Trained in full next to the adapters, e.g. ["embed_tokens", "lm_head"] when new tokens
    # were added or the base is weak (see ARCHITECTURE.md's measured facts).
    modules_to_save: list[str] = Field(default_factory=list)

    @field_validator("target_modules")
    @classmethod
    def _non_empty_modules(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("target_modules must name at least one module, or be 'all-linear'")
        return value


class MethodConfig(_Model):
    type: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)


class TrainingConfig(_Model):
    epochs: int = Field(default=1, ge=1)
    # When set, stops after this many optimizer steps, overriding epochs.
    max_steps: int | None = Field(default=None, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    batch_size_per_device: int = Field(default=4, ge=1)
    gradient_accumulation: int = Field(default=1, ge=1)
    max_seq_length: int = Field(default=2048, ge=16)
    packing: bool = True
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    gradient_checkpointing: bool = True
    seed: int = 42


class DistributedConfig(_Model):
    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: Literal[2, 3] = 2
    offload: Literal["none", "optimizer", "all"] = "none"


class ResourcesConfig(_Model):
    workers: int = Field(default=1, ge=1)
    # 0 means CPU-only workers (the local stack and tests).
    gpus_per_worker: int = Field(default=1, ge=0)
    cpus_per_worker: float = Field(default=1, gt=0)


class CheckpointingConfig(_Model):
    # None: checkpoints stay on the workers' local disk only (tests); the operator always sets it.
    uri: DataUri | None = None
    every_steps: int = Field(default=200, ge=1)
    keep_last: int = Field(default=3, ge=1)


class LossMetric(_Model):
    type: Literal["loss"] = "loss"


class JsonValidMetric(_Model):
    type: Literal["json_valid"] = "json_valid"


class JsonSchemaMetric(_Model):
    type: Literal["json_schema"] = "json_schema"
    # Named schema_ in Python because BaseModel already has a `schema` attribute; "schema" in JSON.
    schema_: dict[str, Any] = Field(alias="schema")


class RegexMetric(_Model):
    type: Literal["regex"] = "regex"
    pattern: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"regex does not compile: {err}") from err
        return pattern


class ExactMatchMetric(_Model):
    type: Literal["exact_match"] = "exact_match"
    # Empty: the whole output must match; else these JSON fields of the output must match.
    fields: list[str] = Field(default_factory=list)


Metric = Annotated[
    LossMetric | JsonValidMetric | JsonSchemaMetric | RegexMetric | ExactMatchMetric,
    Field(discriminator="type"),
]


class EvalDataset(_Model):
    name: str = Field(min_length=1)
    uri: DataUri


class GeneralProbe(_Model):
    uri: DataUri


class EvaluationConfig(_Model):
    datasets: list[EvalDataset] = Field(default_factory=list)
    metrics: list[Metric] = Field(default_factory=lambda: list[Metric]([LossMetric()]))
    compare_to_base: bool = True
    general_probe: GeneralProbe | None = None
    max_new_tokens: int = Field(default=256, ge=1)
    max_samples: int = Field(default=200, ge=1)

    @field_validator("metrics", mode="before")
    @classmethod
    def _accept_shorthand(cls, metrics: Any) -> Any:
        """Accept "loss" for {"type": "loss"} and {"regex": {...}} for {"type": "regex", ...}."""
        if not isinstance(metrics, list):
            return metrics
        return [_expand_metric_shorthand(metric) for metric in metrics]


def _expand_metric_shorthand(metric: Any) -> Any:
    """Expand the spec's short forms: "loss", {"regex": "a+"}, {"exact_match": ["f"]},
    {"json_schema": <schema>} or {"json_schema": {"schema": <schema>}}."""
    if isinstance(metric, str):
        return {"type": metric}
    if not (isinstance(metric, dict) and "type" not in metric and len(metric) == 1):
        return metric
    ((kind, body),) = metric.items()
    if kind == "regex" and isinstance(body, str):
        return {"type": kind, "pattern": body}
    if kind == "exact_match" and isinstance(body, list):
        return {"type": kind, "fields": body}
    if kind == "json_schema" and isinstance(body, dict) and "schema" not in body:
        return {"type": kind, "schema": body}
    if isinstance(body, dict):
        return {"type": kind, **body}
    return metric


# The metric keys the evaluation reports (evaluate.py's module docstring): a gate rule on any other
# key can never pass. tests/unit/test_gate_metrics.py holds these to the job's own key-making code.
VALIDATION_METRICS = ("validation.loss", "validation.perplexity")
LOSS_METRICS = ("loss", "perplexity")
FORGETTING_METRICS = ("forgetting.probeLoss", "forgetting.lossIncrease", "forgetting.relativeLossIncrease")
BASE_FORGETTING_METRICS = ("forgetting.probeLoss",)
_GENERATION_KEYS = {
    "json_valid": "jsonValid",
    "json_schema": "jsonSchema",
    "regex": "regex",
    "exact_match": "exactMatch",
}


def reported_metric_keys(evaluation: EvaluationConfig) -> tuple[frozenset[str], frozenset[str]]:
    """(metrics, baseMetrics) keys an evaluation with this config can report: the first is what a
    gate rule's plain key reads, the second what its `base.` key reads (`delta.` needs both)."""
    per_dataset: set[str] = set()
    exact_fields: list[str] | None = None
    for metric in evaluation.metrics:
        if metric.type == "loss":
            per_dataset.update(LOSS_METRICS)
        else:
            per_dataset.add(_GENERATION_KEYS[metric.type])
        if isinstance(metric, ExactMatchMetric):
            exact_fields = list(metric.fields)  # the last one wins, as in scoring.MetricSpec
    per_dataset.update(f"fieldMatch.{name}" for name in exact_fields or [])
    names = [d.name for d in evaluation.datasets]
    keys = set(VALIDATION_METRICS) | {f"{name}.{key}" for name in names for key in per_dataset}
    if names:
        keys |= per_dataset  # the means over datasets
    base = set(keys) if evaluation.compare_to_base else set()
    if evaluation.general_probe is not None:
        keys.update(FORGETTING_METRICS)
        base.update(BASE_FORGETTING_METRICS)
    return frozenset(keys), frozenset(base)


def gate_metric_reported(key: str, evaluation: EvaluationConfig) -> bool:
    """Whether a gate rule's metric key (gate.metric_value's grammar) can have a value."""
    metrics, base = reported_metric_keys(evaluation)
    if key.startswith("base."):
        return key.removeprefix("base.") in base
    if key.startswith("delta."):
        inner = key.removeprefix("delta.")
        return inner in metrics and inner in base
    return key in metrics


class OutputConfig(_Model):
    # Where the adapter (or merged model) and the evaluation report go.
    uri: DataUri | None = None
    # Also write base+adapter merged weights (what serving loads when it cannot load adapters).
    merge: bool = False


class RunIdentity(_Model):
    """Which InstructionTune this job belongs to; the job patches that tune's status."""

    namespace: str = "default"
    name: str = ""
    uid: str = ""
    attempt: int = Field(default=0, ge=0)


# The parts of the config that change what the trained weights are. Run identity, where
# checkpoints/outputs go, evaluation and CPU counts do not change the weights.
_TRAINING_RELEVANT = ("base_model", "dataset", "template", "method", "training", "distributed")


class TrainConfig(_Model):
    base_model: ModelSource
    dataset: DatasetConfig
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    checkpointing: CheckpointingConfig = Field(default_factory=CheckpointingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    run: RunIdentity = Field(default_factory=RunIdentity)

    @model_validator(mode="after")
    def _coherent(self) -> TrainConfig:
        if (
            self.method.type == "qlora"
            and self.distributed.strategy == "deepspeed"
            and self.distributed.zero_stage == 3
        ):
            # bitsandbytes 4-bit weights cannot be partitioned by ZeRO-3.
            raise ValueError("qlora is incompatible with DeepSpeed ZeRO stage 3; use zero_stage 2 or ddp")
        if self.distributed.strategy == "ddp" and self.distributed.offload != "none":
            raise ValueError("offload needs strategy deepspeed")
        return self

    @property
    def world_size(self) -> int:
        return self.resources.workers * max(1, self.resources.gpus_per_worker)

    @property
    def effective_batch_size(self) -> int:
        """Sequences (or packs) per optimizer step across all workers."""
        return self.world_size * self.training.batch_size_per_device * self.training.gradient_accumulation

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> TrainConfig:
        return cls.model_validate_json(text)

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of the training-relevant parts plus the world size.

        World size is included because it changes the effective batch size, hence the run.
        """
        relevant = self.model_dump(mode="json", by_alias=True, include=set(_TRAINING_RELEVANT))
        relevant["world_size"] = self.world_size
        canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
