#!/usr/bin/env python3
"""The local stack: real upstream programs started on 127.0.0.1, no containers.

    python hack/localstack.py up|down|status [--dir DIR]

Starts etcd, kube-apiserver (TLS, RBAC, Node authorizer), kube-controller-manager, kube-scheduler,
KWOK (fake GPU and CPU nodes), the KubeRay operator with its CRDs, MinIO with the project's buckets, a
local Ray head, and one real node in pool `local`: containerd, a kubelet, kube-proxy and CoreDNS, whose
pods run code (hack/localstack_node.py; what each component runs: hack/localstack_components.py).
Every process runs in its own process group; its pid is recorded in ``<dir>/stack.json`` and ``down``
stops exactly those processes (and their descendants), never anything found by name: the
Ray head runs as ``ray start --block`` and is stopped through it, not with ``ray stop`` (which stops
every Ray on the machine, including other stacks').

Files in the state dir: ``kubeconfig`` (admin), ``env`` (shell-sourceable; the only place the MinIO
credentials are written), ``stack.json`` (ports, pids, paths), ``logs/<component>.log``.
Programs come from ``hack/build-stack.sh`` (run automatically when one is missing); ``ray`` comes from
the project's virtual environment (``hack/venv.sh``). Standard library only.

The real node needs root and bridge netfilter; it is left out (``up`` says why) when the machine lacks
them, with INSTRUCTUNE_NODE=0, or while another stack on the machine runs its node. ``up`` refuses to
start when no pod range is safe (every range is checked against the machine's routes, name servers
and package hosts), and ``down`` removes everything the node created.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import localstack_components as comp
import localstack_node as node

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
DEFAULT_DIR = REPO / ".stack"
CACHE = Path(os.environ.get("INSTRUCTUNE_CACHE", str(Path.home() / ".cache" / "instructune")))
HOST = "127.0.0.1"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
REGION = "us-east-1"
BUCKETS = ("models", "datasets", "artifacts")
POOL_LABEL = "instructune.io/pool"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
KWOK_ANNOTATION = comp.KWOK_ANNOTATION
STOP_GRACE_S = 10.0
# State-dir entries that `up` owns and may delete; nothing else in the directory is touched.
OWNED_ENTRIES = ("etcd", "minio", "pki", "logs", "kwok", "bin", "node", "kubeconfig", "env", "stack.json")
NODE_NAME = comp.NODE_NAME
# The real node's containerd keeps its images and snapshots here (imported once, kept across stacks).
CONTAINERD_ROOT = CACHE / "node" / "containerd"


class StackError(RuntimeError):
    """A component failed to start or the state dir is in a state `up` cannot handle."""


@dataclass(frozen=True)
class Pool:
    name: str
    nodes: int
    cpu: str
    memory: str
    gpus: int = 0
    gpu_product: str = ""
    gpu_memory_mib: int = 0


POOLS = (
    Pool(
        "a100-80g",
        2,
        cpu="96",
        memory="1Ti",
        gpus=8,
        gpu_product="NVIDIA-A100-SXM4-80GB",
        gpu_memory_mib=81920,
    ),
    Pool("l4", 2, cpu="16", memory="64Gi", gpus=1, gpu_product="NVIDIA-L4", gpu_memory_mib=23034),
    Pool("cpu", 2, cpu="32", memory="128Gi"),
)

# program name -> (build-stack.sh component, versions.env key)
PROGRAMS = {
    "etcd": ("etcd", "ETCD_VERSION"),
    "kube-apiserver": ("kubernetes", "K8S_VERSION"),
    "kube-controller-manager": ("kubernetes", "K8S_VERSION"),
    "kube-scheduler": ("kubernetes", "K8S_VERSION"),
    "kubectl": ("kubernetes", "K8S_VERSION"),
    "kwok": ("kwok", "KWOK_VERSION"),
    "kuberay-operator": ("kuberay", "KUBERAY_VERSION"),
    "minio": ("minio", "MINIO_VERSION"),
    "kubelet": ("kubernetes", "K8S_VERSION"),
    "kube-proxy": ("kubernetes", "K8S_VERSION"),
    "coredns": ("coredns", "COREDNS_VERSION"),
    # Not started by the stack: tests/integration/test_metrics_prometheus.py runs it.
    "prometheus": ("prometheus", "PROMETHEUS_VERSION"),
    # The node's own static programs (hack/node-images), versioned by a hash of their sources.
    "pause": ("node-images", ""),
    "probe": ("node-images", ""),
}


@dataclass
class Proc:
    """One started process: enough to find it again and to know it is still the same process."""

    name: str
    pid: int
    start_ticks: int
    log: str
    argv: list[str] = field(default_factory=list)


def log(msg: str) -> None:
    print(f"localstack: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Programs


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (HACK / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def program(name: str) -> Path:
    key = PROGRAMS[name][1]
    version = versions()[key] if key else node.source_hash(HACK / "node-images")
    return CACHE / "bin" / f"{name}-{version}"


def ensure_programs(names: Sequence[str] = tuple(PROGRAMS)) -> None:
    """Builds (once, cached outside the clone) every pinned program of `names` that is missing."""
    missing = sorted({PROGRAMS[n][0] for n in names if not os.access(program(n), os.X_OK)})
    if missing:
        log(f"building missing programs ({' '.join(missing)}) with hack/build-stack.sh ...")
        rc = subprocess.run(["bash", str(HACK / "build-stack.sh"), *missing], check=False).returncode
        if rc != 0:
            raise StackError(
                f"hack/build-stack.sh {' '.join(missing)} failed (exit {rc}); see its output above"
            )


def ray_program() -> Path:
    """`ray` from this interpreter's environment, $INSTRUCTUNE_VENV, or the project venv (hack/venv.sh)."""
    candidates = [Path(sys.executable).parent / "ray"]
    if os.environ.get("INSTRUCTUNE_VENV"):
        candidates.append(Path(os.environ["INSTRUCTUNE_VENV"]) / "bin" / "ray")
    for c in candidates:
        if os.access(c, os.X_OK):
            return c
    log("no `ray` next to this interpreter: locating the project venv with hack/venv.sh ...")
    res = subprocess.run(["bash", str(HACK / "venv.sh")], stdout=subprocess.PIPE, text=True, check=False)
    venv_ray = (
        Path(res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "/nonexistent") / "bin" / "ray"
    )
    if res.returncode != 0 or not os.access(venv_ray, os.X_OK):
        raise StackError("ray: no `ray` program found (hack/venv.sh failed or the venv lacks ray)")
    return venv_ray


