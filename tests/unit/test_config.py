"""TrainConfig: the operator -> job contract."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from instructune_jobs.config import (
    ExactMatchMetric,
    JsonSchemaMetric,
    JsonValidMetric,
    LossMetric,
    RegexMetric,
    TrainConfig,
)

pytestmark = pytest.mark.unit


def minimal(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "base_model": {"uri": "s3://models/llama-3.1-8b/"},
        "dataset": {"train": [{"uri": "s3://data/task/"}]},
    }
    spec.update(overrides)
    return spec


def full() -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "base_model": {"uri": "hf://meta-llama/Llama-3.1-8B@0e9e39f"},
            "dataset": {
                "train": [
                    {"uri": "s3://bucket/prefix/", "weight": 0.8},
                    {"uri": "s3://general/alpaca.jsonl", "weight": 0.2},
                ],
                "validation": {"fraction": 0.1},
                "format": "alpaca",
                "field_mapping": {"instruction": "question", "output": "answer"},
                "invalid_rows": {"policy": "fail", "max_fraction": 0.0},
            },
            "template": {"chat_template": "{{ messages }}", "system_prompt": "Be terse."},
            "method": {
                "type": "lora",
                "lora": {
                    "r": 32,
                    "alpha": 64,
                    "target_modules": ["q_proj", "v_proj"],
                    "modules_to_save": ["embed_tokens", "lm_head"],
                },
            },
            "training": {
                "epochs": 3,
                "max_steps": 500,
                "learning_rate": 3e-3,
                "max_seq_length": 512,
                "seed": 7,
            },
            "distributed": {"strategy": "deepspeed", "zero_stage": 3, "offload": "optimizer"},
            "resources": {"workers": 2, "gpus_per_worker": 8, "cpus_per_worker": 4},
            "checkpointing": {"uri": "s3://artifacts/demo/", "every_steps": 50, "keep_last": 2},
            "evaluation": {
                "datasets": [{"name": "heldout", "uri": "s3://data/heldout.jsonl"}],
                "metrics": [
                    "loss",
                    "json_valid",
                    {"json_schema": {"type": "object", "required": ["party"]}},
                    {"regex": "^\\{"},
                    {"exact_match": ["party", "date"]},
                ],
                "general_probe": {"uri": "s3://data/general.jsonl"},
            },
            "output": {"uri": "s3://artifacts/demo/final/", "merge": True},
            "run": {"namespace": "team-a", "name": "demo", "uid": "1234", "attempt": 2},
        }
    )


def test_defaults_fill_everything_but_model_and_data() -> None:
    cfg = TrainConfig.model_validate(minimal())
    assert cfg.method.type == "lora" and cfg.method.lora.target_modules == "all-linear"
    assert cfg.training.packing is True and cfg.training.precision == "bf16"
    assert cfg.dataset.format == "auto" and cfg.dataset.invalid_rows.policy == "skip"
    assert cfg.dataset.validation.uri is None and cfg.dataset.validation.fraction == 0.05
    assert cfg.distributed.strategy == "deepspeed" and cfg.distributed.zero_stage == 2
    assert cfg.evaluation.metrics == [LossMetric()]
    assert cfg.template.chat_template is None  # None: the model's own template


def test_json_round_trip_is_lossless() -> None:
    cfg = full()
    again = TrainConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.to_json() == cfg.to_json()
    assert again.config_hash() == cfg.config_hash()


def test_json_uses_snake_case_and_schema_key() -> None:
    document = json.loads(full().to_json())
    assert "base_model" in document and "batch_size_per_device" in document["training"]
    schema_metric = document["evaluation"]["metrics"][2]
    assert schema_metric == {"type": "json_schema", "schema": {"type": "object", "required": ["party"]}}


def test_metric_shorthands_expand_to_typed_metrics() -> None:
    metrics = full().evaluation.metrics
    assert [type(m) for m in metrics] == [
        LossMetric,
        JsonValidMetric,
        JsonSchemaMetric,
        RegexMetric,
        ExactMatchMetric,
    ]
    assert isinstance(metrics[3], RegexMetric) and metrics[3].pattern == "^\\{"
    assert isinstance(metrics[4], ExactMatchMetric) and metrics[4].fields == ["party", "date"]


def test_hf_uri_exposes_repo_and_revision() -> None:
    model = full().base_model
    assert (model.scheme, model.hf_repo, model.hf_revision) == ("hf", "meta-llama/Llama-3.1-8B", "0e9e39f")


@pytest.mark.parametrize("uri", ["http://x/y", "hf://no-revision-slash", "s3://", "relative/path"])
def test_bad_model_uri_is_rejected(uri: str) -> None:
    with pytest.raises(ValidationError):
        TrainConfig.model_validate(minimal(base_model={"uri": uri}))


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"dataset": {"train": []}}, "at least 1"),
        ({"dataset": {"train": [{"uri": "s3://data/x", "weight": 0}]}}, "greater than 0"),
        ({"dataset": {"train": [{"uri": "s3://data/x"}], "field_mapping": {"answer": "x"}}}, "field_mapping"),
        (
            {"dataset": {"train": [{"uri": "s3://data/x"}], "validation": {"fraction": 0.7}}},
            "less than or equal to 0.5",
        ),
        ({"training": {"precision": "int8"}}, "precision"),
        ({"training": {"bogus": 1}}, "Extra inputs"),
        ({"method": {"lora": {"target_modules": []}}}, "at least one module"),
        ({"method": {"type": "qlora"}, "distributed": {"zero_stage": 3}}, "ZeRO stage 3"),
        ({"distributed": {"strategy": "ddp", "offload": "all"}}, "offload needs"),
        ({"evaluation": {"metrics": [{"regex": "("}]}}, "does not compile"),
        ({"evaluation": {"metrics": ["bleu"]}}, "bleu"),
    ],
)
def test_incoherent_configs_are_rejected_with_a_reason(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainConfig.model_validate(minimal(**patch))


def test_config_hash_ignores_identity_outputs_and_evaluation() -> None:
    base = full()
    changed = base.model_copy(deep=True)
    changed.run.attempt = 9
    changed.run.uid = "other"
    changed.checkpointing.every_steps = 7
    changed.output.merge = False
    changed.evaluation.max_samples = 3
    changed.resources.cpus_per_worker = 16
    assert changed.config_hash() == base.config_hash()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: setattr(c.training, "learning_rate", 1e-4),
        lambda c: setattr(c.training, "seed", 8),
        lambda c: setattr(c.method.lora, "r", 8),
        lambda c: setattr(c.dataset.train[0], "weight", 0.5),
        lambda c: setattr(c.template, "system_prompt", "Be verbose."),
        lambda c: setattr(c.resources, "workers", 4),  # world size changes the effective batch
    ],
)
def test_config_hash_changes_with_what_is_trained(mutate: Any) -> None:
    base = full()
    changed = base.model_copy(deep=True)
    mutate(changed)
    assert changed.config_hash() != base.config_hash()


def test_config_hash_is_a_sha256_hex() -> None:
    digest = full().config_hash()
    assert len(digest) == 64 and int(digest, 16) >= 0


def test_effective_batch_size_counts_workers_gpus_and_accumulation() -> None:
    cfg = TrainConfig.model_validate(
        minimal(
            resources={"workers": 2, "gpus_per_worker": 4},
            training={"batch_size_per_device": 3, "gradient_accumulation": 5},
        )
    )
    assert cfg.world_size == 8 and cfg.effective_batch_size == 120
    cpu = TrainConfig.model_validate(minimal(resources={"workers": 2, "gpus_per_worker": 0}))
    assert cpu.world_size == 2


def test_config_module_imports_no_training_stack() -> None:
    code = (
        "import sys, instructune_jobs.config\n"
        "heavy = {'torch', 'ray', 'transformers', 'boto3', 'peft', 'deepspeed'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
