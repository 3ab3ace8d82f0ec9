"""Ray Serve rollout of a tuned model: an OpenAI-style chat endpoint that renders prompts with
exactly the chat template the model was trained with.

The operator runs this as a Ray job (`serving.runtime: ray-serve`, the embedded local serving):

    python -m instructune_jobs.serve --name N --model M --base BASE_URI --weights WEIGHTS_URI \
        --tokenizer TOKENIZER_URI --template-hash H --system-prompt S --http-port P

Read top to bottom, `deploy` does:

1. check the rollout before touching Ray Serve: the trained tokenizer's chat template must hash to
   --template-hash (the hash training recorded), and the weights prefix must hold a PEFT adapter
   (`adapter_config.json`, needs --base) or a whole model (`config.json`). A refused rollout fails
   the job and leaves the application already serving untouched;
2. start Ray Serve's HTTP proxy on --http-host:--http-port. Serve is cluster-scoped and detached:
   it outlives this job, and a second start with other HTTP options is ignored by Ray, which is
   why the port actually in force is checked (the operator reports an endpoint on its port);
3. `serve.run(app, name=N, route_prefix=/N)`: one replica that downloads base + weights + tokenizer
   from S3, checks the template again on what it loaded, and answers
       GET  /N/v1/models              the model, with its template hash and artifacts
       POST /N/v1/chat/completions    OpenAI chat completions (no streaming, n=1)
   Running the job again with the same N rolls the application to the new weights: Serve replaces
   the application's replicas, starting new ones before stopping the old;
4. probe `http://<host>:P/N/v1/models` until it answers with M and the expected template hash, so
   that the job succeeds only when the endpoint the operator reports serves this rollout.

`--delete --name N` removes the application (the operator's teardown; tests use it to clean up).

temperature 0 is greedy decoding through `generation.generate`, the very function the evaluation
gate scored the model with, so a served greedy answer is the one evaluation saw. The system
prompt (--system-prompt, the tune's template.systemPrompt) is prepended when a request has none,
as training did for rows without one.
"""

import argparse
import contextlib
import logging
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from instructune_jobs.artifacts import fetch_base_model
from instructune_jobs.config import ModelSource
from instructune_jobs.data.template import (
    TemplateMismatchError,
    render_chat,
    resolve_chat_template,
    template_hash,
)
from instructune_jobs.data.types import Conversation
from instructune_jobs.generation import generate, stop_token_ids
from instructune_jobs.models import Precision, TrainedArtifacts, load_tokenizer, load_tuned_model
from instructune_jobs.storage import Storage

log = logging.getLogger("instructune.serve")

DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_LIMIT = 2048
DEPLOYMENT_NAME = "chat"
READY_PROBE_SECONDS = 60.0


# ---------------------------------------------------------------------------------------------
# What to serve
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeOptions:
    name: str  # the Serve application, also the route prefix /<name>
    model: str  # the model name requests and responses carry
    base: str  # base model uri (s3:// or hf://), needed under an adapter
    weights: str  # <ckpt>/final/adapter/ or <ckpt>/final/model/
    tokenizer: str  # <ckpt>/final/tokenizer/: carries the template trained with
    template_hash: str  # sha256 of that template, as training recorded it
    system_prompt: str = ""
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    max_tokens_limit: int = MAX_TOKENS_LIMIT
    precision: Precision = "bf16"  # on GPU; CPU always loads fp32


def check_served_template(tokenizer: Any, expected_hash: str, source: str) -> str:
    """The template this tokenizer renders with, after checking it is the one trained with."""
    if not expected_hash:
        raise TemplateMismatchError(
            "no template hash given (--template-hash): serving must render prompts with exactly the "
            "template the model was trained with, and without the hash training recorded that "
            "cannot be checked"
        )
    template = resolve_chat_template(tokenizer, None)
    digest = template_hash(template)
    if digest != expected_hash:
        raise TemplateMismatchError(
            f"refusing to serve: the chat template of {source} hashes to {digest[:12]} but the model "
            f"was trained with template {expected_hash[:12]}; prompts rendered with another template "
            "are not what the model learnt (and not what the evaluation gate scored)"
        )
    return template