def crd_dir() -> Path:
    """KubeRay's CRDs, read from the Go module cache (never copied into the repository)."""
    gomodcache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=False)
    base = Path(gomodcache.stdout.strip() or Path.home() / "go" / "pkg" / "mod")
    d = base / f"github.com/ray-project/kuberay/ray-operator@{versions()['KUBERAY_VERSION']}/config/crd/bases"
    if not d.is_dir():
        raise StackError(f"kuberay CRDs: {d} not found (hack/build-stack.sh kuberay fetches the module)")
    return d


# ---------------------------------------------------------------------------------------------------
# Processes


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a live process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def alive(p: Proc) -> bool:
    """True while the recorded process runs (a zombie or a reused pid counts as gone)."""
    _reap(p.pid)
    st = _stat(p.pid)
    return st is not None and st[0] not in ("Z", "X") and st[1] == p.start_ticks


def _proc_table() -> dict[int, tuple[int, int, int, str]]:
    """pid -> (ppid, pgid, start ticks, command name) of every process."""
    table: dict[int, tuple[int, int, int, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            fields = raw[raw.rindex(")") + 2 :].split()
            comm = raw[raw.index("(") + 1 : raw.rindex(")")]
            table[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[19]), comm)
    return table


def descendants(pids: Sequence[int]) -> list[Proc]:
    """Live descendants and process-group members of the given pids (each a group leader here), with
    their start times so that a later kill hits only them."""
    table = _proc_table()
    found: dict[int, Proc] = {}
    todo = list(pids)
    for pid, (_, pgid, ticks, comm) in table.items():
        if pgid in pids and pid not in pids:
            found[pid] = Proc(f"{comm}", pid, ticks, "")
            todo.append(pid)
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, ticks, comm) in table.items():
            if ppid == parent and pid not in found and pid not in pids:
                found[pid] = Proc(f"{comm}", pid, ticks, "")
                todo.append(pid)
    return list(found.values())


def start(name: str, argv: list[str], state_dir: Path, env: dict[str, str] | None = None) -> Proc:
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    logfile = logs / f"{name}.log"
    with logfile.open("ab") as out:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=state_dir,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    st = _stat(popen.pid)
    proc = Proc(name, popen.pid, st[1] if st else 0, str(logfile), argv)
    # Keep the Popen object alive: its destructor must not warn, and `alive` reaps it when it exits.
    _POPENS.append(popen)
    return proc


_POPENS: list[subprocess.Popen[bytes]] = []


def tail(path: str | Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def failure(component: str, reason: str, logfile: str | Path) -> StackError:
    return StackError(f"{component}: {reason}\n--- last lines of {logfile} ---\n{tail(logfile)}")


def _signal_all(procs: Sequence[Proc], sig: signal.Signals) -> None:
    for p in procs:
        if alive(p):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, sig)


def _wait_gone(procs: Sequence[Proc], timeout_s: float) -> list[Proc]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in procs):
        time.sleep(0.1)
    return [p for p in procs if alive(p)]


def stop(procs: Sequence[Proc], grace_s: float = STOP_GRACE_S) -> list[Proc]:
    """Stops the recorded processes and everything they started; returns what is still alive (expected: none).

    SIGTERM goes to each recorded process first (so `ray start --block` can drain and stop its own
    children in order), then to its remaining descendants; SIGKILL ends whatever is left after the
    grace period. Processes are signalled by pid and start time only, never by name."""
    live = [p for p in procs if alive(p)]
    tree = descendants([p.pid for p in live])  # snapshot before anything exits and is reparented
    _signal_all(live, signal.SIGTERM)
    _wait_gone(live + tree, grace_s)
    rest = [p for p in tree if alive(p)]
    if rest:
        _signal_all(rest, signal.SIGTERM)
        _wait_gone(rest, 3)
    stubborn = [p for p in live + tree if alive(p)]
    if stubborn:
        log(f"SIGKILL after {grace_s:.0f}s: {', '.join(f'{p.name}[{p.pid}]' for p in stubborn)}")
        _signal_all(stubborn, signal.SIGKILL)
    return _wait_gone(live + tree, 5)


def stop_stack(state_dir: Path, state: dict[str, Any], procs: Sequence[Proc]) -> list[Proc]:
    """Stops every process and removes everything the real node created, in order: the node's pods
    (through the kubelet, so that CNI releases their networks), the clients, the node's containers
    (containerd still running), containerd, the node's bridge/mounts/iptables/cgroups, then the API
    server and etcd. Works from a partial record (a failed start)."""
    record = state.get("node")
    by_name = {p.name: p for p in procs}
    if record:
        with contextlib.suppress(Exception):
            _drain_node(state_dir, record, by_name)
    core = ("containerd", "kube-apiserver", "etcd")
    left = stop([p for p in procs if p.name not in core])
    if record:
        containerd = by_name.get("containerd")
        if containerd is not None and alive(containerd):
            with contextlib.suppress(Exception):
                node.remove_containers(Path(record["dir"]) / "containerd.sock", log)
        left += stop([p for p in procs if p.name == "containerd"])
        problems = node.teardown(record, state_dir, log)
        if problems:
            log(f"the real node left: {', '.join(problems)}")
    for name in ("kube-apiserver", "etcd"):
        left += stop([p for p in procs if p.name == name])
    return left


