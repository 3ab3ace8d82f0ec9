"""The InstructionTune API: the single source of truth for the CRD, the operator and the docs.

Every field carries a description (it becomes `kubectl explain` output) and cross-field rules are
CEL expressions that the API server evaluates, so a wrong manifest is rejected before the
operator ever sees it. `crd()` turns these models into the CustomResourceDefinition in crds/.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonDict

# Limits shared with the job's contract: one number, so the API server admits only what the job runs.
from instructune_jobs.config import VALIDATION_FRACTION_MAX

# The job writes the status too: group, version and plural are the contract's (re-exported here).
from instructune_jobs.contract import GROUP as GROUP
from instructune_jobs.contract import PLURAL as PLURAL
from instructune_jobs.contract import VERSION as VERSION

KIND = "InstructionTune"
SINGULAR = "instructiontune"
SHORT_NAMES = ["itune"]
API_VERSION = f"{GROUP}/{VERSION}"

S3_URI = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"
MODEL_URI = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|hf://[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+(@[A-Za-z0-9_.\-/]+)?)$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# RFC 1035 label: what a Service name must be (it starts with a letter), see naming.py.
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Kubernetes' resource.Quantity grammar (apimachinery's quantity.go), unsigned: 64G, 1.5Gi, 500m, 1e9.
QUANTITY = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


# A tune's name is the value of its children's instructune.io/tune label (63 characters at most)
# and begins the RayCluster's and the Services' names (RFC 1035 labels: a letter first); naming.py
# shortens a child's name with a hash where name and suffix exceed the child's limit.
NAME_MAX = 63


def cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One x-kubernetes-validations entry; fieldPath makes the error name the offending field."""
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


class Model(BaseModel):
    """Base: camelCase on the wire, unknown fields rejected (the API server prunes them anyway)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


# ---------------------------------------------------------------------------------------- spec


class BaseModelSpec(Model):
    """The pretrained model to tune."""

    uri: str = Field(
        pattern=MODEL_URI,
        description="Where the weights are: s3://bucket/prefix/ (a Hugging Face save_pretrained folder) "
        "or hf://org/name@revision.",
    )


class DataSource(Model):
    """One source of instruction data; several are mixed by weight."""

    uri: str = Field(
        pattern=S3_URI, description="An S3 object or a prefix of shards (JSONL, JSONL.gz or Parquet)."
    )
    weight: float = Field(
        default=1.0, gt=0, le=1000, description="Relative share of this source in the training mix (> 0)."
    )


class ValidationSplit(Model):
    """Held-out data for validation loss: its own URI, or a seeded fraction of the training data."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.uri) != has(self.fraction)", "set exactly one of uri or fraction")
            ]
        }
    )
    uri: str | None = Field(default=None, pattern=S3_URI, description="Validation data in S3.")
    fraction: float | None = Field(
        default=None,
        gt=0,
        le=VALIDATION_FRACTION_MAX,
        description=f"Fraction of the training rows held out (0 < f <= {VALIDATION_FRACTION_MAX}).",
    )


class FieldMapping(Model):
    """Names of the dataset's columns when they differ from the format's own names."""

    instruction: str | None = Field(default=None, description="Column holding the instruction.")
    input: str | None = Field(default=None, description="Column holding the optional input/context.")
    output: str | None = Field(default=None, description="Column holding the response.")
    messages: str | None = Field(default=None, description="Column holding a list of chat messages.")


class InvalidRows(Model):
    """What to do with rows that do not fit the format."""

    policy: Literal["skip", "fail"] = Field(
        default="skip", description="skip: drop bad rows (each reported with file and line); fail: stop."
    )
    max_fraction: float = Field(
        default=0.01, ge=0, le=1, description="With skip, the job fails when more rows than this are invalid."
    )


class AuditSpec(Model):
    """Audits of the training rows before tokenizing; every finding is listed in status.data.auditReport."""

    deduplicate: bool = Field(
        default=True, description="Drop rows equal (case and whitespace aside) to a row already kept."
    )
    decontaminate: bool = Field(
        default=True,
        description="Drop training rows whose prompt is a prompt of an evaluation dataset, the general probe or the validation source.",
    )
    pii: Literal["off", "report", "redact", "drop"] = Field(
        default="redact",
        description="Personal data (e-mail, phone, payment card, IBAN, US SSN): list it (report), replace it with a placeholder such as [EMAIL] (redact), drop the row (drop), or do not look (off).",
    )


