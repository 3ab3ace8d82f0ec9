"""Evaluation end to end against MinIO: a random tiny Llama and a LoRA-tuned copy of it, on the
held-out synthetic extraction task, loaded from S3 by the real transformers/PEFT code.

The tuned model is trained here with a minimal plain-torch loop (the recipe's Ray path has its
own tests); what is under test is evaluation: loading, template check, loss, generation, scoring,
base comparison, forgetting probe and the report in S3.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from instructune_jobs.config import TemplateConfig, TrainConfig  # noqa: E402
from instructune_jobs.data.collate import PaddingCollator  # noqa: E402
from instructune_jobs.data.formats import rows_to_conversations  # noqa: E402
from instructune_jobs.data.template import (  # noqa: E402
    TemplateMismatchError,
    template_hash,
)
from instructune_jobs.data.tokenize import tokenize_conversations  # noqa: E402
from instructune_jobs.data.types import LocatedRow  # noqa: E402
from instructune_jobs.evaluate import run_evaluation  # noqa: E402
from instructune_jobs.storage import s3_client_from_env, split_s3_uri  # noqa: E402
from instructune_jobs.synthetic import (  # noqa: E402
    CHATML_TEMPLATE,
    EXTRACTION_KEYS,
    EXTRACTION_SCHEMA,
    build_tiny_llama,
    extraction_rows,
    general_rows,
    upload_directory,
    upload_rows,
)

HELDOUT = 32
# A 64-wide, 2-layer model learns the JSON format in 300 steps (~75-80% strictly valid on held-out
# wording) at a quarter of the 128x4 model's cost: this file tests evaluation, not training quality.
TRAIN_STEPS = 300
MODEL_SHAPE = {"hidden": 64, "layers": 2}


@pytest.fixture(scope="module")
def s3_env(stack: Any) -> Iterator[dict[str, str]]:
    """The stack's S3 endpoint and credentials in os.environ, where s3_client_from_env reads them."""
    keys = [k for k in stack.env if k.startswith(("AWS_", "INSTRUCTUNE_S3"))]
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: stack.env[k] for k in keys})
    yield {k: stack.env[k] for k in keys}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def train_lora(
    base_dir: Path, final_dir: Path, rows: list[dict[str, str]], steps: int, seed: int = 0
) -> float:
    """Minimal LoRA tuning (settings measured to learn the task on a random base, see
    ARCHITECTURE.md), saved as the recipe saves it: final/adapter/ and final/tokenizer/.
    Returns the mean loss of the last 20 steps."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=32,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules="all-linear",
            modules_to_save=["embed_tokens", "lm_head"],
            task_type="CAUSAL_LM",
        ),
    )
    conversations, invalid, _ = rows_to_conversations(
        [LocatedRow("train", i, row) for i, row in enumerate(rows)], "alpaca"
    )
    assert not invalid
    examples, rejected = tokenize_conversations(conversations, tokenizer, None, 512)
    assert not rejected
    collate = PaddingCollator(tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    schedule = get_cosine_schedule_with_warmup(optimizer, steps // 20, steps)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(examples), (16,), generator=generator).tolist()
        loss = model(**collate([examples[i] for i in picks])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(final_dir / "adapter")
    tokenizer.save_pretrained(final_dir / "tokenizer")
    return sum(losses[-20:]) / 20


@pytest.fixture(scope="module")
def tuned_run(s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A random tiny Llama in s3://models/, a LoRA adapter tuned from it in s3://artifacts/,
    held-out extraction rows and a general probe in s3://datasets/."""
    run = uuid.uuid4().hex[:8]
    work = tmp_path_factory.mktemp("evaluate")
    base_dir = build_tiny_llama(work / "base", **MODEL_SHAPE)
    # One thread: these matmuls are too small to gain from two, and on a busy machine (the stack,
    # other test processes) extra threads spin against each other and cost 2-3x wall time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.monotonic()
    try:
        final_loss = train_lora(
            base_dir, work / "final", extraction_rows(2000, seed=0, split="train"), TRAIN_STEPS
        )
    finally:
        torch.set_num_threads(threads)
    train_seconds = time.monotonic() - started
    uris = {
        "base": f"s3://models/{run}/tiny-llama/",
        "root": f"s3://artifacts/{run}/",
        "train": f"s3://datasets/{run}/train.jsonl",
        "heldout": f"s3://datasets/{run}/heldout.jsonl",
        "probe": f"s3://datasets/{run}/general.jsonl",
    }
    upload_directory(base_dir, uris["base"])
    upload_directory(work / "final", uris["root"] + "final/")
    upload_rows(extraction_rows(64, seed=0, split="train"), uris["train"])
    upload_rows(extraction_rows(HELDOUT, seed=1, split="heldout"), uris["heldout"])
    upload_rows(general_rows(48, seed=1), uris["probe"])
    return {
        "uris": uris,
        "base_dir": base_dir,
        "work": work,
        "final_loss": final_loss,
        "train_seconds": train_seconds,
    }


