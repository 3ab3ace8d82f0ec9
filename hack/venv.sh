#!/usr/bin/env bash
# Creates (once per lock) the project's virtual environment outside the clone and prints its
# path. It installs exactly requirements.lock (every transitive dependency pinned with hashes),
# so two machines get the same environment; its cache key is the lock itself. Heavy wheels (torch,
# ray, deepspeed) are installed once and reused by every clone; the project itself is installed
# editable from the clone calling this script.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${INSTRUCTUNE_CACHE:-$HOME/.cache/instructune}
PY=${PYTHON:-python3}
lock=$root/requirements.lock
key=$( (cat "$lock" "$0"; $PY -V) | sha256sum | cut -c1-12)
venv=$CACHE/venv-$key
mkdir -p "$CACHE"
# One creator at a time per venv: a second caller waits, then finds it complete.
exec 8>"$venv.lock"
if ! flock -n 8; then
  echo "venv: another process is creating $venv; waiting for it ..." >&2
  flock 8
fi
if [ ! -f "$venv/.complete" ]; then
  echo "venv: creating $venv (first run installs torch, ray, transformers, deepspeed: several minutes)" >&2
  rm -rf "$venv"
  $PY -m venv "$venv"
  # DeepSpeed ships only an sdist whose setup.py imports torch: install everything else first,
  # then build DeepSpeed against that torch (without build isolation), with no C++/CUDA ops
  # prebuilt. --no-deps: the lock already lists every dependency, hashed.
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  python3 "$root/hack/split_lock.py" "$lock" deepspeed "$tmp/rest.lock" "$tmp/deepspeed.lock"
  "$venv/bin/pip" install -q --require-hashes --no-deps -r "$tmp/rest.lock" >&2 \
    || { echo "venv: installing the Python dependencies failed (is PyPI reachable?)" >&2; exit 1; }
  DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 "$venv/bin/pip" install -q --require-hashes --no-deps \
    --no-build-isolation -r "$tmp/deepspeed.lock" >&2
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" >&2
  touch "$venv/.complete"
fi
# The editable install must point at the clone that is running now (still under the lock).
if ! "$venv/bin/python" -c 'import instructune_operator, sys; sys.exit(0 if instructune_operator.__file__.startswith(sys.argv[1]) else 1)' "$root" 2>/dev/null; then
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" >&2
fi
echo "$venv"
