"""`make demo`: the quickstart end to end on the embedded local stack.

Brings the stack up (or reuses it), seeds MinIO with a tiny model and the extraction task, installs
the CRD, starts the operator, applies examples/quickstart.yaml, follows it to the end and prints
its status, evaluation and, when it is served, the answer to a held-out question.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import httpx
import yaml

HACK = Path(__file__).resolve().parent
ROOT = HACK.parent
sys.path.insert(0, str(HACK))

import localstack  # noqa: E402

from instructune_jobs.quickstart import held_out_question, seed_quickstart  # noqa: E402

NAMESPACE = "demo"
TUNE = "quickstart"


def say(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def kubectl(state_dir: Path, *args: str, input: str | None = None, check: bool = True) -> str:
    return localstack.kubectl(state_dir, *args, input=input, check=check).stdout


def serve_port(state_dir: Path) -> str:
    """Ray Serve's HTTP port on the local stack: picked once per stack, stable across operator restarts."""
    path = state_dir / "serve-port"
    if not path.exists():
        path.write_text(str(localstack.free_ports(1)[0]))
    return path.read_text().strip()


def operator_env(env: dict[str, str], state_dir: Path) -> dict[str, str]:
    """The operator's environment on the local stack: settings file plus the stack's endpoints."""
    return {
        **os.environ,
        **env,
        "INSTRUCTUNE_SETTINGS": str(HACK / "local-settings.yaml"),
        "INSTRUCTUNE_S3_ENDPOINT": env["AWS_ENDPOINT_URL"],
        "INSTRUCTUNE_RAY_ADDRESS": env["RAY_ADDRESS"],
        "INSTRUCTUNE_LOCAL_JOB_IDENTITY_DIR": str(state_dir / "job-identity"),
        "INSTRUCTUNE_RAY_SERVE_HTTP_PORT": serve_port(state_dir),
    }


def start_operator(env: dict[str, str], state_dir: Path) -> subprocess.Popen[bytes]:
    log = (state_dir / "logs" / "operator.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "instructune_operator"],
        env=operator_env(env, state_dir),
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    (state_dir / "operator.pid").write_text(str(proc.pid))
    return proc


def stop_previous_operator(state_dir: Path) -> None:
    pid_file = state_dir / "operator.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        pid_file.unlink()


def follow(state_dir: Path, timeout_s: float) -> dict[str, Any]:
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        tune = yaml.safe_load(kubectl(state_dir, "get", "itune", TUNE, "-n", NAMESPACE, "-o", "yaml"))
        status = tune.get("status") or {}
        progress = status.get("progress") or {}
        line = (
            f"phase={status.get('phase')} step={progress.get('step')}/{progress.get('totalSteps')} "
            f"loss={progress.get('loss')}"
        )
        if line != last:
            print("   ", line, flush=True)
            last = line
        if status.get("phase") in ("Succeeded", "Failed"):
            return tune
        time.sleep(3)
    raise SystemExit(
        f"the quickstart did not finish within {timeout_s:.0f}s; see {state_dir}/logs/operator.log"
    )


def ask(endpoint: str, model: str) -> None:
    row = held_out_question()
    question = f"{row['instruction']}\n\n{row['input']}"
    say(f"asking the served model a held-out question:\n    {question!r}")
    response = httpx.post(
        f"{endpoint}/chat/completions",
        timeout=120,
        json={
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 48,
            "temperature": 0,
        },
    )
    response.raise_for_status()
    answer = response.json()["choices"][0]["message"]["content"]
    print(f"    answer:   {answer}\n    expected: {row['output']}")
    try:
        print(f"    valid JSON with keys {sorted(json.loads(answer))}")
    except ValueError:
        print("    (the answer is not valid JSON)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=ROOT / ".stack")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    state_dir = args.dir.resolve()

    say("starting the local stack (kube-apiserver, etcd, scheduler, KWOK GPU pools, KubeRay, MinIO, Ray)")
    stack = localstack.up(state_dir)
    env = stack["env"]
    os.environ.update(env)

    say("seeding MinIO with a tiny Llama and the extraction task data")
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    for uri, etag in seed_quickstart(s3).items():
        print(f"    {uri}  etag={etag}")

    say("installing the InstructionTune CRD and starting the operator")
    kubectl(state_dir, "apply", "--server-side", "-f", str(ROOT / "crds"))
    kubectl(state_dir, "wait", "--for=condition=Established", "crd/instructiontunes.instructune.io")
    kubectl(state_dir, "create", "namespace", NAMESPACE, check=False)
    kubectl(state_dir, "delete", "itune", TUNE, "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "quickstart-s3", "namespace": NAMESPACE},
        "stringData": {
            "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
        },
    }
    kubectl(state_dir, "apply", "-f", "-", input=json.dumps(secret))
    stop_previous_operator(state_dir)
    start_operator(env, state_dir)

    say("kubectl apply -f examples/quickstart.yaml")
    print(
        kubectl(state_dir, "apply", "-n", NAMESPACE, "-f", str(ROOT / "examples" / "quickstart.yaml")).strip()
    )
    tune = follow(state_dir, args.timeout)

    say("kubectl get itune")
    print(kubectl(state_dir, "get", "itune", "-n", NAMESPACE))
    status = tune["status"]
    say("status")
    print(
        yaml.safe_dump(
            {
                k: status.get(k)
                for k in ("phase", "attempts", "data", "checkpoints", "evaluation", "lineage", "serving")
            },
            sort_keys=False,
        )
    )
    for c in status.get("conditions", []):
        print(f"    {c['type']:<14} {c['status']:<6} {c['reason']:<22} {c['message'][:120]}")
    serving = status.get("serving") or {}
    if status.get("phase") == "Succeeded" and serving.get("endpoint"):
        ask(serving["endpoint"], serving["model"])
    print(f"\nThe stack keeps running: `. {state_dir}/env` then kubectl …; `make stack-down` stops it.")
    return 0 if status.get("phase") == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
