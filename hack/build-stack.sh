#!/usr/bin/env bash
# Builds the local stack's upstream programs from the Go module proxy into a cache outside the
# clone. Each binary's file name carries its pinned version, so a program is rebuilt only when
# its pin in hack/versions.env changes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
CACHE=${INSTRUCTUNE_CACHE:-$HOME/.cache/instructune}
BIN=$CACHE/bin
SRC=$CACHE/src
LOGS=$CACHE/build-logs
mkdir -p "$BIN" "$SRC" "$LOGS"
# One build at a time per cache: a second caller waits, then finds the programs already built.
exec 9>"$CACHE/.build.lock"
if ! flock -n 9; then
  echo "build-stack: another build is running in $CACHE; waiting for it ..." >&2
  flock 9
fi
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=${GOTOOLCHAIN:-auto}

die() { echo "build-stack: $*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "no Go toolchain on PATH: install Go >= 1.24 (https://go.dev/doc/install) and run again"
go_minor=$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')
[ "${go_minor:-0}" -ge 24 ] || die "Go $(go env GOVERSION) is too old: the stack needs Go >= 1.24"

# run NAME CMD...: runs one build step, and on failure names the program and shows its log tail.
run() {
  local name=$1; shift
  local log=$LOGS/$name.log
  echo "build-stack: building $name ..." >&2
  local start=$SECONDS
  if ! "$@" >"$log" 2>&1; then
    echo "build-stack: building $name FAILED (log: $log); last lines:" >&2
    tail -n 25 "$log" >&2
    if grep -qiE 'dial tcp|i/o timeout|no such host|connection refused|proxy.golang.org.*(403|404|410)' "$log"; then
      echo "build-stack: the Go module proxy ($(go env GOPROXY)) looks unreachable or refused a module" >&2
    fi
    exit 1
  fi
  echo "build-stack: built $name in $((SECONDS - start))s" >&2
}

have() { [ -x "$BIN/$1-$2" ]; }

# go_install NAME VERSION MODULE PACKAGE [LDFLAGS]: builds PACKAGE of MODULE@VERSION inside a wrapper
# module (not `go install pkg@v`, which also asks the proxy for the module's version list).
go_install() {
  local name=$1 version=$2 module=$3 pkg=$4 ldflags=${5:-}
  have "$name" "$version" && return 0
  local dir=$SRC/$name-$version out; out=$(mktemp -d)
  mkdir -p "$dir"
  printf 'module instructune.local/%s\ngo 1.24\nrequire %s %s\n' "$name" "$module" "$version" >"$dir/go.mod"
  (cd "$dir" && run "$name-deps" go get "$pkg@$version" \
    && run "$name" go build -trimpath -ldflags "-s -w $ldflags" -o "$out/$name" "$pkg")
  mv "$out/$name" "$BIN/$name-$version"; rm -rf "$out"
}

build_kubernetes() {
  local v=$K8S_VERSION all=1
  for c in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do have "$c" "$v" || all=0; done
  [ $all = 1 ] && return 0
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with local paths,
  # which do not apply to a dependency: a wrapper module pins each one to the matching v0.x tag.
  local dir=$SRC/kubernetes-$v minor=${v#v1.}; minor=${minor%%.*}
  mkdir -p "$dir"
  local gomod; gomod=$(go list -m -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  [ -f "$gomod" ] || die "could not read k8s.io/kubernetes@$v's go.mod from the Go module proxy"
  {
    echo "module instructune.local/kubernetes"
    echo "go 1.24"
    echo "require k8s.io/kubernetes $v"
    grep -E '^\s+k8s\.io/[a-z0-9-]+ v0\.0\.0$' "$gomod" | awk -v t="v0.${v#v1.}" '{print "replace " $1 " => " $1 " " t}'
  } >"$dir/go.mod"
  local ver_ldflags="-X k8s.io/component-base/version.gitVersion=$v -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=$v -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  local out; out=$(mktemp -d)
  (cd "$dir" && run kubernetes-deps go get "k8s.io/kubernetes/cmd/kube-apiserver@$v" "k8s.io/kubernetes/cmd/kube-controller-manager@$v" "k8s.io/kubernetes/cmd/kube-scheduler@$v" "k8s.io/kubernetes/cmd/kubectl@$v" "k8s.io/kubernetes/cmd/kubelet@$v" "k8s.io/kubernetes/cmd/kube-proxy@$v")
  for c in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
    have "$c" "$v" && continue
    (cd "$dir" && run "$c" go build -trimpath -ldflags "-s -w $ver_ldflags" -o "$out/$c" "k8s.io/kubernetes/cmd/$c")
    mv "$out/$c" "$BIN/$c-$v"
  done
  rm -rf "$out"
}

# CoreDNS with only the plugins the local node's Corefile uses (its own main, as CoreDNS documents
# for custom builds): no cloud SDKs to download or compile.
build_coredns() {
  local v=$COREDNS_VERSION
  have coredns "$v" && return 0
  local dir=$SRC/coredns-$v out; out=$(mktemp -d)
  mkdir -p "$dir"
  printf 'module instructune.local/coredns\ngo 1.26\nrequire github.com/coredns/coredns %s\n' "$v" >"$dir/go.mod"
  cat >"$dir/main.go" <<'GO'
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// In CoreDNS's plugin.cfg order.
func init() {
	dnsserver.Directives = []string{"bind", "ready", "health", "errors", "log", "loadbalance", "cache", "kubernetes"}
}

func main() { coremain.Run() }
GO
  (cd "$dir" && run coredns-deps go get "github.com/coredns/coredns@$v" \
    && run coredns go build -trimpath -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$v" -o "$out/coredns" .)
  mv "$out/coredns" "$BIN/coredns-$v"; rm -rf "$out"
}

# The node's own static programs (hack/node-images): the pause image's /pause and the tests' probe,
# named by a hash of their sources.
build_node_images() {
  local src=$here/node-images h
  h=$(cd "$src" && find . -type f \( -name '*.go' -o -name go.mod \) | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-12)
  for p in pause probe; do
    have "$p" "$h" && continue
    (cd "$src" && run "$p" go build -trimpath -ldflags "-s -w" -o "$BIN/$p-$h.tmp" "./$p")
    mv "$BIN/$p-$h.tmp" "$BIN/$p-$h"
  done
}

# Prometheus with only its static and file service discovery (the `remove_all_sd` build tag drops
# every cloud's: their SDKs are most of its dependencies) and without the web UI's assets (the
# tests use its HTTP API only). Its version string is the release's (v0.316.0 is 3.16.0).
build_prometheus() {
  local v=$PROMETHEUS_VERSION
  have prometheus "$v" && return 0
  local dir=$SRC/prometheus-$v out; out=$(mktemp -d)
  mkdir -p "$dir"
  printf 'module instructune.local/prometheus\ngo 1.26\nrequire github.com/prometheus/prometheus %s\n' "$v" >"$dir/go.mod"
  local pkg=github.com/prometheus/prometheus/cmd/prometheus
  (cd "$dir" && run prometheus-deps go get -tags remove_all_sd "$pkg@$v")
  local release; release=$(cat "$(cd "$dir" && go list -m -f '{{.Dir}}' github.com/prometheus/prometheus)/VERSION")
  (cd "$dir" && run prometheus go build -trimpath -tags remove_all_sd \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=$release" -o "$out/prometheus" "$pkg")
  mv "$out/prometheus" "$BIN/prometheus-$v"; rm -rf "$out"
}

want=${*:-kubernetes etcd kwok kuberay helm minio coredns prometheus node-images}
for c in $want; do
  case $c in
    kubernetes) build_kubernetes ;;
    etcd) go_install etcd "$ETCD_VERSION" go.etcd.io/etcd/server/v3 go.etcd.io/etcd/server/v3 ;;
    kwok) go_install kwok "$KWOK_VERSION" sigs.k8s.io/kwok sigs.k8s.io/kwok/cmd/kwok \
            "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" ;;
    kuberay) go_install kuberay-operator "$KUBERAY_VERSION" github.com/ray-project/kuberay/ray-operator \
               github.com/ray-project/kuberay/ray-operator ;;
    helm) go_install helm "$HELM_VERSION" helm.sh/helm/v3 helm.sh/helm/v3/cmd/helm \
            "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" ;;
    minio) go_install minio "$MINIO_VERSION" github.com/minio/minio github.com/minio/minio ;;
    coredns) build_coredns ;;
    prometheus) build_prometheus ;;
    node-images) build_node_images ;;
    *) die "unknown component $c" ;;
  esac
done
echo "build-stack: all programs are in $BIN" >&2
