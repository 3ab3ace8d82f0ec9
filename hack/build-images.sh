#!/usr/bin/env bash
# Builds the product's images without a Docker daemon: buildah (vfs storage, chroot isolation) on
# a Debian bookworm base made with debootstrap, running the very Dockerfiles a user's
# `docker build` runs (operator/Dockerfile, jobs/Dockerfile).
#
#   hack/build-images.sh [base|operator|job ...]     (default: operator job)
#
# stdout: one line per image asked for, `REF ARCHIVE`: the image reference and an archive of
# it (OCI, uncompressed layers) that `ctr -n k8s.io images import ARCHIVE` loads under REF. Logs and
# timings go to stderr (and $IMAGES/timings.log). Exit status non-zero, with the reason, on failure.
# Concurrent callers wait for each other (flock) and then find the images built.
#
# Everything lives outside the clone, under $IMAGES = ${INSTRUCTUNE_CACHE:-~/.cache/instructune}/images:
#   storage.conf, storage/      buildah's image store (CONTAINERS_STORAGE_CONF=$IMAGES/storage.conf)
#   tmp/                        buildah's temporary files and its RUN cache mounts (pip's cache)
#   base-<key>.tar              the debootstrap root filesystem of the base image
#   archives/<name>-<key>.oci.tar  the image archives (OCI)
#   logs/<name>.log             the last build's output of each image
# The job image's `environment` stage (its locked venv) is kept as an image of its own,
# localhost/instructune-job-environment:<key>, keyed by jobs/Dockerfile's `environment` stage and
# jobs/requirements.lock only: a change of instructune_jobs, or of the stages after `environment`,
# rebuilds the job image on top of it in minutes.
# An image's key hashes its Dockerfile, its lock file(s), the sources it ships and the base's key:
# nothing is rebuilt unless one of them changed (or INSTRUCTUNE_IMAGES_REBUILD=1: the product's
# images are rebuilt, from the cached wheels).
#
# The machine reaches the package registries through its own pip configuration and CA bundle; the
# build gets them as build secrets (mounted read-only for the install steps only, never in a
# layer), never as files or variables of an image.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${INSTRUCTUNE_CACHE:-$HOME/.cache/instructune}
IMAGES=$CACHE/images
REPO=${INSTRUCTUNE_IMAGE_REPOSITORY:-ghcr.io/instructune}
SUITE=bookworm
# Bump to rebuild the base (BASE_RECIPE) or the product's images (RECIPE) when what this script
# does to them changes.
BASE_RECIPE=1
RECIPE=2

# Logs go to the caller's stderr (fd 7) even from steps whose own output goes to a log file.
exec 7>&2
log() { echo "build-images: $*" >&7; }
die() { log "ERROR: $*"; exit 1; }

# timed STEP CMD...: runs CMD, logs and records how long it took.
timed() {
  local step=$1; shift
  local start end secs rc=0
  start=$(date +%s.%N)
  "$@" || rc=$?
  end=$(date +%s.%N)
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" -eq 0 ]; then
    log "$step: ${secs}s"
    echo "$(date -u +%FT%TZ) $step ${secs}s" >>"$IMAGES/timings.log"
  else
    log "$step: FAILED after ${secs}s"
  fi
  return "$rc"
}

want=("$@")
[ ${#want[@]} -gt 0 ] || want=(operator job)
for w in "${want[@]}"; do
  case $w in base|operator|job) ;; *) die "unknown image '$w' (base, operator, job)";; esac
done

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, and buildah's chroot isolation)"
mkdir -p "$IMAGES/archives" "$IMAGES/logs" "$IMAGES/tmp" "$IMAGES/storage"

exec 9>"$IMAGES/.lock"
if ! flock -n 9; then
  log "another build is running in $IMAGES; waiting for it ..."
  flock 9
fi

# --- tools -----------------------------------------------------------------------------------
missing=()
command -v buildah >/dev/null 2>&1 || missing+=(buildah)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
  log "installing ${missing[*]} (Debian packages) ..."
  apt-get -o DPkg::Lock::Timeout=600 update -q >&2 || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
    --no-install-recommends "${missing[@]}" >&2 || die "installing ${missing[*]} failed"
fi

cat >"$IMAGES/storage.conf" <<EOF
[storage]
driver = "vfs"
graphroot = "$IMAGES/storage/graph"
runroot = "$IMAGES/storage/run"
EOF
export CONTAINERS_STORAGE_CONF=$IMAGES/storage.conf
# buildah's temporary files (a commit of the job image writes gigabytes) and its RUN cache
# mounts (pip's wheel cache) stay in the cache too.
export TMPDIR=$IMAGES/tmp
export BUILDAH_ISOLATION=chroot

VERSION=$(python3 "$root/hack/images.py" version)
BASE_REF=localhost/instructune-base:$SUITE
ENVIRONMENT_REPO=localhost/instructune-job-environment

# image_key REF: the build key recorded on an image in the store (empty when absent).
image_key() {
  buildah inspect --type image --format '{{index .OCIv1.Config.Labels "io.instructune.build-key"}}' "$1" \
    2>/dev/null || true
}