class DatasetSpec(Model):
    """Instruction-response data: domain data plus general data mixed against forgetting."""

    train: list[DataSource] = Field(
        min_length=1, max_length=32, description="Training sources, mixed by weight."
    )
    validation: ValidationSplit | None = Field(default=None, description="Validation split.")
    format: Literal["auto", "alpaca", "dolly", "messages", "prompt-completion"] = Field(
        default="auto", description="Row format; auto detects it from the fields of each source."
    )
    field_mapping: FieldMapping | None = Field(
        default=None, description="Column names, when not the format's own."
    )
    invalid_rows: InvalidRows | None = Field(default=None, description="Handling of rows that do not fit.")
    audit: AuditSpec | None = Field(
        default=None, description="Duplicate, contamination and personal-data audits (all on by default)."
    )


class TemplateSpec(Model):
    """The one prompt template used identically in training, evaluation and serving."""

    chat_template: str | None = Field(
        default=None,
        max_length=32768,
        description="A Jinja chat template; omitted means the base model tokenizer's own template.",
    )
    system_prompt: str | None = Field(
        default=None, max_length=8192, description="System message prepended to every conversation."
    )


class LoraSpec(Model):
    """LoRA adapter shape."""

    r: int = Field(default=16, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(default=32, ge=1, le=4096, description="LoRA scaling numerator (alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,  # the job adapts nothing otherwise and refuses it
        max_length=64,
        description='Module names to adapt; ["all-linear"] adapts every linear layer but the output head.',
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Modules trained in full next to the adapter (e.g. embed_tokens, lm_head).",
    )


class MethodSpec(Model):
    """How the weights are tuned."""

    type: Literal["lora", "qlora", "full"] = Field(
        default="lora",
        description="lora: adapter on a frozen base; qlora: adapter on a 4-bit base; full: all weights.",
    )
    lora: LoraSpec | None = Field(default=None, description="Adapter settings for lora and qlora.")


class TrainingSpec(Model):
    """Optimisation hyper-parameters."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.epochs) || has(self.maxSteps)", "set epochs or maxSteps")
            ]
        }
    )
    epochs: int | None = Field(default=None, ge=1, le=1000, description="Passes over the training mix.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Optimizer steps; overrides epochs when set."
    )
    learning_rate: float = Field(default=2e-4, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    batch_size_per_device: int = Field(
        default=4, ge=1, le=4096, description="Sequences per device per micro-step."
    )
    gradient_accumulation: int = Field(
        default=1, ge=1, le=1024, description="Micro-steps per optimizer step."
    )
    max_seq_length: int = Field(default=2048, ge=16, le=262144, description="Tokens per (packed) sequence.")
    packing: bool = Field(
        default=True, description="Pack several examples per sequence, kept apart by position ids."
    )
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16", description="Compute precision on GPUs."
    )
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations to save memory.")
    seed: int = Field(default=42, ge=0, description="Seed for data order, splits and initialisation.")


class DistributedSpec(Model):
    """How training is sharded across workers."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.zeroStage) || self.strategy == 'deepspeed'",
                    "zeroStage applies only to strategy deepspeed",
                    ".zeroStage",
                ),
                cel(
                    "!has(self.offload) || self.offload == 'none' || self.strategy == 'deepspeed'",
                    "offload applies only to strategy deepspeed",
                    ".offload",
                ),
            ]
        }
    )
    strategy: Literal["deepspeed", "ddp"] = Field(default="deepspeed", description="deepspeed (ZeRO) or ddp.")
    zero_stage: Literal[2, 3] | None = Field(default=None, description="DeepSpeed ZeRO stage (default 2).")
    offload: Literal["none", "optimizer", "all"] | None = Field(
        default=None, description="DeepSpeed offload to CPU: optimizer state, or optimizer and parameters."
    )


class ResourcesSpec(Model):
    """Where the Ray cluster runs: a GPU pool the platform team defined in the operator settings."""

    gpu_pool: str = Field(
        pattern=DNS_LABEL, max_length=63, description="Name of a GPU pool from the operator settings."
    )
    workers: int = Field(default=1, ge=1, le=512, description="Ray Train workers (one per node).")
    gpus_per_worker: int = Field(default=1, ge=0, le=16, description="GPUs per worker; 0 runs on CPU.")
    cpus_per_worker: int = Field(default=4, ge=1, le=256, description="CPUs per worker.")
    memory_per_worker: str = Field(
        default="16Gi",
        pattern=QUANTITY,
        max_length=64,
        description="Memory per worker, a Kubernetes quantity (16Gi, 64G, 1.5Gi).",
    )
    image: str | None = Field(
        default=None, max_length=512, description="Ray image; defaults to the operator's."
    )


