"""The operator as users install it, on the local stack: `helm upgrade --install` of charts/instructune
with the locally built images, the stack's pools (hack/local-settings.yaml) and its S3 endpoint.

The operator then runs in a pod on the stack's real node, under the chart's ServiceAccount and RBAC,
and reaches the API server through the `kubernetes` Service like any in-cluster client.

    python hack/operator_release.py [--dir STACK_DIR]      # install or upgrade; prints the image refs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HACK = Path(__file__).resolve().parent
ROOT = HACK.parent
sys.path.insert(0, str(HACK))

import localstack  # noqa: E402

RELEASE = "instructune"
NAMESPACE = "instructune-system"
DEPLOYMENT = RELEASE  # the chart's fullname for a release named like the chart
SETTINGS_FILE = HACK / "local-settings.yaml"
# The operator pod runs on the stack's one real node (KWOK's nodes never run code).
NODE_SELECTOR = {localstack.POOL_LABEL: "local"}


def stack_values(
    settings: dict[str, Any], operator_ref: str, job_ref: str, s3_endpoint: str, build: str = ""
) -> dict[str, Any]:
    """Helm values for the local stack. Pure: the chart's defaults apart from what the stack decides.
    `build` names the operator image's build: a rebuilt image under the same tag rolls the pod."""
    repository, tag = operator_ref.rsplit(":", 1)
    return {
        # Imported into the node's containerd, never pulled: no registry is reachable.
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "podAnnotations": {"instructune.io/image-build": build} if build else {},
        "settings": {**settings, "rayImage": job_ref, "s3Endpoint": s3_endpoint},
        "nodeSelector": dict(NODE_SELECTOR),
    }


def helm(state_dir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **localstack.read_env(state_dir)}
    # Helm keeps its caches under HOME; the stack's own dir keeps the machine's HOME clean.
    env.update(HELM_CACHE_HOME=str(state_dir / "helm" / "cache"), HELM_CONFIG_HOME=str(state_dir / "helm" / "config"),
               HELM_DATA_HOME=str(state_dir / "helm" / "data"))  # fmt: skip
    return subprocess.run(
        [str(state_dir / "bin" / "helm"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def install(state_dir: Path) -> dict[str, str]:
    """Builds (cached) and imports the images, installs or upgrades the chart, waits for the operator
    pod to run. Returns {"operator": ref, "job": ref}."""
    (operator_ref, operator_archive), (job_ref, _) = localstack.import_product_archives(
        state_dir, ("operator", "job")
    )
    env = localstack.read_env(state_dir)
    settings = yaml.safe_load(SETTINGS_FILE.read_text())
    # The archive's name carries the image's build key (hack/build-images.sh).
    build = operator_archive.name.removesuffix(".oci.tar").rsplit("-", 1)[-1]
    values = stack_values(settings, operator_ref, job_ref, env["AWS_ENDPOINT_URL"], build)
    values_file = state_dir / "operator-values.json"
    values_file.write_text(json.dumps(values, indent=2))
    started = time.monotonic()
    res = helm(
        state_dir, "upgrade", "--install", RELEASE, str(ROOT / "charts" / "instructune"),
        "--namespace", NAMESPACE, "--create-namespace", "--values", str(values_file),
        "--wait", "--timeout", "8m",
    )  # fmt: skip
    if res.returncode != 0:
        pods = localstack.kubectl(state_dir, "get", "pods", "-n", NAMESPACE, "-o", "wide", check=False).stdout
        logs = localstack.kubectl(
            state_dir, "logs", "-n", NAMESPACE, f"deploy/{DEPLOYMENT}", "--tail=40", check=False
        ).stdout
        raise localstack.StackError(
            f"helm install of the operator failed:\n{res.stderr[-3000:]}\n{pods}\n{logs}"
        )
    localstack.log(f"operator installed with helm in {time.monotonic() - started:.0f}s ({operator_ref})")
    return {"operator": operator_ref, "job": job_ref}


PROCESS_RELEASE = "instructune-process"


def process_values(local_job_identity_dir: str) -> dict[str, Any]:
    """The chart for an operator run as a process on this machine (its Ray head is the stack's,
    outside the cluster): only its ServiceAccount and RBAC, no pod. Pure."""
    return {
        "replicas": 0,
        "rayAuth": {"enabled": False},  # the stack's own Ray head has its token in the environment
        "settings": {"localJobIdentityDir": local_job_identity_dir},
    }


def process_kubeconfig(state_dir: Path, local_job_identity_dir: str) -> Path:
    """A kubeconfig with the token of the chart's ServiceAccount, for an operator run as a process:
    it holds exactly what the chart grants for its settings, never the stack's admin rights."""
    values_file = state_dir / "operator-process-values.json"
    values_file.write_text(json.dumps(process_values(local_job_identity_dir), indent=2))
    res = helm(
        state_dir, "upgrade", "--install", PROCESS_RELEASE, str(ROOT / "charts" / "instructune"),
        "--namespace", NAMESPACE, "--create-namespace", "--skip-crds", "--values", str(values_file),
    )  # fmt: skip
    if res.returncode != 0:
        raise localstack.StackError(f"helm install of the operator's RBAC failed:\n{res.stderr[-3000:]}")
    token = localstack.kubectl(
        state_dir, "create", "token", PROCESS_RELEASE, "-n", NAMESPACE, "--duration=48h"
    ).stdout.strip()
    env = localstack.read_env(state_dir)
    server = yaml.safe_load(Path(env["KUBECONFIG"]).read_text())["clusters"][0]["cluster"]
    path = state_dir / "operator-process.kubeconfig"
    path.touch(mode=0o600)
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "stack", "cluster": server}],
                "users": [{"name": PROCESS_RELEASE, "user": {"token": token}}],
                "contexts": [{"name": "stack", "context": {"cluster": "stack", "user": PROCESS_RELEASE}}],
                "current-context": "stack",
            }
        )
    )
    return path


