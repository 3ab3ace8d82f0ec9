"""Ray Serve rollout on the local stack, submitted as a Ray job exactly as the operator submits it.

A random tiny Llama (base) and a random, non-zero LoRA adapter for it (no training: what is under
test is serving) go to MinIO together with a trained tokenizer whose chat template differs from
the base's, so that a prompt rendered with the wrong template shows. The served answers are
compared with the same model loaded and decoded greedily here.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from instructune_jobs.config import TrainConfig  # noqa: E402
from instructune_jobs.data.template import render_chat, template_hash  # noqa: E402
from instructune_jobs.generation import generate  # noqa: E402
from instructune_jobs.models import (  # noqa: E402
    TrainedArtifacts,
    load_tokenizer,
    load_tuned_model,
)
from instructune_jobs.storage import s3_client_from_env, split_s3_uri  # noqa: E402
from instructune_jobs.synthetic import CHATML_TEMPLATE, build_tiny_llama, upload_directory  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# The template "training" used: ChatML behind a header, so that it renders differently from the
# base tokenizer's plain ChatML (and hashes differently).
TRAINED_TEMPLATE = "{{- '### instructune serving test\\n' }}" + CHATML_TEMPLATE
SYSTEM_PROMPT = "You extract payment terms as JSON."
QUESTION = "Extract the party, amount and date: Acme Labs Inc. shall pay $1,200 by March 3, 2024."
MAX_TOKENS = 12
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class RayJobs:
    """The stack's Ray Jobs API with its token; jobs get the stack's S3 settings and this clone's code."""

    address: str
    headers: dict[str, str]
    env: dict[str, str]

    def submit(self, args: dict[str, str] | list[str]) -> str:
        if isinstance(args, dict):
            # The operator's entrypoint, quoted the same way (operator/.../serving.py).
            words = [f"--{k.replace('_', '-')} {shlex.quote(v)}" for k, v in args.items()]
        else:
            words = [shlex.quote(a) for a in args]
        submission_id = f"test-serve-{uuid.uuid4().hex[:8]}"
        response = httpx.post(
            f"{self.address}/api/jobs/",
            headers=self.headers,
            timeout=30,
            json={
                "entrypoint": "python -m instructune_jobs.serve " + " ".join(words),
                "submission_id": submission_id,
                "runtime_env": {"env_vars": self.env},
                "entrypoint_num_cpus": 0,
            },
        )
        response.raise_for_status()
        return submission_id

    def wait(self, submission_id: str, timeout: float) -> tuple[str, str]:
        """(status, message) once the job ends."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = httpx.get(
                f"{self.address}/api/jobs/{submission_id}", headers=self.headers, timeout=10
            ).json()
            if body["status"] in TERMINAL:
                return body["status"], body.get("message") or ""
            time.sleep(1)
        raise AssertionError(
            f"job {submission_id} still running after {timeout}s:\n{self.logs(submission_id)}"
        )

    def logs(self, submission_id: str) -> str:
        response = httpx.get(
            f"{self.address}/api/jobs/{submission_id}/logs", headers=self.headers, timeout=10
        )
        return str(response.json().get("logs", ""))[-4000:]

    def application(self, name: str) -> dict[str, Any] | None:
        """What the operator polls: GET /api/serve/applications/."""
        response = httpx.get(f"{self.address}/api/serve/applications/", headers=self.headers, timeout=10)
        response.raise_for_status()
        app: dict[str, Any] | None = response.json().get("applications", {}).get(name)
        return app


def running_replicas(app: dict[str, Any]) -> int:
    return sum(
        sum(1 for r in d.get("replicas", []) if r.get("state") == "RUNNING")
        for d in app.get("deployments", {}).values()
    )


@pytest.fixture(scope="module")
def ray_jobs(stack: Any) -> RayJobs:
    # The local Ray head's processes have no S3 credentials (in a cluster the pods carry them by
    # secretKeyRef), so this test hands the stack's throwaway ones to the job. Serve copies the job's
    # runtime_env into the application's config, shown by GET /api/serve/applications/: real
    # credentials must never travel this way.
    s3 = {k: v for k, v in stack.env.items() if k.startswith(("AWS_", "INSTRUCTUNE_S3"))}
    env = {
        **s3,
        # The job runs `python` from the Ray head's PATH: put this interpreter's first, and this
        # clone's jobs/ ahead of whatever clone the shared venv's editable install points at.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT / "jobs"),
    }
    return RayJobs(stack.ray_address, {"Authorization": f"Bearer {stack.ray_token}"}, env)


@pytest.fixture(scope="module")
def artifacts(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Base model in s3://models/, adapter + trained tokenizer in s3://artifacts/<run>/final/."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = {k: os.environ.get(k) for k in stack.env if k.startswith(("AWS_", "INSTRUCTUNE_S3"))}
    os.environ.update({k: stack.env[k] for k in saved})
    work = tmp_path_factory.mktemp("serve")
    run = uuid.uuid4().hex[:8]
    started = time.monotonic()
    base_dir = build_tiny_llama(work / "base")
    print(f"\ntiny llama built in {time.monotonic() - started:.1f}s")
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        # init_lora_weights=False: random B as well as A, so the adapter changes the outputs.
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                   task_type="CAUSAL_LM"),
    )  # fmt: skip
    model.save_pretrained(str(work / "final" / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = TRAINED_TEMPLATE
    tokenizer.save_pretrained(work / "final" / "tokenizer")
    client = s3_client_from_env()
    uris = {"base": f"s3://models/serve-{run}/base/", "root": f"s3://artifacts/serve-{run}/"}
    upload_directory(base_dir, uris["base"], client)
    upload_directory(work / "final", uris["root"] + "final/", client)
    yield {"uris": uris, "work": work, "base_dir": base_dir, "run": run}
    for uri in uris.values():
        bucket, prefix = split_s3_uri(uri)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=item["Key"])
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def serve_args(artifacts: dict[str, Any], name: str, port: int, digest: str) -> dict[str, str]:
    root = artifacts["uris"]["root"]
    return {
        "name": name,
        "model": "extractor",
        "base": artifacts["uris"]["base"],
        "weights": f"{root}final/adapter/",
        "tokenizer": f"{root}final/tokenizer/",
        "template_hash": digest,
        "system_prompt": SYSTEM_PROMPT,
        "http_port": str(port),
    }


@pytest.fixture(scope="module")
def served(stack: Any, ray_jobs: RayJobs, artifacts: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The application deployed by the job; deleted (by a job) at the end."""
    from operator_release import serve_port  # hack/ is on sys.path through tests/conftest.py

    port = int(serve_port(stack.dir))
    name = f"itest-{artifacts['run']}"
    args = serve_args(artifacts, name, port, template_hash(TRAINED_TEMPLATE))
    started = time.monotonic()
    job = ray_jobs.submit(args)
    try:
        status, message = ray_jobs.wait(job, 150)
        assert status == "SUCCEEDED", f"{message}\n{ray_jobs.logs(job)}"
        seconds = time.monotonic() - started
        print(f"\nserve job deployed {name} in {seconds:.1f}s\n{ray_jobs.logs(job)}")
        yield {"name": name, "port": port, "args": args, "url": f"http://127.0.0.1:{port}/{name}/v1",
               "deploy_seconds": seconds}  # fmt: skip
    finally:
        deleted = ray_jobs.submit(["--delete", "--name", name])
        status, message = ray_jobs.wait(deleted, 60)
        assert status == "SUCCEEDED", f"{message}\n{ray_jobs.logs(deleted)}"
        assert ray_jobs.application(name) is None