class CheckpointingSpec(Model):
    """Checkpoints in S3; a restarted run resumes from the latest one."""

    uri: str = Field(pattern=S3_URI, description="S3 prefix for checkpoints and artifacts of this tune.")
    every_steps: int = Field(default=200, ge=1, description="Optimizer steps between checkpoints.")
    keep_last: int = Field(default=3, ge=1, le=100, description="Checkpoints kept; older ones are deleted.")


class EvalDataset(Model):
    """Held-out evaluation prompts with reference responses."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!(self.name in ['forgetting', 'validation'])",
                    "names forgetting and validation are taken by the probe's and the validation split's metrics",
                    ".name",
                ),
            ]
        }
    )
    name: str = Field(pattern=DNS_LABEL, min_length=1, max_length=63, description="Name used in metric keys.")
    uri: str = Field(pattern=S3_URI, description="S3 object or prefix in any supported dataset format.")


class MetricSpec(Model):
    """A score computed on generations (or loss) of the evaluation datasets."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("self.type != 'jsonSchema' || has(self.schema)", "jsonSchema needs schema", ".schema"),
                cel("self.type != 'regex' || has(self.pattern)", "regex needs pattern", ".pattern"),
                cel(
                    "self.type != 'exactMatch' || (has(self.fields) && size(self.fields) > 0)",
                    "exactMatch needs fields",
                    ".fields",
                ),
            ]
        }
    )
    type: Literal["loss", "jsonValid", "jsonSchema", "regex", "exactMatch"] = Field(
        description="loss/perplexity, JSON parses, JSON-schema valid, regex full match, or exact match of fields."
    )
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", description="JSON schema each response must satisfy (jsonSchema)."
    )
    pattern: str | None = Field(default=None, max_length=4096, description="Regular expression (regex).")
    fields: list[str] | None = Field(
        default=None, max_length=64, description="JSON fields compared with the reference (exactMatch)."
    )


class GateRule(Model):
    """A threshold on one reported metric; every rule must hold for the gate to pass."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.min) || has(self.max)", "set min or max"),
                cel(
                    "!has(self.min) || !has(self.max) || self.min <= self.max",
                    "min is above max: no value can pass the rule",
                    ".min",
                ),
            ]
        }
    )
    metric: str = Field(
        max_length=253,
        description="Metric key as reported in status.evaluation.metrics, e.g. jsonValid or forgetting.lossIncrease.",
    )
    min: float | None = Field(default=None, description="The metric must be at least this.")
    max: float | None = Field(default=None, description="The metric must be at most this.")


class ProbeSpec(Model):
    """General data scored before and after tuning, to measure forgetting."""

    uri: str = Field(pattern=S3_URI, description="General instruction data in S3.")


# Gate keys that read the general probe's metrics (gate.metric_value's grammar): forgetting.*,
# base.forgetting.* and delta.forgetting.*.
_READS_PROBE = " || ".join(
    f"g.metric.startsWith('{prefix}forgetting.')" for prefix in ("", "base.", "delta.")
)


class EvaluationSpec(Model):
    """Evaluation after training, and the gate that decides deployment."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    f"has(self.generalProbe) || !has(self.gate) || !self.gate.exists(g, {_READS_PROBE})",
                    "gate rules on forgetting.* metrics need generalProbe: without it they are never reported",
                    ".generalProbe",
                ),
            ]
        }
    )

    datasets: list[EvalDataset] = Field(
        default_factory=list,
        max_length=16,
        description="Evaluation datasets.",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.all(d, self.exists_one(e, e.name == d.name))",
                    "evaluation dataset names must be unique: they prefix the metric keys",
                )
            ]
        },
    )
    metrics: list[MetricSpec] = Field(default_factory=list, max_length=32, description="Scores to compute.")
    compare_to_base: bool = Field(
        default=True, description="Also score the base model, reported as baseMetrics."
    )
    general_probe: ProbeSpec | None = Field(default=None, description="Catastrophic-forgetting probe.")
    max_new_tokens: int = Field(default=256, ge=1, le=32768, description="Generation length limit.")
    gate: list[GateRule] = Field(
        default_factory=list, max_length=32, description="Deploy only when all rules hold."
    )


