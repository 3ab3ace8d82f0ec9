"""The local stack's real node on this machine: what it creates outside its processes, and its removal.

A kubelet with containerd, kube-proxy and CoreDNS run as processes of the stack (hack/localstack.py
starts them from the descriptions in hack/localstack_components.py). Beyond processes, the node
creates a bridge, veth pairs and network namespaces (CNI), mounts (containerd's rootfs and shm
mounts, the kubelet's volumes: all below the node's own directory), iptables chains (kube-proxy's
KUBE-*, CNI's portmap chains) and cgroups (below one cgroup root of its own). Each is recorded when
created, and :func:`teardown` removes exactly those, in order, even after a failed start.

One real node per machine: kube-proxy's chains are machine-wide, so a second stack on the same
machine runs without a node (its `up` says so) while another stack's node runs.
Standard library only.
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import localstack_components as comp

DEBIAN_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "conntrack")
CNI_BIN = Path("/usr/lib/cni")
OWNER_FILE = Path("/run/instructune/node-owner.json")
CNI_CACHE = Path("/var/lib/cni/results")
CONTAINER_LOG_LINKS = Path("/var/log/containers")
# Fixed paths the kubelet, CNI and containerd's shims use whatever their configuration says (the
# kubelet's device-plugin socket, CNI's result cache, container log links, shim sockets): removed
# at the end when they did not exist before the node, and hold nothing but empty dirs and sockets.
MACHINE_PATHS = ("/var/lib/kubelet", "/var/lib/cni", "/var/log/containers", "/run/containerd")
_BUILTIN_CHAIN = re.compile(r"^:(INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) ACCEPT$")


class NodeError(RuntimeError):
    """The real node cannot start here (the message says why and what to do)."""


def _run(*argv: str, check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise NodeError(f"{' '.join(argv)} failed (exit {res.returncode}): {res.stderr.strip()[-2000:]}")
    return res


# ---------------------------------------------------------------------------------------------------
# Preconditions


def unavailable_reason() -> str | None:
    """Why this machine cannot run the node at all (None: it can)."""
    if os.geteuid() != 0:
        return "the real node needs root (containerd, network namespaces, iptables, cgroups)"
    if not Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists():
        return "the kernel has no bridge netfilter (kube-proxy's Services need it on the pod bridge)"
    return None


def ensure_packages(log: Any) -> None:
    """containerd, runc, the CNI plugins, iptables and conntrack from Debian, installed when missing."""
    missing = [c for c in ("containerd", "ctr", "runc", "iptables-save", "conntrack") if not shutil.which(c)]
    if not (CNI_BIN / "bridge").exists():
        missing.append("cni plugins")
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise NodeError(f"missing {', '.join(missing)} and no apt-get: install {' '.join(DEBIAN_PACKAGES)}")
    log(f"installing {' '.join(DEBIAN_PACKAGES)} from Debian (missing: {', '.join(missing)}) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run("apt-get", "update", "-q", timeout=600, env=env)
    _run("apt-get", "install", "-y", "-q", "--no-install-recommends", *DEBIAN_PACKAGES, timeout=900, env=env)


def package_hosts() -> set[str]:
    """Hosts this machine installs packages from, read from its own configuration: pip's index (pip's
    configuration files and environment, pip's default index otherwise), Go's module proxy, apt's
    sources, and any HTTP proxy."""
    urls: list[str] = []
    for f in (
        "/etc/pip.conf",
        "~/.config/pip/pip.conf",
        "~/.pip/pip.conf",
        os.environ.get("PIP_CONFIG_FILE", ""),
    ):
        path = Path(f).expanduser() if f else None
        if path and path.is_file():
            cp = configparser.ConfigParser()
            with contextlib.suppress(configparser.Error):
                cp.read(path)
                for section in cp.sections():
                    for key in ("index-url", "extra-index-url"):
                        urls += cp.get(section, key, fallback="").split()
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "GOPROXY", "HTTPS_PROXY", "HTTP_PROXY",
                "https_proxy", "http_proxy"):  # fmt: skip
        urls += os.environ.get(key, "").replace(",", " ").replace("|", " ").split()
    with contextlib.suppress(ImportError):
        from pip._internal.models.index import PyPI

        urls += [PyPI.pypi_url, f"https://{PyPI.file_storage_domain}/"]
    if shutil.which("go"):
        res = _run("go", "env", "GOPROXY", "GOSUMDB", check=False)
        urls += res.stdout.replace(",", " ").replace("|", " ").split()
    for src in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        if src.suffix in (".list", ".sources", "") and src.is_file():
            with contextlib.suppress(OSError):
                urls += re.findall(r"https?://[^\s\]]+", src.read_text())
    hosts = set()
    for u in urls:
        host = urllib.parse.urlsplit(u if "://" in u else f"https://{u}").hostname
        if host and host not in ("direct", "off"):
            hosts.add(host)
    return hosts


def protected_addresses() -> dict[str, list[str]]:
    """Addresses the node's ranges must never cover: the name servers and every package host."""
    out: dict[str, list[str]] = {}
    with contextlib.suppress(OSError):
        servers = re.findall(r"^\s*nameserver\s+(\S+)", Path("/etc/resolv.conf").read_text(), re.M)
        out["name server of this machine"] = servers
    for host in sorted(package_hosts()):
        try:
            addrs = {ai[4][0] for ai in socket.getaddrinfo(host, 443, socket.AF_INET, socket.SOCK_STREAM)}
        except OSError:
            continue
        out[f"a package host ({host})"] = sorted(str(a) for a in addrs)
    return out


