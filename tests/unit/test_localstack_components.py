"""The local stack's real node, as pure descriptions: its address ranges stay off everything this
machine needs, and its configuration keeps its pods inside the stack."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import tarfile
import tomllib
from pathlib import Path

import localstack_components as comp  # hack/ is on sys.path through tests/conftest.py
import pytest

pytestmark = pytest.mark.unit

ROUTES = """\
default via 192.0.2.1 dev eth0
192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2
local 127.0.0.0/8 dev lo table local proto kernel scope host src 127.0.0.1
local 192.0.2.2 dev eth0 table local proto kernel scope host src 192.0.2.2
broadcast 192.0.2.255 dev eth0 table local proto kernel scope link src 192.0.2.2
"""
# A package index reached through an address that a careless range would capture (this happened:
# a route over it cut the machine off its package index at once).
PROTECTED = {"a package host (index)": ["203.0.113.80"], "name server of this machine": ["10.255.255.53"]}


def net(cidr: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(cidr)


def layout(tmp: Path = Path("/st")) -> comp.NodeLayout:
    ports = {k: 40000 + i for i, k in enumerate(
        ["kubelet", "kubelet_healthz", "kube_proxy_healthz", "kube_proxy_metrics", "coredns_health",
         "coredns_ready", "containerd_stream"])}  # fmt: skip
    return comp.NodeLayout(
        dir=tmp / "node", containerd_root=Path("/cache/node/containerd"), pki=tmp / "pki",
        apiserver="https://127.0.0.1:6443", bridge="itn12345678", pod_cidr=net("198.18.4.0/24"),
        service_cidr=net("10.96.0.0/16"), cgroup_root="/instructune-12345678",
        pause_image="localhost/instructune/pause:abc", ports=ports,
    )  # fmt: skip


def test_routes_are_parsed_from_every_table_without_the_default_route() -> None:
    routes = comp.parse_routes(ROUTES)
    assert [str(r.network) for r in routes] == [
        "192.0.2.0/24",
        "127.0.0.0/8",
        "192.0.2.2/32",
        "192.0.2.255/32",
    ]
    assert routes[0].line.startswith("192.0.2.0/24 dev eth0")


def test_a_range_over_a_package_hosts_address_or_an_existing_route_is_refused() -> None:
    routes = comp.parse_routes(ROUTES)
    problems = comp.range_conflicts({"pod range": net("203.0.113.0/24")}, routes, PROTECTED)
    assert problems == ["pod range 203.0.113.0/24 contains 203.0.113.80 (a package host (index))"]
    problems = comp.range_conflicts({"pod range": net("192.0.0.0/16")}, routes, PROTECTED)
    assert problems and all("overlaps the route" for p in problems)
    assert "192.0.2.0/24 dev eth0" in problems[0]
    assert comp.range_conflicts({"service range": net("10.255.0.0/16")}, routes, PROTECTED) == [
        "service range 10.255.0.0/16 contains 10.255.255.53 (name server of this machine)"
    ]
    assert comp.range_conflicts({"a": net("10.96.0.0/16"), "b": net("10.96.1.0/24")}, [], {}) == [
        "a 10.96.0.0/16 overlaps b 10.96.1.0/24"
    ]
    assert comp.range_conflicts({"pod range": net("198.18.0.0/24")}, routes, PROTECTED) == []


def test_the_first_safe_pod_range_is_chosen_and_none_at_all_is_refused() -> None:
    routes = comp.parse_routes(ROUTES + "198.18.0.0/24 dev itnother proto kernel scope link src 198.18.0.1\n")
    # The default candidates skip a range another bridge already routes.
    assert comp.choose_pod_cidr(net("10.96.0.0/16"), routes, PROTECTED) == net("198.18.4.0/24")
    assert comp.choose_pod_cidr(
        net("10.96.0.0/16"), routes, PROTECTED, candidates=["203.0.113.0/24", "10.96.5.0/24", "198.19.0.0/24"]
    ) == net("198.19.0.0/24")
    with pytest.raises(
        ValueError, match=r"no safe pod range: pod range 203.0.113.0/24 contains 203.0.113.80"
    ):
        comp.choose_pod_cidr(net("10.96.0.0/16"), routes, PROTECTED, candidates=["203.0.113.0/24"])
    with pytest.raises(ValueError, match=r"service range 203.0.0.0/16 contains 203.0.113.80"):
        comp.choose_pod_cidr(net("203.0.0.0/16"), routes, PROTECTED)


def test_pods_get_no_default_route_no_masquerade_and_no_outside_name_server() -> None:
    n = layout()
    conf = json.loads(comp.cni_conflist(n))
    bridge = conf["plugins"][0]
    assert (bridge["bridge"], bridge["isGateway"], bridge["ipMasq"]) == ("itn12345678", False, False)
    assert bridge["ipam"]["routes"] == [{"dst": "10.96.0.0/16", "gw": "198.18.4.1"}]
    assert bridge["ipam"]["dataDir"].startswith("/st/node/")
    assert {p["type"] for p in conf["plugins"]} == {"bridge", "portmap"}

    corefile = comp.corefile(n)
    assert "forward" not in corefile and "bind 198.18.4.1" in corefile
    assert corefile.splitlines()[0] == "cluster.local:53 96.10.in-addr.arpa:53 4.18.198.in-addr.arpa:53 {"
    kubelet = json.loads(comp.kubelet_config(n))
    assert kubelet["clusterDNS"] == ["198.18.4.1"] and kubelet["clusterDomain"] == "cluster.local"
    assert kubelet["resolvConf"] == "/st/node/resolv.conf"


def test_containerd_keeps_its_state_below_the_node_and_restricts_oom_score_adj() -> None:
    n = layout()
    cfg = tomllib.loads(comp.containerd_config(n))
    cri = cfg["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True
    assert cri["sandbox_image"] == "localhost/instructune/pause:abc"
    assert cri["netns_mounts_under_state_dir"] is True
    runc = cri["containerd"]["runtimes"]["runc"]
    assert runc["runtime_type"] == "io.containerd.runc.v2"
    assert runc["options"]["SystemdCgroup"] is False and runc["options"]["Root"] == "/st/node/runc"
    assert cfg["state"] == "/st/node/containerd" and cfg["grpc"]["address"] == "/st/node/containerd.sock"
    assert cfg["root"] == "/cache/node/containerd"
    assert cri["cni"]["conf_dir"] == "/st/node/cni"


def test_kubelet_and_kube_proxy_configuration() -> None:
    n = layout()
    k = json.loads(comp.kubelet_config(n))
    assert (k["cgroupDriver"], k["failSwapOn"], k["cgroupRoot"]) == (
        "cgroupfs",
        False,
        "/instructune-12345678",
    )
    assert k["containerRuntimeEndpoint"] == "unix:///st/node/containerd.sock"
    assert k["authentication"]["anonymous"]["enabled"] is False
    assert k["authorization"]["mode"] == "Webhook"
    assert k["authentication"]["x509"]["clientCAFile"] == "/st/pki/ca.crt"
    argv = comp.kubelet(n, Path("/bin/kubelet")).argv
    assert "--node-ip=198.18.4.1" in argv and "--node-labels=instructune.io/pool=local,type=real" in argv
    p = json.loads(comp.kube_proxy_config(n))
    assert (p["mode"], p["clusterCIDR"], p["nodePortAddresses"]) == (
        "iptables",
        "198.18.4.0/24",
        ["198.18.4.1/32"],
    )
    assert p["iptables"]["localhostNodePorts"] is False and p["conntrack"]["maxPerCore"] == 0


def test_an_oci_archive_of_one_program_is_deterministic_and_self_consistent() -> None:
    a = comp.oci_archive("localhost/x/pause:1", {"pause": b"\x7fELF..."}, ["/pause"])
    assert a == comp.oci_archive("localhost/x/pause:1", {"pause": b"\x7fELF..."}, ["/pause"])
    with tarfile.open(fileobj=io.BytesIO(a)) as tar:
        blobs = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    for name, data in blobs.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    index = json.loads(blobs["index.json"])
    desc = index["manifests"][0]
    assert desc["annotations"]["io.containerd.image.name"] == "localhost/x/pause:1"
    manifest = json.loads(blobs["blobs/sha256/" + desc["digest"].split(":")[1]])
    config = json.loads(blobs["blobs/sha256/" + manifest["config"]["digest"].split(":")[1]])
    assert config["config"]["Entrypoint"] == ["/pause"]
    layer = blobs["blobs/sha256/" + manifest["layers"][0]["digest"].split(":")[1]]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        member = tar.getmember("pause")
        assert member.mode == 0o755 and tar.extractfile(member).read() == b"\x7fELF..."  # type: ignore[union-attr]


def test_the_api_server_authorizes_nodes_and_reaches_kubelets_by_address_and_kwok_ignores_the_real_node() -> (
    None
):
    s = comp.StackLayout(Path("/st"), {"etcd": 1, "apiserver": 2, "kwok": 3}, "10.96.0.0/16")
    api = comp.kube_apiserver(s, Path("/bin/kube-apiserver")).argv
    assert "--authorization-mode=Node,RBAC" in api and "--enable-admission-plugins=NodeRestriction" in api
    assert "--kubelet-preferred-address-types=InternalIP" in api
    assert "--kubelet-certificate-authority=/st/pki/ca.crt" in api
    kwok = comp.kwok(s, Path("/bin/kwok"))
    assert "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake" in kwok.argv
    assert list(kwok.files) == ["/st/kwok/kwok.yaml"]
