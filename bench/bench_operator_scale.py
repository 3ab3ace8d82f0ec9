"""The operator at scale on the local stack: apply -> RayCluster latency, memory, API requests per tune.

Brings up its own local stack (hack/localstack.py) in a temporary directory, installs the CRD,
starts the operator (`python -m instructune_operator`, as hack/demo.py does) with a bench settings
file whose only pool selects no node (nodeSelector instructune.io/pool=bench-none): every tune takes
the real path (validate, server-side apply of ServiceAccount, Role, RoleBinding, ConfigMap and
RayCluster, KubeRay creates the pods), the Ray pods stay Pending, the RayCluster never becomes ready
and no Ray job is ever submitted. Then it creates N tunes at a steady rate with the kubernetes client
while watches on RayClusters and tunes record when each RayCluster is ADDED and when each tune's
status first shows observedGeneration == generation.

Reports (one JSON object on stdout; progress on stderr):
  latency       apply (create returned) -> RayCluster ADDED on the watch: p50/p90/p99/max
  settled       apply -> status.observedGeneration, and first create -> last tune settled
  memory        operator RSS after start-up, peak (VmHWM) and at the end
  api_requests  kube-apiserver /metrics apiserver_request_total deltas per tune, by resource and verb,
                from just before the first create until every tune settled and KubeRay created every
                pod (the bench's own creates and watches subtracted), then a steady-state window
                (the operator's timer passes) per tune per minute
  machine       nproc, load average before/after, pinned stack versions

Run:  python bench/bench_operator_scale.py [--tunes 500] [--rate 10]     (--tunes 50: quick smoke)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

ROOT = Path(__file__).resolve().parents[1]
# This clone's operator, whatever clone the shared venv's editable install points at.
SOURCES = [str(ROOT / "operator"), str(ROOT / "jobs")]
sys.path[:0] = [str(ROOT / "hack"), *SOURCES]

import localstack  # noqa: E402
from operator_release import process_env  # noqa: E402

GROUP, VERSION, PLURAL = "instructune.io", "v1alpha1", "instructiontunes"
POOL, NO_NODE = "bench", {"instructune.io/pool": "bench-none"}
WATCH_TIMEOUT_S = 3600  # one watch connection per resource for the whole run
METRIC = re.compile(r"^apiserver_request_total\{([^}]*)\} (\S+)$", re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')
# Signatures of the operator's own requests: nothing else touches tunes, applies server-side,
# GETs RayClusters (KubeRay reads its informer cache) or LISTs pods (everyone else watches them).
# Core Events are shared with KubeRay, so the operator's are counted from the Event objects.


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    s = sorted(values)

    def rank(p: float) -> float:  # nearest rank
        return round(s[max(0, math.ceil(p / 100 * len(s)) - 1)], 3)

    return {
        "n": len(s),
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": round(s[-1], 3),
        "mean": round(sum(s) / len(s), 3),
    }


# ---------------------------------------------------------------------------------------------------
# The operator process: RSS and CPU from /proc


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in kB."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def proc_cpu_s(pid: int) -> float:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.peak_kb = max(self.peak_kb, proc_status(self.pid).get("VmRSS", 0))


def mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


# ---------------------------------------------------------------------------------------------------
# Watches


class Watcher(threading.Thread):
    """One long watch (a namespaced list function called with watch=True); calls on_event(type, obj, t)."""

    def __init__(
        self, name: str, list_fn: Callable[..., Any], on_event: Callable[[str, dict[str, Any], float], None]
    ) -> None:
        super().__init__(daemon=True, name=f"watch-{name}")
        self.plural, self.list_fn, self.on_event = name, list_fn, on_event
        self.stop = threading.Event()
        self.connected = threading.Event()
        self.closed_at: list[float] = []  # monotonic times at which one of our WATCH requests ended
        self.errors: list[str] = []
        self.resp: Any = None

    def close(self) -> None:
        """Ends the watch now (its connection too: the API server need not wait for it at shutdown)."""
        self.stop.set()
        with contextlib.suppress(Exception):
            self.resp.shutdown()

    def run(self) -> None:
        rv: str | None = None
        while not self.stop.is_set():
            try:
                resp = self.list_fn(
                    watch=True, allow_watch_bookmarks=True, timeout_seconds=WATCH_TIMEOUT_S,
                    resource_version=rv, _preload_content=False,
                )  # fmt: skip
                self.resp = resp
                self.connected.set()
                try:
                    for line in iter_resp_lines(resp):
                        now = time.monotonic()
                        event = json.loads(line)
                        obj = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            rv = None if obj.get("code") == 410 else rv
                            break
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if event.get("type") != "BOOKMARK":
                            self.on_event(event["type"], obj, now)
                finally:
                    resp.release_conn()
                    self.closed_at.append(time.monotonic())
            except Exception as err:
                if self.stop.is_set():
                    return
                self.errors.append(repr(err)[:200])
                time.sleep(0.5)


# ---------------------------------------------------------------------------------------------------
# API server metrics


def scrape(api: str, ctx: ssl.SSLContext) -> Counter[tuple[str, str, str, str, str]]:
    """apiserver_request_total as {(group, resource, subresource, verb, code): count}."""
    with urllib.request.urlopen(urllib.request.Request(f"{api}/metrics"), context=ctx, timeout=30) as r:
        text = r.read().decode()
    out: Counter[tuple[str, str, str, str, str]] = Counter()
    for labels, value in METRIC.findall(text):
        lab = dict(LABEL.findall(labels))
        key = (
            lab.get("group", ""),
            lab.get("resource", ""),
            lab.get("subresource", ""),
            lab["verb"],
            lab["code"],
        )
        out[key] += int(float(value))
    return out


def take_watches(
    delta: Counter[tuple[str, str, str, str, str]], plural: str, count: int
) -> Counter[tuple[str, str, str, str, str]]:
    """Up to `count` WATCH requests on `plural` out of `delta` (the bench's own, to subtract)."""
    taken: Counter[tuple[str, str, str, str, str]] = Counter()
    for key, n in delta.items():
        if count > 0 and key[1] == plural and key[3] == "WATCH" and n > 0:
            taken[key] = min(n, count)
            count -= taken[key]
    return taken


def resource_name(group: str, resource: str, subresource: str) -> str:
    name = resource + (f"/{subresource}" if subresource else "")
    return (
        f"{name}.{group}" if group and group not in (GROUP, "ray.io", "rbac.authorization.k8s.io") else name
    )


def is_operator(group: str, resource: str, verb: str) -> bool:
    return (
        group == GROUP
        or verb == "APPLY"
        or (resource == "rayclusters" and verb == "GET")
        or (group == "" and resource == "pods" and verb == "LIST")
    )


def breakdown(delta: Counter[tuple[str, str, str, str, str]], divide: float) -> dict[str, Any]:
    """Per resource -> verb -> count / divide (resource requests only; /healthz, /metrics... left out)."""
    by: dict[str, Counter[str]] = {}
    operator: dict[str, Counter[str]] = {}
    non_2xx: Counter[str] = Counter()
    total = op_total = 0
    for (group, resource, sub, verb, code), n in delta.items():
        if n <= 0 or not resource:
            continue
        name = resource_name(group, resource, sub)
        by.setdefault(name, Counter())[verb] += n
        total += n
        if is_operator(group, resource, verb):
            operator.setdefault(name, Counter())[verb] += n
            op_total += n
        if not code.startswith("2"):
            non_2xx[f"{name} {verb} {code}"] += n

    def per(d: dict[str, Counter[str]]) -> dict[str, dict[str, float]]:
        rows = sorted(d.items(), key=lambda kv: -sum(kv[1].values()))
        return {k: {v: round(c / divide, 3) for v, c in sorted(vs.items())} for k, vs in rows}

    return {
        "total": round(total / divide, 2),
        "by_resource": per(by),
        "operator_signature_total": round(op_total / divide, 2),
        "operator_signature_by_resource": per(operator),
        "non_2xx": {k: round(v / divide, 3) for k, v in non_2xx.most_common()},
    }


# ---------------------------------------------------------------------------------------------------
# Setup


def bench_settings(path: Path, workers: int, interval: float | None) -> dict[str, Any]:
    local = yaml.safe_load((ROOT / "hack" / "local-settings.yaml").read_text())
    settings: dict[str, Any] = {
        "pools": {
            POOL: {
                "nodeSelector": NO_NODE,
                "gpusPerNode": 0,
                "cpusPerNode": 16,
                "maxWorkers": max(workers, 1),
            }
        },
        "rayImage": local["rayImage"],
    }
    if interval is not None:
        settings["reconcileIntervalSeconds"] = interval
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return settings


def tune_body(template: dict[str, Any], name: str, workers: int) -> dict[str, Any]:
    body = copy.deepcopy(template)
    body["metadata"] = {"name": name, "labels": {"bench": "operator-scale"}}
    body["spec"]["resources"].update(gpuPool=POOL, workers=workers)
    body["spec"]["checkpointing"]["uri"] = f"s3://artifacts/bench/{name}/"
    return body


def wait_operator_watching(
    api: str, ctx: ssl.SSLContext, proc: subprocess.Popen[bytes], timeout: float
) -> None:
    """Until the operator holds a WATCH on instructiontunes (apiserver_longrunning_requests)."""
    pattern = re.compile(
        r'^apiserver_longrunning_requests\{[^}]*resource="instructiontunes"[^}]*verb="WATCH"[^}]*\} (\S+)$',
        re.M,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the operator exited with {proc.returncode} at start")
        with urllib.request.urlopen(urllib.request.Request(f"{api}/metrics"), context=ctx, timeout=30) as r:
            text = r.read().decode()
        if sum(float(v) for v in pattern.findall(text)) >= 1:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the operator did not watch instructiontunes within {timeout:.0f}s")


def log_counts(path: Path) -> dict[str, int]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return {
        "lines": text.count("\n"),
        "warnings": len(re.findall(r"\bWARNING\b", text)),
        "errors": len(re.findall(r"\bERROR\b", text)),
        "tracebacks": text.count("Traceback (most recent call last)"),
    }


def machine() -> dict[str, Any]:
    cpu = platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    mem_kb = 0
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as f:
        mem_kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
    pkgs = {}
    for pkg in ("kopf", "kubernetes", "httpx", "pydantic"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            pkgs[pkg] = importlib.metadata.version(pkg)
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "packages": pkgs,
        "stack_versions": localstack.versions(),
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------------
# The run


def run(
    args: argparse.Namespace, state_dir: Path, result: dict[str, Any], cleanup: list[Callable[[], None]]
) -> None:
    n = args.tunes
    result["load_avg_before"] = loadavg()
    t = time.monotonic()
    log(f"starting the local stack in {state_dir} (load average {result['load_avg_before']}) ...")
    stack = localstack.up(state_dir)
    cleanup.append(lambda: localstack.down(state_dir))
    result["stack_up_s"] = round(time.monotonic() - t, 1)
    api_url = stack["endpoints"]["apiserver"]
    ctx = localstack.admin_ctx(state_dir)

    localstack.kubectl(state_dir, "apply", "--server-side", "-f", str(ROOT / "crds"))
    localstack.kubectl(state_dir, "wait", "--for=condition=Established", "--timeout=60s",
                       f"crd/{PLURAL}.{GROUP}")  # fmt: skip
    localstack.kubectl(state_dir, "create", "namespace", args.namespace)

    settings_path = state_dir / "bench-settings.yaml"
    settings = bench_settings(settings_path, args.workers, args.reconcile_interval)
    from instructune_operator.naming import ray_cluster_name
    from instructune_operator.settings import load_settings

    effective = load_settings(str(settings_path), {})
    result["setup"] = {
        "namespace": args.namespace,
        "workers_per_tune": args.workers,
        "pool": {POOL: settings["pools"][POOL]},
        "reconcile_interval_s": effective.reconcile_interval_seconds,
        "note": (
            "the bench pool selects no node (instructune.io/pool=bench-none): Ray pods stay Pending, "
            "RayClusters never become ready and no Ray job is submitted; the path up to RayCluster "
            "creation (validate, SSA of ServiceAccount/Role/RoleBinding/ConfigMap/RayCluster) is the real one"
        ),
    }

    op_log = state_dir / "logs" / "operator.log"
    op_env = {
        **process_env(state_dir),
        "INSTRUCTUNE_SETTINGS": str(settings_path),
        "INSTRUCTUNE_NAMESPACES": args.namespace,
        "PYTHONPATH": os.pathsep.join([*SOURCES, *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    operator_cmd = (
        shlex.split(args.operator_cmd)
        if args.operator_cmd
        else [sys.executable, "-m", "instructune_operator"]
    )
    result["setup"]["operator_cmd"] = operator_cmd
    with op_log.open("ab") as out:
        operator = subprocess.Popen(
            operator_cmd, env=op_env, stdout=out, stderr=out,
            start_new_session=True, cwd=state_dir,
        )  # fmt: skip

    def stop_operator() -> None:
        if operator.poll() is None:
            operator.terminate()
            try:
                operator.wait(timeout=20)
            except subprocess.TimeoutExpired:
                operator.kill()
                operator.wait()

    cleanup.append(stop_operator)
    wait_operator_watching(api_url, ctx, operator, 120)
    rss = RssSampler(operator.pid)
    rss.start()
    log(f"operator pid {operator.pid} watching; log {op_log}")

    kconf = client.Configuration()
    config.load_kube_config(config_file=stack["paths"]["kubeconfig"], client_configuration=kconf)
    kconf.connection_pool_maxsize = 32
    kapi = client.ApiClient(kconf)
    custom = client.CustomObjectsApi(kapi)

    lock = threading.Lock()
    created: dict[str, float] = {}
    sent: dict[str, float] = {}
    create_errors: list[str] = []
    rc_seen: dict[str, float] = {}
    settled: dict[str, float] = {}
    phases: dict[str, str] = {}
    job_ids: set[str] = set()
    pods_seen: dict[str, float] = {}
    cluster_of = {ray_cluster_name(f"bench-{i:04d}"): f"bench-{i:04d}" for i in range(n)}

    def on_cluster(kind: str, obj: dict[str, Any], now: float) -> None:
        tune = cluster_of.get(obj["metadata"]["name"])
        if tune and kind != "DELETED":
            with lock:
                rc_seen.setdefault(tune, now)

    def on_tune(kind: str, obj: dict[str, Any], now: float) -> None:
        meta, status = obj["metadata"], obj.get("status") or {}
        with lock:
            if status.get("phase"):
                phases[meta["name"]] = status["phase"]
            if status.get("jobId"):
                job_ids.add(meta["name"])
            if status.get("observedGeneration") == meta.get("generation"):
                settled.setdefault(meta["name"], now)

    def on_pod(kind: str, obj: dict[str, Any], now: float) -> None:
        if kind == "ADDED":
            with lock:
                pods_seen.setdefault(obj["metadata"]["name"], now)

    ns = args.namespace
    core = client.CoreV1Api(kapi)
    watchers = [
        Watcher("rayclusters", partial(custom.list_namespaced_custom_object, "ray.io", "v1", ns, "rayclusters"),
                on_cluster),
        Watcher(PLURAL, partial(custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL), on_tune),
        Watcher("pods", partial(core.list_namespaced_pod, ns), on_pod),
    ]  # fmt: skip
    for w in watchers:
        w.start()
        if not w.connected.wait(30):
            raise RuntimeError(f"could not watch {w.plural}")

        cleanup.append(w.close)

    # Background: what the stack does with the operator idle (leases, controllers, KubeRay).
    m_idle = scrape(api_url, ctx)
    t_idle = time.monotonic()
    time.sleep(args.idle_seconds)
    m0 = scrape(api_url, ctx)
    t0 = time.monotonic()
    idle = breakdown(m0 - m_idle, t0 - t_idle)
    rss_start = proc_status(operator.pid).get("VmRSS")
    cpu0 = proc_cpu_s(operator.pid)

    template = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())

    def create(name: str) -> None:
        body = tune_body(template, name, args.workers)
        sent[name] = time.monotonic()
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, args.namespace, PLURAL, body)
        except ApiException as err:
            create_errors.append(f"{name}: {err.status} {err.reason}")
            return
        created[name] = time.monotonic()

    log(f"creating {n} tunes at {args.rate}/s ...")
    expected_pods = n * (1 + args.workers)
    interrupted: str | None = None
    timed_out = False
    t_created: float | None = None
    t_settled: float | None = None
    try:
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="create") as pool:
            for i in range(n):
                delay = t0 + i / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(create, f"bench-{i:04d}")
        t_created = time.monotonic()
        log(f"created {len(created)} in {t_created - t0:.1f}s; waiting for RayClusters and status ...")
        deadline, last_log = time.monotonic() + args.timeout, 0.0
        while True:
            with lock:
                done_rc = sum(1 for k in created if k in rc_seen)
                done_st = sum(1 for k in created if k in settled)
                done_pods = len(pods_seen)
            now = time.monotonic()
            if done_rc >= len(created) and done_st >= len(created) and t_settled is None:
                t_settled = now
                log(f"every tune settled after {now - t0:.1f}s; waiting for KubeRay's pods ...")
            if t_settled is not None and (done_pods >= expected_pods or now - t_settled > args.kuberay_wait):
                break
            if operator.poll() is not None:
                raise RuntimeError(f"the operator exited with {operator.returncode}; see {op_log}")
            if now > deadline:
                timed_out = True
                break
            if now - last_log > 10:
                last_log = now
                log(f"  {done_rc}/{len(created)} RayClusters, {done_st} settled, {done_pods} pods, load {loadavg()}, "
                    f"operator RSS {mb(proc_status(operator.pid).get('VmRSS'))} MB")  # fmt: skip
            time.sleep(0.2)
    except (KeyboardInterrupt, SystemExit) as err:
        interrupted = "Ctrl-C" if isinstance(err, KeyboardInterrupt) else f"exit {err.code}"
        log(f"interrupted ({interrupted}): reporting what was measured so far (Ctrl-C again aborts)")
        result["interrupted"] = interrupted
    t1 = time.monotonic()
    m1 = scrape(api_url, ctx)
    cpu1 = proc_cpu_s(operator.pid)
    rss_settled = proc_status(operator.pid).get("VmRSS")

    # The bench's own requests inside [m0, m1]: its creates and any watch request of its that ended
    # in the window (apiserver_request_total counts a WATCH when it ends; open ones are not counted).
    creation_delta = m1 - m0
    own: Counter[tuple[str, str, str, str, str]] = Counter(
        {k: v for k, v in creation_delta.items() if (k[0], k[1], k[2], k[3]) == (GROUP, PLURAL, "", "POST")}
    )
    ended = {w.plural: sum(1 for x in w.closed_at if t0 <= x <= t1) for w in watchers}
    for plural, count in ended.items():
        own += take_watches(creation_delta - own, plural, count)
    creation_delta.subtract(own)

    if not interrupted:
        log(f"window closed after {t1 - t0:.1f}s; steady state for {args.steady_seconds:.0f}s ...")
        time.sleep(args.steady_seconds)
    m2 = scrape(api_url, ctx)
    t2 = time.monotonic()
    cpu2 = proc_cpu_s(operator.pid)
    status_end = proc_status(operator.pid)
    steady_delta = m2 - m1
    for w in watchers:  # a watch of ours that ended in the steady window (none expected)
        steady_delta.subtract(
            take_watches(steady_delta, w.plural, sum(1 for x in w.closed_at if t1 < x <= t2))
        )
    rss.stop.set()

    # The operator's Events (Kopf posts them with reportingComponent "kopf"); after the last scrape.
    events = client.CoreV1Api(kapi).list_namespaced_event(args.namespace).items
    kopf_events = sum(
        1 for e in events if (e.reporting_component or (e.source and e.source.component)) == "kopf"
    )
    pending_pods = len(
        client.CoreV1Api(kapi)
        .list_namespaced_pod(args.namespace, field_selector="status.phase=Pending")
        .items
    )

    lat_rc = [rc_seen[k] - created[k] for k in created if k in rc_seen]
    lat_st = [settled[k] - created[k] for k in created if k in settled]
    ok = len(created)
    creation = breakdown(creation_delta, ok or 1)
    steady_minutes = (t2 - t1) / 60
    steady = breakdown(steady_delta, (ok or 1) * steady_minutes)
    steady_total_per_s = breakdown(steady_delta, t2 - t1)["total"]
    result.update(
        {
            "tunes": n,
            "created": ok,
            "create_errors": create_errors[:10],
            "rate_target_per_s": args.rate,
            "rate_achieved_per_s": round((ok - 1) / (max(created.values()) - min(created.values())), 2)
            if ok > 1
            else None,
            "timed_out": timed_out,
            "latency_apply_to_raycluster_s": percentiles(lat_rc),
            "latency_apply_to_status_observed_s": percentiles(lat_st),
            "create_call_s": percentiles([created[k] - sent[k] for k in created]),
            "all_rayclusters_after_first_create_s": round(max(rc_seen.values()) - t0, 2) if rc_seen else None,
            "settled_after_first_create_s": round(max(settled.values()) - t0, 2) if settled else None,
            "kuberay_all_pods_after_first_create_s": round(max(pods_seen.values()) - t0, 2)
            if pods_seen
            else None,
            "creating_took_s": round(t_created - t0, 2) if t_created else None,
            "kuberay_pods_in_window": f"{len(pods_seen)}/{expected_pods}",
            "phases_at_end": dict(Counter(phases.values())),
            "tunes_with_job_submitted": len(job_ids),
            "pending_pods_at_end": pending_pods,
            "operator": {
                "rss_after_start_mb": mb(rss_start),
                "rss_when_settled_mb": mb(rss_settled),
                "rss_end_mb": mb(status_end.get("VmRSS")),
                "rss_peak_mb_vmhwm": mb(status_end.get("VmHWM")),
                "rss_peak_mb_sampled": mb(rss.peak_kb),
                "cpu_s_until_settled": round(cpu1 - cpu0, 1),
                "cpu_cores_steady": round((cpu2 - cpu1) / (t2 - t1), 2),
                "log": log_counts(op_log),
            },
            "api_requests_per_tune_until_settled": {
                "window_s": round(t1 - t0, 1),
                **creation,
                "operator_events_per_tune": round(kopf_events / (ok or 1), 2),
                "subtracted": {
                    "bench_creates": sum(v for k, v in own.items() if k[3] == "POST"),
                    "bench_watch_requests_ended_in_window": ended,
                    "how": (
                        "minus the bench's POSTs of instructiontunes and any of its three watches (rayclusters, "
                        "instructiontunes, pods) that ended inside the window (still-open watches are not counted "
                        "by apiserver_request_total); non-resource requests (/metrics, /healthz) left out"
                    ),
                },
                "note": (
                    "window: from just before the first create until every tune settled and KubeRay created "
                    "every pod (timer passes in it included); "
                    "all stack components (operator, KubeRay, scheduler, controller-manager, KWOK) together; "
                    "operator_signature_* is the operator's share (tunes, server-side applies, RayCluster "
                    "GETs, pod LISTs); its core Events are operator_events_per_tune"
                ),
            },
            "steady_state_requests_per_tune_per_min": None
            if interrupted
            else {
                "window_s": round(t2 - t1, 1),
                "all_components_per_s": steady_total_per_s,
                **steady,
            },
            "background_requests_per_s_before_tunes": {
                "window_s": round(t0 - t_idle, 1),
                "total": idle["total"],
                "by_resource": idle["by_resource"],
            },
            "watch_errors": [e for w in watchers for e in w.errors][:5],
        }
    )
    if args.dump:
        with args.dump.open("w") as f:
            f.write(json.dumps({"t0_monotonic": t0}) + "\n")
            for name in sorted(sent):
                times = {"sent": sent.get(name), "created": created.get(name), "raycluster": rc_seen.get(name),
                         "settled": settled.get(name)}  # fmt: skip
                f.write(
                    json.dumps({"name": name, **{k: v and round(v - t0, 4) for k, v in times.items()}}) + "\n"
                )
    p99 = result["latency_apply_to_raycluster_s"].get("p99")
    peak = result["operator"]["rss_peak_mb_vmhwm"]
    complete = not timed_out and not interrupted and len(rc_seen) == n
    result["goal"] = {  # None: the run did not get through all N tunes
        "p99_apply_to_raycluster_under_2s": (p99 is not None and p99 < 2.0) if complete else None,
        "operator_peak_rss_under_150mb": (peak is not None and peak < 150) if complete else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunes", type=int, default=500, help="tunes to create (50: quick smoke)")
    parser.add_argument("--rate", type=float, default=10.0, help="creates per second")
    parser.add_argument("--workers", type=int, default=1, help="Ray workers per tune (pods: 1 + workers)")
    parser.add_argument("--namespace", default="bench")
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds to wait for every tune after the last create"
    )
    parser.add_argument(
        "--steady-seconds",
        type=float,
        help="steady-state window after settling (default 60; 20 for <=50 tunes)",
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=10, help="background window before the first create"
    )
    parser.add_argument(
        "--reconcile-interval",
        type=float,
        help="operator settings reconcileIntervalSeconds (default: the operator's)",
    )
    parser.add_argument(
        "--kuberay-wait", type=float, default=300,
        help="after every tune settled, seconds to wait at most for KubeRay to create every pod",
    )  # fmt: skip
    parser.add_argument(
        "--operator-cmd",
        help="command that runs the operator, e.g. under a profiler (default: this python -m instructune_operator)",
    )
    parser.add_argument(
        "--dump", type=Path, help="write per-tune times (JSON lines, seconds after the first create)"
    )
    parser.add_argument("--dir", type=Path, help="state dir for the stack (default: a new temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the state dir (logs) after the run")
    args = parser.parse_args()  # fmt: skip
    if args.steady_seconds is None:
        args.steady_seconds = 20.0 if args.tunes <= 50 else 60.0

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds like Ctrl-C
    state_dir = (args.dir or Path(tempfile.mkdtemp(prefix="itune-bench-"))).resolve()
    result: dict[str, Any] = {"bench": "operator_scale", "machine": machine(), "command": " ".join(sys.argv)}
    cleanup: list[Callable[[], None]] = []
    rc = 0
    try:
        run(args, state_dir, result, cleanup)
    except KeyboardInterrupt:
        result["interrupted"] = "Ctrl-C"
        rc = 130
    except SystemExit as e:
        result["interrupted"] = f"exit {e.code}"
        rc = int(e.code) if isinstance(e.code, int) else 1
    except Exception as e:
        result["error"] = repr(e)[:2000]
        rc = 1
    finally:
        # Ctrl-C during cleanup must not leave the stack running: ignore it until down is done.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        if cleanup:
            log("stopping the operator and the stack ...")
        for step in reversed(cleanup):
            try:
                step()
            except Exception as e:
                log(f"cleanup: {e!r}")
        result["load_avg_after"] = loadavg()
        if args.keep or args.dir:
            result["state_dir"] = str(state_dir)
        else:
            shutil.rmtree(state_dir, ignore_errors=True)
        signal.signal(signal.SIGINT, old)
    print(json.dumps(result, indent=1))
    return rc or (130 if result.get("interrupted") else 0)


if __name__ == "__main__":
    sys.exit(main())