def _drain_node(state_dir: Path, record: dict[str, Any], by_name: dict[str, Proc]) -> None:
    """Deletes the node's pods while the kubelet runs and waits (briefly) until their sandboxes stop."""
    if not all(n in by_name and alive(by_name[n]) for n in ("kube-apiserver", "kubelet", "containerd")):
        return
    kubectl(state_dir, "delete", "pods", "--all-namespaces", f"--field-selector=spec.nodeName={record['name']}",
            "--grace-period=0", "--force", "--wait=false", check=False)  # fmt: skip
    sock = Path(record["dir"]) / "containerd.sock"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not node.ctr(sock, "tasks", "ls", "-q", check=False, timeout=10).stdout.strip():
            return
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------------
# Waiting


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_get(
    url: str, ctx: ssl.SSLContext | None = None, timeout: float = 3.0, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def insecure_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def admin_ctx(state_dir: Path) -> ssl.SSLContext:
    pki = state_dir / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


def wait_until(
    component: str, proc: Proc | None, check: Callable[[], bool], timeout_s: float, what: str
) -> None:
    """Polls `check` until it is true; fails naming the component (with its log tail) on timeout or exit."""
    deadline = time.monotonic() + timeout_s
    last_err = ""
    while True:
        if proc is not None and not alive(proc):
            raise failure(component, f"exited while waiting for {what}", proc.log)
        try:
            if check():
                return
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            last_err = f" (last error: {e})"
        if time.monotonic() > deadline:
            logfile = proc.log if proc else "(no log)"
            raise failure(
                component, f"not ready after {timeout_s:.0f}s waiting for {what}{last_err}", logfile
            )
        time.sleep(0.25)


def http_ok(
    url: str,
    ctx: ssl.SSLContext | None = None,
    expect: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Callable[[], bool]:
    def check() -> bool:
        status, body = http_get(url, ctx, headers=headers)
        return status == 200 and (expect is None or expect in body)

    return check


# ---------------------------------------------------------------------------------------------------
# Certificates (openssl CLI; ECDSA P-256)


def _openssl(*args: str, stdin: bytes | None = None) -> bytes:
    res = subprocess.run(["openssl", *args], input=stdin, capture_output=True, check=False)
    if res.returncode != 0:
        raise StackError(f"pki: openssl {args[0]} failed: {res.stderr.decode(errors='replace')}")
    return res.stdout


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    path.chmod(0o600)


def _sign(pki: Path, name: str, subject: str, ext: str) -> tuple[Path, Path]:
    key, crt, extfile = pki / f"{name}.key", pki / f"{name}.crt", pki / f"{name}.ext"
    _key(key)
    csr = _openssl("req", "-new", "-key", str(key), "-subj", subject)
    extfile.write_text(ext)
    _openssl(
        "x509", "-req", "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"), "-set_serial",
        str(secrets.randbits(63)), "-days", "3650", "-extfile", str(extfile), "-out", str(crt), stdin=csr,
    )  # fmt: skip
    extfile.unlink()
    return crt, key


def issue_client_cert(state_dir: Path, user: str, groups: Sequence[str] = ()) -> tuple[Path, Path]:
    """A client certificate (cert, key) for `user` in `groups`, signed by the stack's CA."""
    subject = "".join(f"/O={g}" for g in groups) + f"/CN={user}"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in user)
    ext = "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
    return _sign(state_dir / "pki", f"client-{safe}", subject, ext)


def make_pki(pki: Path, extra_ips: Sequence[str] = ()) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    _key(pki / "ca.key")
    _openssl(
        "req", "-x509", "-new", "-key", str(pki / "ca.key"), "-subj", "/CN=instructune-local-ca", "-days", "3650",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", str(pki / "ca.crt"),
    )  # fmt: skip
    sans = ",".join(
        [
            f"IP:{HOST}",
            f"IP:{SERVICE_IP}",
            *(f"IP:{ip}" for ip in extra_ips),
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
        ]
    )
    _sign(
        pki, "apiserver", "/CN=kube-apiserver",
        f"keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName={sans}\n",
    )  # fmt: skip
    client = "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
    _sign(pki, "admin", "/O=system:masters/CN=instructune-admin", client)
    _sign(pki, "controller-manager", "/CN=system:kube-controller-manager", client)
    _sign(pki, "scheduler", "/CN=system:kube-scheduler", client)
    # The API server's identity towards kubelets (logs, exec); bound to system:kubelet-api-admin.
    _sign(pki, "apiserver-kubelet-client", "/CN=instructune:apiserver-kubelet-client", client)
    _key(pki / "sa.key")
    _openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))


def write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "instructune",
                "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate": str(pki / f"{user}.crt"),
                    "client-key": str(pki / f"{user}.key"),
                },
            }
        ],
        "contexts": [{"name": "instructune", "context": {"cluster": "instructune", "user": user}}],
        "current-context": "instructune",
    }
    path.write_text(json.dumps(cfg, indent=2) + "\n")  # JSON is YAML
    path.chmod(0o600)


# ---------------------------------------------------------------------------------------------------
# S3 (a tiny SigV4 client: enough to create buckets without boto3)