def weights_kind(uri: str, storage: Storage) -> str:
    """Whether a prefix holds a PEFT adapter ("adapter": adapter_config.json) or a whole model
    ("full": config.json)."""
    prefix = uri.rstrip("/") + "/"
    names = {obj.uri.removeprefix(prefix) for obj in storage.list(prefix)}
    if "adapter_config.json" in names:
        return "adapter"
    if "config.json" in names:
        return "full"
    raise FileNotFoundError(f"no adapter (adapter_config.json) or model (config.json) under {uri}")


def preflight(options: ServeOptions, scratch: Path, storage: Storage) -> str:
    """Checks a rollout can serve before Ray Serve is touched; returns the weights' kind."""
    storage.download_prefix(options.tokenizer, scratch / "tokenizer")
    check_served_template(load_tokenizer(scratch / "tokenizer"), options.template_hash, options.tokenizer)
    kind = weights_kind(options.weights, storage)
    if kind == "adapter" and not options.base:
        raise ValueError(f"{options.weights} is an adapter: --base must name its base model")
    return kind


# ---------------------------------------------------------------------------------------------
# Requests and responses (OpenAI chat completions)
# ---------------------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the endpoint refuses; rendered as OpenAI's error object."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    # extra="ignore": OpenAI clients send fields this endpoint does not use (user, logprobs, ...).
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's default
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    seed: int | None = None


