"""`make demo`: the quickstart end to end on the embedded local stack.

Brings the stack up (or reuses it), seeds MinIO with a tiny model and the extraction task, installs
the operator with helm (it runs in a pod on the stack's real node), applies examples/quickstart.yaml
(its Ray cluster runs in pods there too), follows it to the end and prints the pods, the status, the
evaluation and, when it is served, the answer to a held-out question asked through its Service.
"""

from __future__ import annotations

import argparse
import json
import os
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
import operator_release  # noqa: E402

from instructune_jobs.quickstart import held_out_question, seed_quickstart  # noqa: E402

NAMESPACE = "demo"
TUNE = "quickstart"


def say(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def kubectl(state_dir: Path, *args: str, input: str | None = None, check: bool = True) -> str:
    return localstack.kubectl(state_dir, *args, input=input, check=check).stdout


def show_pods(state_dir: Path) -> None:
    say(f"kubectl get pods -n {NAMESPACE} -o wide   (the tune's Ray cluster, from the job image)")
    print(kubectl(state_dir, "get", "pods", "-n", NAMESPACE, "-o", "wide"), end="")


def service_url(state_dir: Path, endpoint: str) -> str:
    """`http://<svc>.<ns>.svc:PORT/...` -> the same URL on the Service's cluster IP: kube-proxy routes
    it from this machine as from any pod, and no resolver here knows the cluster's names."""
    scheme, rest = endpoint.split("://", 1)
    host, _, path = rest.partition("/")
    name, _, port = host.partition(":")
    parts = name.split(".")
    if len(parts) < 3 or parts[2] != "svc":
        return endpoint
    return f"{scheme}://{service_ip(state_dir, parts[1], parts[0])}:{port or 80}/{path}"


def service_ip(state_dir: Path, namespace: str, service: str) -> str:
    """Where this machine reaches a Service: its cluster IP (kube-proxy routes it from the host too),
    or for a headless one (KubeRay's head Service) the address of its first ready endpoint."""
    ip = kubectl(state_dir, "get", "service", service, "-n", namespace, "-o", "jsonpath={.spec.clusterIP}")
    if ip and ip != "None":
        return ip
    slices = json.loads(
        kubectl(state_dir, "get", "endpointslices", "-n", namespace, "-l",
                f"kubernetes.io/service-name={service}", "-o", "json")
    )  # fmt: skip
    for item in slices["items"]:
        for endpoint in item.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready", True):
                return str(endpoint["addresses"][0])
    raise SystemExit(f"service {namespace}/{service} has no ready endpoint")


def follow(state_dir: Path, timeout_s: float, applied: float) -> dict[str, Any]:
    """Prints each change of phase and progress until the tune ends; `applied` is when it was applied
    (time.monotonic), for the time to its first training step."""
    deadline, last, shown = time.monotonic() + timeout_s, "", False
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
        if not shown and progress.get("step"):
            print(f"    apply -> first training step reported: {time.monotonic() - applied:.0f}s", flush=True)
            show_pods(state_dir)
            shown = True
        if status.get("phase") in ("Succeeded", "Failed"):
            return tune
        time.sleep(3)
    raise SystemExit(
        f"the quickstart did not finish within {timeout_s:.0f}s; see the operator's log: "
        f"kubectl logs -n {operator_release.NAMESPACE} deploy/{operator_release.DEPLOYMENT}"
    )


def ask(state_dir: Path, endpoint: str, model: str) -> None:
    row = held_out_question()
    question = f"{row['instruction']}\n\n{row['input']}"
    url = service_url(state_dir, endpoint)
    say(f"asking the served model a held-out question through its Service ({url}):\n    {question!r}")
    response = httpx.post(
        f"{url}/chat/completions",
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
    started = time.monotonic()

    say(
        "starting the local stack (kube-apiserver, etcd, scheduler, KWOK GPU pools, KubeRay, MinIO, a real node)"
    )
    stack = localstack.up(state_dir)
    env = stack["env"]
    os.environ.update(env)

    say("seeding MinIO with a tiny Llama and the extraction task data")
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    for uri, etag in seed_quickstart(s3).items():
        print(f"    {uri}  etag={etag}")

    say("installing the operator with helm (charts/instructune, the locally built images, the CRD)")
    # Helm installs a chart's CRDs only when they are absent: applied first, an upgrade reaches them.
    kubectl(state_dir, "apply", "--server-side", "-f", str(ROOT / "crds"))
    kubectl(state_dir, "wait", "--for=condition=Established", "crd/instructiontunes.instructune.io")
    for name, ref in operator_release.install(state_dir).items():
        print(f"    {name}: {ref}")
    print(kubectl(state_dir, "get", "pods", "-n", operator_release.NAMESPACE, "-o", "wide"), end="")
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

    say("kubectl apply -f examples/quickstart.yaml")
    applied = time.monotonic()
    print(
        kubectl(state_dir, "apply", "-n", NAMESPACE, "-f", str(ROOT / "examples" / "quickstart.yaml")).strip()
    )
    tune = follow(state_dir, args.timeout, applied)

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
        ask(state_dir, serving["endpoint"], serving["model"])
    took = time.monotonic() - started
    print(f"\nmake demo: {int(took // 60)}m{int(took % 60):02d}s")
    print(f"The stack keeps running: `. {state_dir}/env` then kubectl …; `make stack-down` stops it.")
    return 0 if status.get("phase") == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
