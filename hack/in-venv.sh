#!/usr/bin/env bash
# Runs one program of the project's virtual environment (hack/venv.sh) from the clone's root, with
# this clone's code first on PYTHONPATH, as `make test` does: `hack/in-venv.sh ruff check operator`.
# The pre-commit hooks (.pre-commit-config.yaml) call it. With this clone first on the path,
# hack/venv.sh finds its code importable and leaves the shared venv's editable install alone; it
# needs the network only when the venv does not exist yet (run `make venv` once).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$root/operator:$root/jobs:$root/cli${PYTHONPATH:+:$PYTHONPATH}
venv=$("$root/hack/venv.sh")
cd "$root"
exec "$venv/bin/$1" "${@:2}"