def host_routes() -> list[comp.Route]:
    return comp.parse_routes(_run("ip", "-4", "route", "show", "table", "all").stdout)


def plan_network(service_cidr: str) -> ipaddress.IPv4Network:
    """The pod range to use beside `service_cidr`; NodeError (listing the conflicts) when unsafe."""
    try:
        return comp.choose_pod_cidr(ipaddress.IPv4Network(service_cidr), host_routes(), protected_addresses())
    except ValueError as e:
        raise NodeError(
            f"refusing to start the real node: {e}. A route over an address this machine needs (its "
            "package hosts, its name servers) would cut it off; change SERVICE_CIDR or free a range."
        ) from e


# ---------------------------------------------------------------------------------------------------
# Ownership: one node per machine


def owner() -> str | None:
    try:
        return str(json.loads(OWNER_FILE.read_text())["dir"])
    except (OSError, ValueError, KeyError):
        return None


def claim(state_dir: Path) -> None:
    OWNER_FILE.parent.mkdir(parents=True, exist_ok=True)
    OWNER_FILE.write_text(json.dumps({"dir": str(state_dir)}) + "\n")


def release(state_dir: Path) -> None:
    if owner() == str(state_dir):
        OWNER_FILE.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# What the node creates: bridge, cgroups


def names_for(state_dir: Path) -> tuple[str, str]:
    """(bridge name, cgroup root) of the stack in `state_dir`: unique per stack dir, short enough."""
    h = hashlib.sha1(str(state_dir).encode()).hexdigest()[:8]
    return f"itn{h}", f"/instructune-{h}"


def create_bridge(name: str, pod_cidr: ipaddress.IPv4Network) -> None:
    """The pods' bridge, with the node's address. Pod -> Service -> pod traffic is routed by the host
    (a pod sends it to its gateway, kube-proxy rewrites the address), so the bridge, and only the
    bridge, forwards: the machine's ip_forward stays as it is. A chain of the node's own drops what
    would leave the bridge for any other interface."""
    gw = pod_cidr.network_address + 1
    _run("ip", "link", "add", name, "type", "bridge")
    _run("ip", "addr", "add", f"{gw}/{pod_cidr.prefixlen}", "dev", name)
    _run("ip", "link", "set", name, "up")
    Path(f"/proc/sys/net/ipv4/conf/{name}/forwarding").write_text("1\n")
    chain = guard_chain(name)
    _run("iptables", "-w", "-N", chain)
    _run("iptables", "-w", "-A", chain, "-i", name, "!", "-o", name, "-j", "DROP")
    _run("iptables", "-w", "-A", chain, "!", "-i", name, "-o", name, "-j", "DROP")
    _run("iptables", "-w", "-I", "FORWARD", "1", "-j", chain)


