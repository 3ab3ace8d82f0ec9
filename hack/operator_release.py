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
    settings: dict[str, Any], operator_ref: str, job_ref: str, s3_endpoint: str
) -> dict[str, Any]:
    """Helm values for the local stack. Pure: the chart's defaults apart from what the stack decides."""
    repository, tag = operator_ref.rsplit(":", 1)
    return {
        # Imported into the node's containerd, never pulled: no registry is reachable.
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
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
    operator_ref, job_ref = localstack.import_product_images(state_dir, ("operator", "job"))
    env = localstack.read_env(state_dir)
    settings = yaml.safe_load(SETTINGS_FILE.read_text())
    values = stack_values(settings, operator_ref, job_ref, env["AWS_ENDPOINT_URL"])
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