def s3_request(endpoint: str, access: str, secret: str, method: str, path: str) -> int:
    host = endpoint.split("://", 1)[1]
    now = dt.datetime.now(dt.UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(b"").hexdigest()
    headers = {"host": host, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [method, path, "", *(f"{k}:{headers[k]}" for k in sorted(headers)), "", signed, payload]
    )
    scope = f"{day}/{REGION}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret}".encode()
    for part in (day, REGION, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    req = urllib.request.Request(endpoint + path, method=method, headers=headers)
    req.add_header(
        "Authorization",
        f"AWS4-HMAC-SHA256 Credential={access}/{scope}, SignedHeaders={signed}, Signature={signature}",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


# ---------------------------------------------------------------------------------------------------
# Kubernetes objects


def kubectl(
    state_dir: Path, *args: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [str(program("kubectl")), "--kubeconfig", str(state_dir / "kubeconfig"), *args],
        input=input, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if check and res.returncode != 0:
        raise StackError(f"kubectl {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def node_manifests() -> dict[str, Any]:
    items = []
    for pool in POOLS:
        for i in range(pool.nodes):
            name = f"kwok-{pool.name}-{i}"
            labels = {
                POOL_LABEL: pool.name,
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            }
            capacity = {"cpu": pool.cpu, "memory": pool.memory, "pods": "110", "ephemeral-storage": "1Ti"}
            taints = []
            if pool.gpus:
                labels |= {
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.product": pool.gpu_product,
                    "nvidia.com/gpu.count": str(pool.gpus),
                    "nvidia.com/gpu.memory": str(pool.gpu_memory_mib),
                }
                capacity["nvidia.com/gpu"] = str(pool.gpus)
                taints.append(GPU_TAINT)
            items.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": name, "labels": labels, "annotations": {KWOK_ANNOTATION: "fake"}},
                    "spec": {"taints": taints},
                    "status": {"capacity": capacity, "allocatable": capacity},
                }
            )
    return {"apiVersion": "v1", "kind": "List", "items": items}


# ---------------------------------------------------------------------------------------------------
# State


def _load(state_dir: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((state_dir / "stack.json").read_text())
        return data
    except (OSError, ValueError):
        return None


def _procs(state: dict[str, Any]) -> list[Proc]:
    return [Proc(**p) for p in state.get("processes", [])]


def _save(state_dir: Path, state: dict[str, Any]) -> None:
    tmp = state_dir / "stack.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(state_dir / "stack.json")


def read_env(state_dir: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in (state_dir / "env").read_text().splitlines():
            if line.startswith("export ") and "=" in line:
                k, _, v = line[len("export ") :].partition("=")
                if k != "PATH":  # for a shell to expand ("<dir>/bin:$PATH"), not a value
                    env[k] = v.strip("'")
    return env


def _write_env(state_dir: Path, env: dict[str, str]) -> None:
    path = state_dir / "env"
    path.touch(mode=0o600)
    path.chmod(0o600)
    lines = ["# Source me: . " + str(path)]
    lines += [f"export {k}='{v}'" for k, v in env.items()]
    lines.append(f'export PATH="{state_dir / "bin"}:$PATH"')
    path.write_text("\n".join(lines) + "\n")


def ray_auth(env: dict[str, str]) -> dict[str, str]:
    """The HTTP header that Ray's token authentication wants (Ray clients send it from RAY_AUTH_TOKEN)."""
    return {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"} if env.get("RAY_AUTH_TOKEN") else {}


def ray_temp_dir(state_dir: Path) -> Path:
    # Ray's unix socket paths must stay short (~107 bytes): keep its temp dir at a short fixed path.
    return Path("/tmp") / f"itr-{hashlib.sha1(str(state_dir).encode()).hexdigest()[:8]}"


def _clean(state_dir: Path) -> None:
    node.unmount_below([state_dir / "node"])  # never delete through a mount
    for name in OWNED_ENTRIES:
        p = state_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    shutil.rmtree(ray_temp_dir(state_dir), ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# up / down / status


def healthy(state_dir: Path, state: dict[str, Any]) -> list[str]:
    """Names of the components that do not answer their health check (empty: all healthy)."""
    ports = state["ports"]
    checks: dict[str, Callable[[], bool]] = {
        "etcd": http_ok(f"http://{HOST}:{ports['etcd']}/health", expect=b'"health":"true"'),
        "kube-apiserver": http_ok(f"{state['endpoints']['apiserver']}/readyz", admin_ctx(state_dir)),
    }
    if not state.get("api_only"):
        checks |= _service_checks(state_dir, state)
    bad = []
    for name, check in checks.items():
        try:
            ok = check()
        except (OSError, ValueError, subprocess.SubprocessError):
            ok = False
        if not ok:
            bad.append(name)
    return bad


def _service_checks(state_dir: Path, state: dict[str, Any]) -> dict[str, Callable[[], bool]]:
    """The full stack's components beside the API server and etcd, and its real node's."""
    ports = state["ports"]
    checks: dict[str, Callable[[], bool]] = {
        "kube-controller-manager": http_ok(
            f"https://{HOST}:{ports['controller_manager']}/healthz", insecure_ctx()
        ),
        "kube-scheduler": http_ok(f"https://{HOST}:{ports['scheduler']}/healthz", insecure_ctx()),
        "kwok": http_ok(f"http://{HOST}:{ports['kwok']}/healthz"),
        "kuberay-operator": http_ok(f"http://{HOST}:{ports['kuberay_probe']}/readyz"),
        "minio": http_ok(f"{state['endpoints']['s3']}/minio/health/live"),
        "ray": http_ok(
            f"http://{HOST}:{ports['ray_dashboard']}/api/version", headers=ray_auth(read_env(state_dir))
        ),
    }
    record = state.get("node")
    if record:
        checks["containerd"] = lambda: node.ctr(Path(record["dir"]) / "containerd.sock", "version", check=False,
                                               timeout=5).returncode == 0  # fmt: skip
        checks["coredns"] = http_ok(f"http://{HOST}:{ports['coredns_ready']}/ready")
        checks["kube-proxy"] = http_ok(f"http://{HOST}:{ports['kube_proxy_healthz']}/healthz")
        checks["kubelet"] = http_ok(f"http://{HOST}:{ports['kubelet_healthz']}/healthz")
    return checks


def _result(state_dir: Path, state: dict[str, Any], reused: bool) -> dict[str, Any]:
    return {**state, "env": read_env(state_dir), "reused": reused}


def up(state_dir: Path, api_only: bool = False) -> dict[str, Any]:
    """Starts the stack in `state_dir` (or reuses a healthy running one) and returns its description.

    The result is stack.json's content plus ``env`` (the variables of ``<dir>/env``, credentials
    included) and ``reused`` (True when a running stack was found and left as it was).

    ``api_only`` starts etcd and kube-apiserver alone (no node, controllers, KWOK, KubeRay, MinIO or
    Ray) with the CRDs of the objects the operator writes (KubeRay's RayCluster and the project's
    own) established: the in-process reconcile tests' stack, up in a few seconds. ``down`` stops it
    like the full stack."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    with _locked(state_dir):
        running = _running_stack(state_dir)
        if running is not None:
            if bool(running.get("api_only")) != api_only:
                raise StackError(
                    f"the stack running in {state_dir} is {'' if running.get('api_only') else 'not '}API-only; "
                    f"run `python hack/localstack.py down --dir {state_dir}` first"
                )
            log(f"reusing the running stack in {state_dir}")
            return _result(state_dir, running, reused=True)
        return _start_api_only(state_dir) if api_only else _start(state_dir)


def _running_stack(state_dir: Path) -> dict[str, Any] | None:
    """The recorded stack if it runs and is healthy; None (after cleaning stale state) if nothing runs."""
    old = _load(state_dir)
    if old is not None:
        procs = _procs(old)
        running = [p.name for p in procs if alive(p)]
        if running and len(running) == len(procs) and old.get("complete"):
            bad = healthy(state_dir, old)
            if not bad:
                return old
            raise StackError(
                f"the stack in {state_dir} runs but is unhealthy ({', '.join(bad)}); "
                f"run `python hack/localstack.py down --dir {state_dir}` first"
            )
        if running:
            dead = sorted({p.name for p in procs} - set(running))
            raise StackError(
                f"the stack in {state_dir} is partly running (stopped: {', '.join(dead) or 'none'}; "
                f"incomplete start: {not old.get('complete')}); "
                f"run `python hack/localstack.py down --dir {state_dir}`"
            )
        log(f"cleaning the stale state of a stack that no longer runs in {state_dir}")
        if old.get("node"):
            node.teardown(old["node"], state_dir, log)
    _clean(state_dir)
    return None


def node_wanted(state_dir: Path) -> str | None:
    """Why this stack runs without the real node (None: it runs one). INSTRUCTUNE_NODE=0 turns it off."""
    if os.environ.get("INSTRUCTUNE_NODE", "1") == "0":
        return "INSTRUCTUNE_NODE=0"
    reason = node.unavailable_reason()
    if reason:
        return reason
    other = node.owner()
    if other and other != str(state_dir):
        old = _load(Path(other))
        if old is not None and any(alive(p) for p in _procs(old) if p.name in ("kubelet", "containerd")):
            return f"the stack in {other} runs this machine's real node (one per machine)"
        log(f"removing what the stopped stack in {other} left of its node")
        if old is not None and old.get("node"):
            node.teardown(old["node"], Path(other), log)
        else:
            node.OWNER_FILE.unlink(missing_ok=True)
    return None


def _plan_node(state_dir: Path) -> dict[str, Any]:
    """The node's record (stack.json's "node"), or {"absent": why} when this stack runs without one. Refuses
    (StackError) when no pod range is safe: nothing has been created yet at that point."""
    why_not = node_wanted(state_dir)
    if why_not:
        log(f"no real node in this stack: {why_not}")
        return {"absent": why_not}
    try:
        node.ensure_packages(log)
        pod_cidr = node.plan_network(SERVICE_CIDR)
    except node.NodeError as e:
        raise StackError(f"real node: {e}") from e
    bridge, cgroup_root = node.names_for(state_dir)
    return {
        "name": NODE_NAME,
        "dir": str(state_dir / "node"),
        "containerd_root": str(CONTAINERD_ROOT),
        "bridge": bridge,
        "bridge_created": False,
        "pod_cidr": str(pod_cidr),
        "service_cidr": SERVICE_CIDR,
        "gateway": str(pod_cidr.network_address + 1),
        "cgroup_root": cgroup_root,
        "cni_network": f"instructune-{bridge}",
        "kube_proxy": str(program("kube-proxy")),
        "baseline": None,
        "pause_image": f"localhost/instructune/pause:{node.source_hash(HACK / 'node-images')}",
        "probe_image": f"localhost/instructune/probe:{node.source_hash(HACK / 'node-images')}",
    }


def _start(state_dir: Path) -> dict[str, Any]:
    ensure_programs()
    ray_bin = ray_program()
    crds = crd_dir()

    state: dict[str, Any] = {"dir": str(state_dir), "complete": False, "processes": [], "timings": {}}
    planned = _plan_node(state_dir)
    state["node"] = None if "absent" in planned else planned
    state["node_absent"] = planned.get("absent")
    return _run_start(
        state_dir, state, lambda launch, mark: _up(state_dir, state, launch, mark, ray_bin, crds)
    )


def _start_api_only(state_dir: Path) -> dict[str, Any]:
    ensure_programs(API_ONLY_PROGRAMS)
    crds = crd_dir()
    state: dict[str, Any] = {
        "dir": str(state_dir), "complete": False, "processes": [], "timings": {}, "api_only": True,
        "node": None, "node_absent": "an API-only stack",
    }  # fmt: skip
    return _run_start(
        state_dir, state, lambda launch, mark: _up_api_only(state_dir, state, launch, mark, crds)
    )


def _run_start(
    state_dir: Path,
    state: dict[str, Any],
    body: Callable[[Callable[..., Proc], Callable[[str], None]], None],
) -> dict[str, Any]:
    """Runs `body(launch, mark)`, recording every process it launches; stops them all if it fails."""
    procs: list[Proc] = []
    t0 = time.monotonic()

    def launch(name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        p = start(name, argv, state_dir, env)
        procs.append(p)
        state["processes"] = [asdict(x) for x in procs]
        _save(state_dir, state)  # recorded at once: a crash during `up` leaves nothing unaccounted for
        return p

    def mark(phase: str) -> None:
        state["timings"][phase] = round(time.monotonic() - t0, 1)
        log(f"{phase} ready ({state['timings'][phase]}s)")

    try:
        body(launch, mark)
    except BaseException:
        log("start failed: stopping what was started")
        stop_stack(state_dir, state, procs)
        shutil.rmtree(ray_temp_dir(state_dir), ignore_errors=True)
        state["processes"] = [asdict(p) for p in procs]
        _save(state_dir, state)
        raise
    state["complete"] = True
    state["timings"]["total"] = round(time.monotonic() - t0, 1)
    _save(state_dir, state)
    log(f"stack up in {state['timings']['total']}s: . {state_dir / 'env'}")
    return _result(state_dir, state, reused=False)


# ---------------------------------------------------------------------------------------------------
# The real node (its parts: hack/localstack_components.py; what it creates: hack/localstack_node.py)


def node_layout(record: dict[str, Any], pki: Path, api: str, ports: dict[str, int]) -> comp.NodeLayout:
    return comp.NodeLayout(
        dir=Path(record["dir"]),
        containerd_root=Path(record["containerd_root"]),
        pki=pki,
        apiserver=api,
        bridge=record["bridge"],
        pod_cidr=ipaddress.IPv4Network(record["pod_cidr"]),
        service_cidr=ipaddress.IPv4Network(record["service_cidr"]),
        cgroup_root=record["cgroup_root"],
        pause_image=record["pause_image"],
        ports=ports,
        name=record["name"],
    )


def make_node_pki(pki: Path, api: str, n: comp.NodeLayout) -> None:
    """The node's identities: the kubelet (Node authorizer: system:node:<name> in system:nodes) and its
    serving certificate for the node's address, kube-proxy (system:node-proxier) and CoreDNS."""
    client = "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
    _sign(pki, "kubelet", f"/O=system:nodes/CN=system:node:{n.name}", client)
    _sign(pki, "kubelet-serving", f"/CN={n.name}", "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
          f"subjectAltName=IP:{n.gateway},DNS:{n.name}\n")  # fmt: skip
    _sign(pki, "kube-proxy", "/CN=system:kube-proxy", client)
    _sign(pki, "coredns", "/CN=instructune:coredns", client)
    for user in ("kubelet", "kube-proxy", "coredns"):
        write_kubeconfig(pki / f"{user}.kubeconfig", api, pki, user)


def launch_component(launch: Callable[..., Proc], c: comp.Component) -> Proc:
    write_files(c)
    return launch(c.name, list(c.argv), dict(c.env))


def write_files(c: comp.Component) -> None:
    for path, content in c.files.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(content)


def start_node_runtime(
    state_dir: Path,
    state: dict[str, Any],
    record: dict[str, Any],
    n: comp.NodeLayout,
    launch: Callable[..., Proc],
    mark: Callable[[str], None],
) -> None:
    """The bridge, the cgroup root and containerd (with the node's images): all before the API server
    is up. Each creation is recorded before it happens, so a failure removes it."""
    for d in (n.dir, n.dir / "cni-ipam", n.pod_logs_dir, n.kubelet_dir, n.containerd_root):
        d.mkdir(parents=True, exist_ok=True)
    # What this machine had before the node: `down` removes what was added, the tests compare.
    record["baseline"] = node.inventory(node.marks(record))
    node.claim(state_dir)
    record["bridge_created"] = True
    _save(state_dir, state)
    try:
        node.create_bridge(n.bridge, n.pod_cidr)
        node.create_cgroup_root(n.cgroup_root)
    except node.NodeError as e:
        raise StackError(f"real node: {e}") from e
    containerd = launch_component(launch, comp.containerd(n))
    wait_until("containerd", containerd,
               lambda: node.ctr(n.containerd_socket, "version", check=False, timeout=5).returncode == 0, 60,
               "its socket")  # fmt: skip
    mark("containerd")
    ensure_node_images(record)
    mark("node images")


def ensure_node_images(record: dict[str, Any]) -> None:
    """The node's own images (pause, probe), imported when containerd does not hold them."""
    socket_path = Path(record["dir"]) / "containerd.sock"
    have = node.image_refs(socket_path)
    images = CACHE / "node" / "images"
    for name, ref in (("pause", record["pause_image"]), ("probe", record["probe_image"])):
        if ref not in have:
            archive = images / f"{name}-{ref.rsplit(':', 1)[1]}.oci.tar"
            node.write_program_image(archive, ref, program(name), name)
            node.import_image(socket_path, archive)


def start_node_agents(state_dir: Path, n: comp.NodeLayout, launch: Callable[..., Proc]) -> None:
    """CoreDNS, kube-proxy and the kubelet: once the API server answers."""
    kubectl(state_dir, "apply", "--server-side", "--field-manager=instructune-localstack", "-f", "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": comp.node_rbac()}))  # fmt: skip
    for c in (comp.coredns(n, program("coredns")), comp.kube_proxy(n, program("kube-proxy")),
              comp.kubelet(n, program("kubelet"))):  # fmt: skip
        launch_component(launch, c)


def procs_by_name(state: dict[str, Any]) -> dict[str, Proc]:
    return {p.name: p for p in _procs(state)}


def wait_node_ready(
    state_dir: Path, n: comp.NodeLayout, procs: dict[str, Proc], mark: Callable[[str], None]
) -> None:
    wait_until(
        "coredns", procs["coredns"], http_ok(f"http://{HOST}:{n.ports['coredns_ready']}/ready"), 60, "/ready"
    )
    mark("coredns")
    wait_until("kube-proxy", procs["kube-proxy"], http_ok(f"http://{HOST}:{n.ports['kube_proxy_healthz']}/healthz"),
               90, "/healthz")  # fmt: skip
    mark("kube-proxy")
    wait_until("kubelet", procs["kubelet"], http_ok(f"http://{HOST}:{n.ports['kubelet_healthz']}/healthz"), 90,
               "/healthz")  # fmt: skip
    wait_until(
        "kubelet", procs["kubelet"],
        lambda: kubectl(state_dir, "wait", "--for=condition=Ready", "--timeout=5s", f"node/{n.name}",
                        check=False).returncode == 0,
        120, f"node {n.name} Ready",
    )  # fmt: skip
    mark("node Ready")


def _paths(state_dir: Path, kubeconfig: Path, pki: Path, crds: Path) -> dict[str, str]:
    """Where a stack's files are (stack.json's "paths"), the full and the API-only stack alike."""
    return {
        "kubeconfig": str(kubeconfig),
        "env": str(state_dir / "env"),
        "logs": str(state_dir / "logs"),
        "audit_log": str(state_dir / "logs" / "audit.log"),
        "pki": str(pki),
        "crds": str(crds),
    }


def _wait_etcd(etcd: Proc, ports: dict[str, int], mark: Callable[[str], None]) -> None:
    wait_until(
        "etcd",
        etcd,
        http_ok(f"http://{HOST}:{ports['etcd']}/health", expect=b'"health":"true"'),
        60,
        "/health",
    )
    mark("etcd")


def _start_apiserver(
    state_dir: Path,
    layout: comp.StackLayout,
    api: str,
    launch: Callable[..., Proc],
    mark: Callable[[str], None],
) -> Proc:
    """Starts kube-apiserver (etcd answers by then) and waits until it is ready."""
    apiserver = launch_component(launch, comp.kube_apiserver(layout, program("kube-apiserver")))
    wait_until("kube-apiserver", apiserver, http_ok(f"{api}/readyz", admin_ctx(state_dir)), 120, "/readyz")
    mark("kube-apiserver")
    return apiserver


def _up(
    state_dir: Path,
    state: dict[str, Any],
    launch: Callable[..., Proc],
    mark: Callable[[str], None],
    ray_bin: Path,
    crds: Path,
) -> None:
    pki = state_dir / "pki"
    names = [
        "etcd", "etcd_peer", "apiserver", "controller_manager", "scheduler", "kwok", "kuberay_metrics",
        "kuberay_probe", "minio", "minio_console", "ray_gcs", "ray_dashboard", "ray_client", "ray_agent",
        "ray_node_manager", "ray_object_manager", "ray_metrics", "ray_runtime_env_agent", "ray_dashboard_agent_grpc",
        "kubelet", "kubelet_healthz", "kube_proxy_healthz", "kube_proxy_metrics", "coredns_health", "coredns_ready",
        "containerd_stream",
    ]  # fmt: skip
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    state["ports"] = ports
    ray_tmp = ray_temp_dir(state_dir)
    record = state.get("node")
    # With a real node, the API server and MinIO listen on its bridge's address (the host reaches it
    # too): the only address of this machine that pods can reach.
    service_host = str(record["gateway"]) if record else HOST
    api = f"https://{service_host}:{ports['apiserver']}"
    s3 = f"http://{service_host}:{ports['minio']}"
    access, secret = "instructune-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    kubeconfig = state_dir / "kubeconfig"
    # The only copy of the credentials on disk is <dir>/env (mode 0600); stack.json holds none.
    env = {
        "INSTRUCTUNE_STACK_DIR": str(state_dir),
        "KUBECONFIG": str(kubeconfig),
        "AWS_ENDPOINT_URL": s3,
        "INSTRUCTUNE_S3_ENDPOINT": s3,
        "AWS_ACCESS_KEY_ID": access,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": REGION,
        "RAY_ADDRESS": f"http://{HOST}:{ports['ray_dashboard']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "INSTRUCTUNE_RAY_GCS_ADDRESS": f"{HOST}:{ports['ray_gcs']}",
    }
    state["paths"] = {**_paths(state_dir, kubeconfig, pki, crds), "ray_temp_dir": str(ray_tmp)}
    state["endpoints"] = {
        "apiserver": api,
        "s3": s3,
        "minio_console": f"http://{HOST}:{ports['minio_console']}",
        "ray_dashboard": f"http://{HOST}:{ports['ray_dashboard']}",
        "ray_gcs": f"{HOST}:{ports['ray_gcs']}",
    }
    state["versions"] = versions()

    # Processes that do not need the API server start first, so their start-up overlaps with it.
    stack_layout = comp.StackLayout(state_dir, ports, SERVICE_CIDR, service_host)
    ray_tmp.mkdir(parents=True, exist_ok=True)
    ray = launch_component(
        launch,
        comp.ray_head(
            stack_layout, ray_bin, ray_tmp, env, path=f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            pythonpath=os.pathsep.join(str(REPO / d) for d in ("jobs", "operator")), cache=CACHE,
        ),
    )  # fmt: skip

    make_pki(pki, extra_ips=[service_host] if service_host != HOST else [])
    write_kubeconfig(kubeconfig, api, pki, "admin")
    write_kubeconfig(pki / "controller-manager.kubeconfig", api, pki, "controller-manager")
    write_kubeconfig(pki / "scheduler.kubeconfig", api, pki, "scheduler")
    bindir = state_dir / "bin"
    bindir.mkdir(exist_ok=True)
    vs = versions()
    for tool, target in {
        "kubectl": program("kubectl"),
        "helm": CACHE / "bin" / f"helm-{vs['HELM_VERSION']}",
    }.items():
        if target.exists():
            (bindir / tool).unlink(missing_ok=True)
            (bindir / tool).symlink_to(target)
    (bindir / "ray").unlink(missing_ok=True)
    (bindir / "ray").symlink_to(ray_bin)
    mark("pki")

    layout = None
    if record:
        layout = node_layout(record, pki, api, ports)
        make_node_pki(pki, api, layout)
        start_node_runtime(state_dir, state, record, layout, launch, mark)
    # After the node's bridge exists: MinIO may listen on its address.
    (state_dir / "minio" / "data").mkdir(parents=True)
    minio = launch_component(launch, comp.minio(stack_layout, program("minio"), access, secret))

    etcd = launch_component(launch, comp.etcd(stack_layout, program("etcd")))
    _wait_etcd(etcd, ports, mark)

    _start_apiserver(state_dir, stack_layout, api, launch, mark)
    # Nodes first, while the API server is idle (the CRDs below keep it busy for seconds).
    kubectl(state_dir, "create", "-f", "-", input=json.dumps(node_manifests()))
    if record and layout:
        state["node_agents_started"] = time.time()
        start_node_agents(state_dir, layout, launch)

    kcm = launch_component(
        launch, comp.kube_controller_manager(stack_layout, program("kube-controller-manager"))
    )
    scheduler = launch_component(launch, comp.kube_scheduler(stack_layout, program("kube-scheduler")))
    kwok = launch_component(launch, comp.kwok(stack_layout, program("kwok")))

    crd_files = sorted(crds.glob("*.yaml"))
    kubectl(state_dir, "apply", "--server-side", "--field-manager=instructune-localstack",
            *(x for f in crd_files for x in ("-f", str(f))))  # fmt: skip
    wait_until(
        "kuberay CRDs", None,
        lambda: kubectl(state_dir, "wait", "--for=condition=Established", "--timeout=5s",
                        *(f"crd/{f.name.split('_', 1)[1].removesuffix('.yaml')}.ray.io" for f in crd_files),
                        check=False).returncode == 0,
        60, "CRDs Established",
    )  # fmt: skip
    mark("kuberay CRDs")
    kuberay = launch_component(launch, comp.kuberay_operator(stack_layout, program("kuberay-operator")))

    wait_until("kube-scheduler", scheduler, http_ok(f"https://{HOST}:{ports['scheduler']}/healthz", insecure_ctx()),
               90, "/healthz")  # fmt: skip
    mark("kube-scheduler")
    wait_until("kube-controller-manager", kcm,
               http_ok(f"https://{HOST}:{ports['controller_manager']}/healthz", insecure_ctx()), 90, "/healthz")  # fmt: skip
    mark("kube-controller-manager")
    # The token and root-CA publisher controllers run: pods can be admitted in the default namespace.
    wait_until(
        "kube-controller-manager", kcm,
        lambda: kubectl(state_dir, "get", "serviceaccount/default", "configmap/kube-root-ca.crt",
                        check=False).returncode == 0,
        90, "the default ServiceAccount and kube-root-ca.crt",
    )  # fmt: skip
    mark("serviceaccounts")
    wait_until("kwok", kwok, http_ok(f"http://{HOST}:{ports['kwok']}/healthz"), 60, "/healthz")
    wait_until(
        "kwok", kwok,
        lambda: kubectl(state_dir, "wait", "--for=condition=Ready", "--timeout=5s", "node", "-l", "type=kwok",
                        check=False).returncode == 0,
        90, "every fake node Ready",
    )  # fmt: skip
    mark("kwok nodes")
    wait_until(
        "kuberay-operator", kuberay, http_ok(f"http://{HOST}:{ports['kuberay_probe']}/readyz"), 90, "/readyz"
    )
    mark("kuberay-operator")

    wait_until("minio", minio, http_ok(f"{s3}/minio/health/ready"), 60, "/minio/health/ready")
    for bucket in BUCKETS:
        status = s3_request(s3, access, secret, "PUT", f"/{bucket}")
        if status not in (200, 409):
            raise failure("minio", f"creating bucket {bucket!r} answered HTTP {status}", minio.log)
    mark("minio")
    wait_until(
        "ray",
        ray,
        http_ok(f"http://{HOST}:{ports['ray_dashboard']}/api/version", headers=ray_auth(env)),
        180,
        "/api/version",
    )
    mark("ray")
    if record and layout:
        wait_node_ready(state_dir, layout, procs_by_name(state), mark)
        # The node's own bring-up (kubelet, kube-proxy and CoreDNS started -> node Ready), which the
        # marks above hide: they overlap with the rest of the stack.
        ready = json.loads(kubectl(state_dir, "get", f"node/{layout.name}", "-o", "json").stdout)
        since = {c["type"]: c["lastTransitionTime"] for c in ready["status"]["conditions"]}["Ready"]
        ready_at = dt.datetime.fromisoformat(since.replace("Z", "+00:00")).timestamp()
        state["timings"]["node: agents started -> Ready"] = round(
            ready_at - state.pop("node_agents_started"), 1
        )

    _write_env(state_dir, env)


# The API-only stack (`up(dir, api_only=True)`): its programs, and the CRDs of what the operator writes.
API_ONLY_PROGRAMS = ("etcd", "kube-apiserver", "kubectl")
API_ONLY_KUBERAY_CRDS = ("ray.io_rayclusters.yaml",)


def _up_api_only(
    state_dir: Path,
    state: dict[str, Any],
    launch: Callable[..., Proc],
    mark: Callable[[str], None],
    crds: Path,
) -> None:
    pki = state_dir / "pki"
    ports = dict(zip(("etcd", "etcd_peer", "apiserver"), free_ports(3), strict=True))
    state["ports"] = ports
    api = f"https://{HOST}:{ports['apiserver']}"
    kubeconfig = state_dir / "kubeconfig"
    env = {"INSTRUCTUNE_STACK_DIR": str(state_dir), "KUBECONFIG": str(kubeconfig)}
    crd_files = [crds / name for name in API_ONLY_KUBERAY_CRDS] + sorted((REPO / "crds").glob("*.yaml"))
    state["paths"] = _paths(state_dir, kubeconfig, pki, crds)
    state["endpoints"] = {"apiserver": api}
    state["versions"] = versions()
    layout = comp.StackLayout(state_dir, ports, SERVICE_CIDR)
    # etcd needs no certificates: it starts while they are made.
    etcd = launch_component(launch, comp.etcd(layout, program("etcd")))
    make_pki(pki)
    write_kubeconfig(kubeconfig, api, pki, "admin")
    bindir = state_dir / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "kubectl").unlink(missing_ok=True)
    (bindir / "kubectl").symlink_to(program("kubectl"))
    mark("pki")
    _wait_etcd(etcd, ports, mark)
    apiserver = _start_apiserver(state_dir, layout, api, launch, mark)
    # Straight to the API server (server-side apply takes YAML): two kubectl runs cost seconds more.
    ctx = admin_ctx(state_dir)
    crd_api = f"{api}/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    for f in crd_files:
        req = urllib.request.Request(
            f"{crd_api}/{_crd_name(f)}?fieldManager=instructune-localstack&force=true",
            data=f.read_bytes(), method="PATCH", headers={"Content-Type": "application/apply-patch+yaml"},
        )  # fmt: skip
        try:
            urllib.request.urlopen(req, context=ctx, timeout=60).close()
        except urllib.error.HTTPError as e:
            raise failure(
                "kube-apiserver", f"applying {f.name}: HTTP {e.code} {e.read()[:500]!r}", apiserver.log
            ) from e

    def established() -> bool:
        for f in crd_files:
            code, body = http_get(f"{crd_api}/{_crd_name(f)}", ctx)
            conditions = (
                ((json.loads(body).get("status") or {}).get("conditions") or []) if code == 200 else []
            )
            if not any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return False
        return True

    wait_until("kube-apiserver", apiserver, established, 60, "the CRDs Established")
    mark("CRDs")
    _write_env(state_dir, env)


def _crd_name(path: Path) -> str:
    """A CRD's name from its file: kubebuilder's `<group>_<plural>.yaml` or `<plural>.<group>.yaml`."""
    stem = path.name.removesuffix(".yaml")
    group, sep, plural = stem.partition("_")
    return f"{plural}.{group}" if sep else stem


def down(state_dir: Path) -> None:
    """Stops every process recorded in `state_dir` (and its descendants); keeps logs and data."""
    state_dir = Path(state_dir).resolve()
    if not state_dir.is_dir():
        log(f"no stack recorded in {state_dir}")
        return
    with _locked(state_dir):
        state = _load(state_dir)
        if state is None:
            log(f"no stack recorded in {state_dir}")
            return
        procs = _procs(state)
        left = stop_stack(state_dir, state, procs)
        shutil.rmtree(ray_temp_dir(state_dir), ignore_errors=True)
        if left:
            raise StackError(f"still running after SIGKILL: {', '.join(f'{p.name}[{p.pid}]' for p in left)}")
        state["complete"] = False
        state["stopped"] = True
        _save(state_dir, state)
        log(f"stopped the {len(procs)} processes of {state_dir}")


def status(state_dir: Path) -> dict[str, Any]:
    """Per component: pid, whether it runs, and (when the stack is complete) whether it is healthy."""
    state_dir = Path(state_dir).resolve()
    state = _load(state_dir)
    if state is None:
        return {"dir": str(state_dir), "running": False, "components": {}}
    bad = healthy(state_dir, state) if state.get("complete") and "ports" in state else []
    comps = {
        p.name: {"pid": p.pid, "alive": alive(p), "healthy": alive(p) and p.name not in bad, "log": p.log}
        for p in _procs(state)
    }
    return {
        "dir": str(state_dir),
        "running": bool(comps) and all(c["alive"] for c in comps.values()),
        "complete": bool(state.get("complete")),
        "components": comps,
        "endpoints": state.get("endpoints", {}),
    }


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serializes up/down on one state dir (a second `up` waits, then reuses the first one's stack)."""
    with (state_dir / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def running(state_dir: Path) -> Iterator[dict[str, Any]]:
    """`with running(dir) as info:` brings the stack up and always takes it down (unless it was reused)."""
    info = up(state_dir)
    try:
        yield info
    finally:
        if not info["reused"]:
            down(state_dir)


def import_product_images(state_dir: Path, names: Sequence[str] = ("operator", "job")) -> list[str]:
    return [ref for ref, _ in import_product_archives(state_dir, names)]


def import_product_archives(
    state_dir: Path, names: Sequence[str] = ("operator", "job")
) -> list[tuple[str, Path]]:
    """Builds the product's images (hack/build-images.sh: cached, rebuilt only when their inputs
    change) and imports them into the running stack's real node; returns their references."""
    state = _load(state_dir)
    record = (state or {}).get("node")
    if not record:
        raise StackError(f"no stack with a real node runs in {state_dir}: `make stack-up` first")
    built = subprocess.run(
        ["bash", str(HACK / "build-images.sh"), *names], stdout=subprocess.PIPE, text=True, check=False
    )
    if built.returncode != 0:
        raise StackError("hack/build-images.sh failed (its log is above)")
    ensure_node_images(record)
    refs = []
    for line in built.stdout.splitlines():
        ref, archive = line.split()[:2]
        started = time.monotonic()
        imported = node.import_archive(Path(record["dir"]) / "containerd.sock", ref, Path(archive))
        log(f"{ref}: {'imported in %.0fs' % (time.monotonic() - started) if imported else 'already there'}")
        refs.append((ref, Path(archive)))
    return refs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "images"])
    parser.add_argument(
        "--api-only", action="store_true", help="up: etcd and kube-apiserver only, with the CRDs applied"
    )
    parser.add_argument(
        "--dir", type=Path, default=Path(os.environ.get("INSTRUCTUNE_STACK_DIR", DEFAULT_DIR))
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so an interrupted `up` stops what it had started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.command == "up":
            info = up(args.dir, api_only=args.api_only)
            print(
                json.dumps({k: info[k] for k in ("dir", "endpoints", "paths", "timings", "reused")}, indent=2)
            )
            print(f"# . {info['paths']['env']}")
        elif args.command == "down":
            down(args.dir)
        elif args.command == "images":
            for ref in import_product_images(args.dir):
                print(ref)
        else:
            st = status(args.dir)
            print(json.dumps(st, indent=2))
            return 0 if st["running"] else 3
    except StackError as e:
        print(f"localstack: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