# --- the base: debootstrap, imported as a local image ----------------------------------------
base_key=$(printf '%s\n' "$BASE_RECIPE" "$SUITE" minbase python3,python3-venv,ca-certificates,wget \
  | sha256sum | cut -c1-16)

# remove_rootfs DIR: a debootstrap target, with whatever it left mounted inside (proc, sys, devpts
# after a failure) unmounted first; rm never crosses into another file system.
remove_rootfs() {
  local mnt
  for mnt in $(awk -v d="$1/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r); do
    umount -l "$mnt" 2>/dev/null || true
  done
  rm -rf --one-file-system "$1"
}

build_base() {
  if [ "$(image_key "$BASE_REF")" = "$base_key" ]; then
    return
  fi
  local rootfs_tar=$IMAGES/base-$base_key.tar
  if [ ! -f "$rootfs_tar" ]; then
    local mirror=${INSTRUCTUNE_DEBIAN_MIRROR:-$(python3 "$root/hack/images.py" mirror || true)}
    [ -n "$mirror" ] || die "no Debian mirror in /etc/apt/sources.list(.d); set INSTRUCTUNE_DEBIAN_MIRROR"
    local dir
    dir=$(mktemp -d "$IMAGES/tmp/rootfs.XXXXXX")
    log "base: debootstrap $SUITE (minbase, python3) from the machine's Debian mirror ..."
    if ! timed "base debootstrap" debootstrap --variant=minbase \
        --include=python3,python3-venv,ca-certificates,wget "$SUITE" "$dir" "$mirror" \
        >"$IMAGES/logs/base.log" 2>&1; then
      tail -n 20 "$IMAGES/logs/base.log" >&2
      remove_rootfs "$dir"
      die "debootstrap failed (log: $IMAGES/logs/base.log)"
    fi
    # What a container image does not carry: package caches and lists, the building machine's
    # resolver and host name (the runtime provides them).
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/cache/apt/*.bin "$dir"/var/lib/apt/lists/* \
      "$dir"/var/log/* "$dir"/etc/hostname "$dir"/etc/machine-id
    : >"$dir/etc/resolv.conf"
    rm -f "$IMAGES"/base-*.tar
    timed "base tar" tar -C "$dir" --numeric-owner --xattrs -cf "$rootfs_tar.part" .
    mv "$rootfs_tar.part" "$rootfs_tar"
    remove_rootfs "$dir"
  fi
  local ctr
  ctr=$(buildah from scratch)
  buildah add "$ctr" "$rootfs_tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd '["/bin/bash"]' --label "io.instructune.build-key=$base_key" "$ctr"
  timed "base commit" buildah commit --quiet --rm "$ctr" "$BASE_REF" >/dev/null
}

# --- the product's images ----------------------------------------------------------------------
# image_inputs NAME: the files an image's key covers (relative to the repository root).
image_inputs() {
  case $1 in
    operator) echo operator/Dockerfile operator/requirements.lock jobs/requirements.lock \
      hack/split_lock.py pyproject.toml README.md .dockerignore operator/instructune_operator \
      jobs/instructune_jobs/__init__.py jobs/instructune_jobs/config.py jobs/instructune_jobs/contract.py ;;
    job) echo jobs/Dockerfile jobs/requirements.lock hack/split_lock.py pyproject.toml \
      .dockerignore jobs/instructune_jobs ;;
  esac
}

image_ref() {
  case $1 in
    base) echo "$BASE_REF" ;;
    operator) echo "$REPO/instructune-operator:$VERSION" ;;
    job) echo "$REPO/instructune-job:$VERSION" ;;
  esac
}

# bud STEP LOG DOCKERFILE REF KEY [BUD ARGS...]: one `buildah bud`, the machine's pip configuration
# and CA bundle given as build secrets, its output in LOG (its tail on stderr when it fails).
bud() {
  local step=$1 logfile=$2 dockerfile=$3 ref=$4 key=$5
  shift 5
  local secrets pipconf=$IMAGES/tmp/pip.conf
  # The machine's pip configuration (files and PIP_* variables) as one file for the build, its
  # `cert` pointing at where the build mounts the machine's CA bundle.
  mapfile -t secrets < <(python3 "$root/hack/images.py" pip-conf "$pipconf" /run/secrets/ca.crt)
  local args=(--build-arg "BASE=$BASE_REF" --build-arg "VERSION=$VERSION"
    --secret "id=pip.conf,src=$pipconf" --label "io.instructune.build-key=$key")
  [ -n "${secrets[0]:-}" ] && args+=(--secret "id=ca.crt,src=${secrets[0]}")
  local dir
  for dir in "${secrets[@]:1}"; do args+=(-v "$dir:$dir:ro"); done
  log "$step: building $ref (key $key; log: $logfile) ..."
  # Each line of the log starts with its time, so the commit (the last step) is timed too.
  if ! timed "$step bud" stamped "$logfile" buildah bud --isolation chroot --pull=false "${args[@]}" "$@" \
      -f "$root/$dockerfile" -t "$ref" "$root"; then
    tail -n 30 "$logfile" >&2
    if grep -qiE 'connection (refused|reset)|timed out|name resolution|ssl|certificate' "$logfile"; then
      log "the package index looked unreachable or untrusted from inside the build (pip configuration: $pipconf)"
    fi
    die "building $step failed (log: $logfile)"
  fi
  local commit
  commit=$(awk '$3 == "COMMIT" || $2 == "COMMIT" { c = $1 } { last = $1 } END { if (c) printf "%.1f", last - c }' "$logfile")
  if [ -n "$commit" ]; then
    log "$step commit: ${commit}s (of the bud)"
    echo "$(date -u +%FT%TZ) $step commit ${commit}s" >>"$IMAGES/timings.log"
  fi
}

# stamped LOG CMD...: runs CMD, its output (stdout and stderr) in LOG, each line after its time.
stamped() {
  local logfile=$1; shift
  (
    set +e +o pipefail
    "$@" 2>&1 | while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done >"$logfile"
    exit "${PIPESTATUS[0]}"
  )
}

build_image() {
  local name=$1 ref key dockerfile
  ref=$(image_ref "$name")
  dockerfile=$([ "$name" = job ] && echo jobs/Dockerfile || echo operator/Dockerfile)
  # shellcheck disable=SC2046
  key=$(cd "$root" && { echo "$RECIPE $base_key $VERSION"; python3 hack/images.py key $(image_inputs "$name"); } \
    | sha256sum | cut -c1-16)
  KEY=$key
  if [ -n "${INSTRUCTUNE_IMAGES_REBUILD:-}" ]; then
    rm -f "$IMAGES/archives/$name-$key.oci.tar"
  elif [ -f "$IMAGES/archives/$name-$key.oci.tar" ] || [ "$(image_key "$ref")" = "$key" ]; then
    log "$name: $ref is up to date (key $key)"
    return
  fi
  build_base
  local extra=()
  if [ "$name" = job ]; then
    # The job image's `environment` stage (the locked venv: ~6 GB, most of the build's time) as an
    # image of its own, keyed by what it installs: a change of instructune_jobs alone reuses it.
    local env_key env_ref
    env_key=$(cd "$root" && { echo "$RECIPE $base_key"; python3 hack/images.py stage jobs/Dockerfile environment; \
      python3 hack/images.py key jobs/requirements.lock hack/split_lock.py; } | sha256sum | cut -c1-16)
    env_ref=$ENVIRONMENT_REPO:$env_key
    if [ -n "${INSTRUCTUNE_IMAGES_REBUILD:-}" ] || [ "$(image_key "$env_ref")" != "$env_key" ]; then
      bud "job-environment" "$IMAGES/logs/job-environment.log" "$dockerfile" "$env_ref" "$env_key" \
        --target environment
      local old
      for old in $(buildah images --format '{{.Name}}:{{.Tag}}' | grep "^$ENVIRONMENT_REPO:" | grep -v ":$env_key\$"); do
        buildah rmi "$old" >/dev/null 2>&1 || true
      done
    fi
    extra=(--build-arg "ENVIRONMENT=$env_ref")
  fi
  bud "$name" "$IMAGES/logs/$name.log" "$dockerfile" "$ref" "$key" "${extra[@]}"
  # The previous build's image, now untagged, and nothing else of it.
  buildah rmi --prune >/dev/null 2>&1 || true
}

# archive NAME REF KEY: the image as an OCI archive with uncompressed layers (no gzip of gigabytes
# on two cores). buildah 1.28 compresses its OCI outputs, so it writes a docker-archive into a pipe
# that images.py rewrites as OCI on the fly (one pass, no second copy on disk); the OCI index
# names the manifest digest, which an importer can compare with what containerd holds.
archive() {
  local name=$1 ref=$2 key=$3
  local path=$IMAGES/archives/$name-$key.oci.tar fifo=$IMAGES/tmp/$name.docker-archive.pipe
  if [ ! -f "$path" ]; then
    rm -f "$IMAGES/archives/$name"-*.tar "$fifo" "$path.part"
    mkfifo "$fifo"
    python3 "$root/hack/images.py" oci-archive "$fifo" "$path.part" "$ref" >/dev/null &
    local conv=$!
    if ! timed "$name archive" buildah push --quiet "$ref" "docker-archive:$fifo:$ref" >/dev/null; then
      # Unblock the reader if buildah never opened the pipe, then give up.
      timeout 5 sh -c ': >"$1"' sh "$fifo" 2>/dev/null || true
      wait "$conv" 2>/dev/null || true
      rm -f "$fifo" "$path.part"
      die "writing the archive of $ref failed"
    fi
    wait "$conv" || { rm -f "$fifo" "$path.part"; die "rewriting the archive of $ref as OCI failed"; }
    rm -f "$fifo"
    mv "$path.part" "$path"
  fi
  echo "$ref $path"
}

for w in "${want[@]}"; do
  if [ "$w" = base ]; then
    build_base
    archive base "$BASE_REF" "$base_key"
  else
    build_image "$w"
    archive "$w" "$(image_ref "$w")" "$KEY"
  fi
done
