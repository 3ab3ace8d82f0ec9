#!/usr/bin/env bash
# Writes the lock files from pyproject.toml's pins with a pinned uv: every transitive dependency
# pinned with its hashes, for CPython 3.11 on x86_64 Linux (this machine, CI, and both images).
#   requirements.lock           the development environment (all extras, the CLI's too): hack/venv.sh
#   operator/requirements.lock  the operator image: the base dependencies only
#   jobs/requirements.lock      the job image: base + train
# The two image locks are resolved under the development lock as constraints, so every package
# has one version everywhere. `make lock` rewrites them; tests/unit/test_lock_files.py fails when
# a pin in pyproject.toml and the locks disagree.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${INSTRUCTUNE_CACHE:-$HOME/.cache/instructune}
UV_VERSION=0.13.8
tools=$CACHE/tools/uv-$UV_VERSION
if [ ! -x "$tools/bin/uv" ]; then
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q "uv==$UV_VERSION"
fi
compile() {
  "$tools/bin/uv" pip compile "$root/pyproject.toml" --quiet --generate-hashes --no-header \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 "$@"
}
cd "$root"
compile --extra train --extra dev --extra bench --extra cli -o requirements.lock
compile -c requirements.lock -o operator/requirements.lock
compile -c requirements.lock --extra train -o jobs/requirements.lock
# The index is the machine's own (pip's configuration), never one written into a lock.
sed -i '/^--index-url/d' requirements.lock operator/requirements.lock jobs/requirements.lock