class ServingSpec(Model):
    """Serving rollout after the gate passes."""

    enabled: bool = Field(
        default=False, description="Deploy the tuned model when the evaluation gate passes."
    )
    runtime: Literal["vllm", "ray-serve"] = Field(default="vllm", description="Serving runtime.")
    replicas: int = Field(default=1, ge=1, le=100, description="Serving replicas.")
    gpu_pool: str | None = Field(default=None, pattern=DNS_LABEL, description="GPU pool for serving pods.")
    target: str | None = Field(
        default=None,
        pattern=DNS_1035_LABEL,
        max_length=53,
        description="Serving name shared by successive tunes (it names a Service: a letter first).",
    )


class SecretRef(Model):
    """A Secret in the tune's namespace."""

    name: str = Field(pattern=DNS_LABEL, max_length=253, description="Secret name.")


class CredentialsSpec(Model):
    """Credentials, by reference only: values never appear in the tune, its status or events."""

    s3_secret_ref: SecretRef | None = Field(
        default=None,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; omit for workload identity.",
    )
    hf_token_secret_ref: SecretRef | None = Field(
        default=None, description="Secret with HF_TOKEN for hf:// models."
    )


IMMUTABLE_RULE = cel(
    "self == oldSelf", "is immutable after creation: create a new InstructionTune to train again"
)


def frozen(description: str, default_factory: Any = None) -> Any:
    """A spec field that defines the training run: changing it would silently mix two runs."""
    extra: dict[str, Any] = {"x-kubernetes-validations": [IMMUTABLE_RULE]}
    if default_factory is None:
        return Field(description=f"{description} Immutable.", json_schema_extra=extra)  # type: ignore[arg-type]
    return Field(
        default_factory=default_factory, description=f"{description} Immutable.", json_schema_extra=extra
    )  # type: ignore[arg-type]


NAME_RULES: list[JsonDict] = [
    cel(
        f"size(self.metadata.name) <= {NAME_MAX}",
        f"metadata.name must be at most {NAME_MAX} characters: it is the value of the children's "
        "instructune.io/tune label",
    ),
    cel(
        f"self.metadata.name.matches('{DNS_1035_LABEL}')",
        "metadata.name must be an RFC 1035 label (lower-case letters, digits and '-', a letter first): "
        "it begins the names of the tune's RayCluster and Services",
    ),
]
"""Rules on the whole object (crd.py puts them at the schema's root): CEL sees metadata.name there."""