@pytest.fixture(scope="module")
def local_model(artifacts: dict[str, Any]) -> tuple[Any, Any]:
    """(tokenizer, adapter model) loaded here through evaluate's loaders, as the replica loads them."""
    work = artifacts["work"]
    cfg = TrainConfig.model_validate(
        {"base_model": {"uri": str(artifacts["base_dir"])}, "dataset": {"train": [{"uri": "/nonexistent"}]}}
    )
    tokenizer = load_tokenizer(work / "final" / "tokenizer")
    model = load_tuned_model(
        TrainedArtifacts("adapter", work / "final" / "adapter", None, {}, "local"),
        artifacts["base_dir"],
        cfg.training.precision,
    )
    return tokenizer, model


def local_answer(local_model: tuple[Any, Any], template: str, with_system: bool) -> tuple[int, str]:
    """(prompt tokens, greedy answer) for QUESTION rendered with template here."""
    tokenizer, model = local_model
    messages = [{"role": "user", "content": QUESTION}]
    if with_system:
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    prompt = render_chat(tokenizer, messages, template, add_generation_prompt=True)
    answer = generate(model, tokenizer, [prompt], MAX_TOKENS, batch_size=1)[0].text
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), answer


def test_the_job_leaves_one_running_replica_serving_the_trained_template(
    served: dict[str, Any], ray_jobs: RayJobs
) -> None:
    app = ray_jobs.application(served["name"])
    assert app is not None and app["status"] == "RUNNING"
    assert app["route_prefix"] == f"/{served['name']}"
    assert running_replicas(app) == 1

    response = httpx.get(f"{served['url']}/models", timeout=30)
    assert response.status_code == 200
    (card,) = response.json()["data"]
    assert card["id"] == "extractor" and card["object"] == "model"
    assert card["instructune"]["templateHash"] == template_hash(TRAINED_TEMPLATE)
    assert card["instructune"]["kind"] == "adapter"
    assert card["instructune"]["weights"] == served["args"]["weights"]