def guard_chain(bridge: str) -> str:
    return f"ITN-{bridge.removeprefix('itn')}"


def cgroup_mounts() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 controllers and the unified one)."""
    out = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            if right.split()[:1] in (["cgroup"], ["cgroup2"]):
                out.append(Path(left.split()[4]))
    return out


def create_cgroup_root(root: str) -> None:
    """The kubelet's cgroupRoot must exist in every hierarchy; cpuset children start empty in v1."""
    for mount in cgroup_mounts():
        d = mount / root.lstrip("/")
        d.mkdir(exist_ok=True)
        for f in ("cpuset.cpus", "cpuset.mems"):
            if (d / f).exists() and not (d / f).read_text().strip():
                (d / f).write_text((mount / f).read_text())


def cgroup_dirs(root: str) -> list[Path]:
    """Every cgroup below `root` in every hierarchy, deepest first."""
    out: list[Path] = []
    for mount in cgroup_mounts():
        top = mount / root.lstrip("/")
        if top.is_dir():
            out += [Path(dp) for dp, _, _ in os.walk(top)]
    return sorted(out, key=lambda p: len(p.parts), reverse=True)


# ---------------------------------------------------------------------------------------------------
# Images


def source_hash(src: Path) -> str:
    """The hash hack/build-stack.sh names the node's own programs by (sha256sum of their sources)."""
    files = sorted(
        "./" + str(p.relative_to(src))
        for p in src.rglob("*")
        if p.is_file() and (p.suffix == ".go" or p.name == "go.mod")
    )
    listing = "".join(f"{hashlib.sha256((src / f).read_bytes()).hexdigest()}  {f}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()[:12]


def ctr(
    socket_path: Path, *args: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return _run(
        "ctr", "--address", str(socket_path), "--namespace", "k8s.io", *args, check=check, timeout=timeout
    )


def image_refs(socket_path: Path) -> set[str]:
    return set(ctr(socket_path, "images", "ls", "-q").stdout.split())


def import_image(socket_path: Path, archive: Path) -> None:
    ctr(socket_path, "images", "import", "--no-unpack=false", str(archive), timeout=1800)


def archive_digest(archive: Path) -> str | None:
    """The manifest digest an OCI archive's index names first (None: not an OCI archive)."""
    with contextlib.suppress(OSError, KeyError, ValueError, tarfile.TarError), tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        if member is not None:
            return str(json.loads(member.read())["manifests"][0]["digest"])
    return None


def image_digest(socket_path: Path, ref: str) -> str | None:
    for line in ctr(socket_path, "images", "ls").stdout.splitlines()[1:]:
        words = line.split()
        if len(words) >= 3 and words[0] == ref:
            return words[2]
    return None


def remove_image(socket_path: Path, ref: str, manifest_digest: str) -> None:
    """Removes `ref` and the name the CRI gives the same image (its config digest), so that the
    garbage collector frees its layers (a replaced multi-GB image would otherwise stay on disk)."""
    names = [ref]
    with contextlib.suppress(NodeError, ValueError, KeyError):
        manifest = json.loads(ctr(socket_path, "content", "get", manifest_digest, timeout=60).stdout)
        names.append(manifest["config"]["digest"])
    have = image_refs(socket_path)
    ctr(socket_path, "images", "rm", "--sync", *[n for n in names if n in have], check=False, timeout=600)


def import_archive(socket_path: Path, ref: str, archive: Path) -> bool:
    """Imports `archive` unless containerd already holds `ref` at the archive's digest (the root
    outlives stacks: a multi-GB image is imported once). True when it imported."""
    digest, old = archive_digest(archive), image_digest(socket_path, ref)
    if digest is not None and old == digest:
        return False
    if old is not None:
        remove_image(socket_path, ref, old)
    import_image(socket_path, archive)
    if ref not in image_refs(socket_path):
        raise NodeError(f"importing {archive} did not give an image named {ref}")
    return True


def write_program_image(archive: Path, ref: str, program: Path, name: str) -> None:
    """An image of one static program at /<name> (its entrypoint), as an OCI archive."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_suffix(".tmp")
    tmp.write_bytes(comp.oci_archive(ref, {name: program.read_bytes()}, [f"/{name}"]))
    tmp.replace(archive)


# ---------------------------------------------------------------------------------------------------
# Inventory and removal


def _iptables_rules(family: int) -> list[tuple[str, str]]:
    """(table, line) of every chain and rule, packet counters left out (they are not what was created)."""
    tool = "iptables-save" if family == 4 else "ip6tables-save"
    if not shutil.which(tool):
        return []
    table, out = "", []
    for line in _run(tool, check=False).stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith((":", "-A ")):
            line = re.sub(r"\s+\[\d+:\d+\]$", "", line)
            # An empty built-in chain that accepts is what a table that does not exist does.
            if not _BUILTIN_CHAIN.match(line):
                out.append((table, line))
    return out


def iptables_state() -> dict[str, list[str]]:
    return {f"ipv{f}": sorted(f"{t} {line}" for t, line in _iptables_rules(f)) for f in (4, 6)}


def marks(record: dict[str, Any]) -> list[str]:
    """The paths that name the node's processes and mounts."""
    return [record["dir"], record["containerd_root"]]


def inventory(paths: Iterable[str]) -> dict[str, list[str]]:
    """What the node can leave behind on this machine: processes naming one of `marks` (the node's
    paths) in their command line, mounts below them, network namespaces, links, iptables rules."""
    marks = [m for m in paths if m]
    procs = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if any(m in cmd for m in marks):
                    procs.append(f"{entry.name} {cmd.strip()}")
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mp = line.split()[4]
            if any(mp.startswith(m) for m in marks) or mp.startswith("/run/netns/"):
                mounts.append(mp)
    netns = sorted(p.name for p in Path("/run/netns").glob("*")) if Path("/run/netns").is_dir() else []
    links = sorted(
        re.findall(r"^\d+:\s+([^:@]+)", _run("ip", "-o", "link", "show", check=False).stdout, re.M)
    )
    paths = [p for p in MACHINE_PATHS if Path(p).exists()]
    return {"processes": sorted(procs), "mounts": sorted(mounts), "netns": netns, "links": links, "paths": paths,
            **{f"iptables_{k}": v for k, v in iptables_state().items()}}  # fmt: skip


def leftovers(record: dict[str, Any]) -> list[str]:
    """What of the node is still on this machine, compared with what it had before the node started
    (empty: nothing). Other programs' creations in the meantime (a container build's bridge, say)
    are not the node's and are not listed."""
    now, before = inventory(marks(record)), record["baseline"]
    left = [f"process {p}" for p in now["processes"]]
    left += [f"mount {m}" for m in now["mounts"] if m not in before["mounts"]]
    left += [f"netns {n}" for n in now["netns"] if n not in before["netns"]]
    left += [f"link {link}" for link in now["links"] if link not in before["links"]
             and (link == record["bridge"] or link.startswith("veth"))]  # fmt: skip
    for family in ("iptables_ipv4", "iptables_ipv6"):
        left += [f"{family} {r}" for r in now[family] if r not in before[family]
                 and ours(r, record.get("cni_network", ""))]  # fmt: skip
    for path in now["paths"]:
        if path not in before["paths"]:
            for dirpath, _, files in os.walk(path):
                left += [f"file {dirpath}/{f}" for f in files
                         if stat.S_ISSOCK(os.lstat(os.path.join(dirpath, f)).st_mode)
                         or record.get("cni_network", "-") in f]  # fmt: skip
    left += [f"cgroup {d}" for d in cgroup_dirs(record["cgroup_root"])]
    if owner() == str(Path(record["dir"]).parent):
        left.append(f"the machine's node claim ({OWNER_FILE})")
    return left


def _kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _processes_naming(mark: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if mark.encode() in (entry / "cmdline").read_bytes():
                    out.append(int(entry.name))
    return out


def remove_containers(socket_path: Path, log: Any) -> None:
    """With containerd still running: kill every task of the node's containers and delete them (the
    containerd root outlives the node, its containers must not)."""
    res = ctr(socket_path, "tasks", "ls", "-q", check=False, timeout=30)
    for task in res.stdout.split():
        ctr(socket_path, "tasks", "kill", "--signal", "SIGKILL", task, check=False, timeout=30)
    deadline = time.monotonic() + 15
    while (
        time.monotonic() < deadline
        and ctr(socket_path, "tasks", "ls", "-q", check=False, timeout=30).stdout.strip()
    ):
        for task in ctr(socket_path, "tasks", "ls", "-q", check=False, timeout=30).stdout.split():
            ctr(socket_path, "tasks", "delete", "--force", task, check=False, timeout=30)
        time.sleep(0.3)
    containers = ctr(socket_path, "containers", "ls", "-q", check=False, timeout=30).stdout.split()
    if containers:
        ctr(socket_path, "containers", "delete", *containers, check=False, timeout=60)
        log(f"node: removed {len(containers)} containers")


def ours(line: str, cni_network: str) -> bool:
    """Whether an iptables line is the node's: kube-proxy's and the kubelet's KUBE-* chains (nothing
    else on a machine runs them: one node per machine), the node's ITN-* guard, and CNI rules that
    name the node's network (portmap's per-pod chains). Other CNI users (a container build's
    network, say) share CNI's chain names, so CNI-* alone never counts."""
    return bool(re.search(r"\b(KUBE|ITN)-", line)) or (bool(cni_network) and f'"{cni_network}"' in line)


def remove_iptables(baseline: dict[str, list[str]], kube_proxy: str | None, cni_network: str) -> None:
    """kube-proxy's own clean-up first, then every rule and chain that was not there before the node
    started and is the node's (:func:`ours`); nothing else is touched."""
    if kube_proxy and Path(kube_proxy).exists():
        _run(kube_proxy, "--cleanup", "--v=0", check=False, timeout=60)
    for family in (4, 6):
        tool = "iptables" if family == 4 else "ip6tables"
        if not shutil.which(tool):
            continue
        before = set(baseline.get(f"ipv{family}", []))
        rules = _iptables_rules(family)
        new_rules = [(t, line) for t, line in rules if line.startswith("-A ") and f"{t} {line}" not in before
                     and ours(line, cni_network)]  # fmt: skip
        # Chains: KUBE-*/ITN-* that are new, and the chains the node's CNI rules jump to.
        chains = {(t, line[1:].split()[0]) for t, line in rules if line.startswith(":")}
        created = {(t, c) for t, c in chains if re.match(r"(KUBE|ITN)-", c) and f"{t} :{c} -" not in before}
        for t, line in new_rules:
            jump = re.search(r"-j (CNI-DN-\S+)", line)
            if jump and (t, jump.group(1)) in chains:
                created.add((t, jump.group(1)))
        for table, line in new_rules:
            words = shlex.split(line)
            if (table, words[1]) not in created:  # rules in created chains go with their chain
                _run(tool, "-w", "-t", table, "-D", *words[1:], check=False)
        for table, chain in sorted(created):
            _run(tool, "-w", "-t", table, "-F", chain, check=False)
        for table, chain in sorted(created):
            _run(tool, "-w", "-t", table, "-X", chain, check=False)


def unmount_below(paths: Iterable[Path]) -> list[str]:
    """Unmounts every mount at or below `paths`, deepest first; returns what could not be unmounted."""
    roots = [str(p) for p in paths]
    left = []
    for _ in range(3):
        mps = []
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/mountinfo").read_text().splitlines():
                mp = line.split()[4].replace("\\040", " ")
                if any(mp == r or mp.startswith(r + "/") for r in roots):
                    mps.append(mp)
        if not mps:
            return []
        left = []
        for mp in sorted(set(mps), key=lambda m: m.count("/"), reverse=True):
            if (
                _run("umount", mp, check=False).returncode != 0
                and _run("umount", "-l", mp, check=False).returncode != 0
            ):
                left.append(mp)
    return left


def _remove_if_only_sockets(top: Path) -> bool:
    """Removes `top` when it holds nothing but directories and sockets; True when it is gone."""
    if not top.exists():
        return True
    for dirpath, _, files in os.walk(top):
        for f in files:
            if not stat.S_ISSOCK(os.lstat(os.path.join(dirpath, f)).st_mode):
                return False
    for dirpath, _, files in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
        for f in files:
            os.unlink(os.path.join(dirpath, f))
        os.rmdir(dirpath)
    return True


def teardown(record: dict[str, Any], state_dir: Path, log: Any) -> list[str]:
    """Removes what the node recorded in `record` (stack.json's "node"); its processes must be stopped
    already (containerd last). Returns what could not be removed (expected: nothing)."""
    problems: list[str] = []
    node_dir = Path(record["dir"])
    socket_mark = str(node_dir / "containerd.sock")
    # containerd's shims outlive containerd by design; they name the node's socket in their argv.
    _kill_pids(_processes_naming(socket_mark))
    # Whatever still runs in the node's cgroups is a container process of the node.
    for d in cgroup_dirs(record.get("cgroup_root", "")) if record.get("cgroup_root") else []:
        with contextlib.suppress(OSError):
            _kill_pids(int(p) for p in (d / "cgroup.procs").read_text().split())
    time.sleep(0.2)
    baseline = record.get("baseline")
    if baseline is not None:
        remove_iptables(
            {k.removeprefix("iptables_"): v for k, v in baseline.items()},
            record.get("kube_proxy"),
            record.get("cni_network", ""),
        )
    bridge = record.get("bridge")
    if bridge and record.get("bridge_created"):
        links = _run("ip", "-o", "link", "show", "master", bridge, check=False).stdout
        for veth in re.findall(r"^\d+:\s+([^:@]+)", links, re.M):
            _run("ip", "link", "delete", veth, check=False)
        if _run("ip", "link", "show", bridge, check=False).returncode == 0:
            _run("ip", "link", "delete", bridge, check=False)
    left = unmount_below([node_dir])
    problems += [f"mount {m}" for m in left]
    for d in cgroup_dirs(record["cgroup_root"]) if record.get("cgroup_root") else []:
        for _ in range(20):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        else:
            problems.append(f"cgroup {d}")
    with contextlib.suppress(OSError):
        for link in CONTAINER_LOG_LINKS.glob("*.log"):
            if link.is_symlink() and os.readlink(link).startswith(str(node_dir) + "/"):
                link.unlink()
    net = record.get("cni_network")
    if net and CNI_CACHE.is_dir():
        for f in CNI_CACHE.glob(f"{net}-*"):
            f.unlink(missing_ok=True)
    if baseline is not None and "paths" in baseline:
        for p in MACHINE_PATHS:
            if p not in baseline["paths"] and not _remove_if_only_sockets(Path(p)):
                log(f"node: left {p}: it holds files of another program now")
    release(state_dir)
    if problems:
        log(f"node: could not remove: {', '.join(problems)}")
    return problems