class InstructionTuneSpec(Model):
    """Desired state of an instruction-tuning run."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!(has(self.method) && self.method.type == 'qlora') || self.resources.gpusPerWorker > 0",
                    "qlora needs GPUs: set resources.gpusPerWorker > 0",
                    ".resources.gpusPerWorker",
                ),
                cel(
                    "!(has(self.method) && self.method.type == 'qlora')"
                    " || !(has(self.distributed) && has(self.distributed.zeroStage) && self.distributed.zeroStage == 3)",
                    "qlora is incompatible with DeepSpeed ZeRO stage 3 (4-bit weights cannot be partitioned): use zeroStage 2",
                    ".distributed.zeroStage",
                ),
                cel(
                    "!(has(self.method) && self.method.type == 'full') || !has(self.method.lora)",
                    "method.lora applies only to lora and qlora",
                    ".method.lora",
                ),
                cel(
                    "!(has(self.serving) && self.serving.enabled)"
                    " || (has(self.evaluation) && has(self.evaluation.gate) && size(self.evaluation.gate) > 0)",
                    "serving.enabled needs at least one evaluation.gate rule: nothing is deployed ungated",
                    ".evaluation.gate",
                ),
            ]
        }
    )
    base_model: BaseModelSpec = frozen("The pretrained model to tune.")
    dataset: DatasetSpec = frozen("Training and validation data.")
    template: TemplateSpec = frozen("The prompt template.", TemplateSpec)
    method: MethodSpec = frozen("Tuning method.", MethodSpec)
    training: TrainingSpec = frozen("Hyper-parameters.")
    distributed: DistributedSpec = frozen("Sharding.", DistributedSpec)
    resources: ResourcesSpec = frozen("Compute: GPU pool and worker count.")
    checkpointing: CheckpointingSpec = frozen("Checkpoints and artifacts in S3.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Evaluation and gate.")
    serving: ServingSpec = Field(default_factory=ServingSpec, description="Serving rollout.")
    credentials: CredentialsSpec = Field(
        default_factory=CredentialsSpec, description="Credential references."
    )
    suspend: bool = Field(default=False, description="true tears the Ray cluster down and keeps checkpoints.")
    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="Retries of a failed job, each from the latest checkpoint."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=60, description="Wall-clock limit of the run; exceeded means Failed."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the tune this long after it finished."
    )
    delete_artifacts_on_delete: bool = Field(
        default=False, description="Also delete checkpoints and artifacts in S3 when the tune is deleted."
    )


# -------------------------------------------------------------------------------------- status

# The vocabulary of the status, in one place (as KubeRay's raycluster_types.go): the operator code
# names phases, condition types and reasons only through these, so a typo is a type error, not a
# condition nobody waits for.

Phase = Literal[
    "Pending", "Provisioning", "Training", "Evaluating", "Deploying", "Succeeded", "Failed", "Suspended"
]
PHASE_PENDING: Final = "Pending"
PHASE_PROVISIONING: Final = "Provisioning"
PHASE_TRAINING: Final = "Training"
PHASE_EVALUATING: Final = "Evaluating"
PHASE_DEPLOYING: Final = "Deploying"
PHASE_SUCCEEDED: Final = "Succeeded"
PHASE_FAILED: Final = "Failed"
PHASE_SUSPENDED: Final = "Suspended"
TERMINAL_PHASES: tuple[Phase, ...] = (PHASE_SUCCEEDED, PHASE_FAILED)

ConditionType = Literal[
    "Validated", "ClusterReady", "Training", "Evaluated", "EvalPassed", "Serving", "Ready", "Succeeded"
]
CONDITION_VALIDATED: Final = "Validated"
CONDITION_CLUSTER_READY: Final = "ClusterReady"
CONDITION_TRAINING: Final = "Training"
CONDITION_EVALUATED: Final = "Evaluated"
CONDITION_EVAL_PASSED: Final = "EvalPassed"
CONDITION_SERVING: Final = "Serving"
CONDITION_READY: Final = "Ready"
CONDITION_SUCCEEDED: Final = "Succeeded"
CONDITION_TYPES: tuple[ConditionType, ...] = get_args(ConditionType)

ConditionStatus = Literal["True", "False", "Unknown"]


class Reason(StrEnum):
    """CamelCase reasons of condition transitions; each also becomes the reason of an event."""

    # Validated
    SPEC_VALID = "SpecValid"
    INVALID_SPEC = "InvalidSpec"
    # ClusterReady: waiting, ready, or why a Ray pod cannot run (lifecycle.diagnose_pods)
    PROVISIONING = "Provisioning"
    RAY_CLUSTER_READY = "RayClusterReady"
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    CRASH_LOOP_BACK_OFF = "CrashLoopBackOff"
    OOM_KILLED = "OOMKilled"
    # Training
    SUSPENDED = "Suspended"
    SUBMITTED = "Submitted"
    RESUMED = "Resumed"
    PREEMPTED = "Preempted"
    RUNNING = "Running"
    RETRYING = "Retrying"
    JOB_FAILED = "JobFailed"
    COMPLETED = "Completed"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    # A job's permanent exit (instructune_jobs.contract.PERMANENT_EXIT_REASONS): no retry.
    INVALID_TRAINING_CONFIG = "InvalidTrainingConfig"
    CHECKPOINT_CONFIG_MISMATCH = "CheckpointConfigMismatch"
    INVALID_DATA = "InvalidData"
    JOB_VERSION_MISMATCH = "JobVersionMismatch"
    # Evaluated, EvalPassed
    EVALUATED = "Evaluated"
    NO_METRICS = "NoMetrics"
    GATE_PASSED = "GatePassed"
    GATE_FAILED = "GateFailed"
    # Serving, and Ready/Succeeded of a served tune
    ROLLING_OUT = "RollingOut"
    AVAILABLE = "Available"
    SERVING = "Serving"
    # Ready/Succeeded of a failed tune
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    # Not a condition's: the reason of the event that records a phase change.
    PHASE = "Phase"


class Condition(Model):
    """A condition following the Kubernetes API conventions."""

    # The schema keeps plain strings: a new type or reason needs no CRD change (clients only compare).
    type: Annotated[ConditionType, WithJsonSchema({"type": "string"})] = Field(
        description="Condition type, e.g. Validated, Training, EvalPassed, Ready."
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: Annotated[Reason, WithJsonSchema({"type": "string"})] = Field(
        description="CamelCase reason for the last transition."
    )
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: str = Field(description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="The spec generation this reflects.")


class RayClusterRef(Model):
    """The tune's Ray cluster."""

    name: str | None = Field(default=None, description="RayCluster name.")
    dashboard_url: str | None = Field(default=None, description="Ray dashboard / Jobs API address.")