# The roles the chat templates know; "developer" is OpenAI's newer name for system.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def to_conversation(messages: Sequence[ChatMessage], system_prompt: str) -> Conversation:
    """Request messages as the conversation training rendered: text content, known roles, and the
    tune's system prompt first when the request brings none."""
    conversation: Conversation = []
    for index, message in enumerate(messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise RequestError(
                f"messages[{index}].role {message.role!r} is not supported (one of {sorted(_ROLES)})",
                param=f"messages[{index}].role",
            )
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise RequestError(
                    "only text content parts are supported", param=f"messages[{index}].content"
                )
            content = "".join(part.text or "" for part in content)
        conversation.append({"role": role, "content": content or ""})
    if system_prompt and conversation[0]["role"] != "system":
        conversation.insert(0, {"role": "system", "content": system_prompt})
    if conversation[-1]["role"] == "assistant":
        raise RequestError(
            "the last message must not be the assistant's: there is nothing to answer", param="messages"
        )
    return conversation


def check_request(request: ChatRequest, served_model: str) -> None:
    if request.model and request.model != served_model:
        raise RequestError(
            f"the model {request.model!r} does not exist; this endpoint serves {served_model!r}",
            status=404,
            param="model",
            code="model_not_found",
        )
    if request.stream:
        raise RequestError("streaming is not supported", param="stream")
    if request.n != 1:
        raise RequestError("only n=1 is supported", param="n")


def completion_body(
    served_model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int, digest: str
) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served_model,
        # OpenAI's field for "the backend configuration that produced this": here the template.
        "system_fingerprint": f"instructune-{digest[:12]}",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


# ---------------------------------------------------------------------------------------------
# The model a replica serves
# ---------------------------------------------------------------------------------------------


class ChatModel:
    """Weights, tokenizer and template of one rollout, loaded from S3; answers chat requests."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        started = time.monotonic()
        storage = Storage()
        # Tokenizer and weights only live on disk while loading: they are in memory afterwards. The
        # base goes to the node's model cache (keyed by content), where a roll to another adapter
        # of the same base finds it.
        with tempfile.TemporaryDirectory(prefix="instructune-serve-") as scratch:
            tokenizer_dir, weights_dir = Path(scratch) / "tokenizer", Path(scratch) / "weights"
            storage.download_prefix(options.tokenizer, tokenizer_dir)
            self.tokenizer = load_tokenizer(tokenizer_dir)
            # Checked again on what this replica renders with, not only by the job that deployed it.
            self.template = check_served_template(self.tokenizer, options.template_hash, options.tokenizer)
            self.kind = weights_kind(options.weights, storage)
            storage.download_prefix(options.weights, weights_dir)
            base = (
                fetch_base_model(ModelSource(uri=options.base), storage).path
                if self.kind == "adapter"
                else None
            )
            artifacts = TrainedArtifacts(self.kind, weights_dir, tokenizer_dir, {}, options.weights)
            self.model = load_tuned_model(artifacts, base, options.precision)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.created = int(time.time())
        # One generation at a time: requests share one model, and on CPU they share its threads.
        self.lock = threading.Lock()
        # "ray.serve": the logger whose records Serve writes to the replica's log.
        logging.getLogger("ray.serve").info(
            "loaded %s %s (base %s) in %.1fs",
            self.kind,
            options.weights,
            options.base or "-",
            time.monotonic() - started,
        )

    @property
    def digest(self) -> str:
        return template_hash(self.template)

    def models(self) -> dict[str, Any]:
        options = self.options
        return {
            "object": "list",
            "data": [
                {
                    "id": options.model,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "instructune",
                    "root": options.weights,
                    "parent": options.base or None,
                    "max_model_len": self.context_length or None,
                    "instructune": {
                        "templateHash": self.digest,
                        "kind": self.kind,
                        "base": options.base,
                        "weights": options.weights,
                        "tokenizer": options.tokenizer,
                        "systemPrompt": options.system_prompt,
                    },
                }
            ],
        }

    def complete(self, request: ChatRequest) -> dict[str, Any]:
        options = self.options
        check_request(request, options.model)
        conversation = to_conversation(request.messages, options.system_prompt)
        prompt = render_chat(self.tokenizer, conversation, self.template, add_generation_prompt=True)
        prompt_tokens = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        max_tokens = request.max_completion_tokens or request.max_tokens or options.default_max_tokens
        if max_tokens > options.max_tokens_limit:
            raise RequestError(f"max_tokens is at most {options.max_tokens_limit}", param="max_tokens")
        if self.context_length:
            if prompt_tokens >= self.context_length:
                raise RequestError(
                    f"the prompt has {prompt_tokens} tokens; the model's context is {self.context_length}",
                    param="messages",
                    code="context_length_exceeded",
                )
            max_tokens = min(max_tokens, self.context_length - prompt_tokens)
        with self.lock:
            if request.temperature == 0:
                out = generate(self.model, self.tokenizer, [prompt], max_tokens, batch_size=1)[0]
                text, tokens, stopped = out.text, out.tokens, out.stopped
            else:
                text, tokens, stopped = self._sample(prompt, max_tokens, request)
        # The stop token was generated too: it counts, as OpenAI and vLLM count it.
        return completion_body(
            options.model,
            text,
            "stop" if stopped else "length",
            prompt_tokens,
            tokens + int(stopped),
            self.digest,
        )

    def _sample(self, prompt: str, max_tokens: int, request: ChatRequest) -> tuple[str, int, bool]:
        """Sampling at the request's temperature and top_p; greedy decoding is `generate`'s."""
        import torch
        from transformers import GenerationConfig

        stop_ids = stop_token_ids(self.model, self.tokenizer)
        config = GenerationConfig(
            do_sample=True,
            temperature=request.temperature,
            top_p=request.top_p,
            max_new_tokens=max_tokens,
            eos_token_id=stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        device = next(self.model.parameters()).device
        ids = torch.tensor([self.tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
        with torch.inference_mode():
            if request.seed is not None:
                torch.manual_seed(request.seed)
            new_tokens = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
            )[0, ids.shape[1] :].tolist()
        stop = next((pos for pos, token in enumerate(new_tokens) if token in stop_ids), None)
        kept = new_tokens if stop is None else new_tokens[:stop]
        return self.tokenizer.decode(kept, skip_special_tokens=True), len(kept), stop is not None


# ---------------------------------------------------------------------------------------------
# The Serve application
# ---------------------------------------------------------------------------------------------


def build_app(options: ServeOptions, num_cpus: float = 0.5, num_gpus: float = 0.0) -> Any:
    """The bound Serve application: one replica of a FastAPI ingress around `ChatModel`.

    Built in a function so that importing this module needs neither Ray nor FastAPI; the class is
    pickled by value (with its FastAPI app), everything it calls is imported from this package."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI(title=f"instructune {options.model}")

    @api.exception_handler(RequestValidationError)
    async def _invalid(_request: Any, err: RequestValidationError) -> JSONResponse:
        # OpenAI's clients expect 400 with an error object, not FastAPI's 422 with "detail".
        first = (err.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        error = RequestError(
            f"invalid request: {where or 'body'}: {first.get('msg', 'invalid')}", param=where
        )
        return JSONResponse(error.body(), status_code=400)

    @serve.deployment(
        name=DEPLOYMENT_NAME,
        num_replicas=1,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        # Generation is serialised in the replica; a few queued requests are enough.
        max_ongoing_requests=8,
    )
    @serve.ingress(api)
    class ChatDeployment:
        def __init__(self, served: ServeOptions) -> None:
            self.chat = ChatModel(served)

        # This module does not use `from __future__ import annotations`: Ray's class-based view
        # rewrites these signatures, and FastAPI could then not resolve a string annotation such
        # as "ChatRequest" (the body would be taken for a query parameter).
        @api.get("/v1/models", response_model=None)
        def models(self) -> JSONResponse:
            return JSONResponse(self.chat.models())

        @api.post("/v1/chat/completions", response_model=None)
        def chat_completions(self, body: ChatRequest) -> JSONResponse:
            # A sync endpoint: FastAPI runs it in a thread, so generating does not block the loop.
            try:
                return JSONResponse(self.chat.complete(body))
            except RequestError as err:
                return JSONResponse(err.body(), status_code=err.status)

    return ChatDeployment.bind(options)  # type: ignore[attr-defined]  # serve.deployment adds bind


def _probe_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _http_port_in_force() -> int | None:
    """The port Serve's proxies really listen on. Serve's HTTP options are fixed when Serve first
    starts on a cluster, so they may differ from ours; Ray has no public getter for them."""
    with contextlib.suppress(Exception):
        from ray.serve.context import _get_global_client

        return int(_get_global_client().http_config.port)  # type: ignore[union-attr]
    return None


def wait_until_serving(
    url: str, options: ServeOptions, timeout: float = READY_PROBE_SECONDS
) -> dict[str, Any]:
    """Polls GET <url>/v1/models until it describes this rollout (the proxy learns new routes a
    moment after the application is RUNNING; during a roll the old replicas answer for a while)."""
    import json

    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
                card = json.loads(response.read())["data"][0]
            if (
                card["id"] == options.model
                and card["instructune"]["templateHash"] == options.template_hash
                and card["instructune"]["weights"] == options.weights
            ):
                return dict(card)
            last = f"answered for {card['id']} {card['instructune']['weights']}"
        except (OSError, urllib.error.URLError, ValueError, KeyError) as err:
            last = str(err)
        time.sleep(1)
    raise TimeoutError(f"{url}/v1/models did not serve this rollout within {timeout:.0f}s ({last})")


def deploy(options: ServeOptions, http_host: str, http_port: int, num_cpus: float, num_gpus: float) -> str:
    """Checks, deploys (or rolls) and probes the application; returns its base URL (…/v1)."""
    import ray
    from ray import serve

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="instructune-serve-check-") as scratch:
        kind = preflight(options, Path(scratch), Storage())
    log.info(
        "rollout checked: %s weights, template %s (%.1fs)",
        kind,
        options.template_hash[:12],
        time.monotonic() - started,
    )

    ray.init(ignore_reinit_error=True)  # inside a Ray job RAY_ADDRESS names this cluster
    serve.start(http_options={"host": http_host, "port": http_port})
    in_force = _http_port_in_force()
    if in_force is not None and in_force != http_port:
        raise RuntimeError(
            f"Ray Serve on this cluster already listens on port {in_force}, not {http_port}: Serve's HTTP "
            "options are fixed when it first starts, so the endpoint on the requested port would never "
            "answer. Use the port in force (the operator's ray_serve_http_port) or restart Serve."
        )
    serve.run(
        build_app(options, num_cpus, num_gpus),
        name=options.name,
        route_prefix=f"/{options.name}",
        blocking=False,
    )
    url = f"http://{_probe_host(http_host)}:{http_port}/{options.name}"
    wait_until_serving(url, options)
    log.info("serving %s at %s/v1 (%.1fs)", options.model, url, time.monotonic() - started)
    return f"{url}/v1"


def delete(name: str) -> None:
    import ray
    from ray import serve

    ray.init(ignore_reinit_error=True)
    serve.delete(name)
    log.info("deleted Serve application %s", name)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m instructune_jobs.serve",
        description="Deploy (or roll, or --delete) a tuned model as a Ray Serve OpenAI-style chat endpoint.",
    )
    parser.add_argument("--name", required=True, help="Serve application; the route prefix is /<name>")
    parser.add_argument("--delete", action="store_true", help="delete the application and exit")
    parser.add_argument("--model", help="model name served (requests' and responses' `model`)")
    parser.add_argument("--base", default="", help="base model uri (s3:// or hf://); needed under an adapter")
    parser.add_argument("--weights", help="<ckpt>/final/adapter/ (LoRA) or <ckpt>/final/model/ (full)")
    parser.add_argument("--tokenizer", help="<ckpt>/final/tokenizer/, carrying the template trained with")
    parser.add_argument("--template-hash", default="", help="sha256 of the chat template training used")
    parser.add_argument("--system-prompt", default="", help="prepended when a request has no system message")
    parser.add_argument(
        "--http-host",
        default="127.0.0.1",
        help="where Serve's proxy listens (0.0.0.0 to be reachable from outside the node)",
    )
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=float, default=0.5, help="CPUs reserved by the replica")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs reserved by the replica")
    parser.add_argument(
        "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="max_tokens of requests that set none"
    )
    args = parser.parse_args(argv)
    if not args.delete:
        missing = [
            f"--{k.replace('_', '-')}" for k in ("model", "weights", "tokenizer") if not getattr(args, k)
        ]
        if missing:
            parser.error(f"deploying needs {', '.join(missing)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.delete:
        delete(args.name)
        return 0
    options = ServeOptions(
        name=args.name,
        model=args.model,
        base=args.base,
        weights=args.weights,
        tokenizer=args.tokenizer,
        template_hash=args.template_hash,
        system_prompt=args.system_prompt,
        default_max_tokens=args.max_tokens,
    )
    try:
        endpoint = deploy(options, args.http_host, args.http_port, args.num_cpus, args.num_gpus)
    except (TemplateMismatchError, FileNotFoundError, ValueError) as err:
        # A refused rollout: one clear line in the job's logs and message, no traceback to dig through.
        log.error("%s", err)
        print(f"instructune serve: {err}", file=sys.stderr)
        return 2
    print(endpoint)
    return 0


if __name__ == "__main__":
    # Run the importable module's main rather than this __main__ copy: what main deploys is then
    # pickled by reference to instructune_jobs.serve (which replicas import) instead of by value.
    from instructune_jobs.serve import main as _main

    sys.exit(_main())