def test_chat_completion_is_openai_shaped_and_rendered_with_the_trained_template(
    served: dict[str, Any], local_model: tuple[Any, Any]
) -> None:
    started = time.monotonic()
    response = httpx.post(
        f"{served['url']}/chat/completions",
        timeout=60,
        json={"model": "extractor", "messages": [{"role": "user", "content": QUESTION}],
              "max_tokens": MAX_TOKENS, "temperature": 0},
    )  # fmt: skip
    latency = time.monotonic() - started
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "extractor"
    assert body["system_fingerprint"] == f"instructune-{template_hash(TRAINED_TEMPLATE)[:12]}"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= MAX_TOKENS

    # The served prompt is the trained template's rendering with the tune's system prompt prepended:
    # its token count and the greedy answer are those of the same model and rendering here.
    prompt_tokens, answer = local_answer(local_model, TRAINED_TEMPLATE, with_system=True)
    assert usage["prompt_tokens"] == prompt_tokens
    assert choice["message"]["content"] == answer
    # ... and neither the base tokenizer's template nor a prompt without the system prompt would match.
    assert local_answer(local_model, CHATML_TEMPLATE, with_system=True)[0] != prompt_tokens
    assert local_answer(local_model, TRAINED_TEMPLATE, with_system=False)[0] != prompt_tokens
    print(f"\nchat completion in {latency:.2f}s: {choice['message']['content']!r}")


@pytest.mark.parametrize(
    ("request_body", "status", "param"),
    [
        ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, 400, "stream"),
        ({"messages": []}, 400, "messages"),
    ],
)
def test_invalid_requests_get_openai_errors(
    served: dict[str, Any], request_body: dict[str, Any], status: int, param: str
) -> None:
    response = httpx.post(f"{served['url']}/chat/completions", json=request_body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_a_wrong_template_hash_fails_the_job_and_leaves_the_app_serving(
    served: dict[str, Any], ray_jobs: RayJobs, artifacts: dict[str, Any]
) -> None:
    # The base tokenizer's template: what serving would use had it read the wrong tokenizer.
    wrong = template_hash(CHATML_TEMPLATE)
    job = ray_jobs.submit(serve_args(artifacts, served["name"], served["port"], wrong))
    status, _message = ray_jobs.wait(job, 90)
    logs = ray_jobs.logs(job)
    assert status == "FAILED", logs
    assert "refusing to serve" in logs and wrong[:12] in logs and template_hash(TRAINED_TEMPLATE)[:12] in logs

    app = ray_jobs.application(served["name"])
    assert app is not None and app["status"] == "RUNNING" and running_replicas(app) == 1
    card = httpx.get(f"{served['url']}/models", timeout=30).json()["data"][0]
    assert card["instructune"]["templateHash"] == template_hash(TRAINED_TEMPLATE)