class Progress(Model):
    """Training progress reported by the job."""

    step: int | None = Field(default=None, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, description="Epochs done.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: float | None = Field(default=None, description="Training throughput.")
    percent: int | None = Field(default=None, description="step / totalSteps, in percent.")
    eta: str | None = Field(default=None, description="Estimated time left.")


class CheckpointRef(Model):
    """A checkpoint in S3."""

    step: int = Field(description="Step of the checkpoint.")
    uri: str = Field(description="Its S3 location.")
    loss: float | None = Field(default=None, description="Training loss at that step.")
    time: str | None = Field(default=None, description="When it was written.")


class DataStatus(Model):
    """What the job read."""

    rows: int | None = Field(default=None, description="Valid rows used.")
    invalid_rows: int | None = Field(default=None, description="Rows rejected.")
    invalid_rows_report: str | None = Field(
        default=None,
        description="Object listing every rejected row as JSON lines {object, line, reason}.",
    )
    duplicate_rows: int | None = Field(default=None, description="Rows dropped as duplicates.")
    contaminated_rows: int | None = Field(
        default=None, description="Training rows dropped because their prompt is an evaluation prompt."
    )
    pii_rows: int | None = Field(
        default=None, description="Rows with personal data (see spec.dataset.audit.pii)."
    )
    audit_report: str | None = Field(
        default=None,
        description="Object listing every audited row as JSON lines {object, line, kind, detail, action}.",
    )
    tokens: int | None = Field(default=None, description="Training tokens per epoch.")
    padding_fraction: float | None = Field(default=None, description="Padding share of the packed batches.")
    template_hash: str | None = Field(default=None, description="sha256 of the chat template trained with.")


class EvaluationStatus(Model):
    """Evaluation results and the gate's verdict."""

    metrics: dict[str, float] = Field(default_factory=dict, description="Metrics of the tuned model.")
    base_metrics: dict[str, float] = Field(
        default_factory=dict, description="The same metrics of the base model."
    )
    passed: bool | None = Field(default=None, description="Whether every gate rule held.")
    summary: str | None = Field(default=None, description="One-line verdict, shown by kubectl get.")
    report_uri: str | None = Field(default=None, description="Full report in S3.")


class Lineage(Model):
    """Everything needed to reproduce the tuned model."""

    base_model_revision: str | None = Field(default=None, description="Base model revision or content hash.")
    data_etags: dict[str, str] = Field(default_factory=dict, description="ETag of every data object read.")
    config_hash: str | None = Field(default=None, description="sha256 of the training configuration.")
    image: str | None = Field(default=None, description="Image the job ran in.")
    version: str | None = Field(default=None, description="instructune version.")


class ServingStatus(Model):
    """The serving deployment of this tune."""

    endpoint: str | None = Field(default=None, description="OpenAI-compatible endpoint.")
    model: str | None = Field(default=None, description="Served model name.")
    ready_replicas: int | None = Field(default=None, description="Ready serving replicas.")
    template_hash: str | None = Field(default=None, description="sha256 of the chat template served.")
    previous_adapter_uri: str | None = Field(default=None, description="Adapter served before, for rollback.")


class InstructionTuneStatus(Model):
    """Observed state, written by the operator and (progress only) by the job."""

    phase: Phase | None = Field(default=None, description="Lifecycle phase.")
    conditions: list[Condition] = Field(default_factory=list, description="Current conditions.")
    observed_generation: int | None = Field(default=None, description="The spec generation last acted on.")
    attempts: int | None = Field(default=None, description="Job attempts so far.")
    resumes: int | None = Field(
        default=None,
        description="Attempts started by resuming after a suspension or a node preemption; they do not count against backoffLimit.",
    )
    ray_cluster: RayClusterRef | None = Field(default=None, description="The Ray cluster.")
    job_id: str | None = Field(default=None, description="Ray job submission id.")
    started_at: str | None = Field(default=None, description="When the first attempt started.")
    finished_at: str | None = Field(default=None, description="When the tune reached Succeeded or Failed.")
    progress: Progress | None = Field(default=None, description="Training progress.")
    checkpoints: list[CheckpointRef] = Field(default_factory=list, description="Checkpoints kept.")
    data: DataStatus | None = Field(default=None, description="Data statistics.")
    evaluation: EvaluationStatus | None = Field(default=None, description="Evaluation results.")
    lineage: Lineage | None = Field(default=None, description="Lineage.")
    serving: ServingStatus | None = Field(default=None, description="Serving.")
