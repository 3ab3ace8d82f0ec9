"""The training recipe on the local stack's real Ray head and MinIO.

Every run is submitted through the Ray Jobs API as `python -m instructune_jobs --config-file ...`,
exactly as the operator submits it; the job's driver and workers take the S3 endpoint and
credentials from the Ray head's environment (as Ray pods get them from the Secret). A random tiny
Llama (built offline, uploaded to MinIO) is loaded through the recipe's real S3 and transformers
code. Four properties, on 2 CPU cores:

1. loss parity: the job (1 worker, DDP, unpacked) and a plain single-process PEFT/torch loop with
   the same model, data, masking, order and seed end within 1% of each other;
2. DeepSpeed ZeRO-2 and ZeRO-3 (with CPU offload) on 2 workers train, checkpoint to S3 keeping
   the last K, write the final artifacts, and agree with each other;
3. a job stopped midway (Ray Jobs API, as the operator submits it) and submitted again resumes
   from the latest S3 checkpoint and ends at the planned step count, no step repeated beyond the
   checkpoint interval (read from metrics.jsonl);
4. the tuned model follows the trained output format on held-out prompts far more often than
   the base model (the same job's evaluation, run by the entrypoint after training);
5. the data is tokenized once per configuration: the resumed attempt reuses it, and data the
   policy refuses fails the job with exit code 4 and the row before any training worker starts.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shlex
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")
pytest.importorskip("ray")
pytest.importorskip("peft")
pytest.importorskip("deepspeed")

from instructune_jobs.artifacts import ArtifactLayout  # noqa: E402
from instructune_jobs.checkpointing import STATE_FILE, list_checkpoints  # noqa: E402
from instructune_jobs.config import TrainConfig  # noqa: E402
from instructune_jobs.data.collate import PaddingCollator  # noqa: E402
from instructune_jobs.data.pipeline import load_examples  # noqa: E402
from instructune_jobs.storage import Storage  # noqa: E402
from instructune_jobs.synthetic import (  # noqa: E402
    EXTRACTION_SCHEMA,
    build_tiny_llama,
    extraction_rows,
    upload_directory,
    upload_rows,
)

# ARCHITECTURE.md's measured settings for learning the extraction format on a random tiny base.
FORMAT_STEPS = 480
FORMAT_EVERY = 60
HELDOUT = 32


@pytest.fixture(scope="module")
def stack_env(stack: Any) -> Iterator[dict[str, str]]:
    """The stack's S3 endpoint and credentials in os.environ for this module: the test itself
    uploads the model and data and reads the results."""
    keys = [k for k in stack.env if k.startswith(("AWS_", "INSTRUCTUNE_S3"))]
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: stack.env[k] for k in keys})
    yield dict(stack.env)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def assets(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    work = tmp_path_factory.mktemp("finetune")
    base_dir = build_tiny_llama(work / "base")
    uris = {
        "base": f"s3://models/{run}/tiny-llama/",
        "train": f"s3://datasets/{run}/extraction-train.jsonl",
        "heldout": f"s3://datasets/{run}/extraction-heldout.jsonl",
        "root": f"s3://artifacts/{run}",
    }
    upload_directory(base_dir, uris["base"])
    upload_rows(extraction_rows(2000, seed=0, split="train"), uris["train"])
    upload_rows(extraction_rows(HELDOUT, seed=1, split="heldout"), uris["heldout"])
    return {"uris": uris, "base_dir": base_dir, "work": work}


def make_config(assets: dict[str, Any], name: str, **overrides: Any) -> TrainConfig:
    uris = assets["uris"]
    raw: dict[str, Any] = {
        "base_model": {"uri": uris["base"]},
        "dataset": {"train": [{"uri": uris["train"]}], "format": "alpaca", "validation": {"fraction": 0.0}},
        "method": {
            "type": "lora",
            "lora": {
                "r": 8,
                "alpha": 16,
                "dropout": 0.0,
                "target_modules": "all-linear",
                "modules_to_save": ["embed_tokens", "lm_head"],
            },
        },
        "training": {
            "max_steps": 30,
            "learning_rate": 2e-3,
            "lr_scheduler": "cosine",
            "warmup_ratio": 0.1,
            "batch_size_per_device": 8,
            "max_seq_length": 256,
            "packing": False,
            "precision": "fp32",
            "gradient_checkpointing": False,
            "seed": 7,
        },
        "distributed": {"strategy": "ddp"},
        "resources": {"workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1},
        "checkpointing": {"uri": f"{uris['root']}/{name}/", "every_steps": 10, "keep_last": 2},
        "evaluation": {"datasets": [], "metrics": ["loss"]},
        "run": {"namespace": "default", "name": f"ft-{name}"},
    }
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return TrainConfig.model_validate(raw)


def read_metrics(cfg: TrainConfig) -> list[dict[str, Any]]:
    body = Storage().read_bytes(ArtifactLayout.for_config(cfg).metrics) or b""
    return [json.loads(line) for line in body.decode().splitlines() if line.strip()]


def jobs_client(stack_env: dict[str, str]) -> Any:
    from ray.job_submission import JobSubmissionClient

    token = stack_env.get("RAY_AUTH_TOKEN")
    return JobSubmissionClient(
        stack_env["RAY_ADDRESS"], headers={"Authorization": f"Bearer {token}"} if token else None
    )


def submit(client: Any, cfg: TrainConfig, work: Path, name: str) -> str:
    config_file = work / f"{name}-config.json"
    config_file.write_text(cfg.to_json())
    entrypoint = (
        f"{shlex.quote(sys.executable)} -m instructune_jobs --config-file {shlex.quote(str(config_file))}"
    )
    return str(client.submit_job(entrypoint=entrypoint, submission_id=f"ft-{name}-{uuid.uuid4().hex[:6]}"))


def wait_job(client: Any, job_id: str, timeout: float, until: Any = None) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id))
        if until is not None and until():
            return status
        if status.endswith(("SUCCEEDED", "FAILED", "STOPPED")):
            return status
        time.sleep(1)
    raise AssertionError(
        f"job {job_id} still {client.get_job_status(job_id)} after {timeout}s:\n"
        f"{client.get_job_logs(job_id)[-4000:]}"
    )


def run_job(
    stack_env: dict[str, str],
    cfg: TrainConfig,
    work: Path,
    name: str,
    timeout: float = 600,
    logs_out: list[str] | None = None,
) -> dict[str, Any]:
    """Submit, wait for success, return the entrypoint's INSTRUCTUNE_RESULT (and the job's log
    in logs_out)."""
    client = jobs_client(stack_env)
    job_id = submit(client, cfg, work, name)
    status = wait_job(client, job_id, timeout)
    logs = client.get_job_logs(job_id)
    assert status.endswith("SUCCEEDED"), f"{name}: {status}\n{logs[-6000:]}"
    if logs_out is not None:
        logs_out.append(logs)
    return job_result(logs)


def job_result(logs: str) -> dict[str, Any]:
    line = next(line for line in reversed(logs.splitlines()) if line.startswith("INSTRUCTUNE_RESULT "))
    return dict(json.loads(line.removeprefix("INSTRUCTUNE_RESULT ")))


# ---------------------------------------------------------------------------------------------
# 1. Loss parity with a plain PyTorch/PEFT loop
# ---------------------------------------------------------------------------------------------


def plain_reference_losses(cfg: TrainConfig, base_dir: Path) -> list[float]:
    """The same training written as a single-process loop with no Ray, DDP or DeepSpeed:
    transformers + PEFT + torch AdamW + HF cosine schedule, the data step's examples, padding
    collator and the documented order (epoch e: random.Random(seed + e).shuffle)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    training, lora = cfg.training, cfg.method.lora
    torch.manual_seed(training.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    items = load_examples(cfg, tokenizer).train
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    torch.manual_seed(training.seed)
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            modules_to_save=lora.modules_to_save,
            task_type="CAUSAL_LM",
        ),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)
    total = training.max_steps or 0
    schedule = get_scheduler(
        "cosine",
        optimizer,
        num_warmup_steps=math.ceil(training.warmup_ratio * total),
        num_training_steps=total,
    )
    collate = PaddingCollator(tokenizer.pad_token_id)
    per_epoch = len(items) // training.batch_size_per_device
    losses = []
    model.train()
    for step in range(total):
        epoch, within = divmod(step, per_epoch)
        order = list(range(len(items)))
        random.Random(training.seed + epoch).shuffle(order)
        batch = [
            items[i]
            for i in order[within * training.batch_size_per_device :][: training.batch_size_per_device]
        ]
        loss = model(**collate(batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, training.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_job_loss_matches_a_plain_pytorch_loop(assets: dict[str, Any], stack_env: dict[str, str]) -> None:
    cfg = make_config(assets, "parity")
    started = time.monotonic()
    result = run_job(stack_env, cfg, assets["work"], "parity")
    job_seconds = time.monotonic() - started
    job = [line["loss"] for line in read_metrics(cfg)]
    reference = plain_reference_losses(cfg, assets["base_dir"])

    assert len(job) == len(reference) == 30
    tail_job, tail_ref = sum(job[-5:]) / 5, sum(reference[-5:]) / 5
    message = (
        f"job final {job[-1]:.5f} (last-5 mean {tail_job:.5f}) vs plain loop {reference[-1]:.5f} "
        f"({tail_ref:.5f}); first {job[0]:.4f}/{reference[0]:.4f}; job {job_seconds:.0f}s"
    )
    print(message)
    assert abs(job[-1] - reference[-1]) / reference[-1] < 0.01, message
    assert abs(tail_job - tail_ref) / tail_ref < 0.01, message
    assert job[-1] < job[0] - 1.0, f"the job did not learn: {message}"
    assert result["training"]["steps"] == 30


# ---------------------------------------------------------------------------------------------
# 2. DeepSpeed ZeRO-2 and ZeRO-3 on two workers
# ---------------------------------------------------------------------------------------------


def test_zero2_and_zero3_train_on_two_workers_and_checkpoint_to_s3(
    assets: dict[str, Any], stack_env: dict[str, str]
) -> None:
    common = {
        "training__max_steps": 6,
        "training__packing": True,
        "training__batch_size_per_device": 4,
        "training__gradient_checkpointing": True,
        "resources__workers": 2,
        "checkpointing__every_steps": 2,
        "checkpointing__keep_last": 2,
    }
    runs = {
        "zero2": make_config(
            assets, "zero2", distributed={"strategy": "deepspeed", "zero_stage": 2}, **common
        ),
        "zero3": make_config(
            assets,
            "zero3",
            distributed={"strategy": "deepspeed", "zero_stage": 3, "offload": "all"},
            **common,
        ),
    }
    final: dict[str, float] = {}
    timings: dict[str, float] = {}
    logs: list[str] = []
    for name, cfg in runs.items():
        started = time.monotonic()
        result = run_job(stack_env, cfg, assets["work"], name, logs_out=logs)
        timings[name] = round(time.monotonic() - started)
        layout, storage = ArtifactLayout.for_config(cfg), Storage()
        checkpoints = list_checkpoints(layout, storage)
        assert [c.step for c in checkpoints] == [4, 6], f"{name}: keep_last=2 of 2, 4, 6"
        files = {o.uri.rsplit("/", 1)[-1] for o in storage.list(checkpoints[-1].uri)}
        # Both ranks' optimizer shards were merged into the one checkpoint directory.
        assert {
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        } <= files
        assert all(c.config_hash == cfg.config_hash() for c in checkpoints)
        assert storage.list(layout.final_adapter) and storage.list(layout.final_tokenizer)
        manifest = json.loads(storage.read_bytes(layout.manifest) or b"{}")
        assert manifest["configHash"] == cfg.config_hash()
        assert manifest["baseModel"]["revision"].startswith("sha256:")
        assert list(manifest["data"]["etags"]) == [assets["uris"]["train"]]
        assert {"torch", "transformers", "peft", "deepspeed", "ray"} <= manifest["packages"].keys()
        progress = json.loads(storage.read_bytes(layout.progress) or b"{}")
        assert progress["progress"]["step"] == 6 and progress["progress"]["percent"] == 100
        assert [c["step"] for c in progress["checkpoints"]] == [4, 6]
        assert result["training"]["steps"] == 6
        final[name] = read_metrics(cfg)[-1]["loss"]
    print(f"final loss zero2 {final['zero2']:.5f}, zero3+offload {final['zero3']:.5f}; seconds {timings}")
    # The same data, order and seed: sharding the states must not change the numbers.
    assert final["zero2"] == pytest.approx(final["zero3"], rel=1e-3)
    # Under ZeRO-3 no rank held the whole base model: each loaded only its partition.
    assert "partitioned as loaded" not in logs[0]
    partitions = re.findall(r"partitioned as loaded, (\d+) of (\d+) elements", logs[1])
    assert partitions, logs[1][-4000:]  # one line per rank, or one that Ray marks as repeated
    assert all(2 * int(held) <= int(total) + 2 * 1024 for held, total in partitions), partitions

    # Resumed under ZeRO-3 + offload: with the final artifacts and the last checkpoint gone, a new
    # job restores step 4 (each rank downloading only its own shard) and ends where the
    # uninterrupted run ended.
    cfg = runs["zero3"]
    layout, storage = ArtifactLayout.for_config(cfg), Storage()
    storage.delete_prefix(layout.final)
    storage.delete_prefix(layout.checkpoint(6), first=STATE_FILE)
    result = run_job(stack_env, cfg, assets["work"], "zero3-resumed")
    assert result["training"]["resumedFromStep"] == 4
    resumed = [line for line in read_metrics(cfg) if line["step"] > 4]
    assert [line["step"] for line in resumed[-2:]] == [5, 6]
    assert resumed[-1]["loss"] == pytest.approx(final["zero3"], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# 3 + 4. Stopped and resubmitted through the Jobs API; then the format is learnt
# ---------------------------------------------------------------------------------------------


def test_stopped_job_resumes_from_s3_and_learns_the_output_format(
    assets: dict[str, Any], stack_env: dict[str, str]
) -> None:
    cfg = make_config(
        assets,
        "resume",
        method__lora__r=32,
        method__lora__alpha=64,
        training__max_steps=FORMAT_STEPS,
        training__learning_rate=3e-3,
        training__batch_size_per_device=16,
        training__max_seq_length=512,
        training__warmup_ratio=0.05,
        training__seed=0,
        resources__cpus_per_worker=2,
        checkpointing__every_steps=FORMAT_EVERY,
        checkpointing__keep_last=2,
        evaluation={
            "datasets": [{"name": "extraction", "uri": assets["uris"]["heldout"]}],
            "metrics": ["json_valid", {"json_schema": EXTRACTION_SCHEMA}],
            "compare_to_base": True,
            "max_new_tokens": 64,
            "max_samples": HELDOUT,
        },
    )
    client = jobs_client(stack_env)
    layout, storage = ArtifactLayout.for_config(cfg), Storage()
    started = time.monotonic()

    # First attempt: stopped once a checkpoint is in S3 and training went on past it.
    first = submit(client, cfg, assets["work"], "resume-1")

    # Stopped as soon as a checkpoint is in S3, not at "checkpoint + n steps" as read from the
    # metrics: those are flushed at each checkpoint and at most every few seconds between, so on a
    # fast run every read sat on a checkpoint and the first attempt ran to its end.
    def has_a_checkpoint() -> bool:
        return bool(list_checkpoints(layout, storage))

    status = wait_job(client, first, 420, until=has_a_checkpoint)
    assert "RUNNING" in status, f"first attempt ended early ({status}):\n{client.get_job_logs(first)[-4000:]}"
    client.stop_job(first)
    assert wait_job(client, first, 120).endswith(("STOPPED", "FAILED"))
    stopped_at = max(line["step"] for line in read_metrics(cfg))
    checkpoint_before = list_checkpoints(layout, storage)[-1].step
    assert checkpoint_before < FORMAT_STEPS

    # Second attempt: a new driver finds the latest checkpoint in S3 and goes on from it.
    second = submit(client, cfg, assets["work"], "resume-2")
    status = wait_job(client, second, 900)
    logs = client.get_job_logs(second)
    assert status.endswith("SUCCEEDED"), logs[-6000:]
    total_seconds = time.monotonic() - started

    lines = read_metrics(cfg)
    attempts = list(dict.fromkeys(line["attempt"] for line in lines))
    assert len(attempts) == 2, attempts
    resumed = [line["step"] for line in lines if line["attempt"] == attempts[1]]
    assert resumed[0] == checkpoint_before + 1, (
        f"resumed at {resumed[0]}, latest checkpoint {checkpoint_before}"
    )
    counts = Counter(line["step"] for line in lines)
    assert sorted(counts) == list(range(1, FORMAT_STEPS + 1)), "every planned step ran, none beyond"
    repeated = sorted(step for step, n in counts.items() if n > 1)
    assert max(counts.values()) <= 2
    assert len(repeated) <= FORMAT_EVERY, f"{len(repeated)} steps repeated, interval {FORMAT_EVERY}"
    manifest = json.loads(storage.read_bytes(layout.manifest) or b"{}")
    assert manifest["training"]["steps"] == FORMAT_STEPS
    assert manifest["training"]["resumedFromStep"] == checkpoint_before
    # The second attempt trained on the tokens the first one prepared.
    assert "data already prepared from the same inputs" in logs
    assert len(storage.list(f"{layout.root}/data")) == 1

    result = job_result(logs)
    tuned, base = result["evaluation"]["metrics"], result["evaluation"]["baseMetrics"]
    tuned_rate, base_rate = tuned["extraction.jsonSchema"], base["extraction.jsonSchema"]
    message = (
        f"held-out prompts in the trained format (JSON with exactly party/amount/date): tuned "
        f"{tuned_rate:.0%}, base {base_rate:.0%} (jsonValid {tuned['extraction.jsonValid']:.0%} vs "
        f"{base['extraction.jsonValid']:.0%}); stopped at step {stopped_at}, resumed from checkpoint "
        f"{checkpoint_before}, {len(repeated)} steps repeated; final loss "
        f"{manifest['training']['finalLoss']:.3f}; both attempts + evaluation {total_seconds:.0f}s"
    )
    print(message)
    assert tuned_rate >= 0.8, message
    assert base_rate <= 0.1, message
    assert result["evaluation"]["reportURI"] == layout.eval_report


# ---------------------------------------------------------------------------------------------
# A checkpoint root of another configuration is refused before anything runs
# ---------------------------------------------------------------------------------------------


def test_checkpoints_of_another_config_are_not_resumed(
    assets: dict[str, Any], stack_env: dict[str, str]
) -> None:
    import subprocess

    from instructune_jobs.artifacts import checkpoint_dir_name
    from instructune_jobs.checkpointing import STATE_FILE, CheckpointState

    cfg = make_config(assets, "foreign")
    layout = ArtifactLayout.for_config(cfg)
    foreign = CheckpointState(10, 0.5, "0" * 64, 1.0, "2026-01-01T00:00:00Z", layout.checkpoint(10))
    Storage().write_bytes(f"{layout.checkpoint(10)}/{STATE_FILE}", foreign.to_json().encode())
    assert layout.checkpoint(10).endswith(checkpoint_dir_name(10))
    done = subprocess.run(
        [sys.executable, "-m", "instructune_jobs", "--config-json", cfg.to_json()],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": ""},  # refused before Ray is contacted at all
    )
    assert done.returncode == 3, done.stderr[-3000:]
    assert "refusing to resume another run" in done.stderr


# ---------------------------------------------------------------------------------------------
# Data the policy refuses stops the job before training starts, with the row that broke it
# ---------------------------------------------------------------------------------------------


def test_refused_data_fails_the_job_with_exit_code_4_and_the_row_before_training(
    assets: dict[str, Any], stack_env: dict[str, str]
) -> None:
    rows = extraction_rows(6, seed=3, split="train")
    rows[2] = {**rows[2], "output": ""}
    bad = assets["uris"]["train"].replace("extraction-train.jsonl", "refused.jsonl")
    upload_rows(rows, bad)
    cfg = make_config(
        assets, "refused", dataset__train=[{"uri": bad}], dataset__invalid_rows={"policy": "fail"}
    )
    client = jobs_client(stack_env)
    job = submit(client, cfg, assets["work"], "refused")
    status = wait_job(client, job, 300)
    logs = client.get_job_logs(job)

    assert status.endswith("FAILED"), logs[-4000:]
    assert client.get_job_info(job).driver_exit_code == 4, logs[-4000:]
    assert f"{bad}:3: empty response in field 'output'" in logs
    layout, storage = ArtifactLayout.for_config(cfg), Storage()
    # No worker trained: the refused row's report is all there is under the root.
    assert read_metrics(cfg) == []
    assert [o.uri for o in storage.list(layout.root)] == [layout.invalid_rows]
    report = json.loads(storage.read_bytes(layout.invalid_rows) or b"{}")
    assert report == {"object": bad, "line": 3, "reason": "empty response in field 'output'"}


# ---------------------------------------------------------------------------------------------
# Exact resume: stopped between two checkpoints, resumed, the same weights as never stopped
# ---------------------------------------------------------------------------------------------


def _final_adapter_tensors(layout: ArtifactLayout, storage: Storage) -> dict[str, Any]:
    from safetensors.torch import load

    files = [o.uri for o in storage.list(layout.final_adapter) if o.uri.endswith(".safetensors")]
    assert files, f"no adapter weights under {layout.final_adapter}"
    tensors: dict[str, Any] = {}
    for uri in files:
        tensors.update(load(storage.read_bytes(uri) or b""))
    return tensors


def test_a_run_resumed_between_checkpoints_ends_bit_for_bit_where_the_uninterrupted_run_ends(
    assets: dict[str, Any], stack_env: dict[str, str]
) -> None:
    """The quickstart's setting (DeepSpeed ZeRO-2 on two workers, packing) with gradient
    accumulation and an epoch boundary inside the replayed steps: data order, sampler position,
    every rank's RNG state, the schedule, the optimizer and the accumulation position must all be
    restored for the resumed run to end on the same bits."""
    rows = extraction_rows(96, seed=5, split="train")  # few rows: the replayed steps cross an epoch
    small = assets["uris"]["train"].replace("extraction-train.jsonl", "exact-resume.jsonl")
    upload_rows(rows, small)
    cfg = make_config(
        assets,
        "exact-resume",
        dataset__train=[{"uri": small}],
        distributed={"strategy": "deepspeed", "zero_stage": 2},
        resources__workers=2,
        method__lora__dropout=0.1,  # a random op in every step: RNG states must be restored
        training__max_steps=9,
        training__packing=True,
        training__batch_size_per_device=2,
        training__gradient_accumulation=2,
        checkpointing__every_steps=3,
        checkpointing__keep_last=3,
    )
    layout, storage = ArtifactLayout.for_config(cfg), Storage()
    run_job(stack_env, cfg, assets["work"], "exact-uninterrupted")
    uninterrupted = {line["step"]: line["loss"] for line in read_metrics(cfg)}
    weights = _final_adapter_tensors(layout, storage)
    epochs = [line["epoch"] for line in read_metrics(cfg)]
    assert math.floor(epochs[2]) < math.floor(epochs[-1]), f"steps 4..9 must cross an epoch: {epochs}"

    # Stopped after step 7: checkpoint 6 never became complete, nor did the final artifacts.
    storage.delete_prefix(layout.final)
    storage.delete_prefix(layout.checkpoint(9), first=STATE_FILE)
    storage.delete_prefix(layout.checkpoint(6), first=STATE_FILE)
    result = run_job(stack_env, cfg, assets["work"], "exact-resumed")

    assert result["training"]["resumedFromStep"] == 3
    resumed = [line for line in read_metrics(cfg) if line["attempt"] != read_metrics(cfg)[0]["attempt"]]
    assert [line["step"] for line in resumed] == list(range(4, 10))
    assert {line["step"]: line["loss"] for line in resumed} == {s: uninterrupted[s] for s in range(4, 10)}
    again = _final_adapter_tensors(layout, storage)
    assert sorted(again) == sorted(weights)
    different = [name for name in weights if not torch.equal(weights[name], again[name])]
    assert not different, f"{len(different)} of {len(weights)} tensors differ, e.g. {different[:3]}"