def _stack_port(state_dir: Path, name: str) -> str:
    """A free port of this machine, picked once per stack and kept in its dir under `name`."""
    path = state_dir / name
    if not path.exists():
        path.write_text(str(localstack.free_ports(1)[0]))
    return path.read_text().strip()


def serve_port(state_dir: Path) -> str:
    """Ray Serve's HTTP port on the stack's own Ray head: picked once per stack, stable across
    operator restarts."""
    return _stack_port(state_dir, "serve-port")


def metrics_port(state_dir: Path) -> str:
    """The /metrics port of an operator run as a process: on this machine the default (8080) may
    be anyone's; stable across operator restarts, as a Prometheus scraping it expects."""
    return _stack_port(state_dir, "metrics-port")


def process_env(state_dir: Path) -> dict[str, str]:
    """The environment of `python -m instructune_operator` run on this machine against the stack:
    the chart's ServiceAccount (process_kubeconfig), the stack's pools, and its own Ray head."""
    env = localstack.read_env(state_dir)
    identity_dir = str(state_dir / "job-identity")
    return {
        **os.environ,
        **env,
        "KUBECONFIG": str(process_kubeconfig(state_dir, identity_dir)),
        "INSTRUCTUNE_SETTINGS": str(SETTINGS_FILE),
        "INSTRUCTUNE_S3_ENDPOINT": env["AWS_ENDPOINT_URL"],
        "INSTRUCTUNE_RAY_ADDRESS": env["RAY_ADDRESS"],
        "INSTRUCTUNE_LOCAL_JOB_IDENTITY_DIR": identity_dir,
        "INSTRUCTUNE_RAY_SERVE_HTTP_PORT": serve_port(state_dir),
        "INSTRUCTUNE_METRICS_PORT": metrics_port(state_dir),
    }


def operator_logs(state_dir: Path, tail: int = 200) -> str:
    return localstack.kubectl(
        state_dir, "logs", "-n", NAMESPACE, f"deploy/{DEPLOYMENT}", f"--tail={tail}", check=False
    ).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=Path(os.environ.get("INSTRUCTUNE_STACK_DIR", localstack.DEFAULT_DIR))
    )
    args = parser.parse_args()
    try:
        for name, ref in install(args.dir).items():
            print(name, ref)
    except localstack.StackError as e:
        print(f"operator_release: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