def extraction_config(uris: dict[str, str], **evaluation: Any) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "base_model": {"uri": uris["base"]},
            "dataset": {"train": [{"uri": uris["train"]}], "format": "alpaca"},
            "training": {"max_seq_length": 512},
            "checkpointing": {"uri": uris["root"]},
            "evaluation": {
                "datasets": [{"name": "extraction", "uri": uris["heldout"]}],
                "metrics": [
                    "loss",
                    "json_valid",
                    {"json_schema": EXTRACTION_SCHEMA},
                    {"regex": r"\{.*\}"},
                    {"exact_match": list(EXTRACTION_KEYS)},
                ],
                "compare_to_base": True,
                "general_probe": {"uri": uris["probe"]},
                "max_new_tokens": 48,
                **evaluation,
            },
        }
    )


def read_s3_json(uri: str) -> dict[str, Any]:
    bucket, key = split_s3_uri(uri)
    return json.loads(s3_client_from_env().get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.fixture(scope="module")
def evaluated(tuned_run: dict[str, Any]) -> dict[str, Any]:
    """run_evaluation as the job calls it: everything (adapter, base, data) read from S3."""
    started = time.monotonic()
    result = run_evaluation(extraction_config(tuned_run["uris"]))
    print(
        f"\ntraining {tuned_run['train_seconds']:.0f}s (final loss {tuned_run['final_loss']:.3f}), "
        f"evaluation {time.monotonic() - started:.0f}s\nmetrics {result['metrics']}\nbase {result['baseMetrics']}"
    )
    return result


def test_report_with_tuned_and_base_metrics_lands_in_s3(
    evaluated: dict[str, Any], tuned_run: dict[str, Any]
) -> None:
    uris = tuned_run["uris"]
    assert evaluated["reportURI"] == f"{uris['root']}eval/report.json"
    assert evaluated["templateHash"] == template_hash(CHATML_TEMPLATE)
    metrics, base = evaluated["metrics"], evaluated["baseMetrics"]
    expected = {
        f"extraction.{k}" for k in ("loss", "perplexity", "jsonValid", "jsonSchema", "regex", "exactMatch")
    }
    assert expected <= metrics.keys()
    assert expected <= base.keys()
    assert {
        "forgetting.probeLoss",
        "forgetting.lossIncrease",
        "forgetting.relativeLossIncrease",
    } <= metrics.keys()
    assert all(isinstance(v, float) and math.isfinite(v) for v in [*metrics.values(), *base.values()])

    report = read_s3_json(evaluated["reportURI"])
    assert report["metrics"] == metrics
    assert report["baseMetrics"] == base
    assert report["templateHash"] == evaluated["templateHash"]
    (dataset,) = report["datasets"]
    assert dataset["generated"] == HELDOUT and len(dataset["samples"]) == HELDOUT
    assert {"messages", "reference", "output", "scores", "baseOutput", "baseScores"} <= dataset["samples"][
        0
    ].keys()
    # The per-sample scores are the ones aggregated into the metrics.
    valid = sum(s["scores"]["jsonValid"] for s in dataset["samples"])
    assert valid / HELDOUT == metrics["extraction.jsonValid"]
    base_valid = sum(s["baseScores"]["jsonValid"] for s in dataset["samples"])
    assert base_valid / HELDOUT == base["extraction.jsonValid"]


def test_tuned_model_beats_the_random_base_on_held_out_format_and_loss(evaluated: dict[str, Any]) -> None:
    metrics, base = evaluated["metrics"], evaluated["baseMetrics"]
    # Tuning taught the format on prompts worded unlike the training ones; the random base has none.
    assert metrics["extraction.jsonValid"] >= 0.6
    assert metrics["extraction.jsonSchema"] >= 0.4
    assert base["extraction.jsonValid"] == 0.0
    assert base["extraction.exactMatch"] == 0.0
    assert metrics["extraction.loss"] < base["extraction.loss"] - 1.0
    assert metrics["extraction.perplexity"] == pytest.approx(math.exp(metrics["extraction.loss"]), rel=1e-6)
    # Values are scored apart from keys, and exact values are the harder part.
    assert metrics["extraction.exactMatch"] <= metrics["extraction.jsonSchema"]
    for key in EXTRACTION_KEYS:
        assert 0.0 <= metrics[f"extraction.fieldMatch.{key}"] <= metrics["extraction.jsonValid"]
    # The mean over datasets (one here) is what an unprefixed gate rule reads.
    assert metrics["jsonValid"] == metrics["extraction.jsonValid"]
    # Forgetting: the tuned model's probe loss against the base's.
    assert metrics["forgetting.lossIncrease"] == pytest.approx(
        metrics["forgetting.probeLoss"] - base["forgetting.probeLoss"]
    )


def test_cli_scoring_the_base_as_a_full_model_reproduces_the_disabled_adapter_base_scores(
    evaluated: dict[str, Any], tuned_run: dict[str, Any], s3_env: dict[str, str], tmp_path: Path
) -> None:
    # The base metrics above come from the PEFT model with its adapter (and modules_to_save)
    # disabled; loading the base weights as a plain model must give the same loss.
    uris = tuned_run["uris"]
    cfg = extraction_config(uris, metrics=["loss"], compare_to_base=False)
    config_file = tmp_path / "config.json"
    config_file.write_text(cfg.to_json())
    report_uri = f"{uris['root']}eval/base-as-full.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "instructune_jobs.evaluate",
            "--config-file",
            str(config_file),
            "--model",
            uris["base"],
            "--report-uri",
            report_uri,
        ],
        env={**os.environ, **s3_env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["reportURI"] == report_uri
    assert result["baseMetrics"] == {
        "forgetting.probeLoss": pytest.approx(result["metrics"]["forgetting.probeLoss"])
    }
    assert result["metrics"]["extraction.loss"] == pytest.approx(
        evaluated["baseMetrics"]["extraction.loss"], rel=1e-4
    )
    assert result["metrics"]["forgetting.probeLoss"] == pytest.approx(
        evaluated["baseMetrics"]["forgetting.probeLoss"], rel=1e-4
    )
    assert result["metrics"]["forgetting.lossIncrease"] == pytest.approx(0.0, abs=1e-5)
    assert read_s3_json(report_uri)["model"]["kind"] == "full"


def test_evaluation_refuses_a_chat_template_other_than_the_trained_one(tuned_run: dict[str, Any]) -> None:
    uris = tuned_run["uris"]
    cfg = extraction_config(uris, metrics=["loss"])
    cfg.template = TemplateConfig(chat_template=CHATML_TEMPLATE.replace("<|im_start|>", "<|im_start|> "))
    with pytest.raises(TemplateMismatchError, match="chat template"):
        run_evaluation(cfg, str(tuned_run["work"] / "final"), tuned_run["base_dir"])


def test_the_validation_split_is_scored_on_the_tokens_training_prepared(tuned_run: dict[str, Any]) -> None:
    from instructune_jobs.artifacts import ArtifactLayout
    from instructune_jobs.prepare import prepare_data, read_prepared
    from instructune_jobs.storage import Storage

    uris = tuned_run["uris"]
    root = uris["root"].rstrip("/") + "-validation/"
    upload_directory(tuned_run["work"] / "final", root + "final/")
    cfg = TrainConfig.model_validate(
        {
            "base_model": {"uri": uris["base"]},
            # 64 rows of the training distribution, a quarter set aside by the seeded split
            "dataset": {
                "train": [{"uri": uris["train"]}],
                "format": "alpaca",
                "validation": {"fraction": 0.25},
            },
            "training": {"max_seq_length": 512},
            "checkpointing": {"uri": root},
            "evaluation": {"datasets": [], "metrics": ["loss"], "compare_to_base": True},
        }
    )
    layout, storage = ArtifactLayout.for_config(cfg), Storage()
    prepared = prepare_data(cfg, layout, storage)
    split = read_prepared(prepared.uri, storage).validation
    assert len(split) == 16
    # What the training job's rank 0 writes at the end of training.
    manifest = {"data": {"preparedUri": prepared.uri, "validationExamples": len(split)}}
    storage.write_bytes(layout.manifest, json.dumps(manifest).encode())

    result = run_evaluation(cfg)

    metrics, base = result["metrics"], result["baseMetrics"]
    assert metrics["validation.loss"] < base["validation.loss"] - 1.0
    assert metrics["validation.perplexity"] == pytest.approx(math.exp(metrics["validation.loss"]), rel=1e-6)
    assert read_s3_json(result["reportURI"])["validation"] == {"examples": 16}
