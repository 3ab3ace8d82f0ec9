#!/usr/bin/env bash
# Creates (once per dependency set) the project's virtual environment outside the clone and
# prints its path. Heavy wheels (torch, ray, deepspeed) are installed once and reused by every
# clone; the project itself is installed editable from the clone calling this script.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${INSTRUCTUNE_CACHE:-$HOME/.cache/instructune}
PY=${PYTHON:-python3}
key=$( (sed -n '/^dependencies/,/^\[tool/p' "$root/pyproject.toml"; cat "$0"; $PY -V) | sha256sum | cut -c1-12)
venv=$CACHE/venv-$key
if [ ! -f "$venv/.complete" ]; then
  echo "venv: creating $venv (first run installs torch, ray, transformers, deepspeed: several minutes)" >&2
  rm -rf "$venv"
  $PY -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel >&2
  # DeepSpeed ships only an sdist whose setup.py imports torch: install torch first and build
  # DeepSpeed against it (without build isolation), with no C++/CUDA ops prebuilt.
  torch_pin=$(grep -o '"torch==[^"]*"' "$root/pyproject.toml" | tr -d '"')
  "$venv/bin/pip" install -q "$torch_pin" >&2
  DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 "$venv/bin/pip" install -q --no-build-isolation -e "$root[train,dev,bench]" >&2 \
    || { echo "venv: installing the Python dependencies failed (is PyPI reachable?)" >&2; exit 1; }
  touch "$venv/.complete"
fi
# The editable install must point at the clone that is running now.
if ! "$venv/bin/python" -c 'import instructune_operator, sys; sys.exit(0 if instructune_operator.__file__.startswith(sys.argv[1]) else 1)' "$root" 2>/dev/null; then
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" >&2
fi
echo "$venv"
