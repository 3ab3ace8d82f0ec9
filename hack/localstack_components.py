"""What each component of the local stack runs, as pure descriptions (no I/O), like kwokctl's components.

A :class:`Component` is a program's argv, its environment and the files it needs written before it
starts; ``hack/localstack.py`` decides when to start it and how to wait for it. The real node's
configuration files (containerd, CNI, kubelet, kube-proxy, CoreDNS) are rendered here too, and so are
the checks that keep its address ranges off every route and address this machine depends on.
Standard library only.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
CLUSTER_DOMAIN = "cluster.local"
POOL_LABEL = "instructune.io/pool"
NODE_POOL = "local"
NODE_NAME = "local-0"
# Candidate pod ranges of the real node, tried in order: the first that overlaps no route and no
# protected address is used. 198.18.0.0/15 is reserved for benchmarking (RFC 2544): nothing on a
# network of its own should route it.
POD_CIDR_CANDIDATES = tuple(f"198.18.{i}.0/24" for i in range(0, 256, 4))


@dataclass(frozen=True)
class Component:
    """One process of the stack: what to run, with which environment, after writing which files."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# The control plane and the services beside it (processes on 127.0.0.1)

KWOK_ANNOTATION = "kwok.x-k8s.io/node"


@dataclass(frozen=True)
class StackLayout:
    """The stack's state dir, its ports and its service range: the input of the components below."""

    dir: Path
    ports: Mapping[str, int]
    service_cidr: str
    # Where the API server and MinIO listen: loopback, or the real node's bridge address when the
    # stack has one, so that pods reach them (a pod cannot reach the host's loopback).
    service_host: str = HOST

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def audit_log(self) -> Path:
        return self.dir / "logs" / "audit.log"

    @property
    def api(self) -> str:
        return f"https://{self.service_host}:{self.ports['apiserver']}"


def etcd(s: StackLayout, binary: Path) -> Component:
    p = s.ports
    return Component(
        "etcd",
        (str(binary), "--name", "default", "--data-dir", str(s.dir / "etcd"),
         "--listen-client-urls", f"http://{HOST}:{p['etcd']}", "--advertise-client-urls", f"http://{HOST}:{p['etcd']}",
         "--listen-peer-urls", f"http://{HOST}:{p['etcd_peer']}",
         "--initial-advertise-peer-urls", f"http://{HOST}:{p['etcd_peer']}",
         "--initial-cluster", f"default=http://{HOST}:{p['etcd_peer']}",
         "--quota-backend-bytes", str(2 << 30), "--snapshot-count", "10000",
         "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "10m",
         "--unsafe-no-fsync", "--log-level", "warn"),
    )  # fmt: skip


# Every request of a ServiceAccount (the operator's, the jobs'), without bodies: what the tests read
# to prove least privilege (tests/e2e: the chart's rules against the calls the operator made).
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
"""


def kube_apiserver(s: StackLayout, binary: Path) -> Component:
    pki = s.pki
    policy = pki / "audit-policy.yaml"
    return Component(
        "kube-apiserver",
        (str(binary), f"--etcd-servers=http://{HOST}:{s.ports['etcd']}",
         f"--bind-address={s.service_host}", f"--advertise-address={s.service_host}",
         f"--secure-port={s.ports['apiserver']}",
         f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
         f"--client-ca-file={pki / 'ca.crt'}",
         "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
         f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
         f"--service-cluster-ip-range={s.service_cidr}",
         # The real node's kubelet is authorized as a node (its own objects only), not by RBAC.
         "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction", "--allow-privileged=true",
         f"--cert-dir={pki / 'apiserver-generated'}", "--profiling=false",
         "--max-requests-inflight=150", "--max-mutating-requests-inflight=50", "--event-ttl=30m",
         "--enable-priority-and-fairness=false",
         # The `kubernetes` Service's endpoint is the advertised address: pods reach the API server
         # through it when it is the node's bridge; a loopback one would only mislead them.
         f"--endpoint-reconciler-type={'none' if s.service_host == HOST else 'lease'}",
         # Logs, exec and port-forward reach a kubelet at its node's address (no DNS names nodes here).
         "--kubelet-preferred-address-types=InternalIP", f"--kubelet-certificate-authority={pki / 'ca.crt'}",
         f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
         f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
         f"--audit-policy-file={policy}", f"--audit-log-path={s.audit_log}", "--audit-log-format=json",
         "--audit-log-mode=batch", "--audit-log-batch-max-wait=1s", "--audit-log-maxsize=200"),
        env={"GOMAXPROCS": "2", "GOMEMLIMIT": "1500MiB"},
        files={str(policy): AUDIT_POLICY},
    )  # fmt: skip


def kube_controller_manager(s: StackLayout, binary: Path) -> Component:
    pki, kc = s.pki, s.pki / "controller-manager.kubeconfig"
    return Component(
        "kube-controller-manager",
        (str(binary), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
         f"--bind-address={HOST}", f"--secure-port={s.ports['controller_manager']}", "--leader-elect=false",
         "--use-service-account-credentials=true", f"--service-account-private-key-file={pki / 'sa.key'}",
         f"--root-ca-file={pki / 'ca.crt'}", f"--cluster-signing-cert-file={pki / 'ca.crt'}",
         f"--cluster-signing-key-file={pki / 'ca.key'}", f"--service-cluster-ip-range={s.service_cidr}",
         f"--cert-dir={pki / 'controller-manager-generated'}", "--profiling=false"),
        env={"GOMAXPROCS": "2"},
    )  # fmt: skip


def kube_scheduler(s: StackLayout, binary: Path) -> Component:
    kc = s.pki / "scheduler.kubeconfig"
    return Component(
        "kube-scheduler",
        (str(binary), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
         f"--bind-address={HOST}", f"--secure-port={s.ports['scheduler']}", "--leader-elect=false",
         f"--cert-dir={s.pki / 'scheduler-generated'}", "--profiling=false"),
        env={"GOMAXPROCS": "2"},
    )  # fmt: skip


def kwok(s: StackLayout, binary: Path) -> Component:
    """Fake nodes: only those with KWOK's annotation (so never the real node, nor its pods). No Stage
    objects are configured, so kwok uses its default stages: nodes become Ready (with node leases) and
    pods Running/Ready; pods owned by a Job complete."""
    home = s.dir / "kwok"
    config = home / "kwok.yaml"
    return Component(
        "kwok",
        (str(binary), f"--kubeconfig={s.kubeconfig}", f"--config={config}",
         f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
         f"--server-address={HOST}:{s.ports['kwok']}", "--node-lease-duration-seconds=40"),
        env={"HOME": str(home), "GOMAXPROCS": "2"},
        files={str(config): "apiVersion: config.kwok.x-k8s.io/v1alpha1\nkind: KwokConfiguration\n"
                            "options:\n  nodeLeaseDurationSeconds: 40\n"},
    )  # fmt: skip


def kuberay_operator(s: StackLayout, binary: Path) -> Component:
    return Component(
        "kuberay-operator",
        (str(binary), "--enable-leader-election=false", f"--metrics-addr={HOST}:{s.ports['kuberay_metrics']}",
         f"--health-probe-bind-address={HOST}:{s.ports['kuberay_probe']}", "--log-stdout-encoder=console"),
        env={"KUBECONFIG": str(s.kubeconfig), "GOMAXPROCS": "2"},
    )  # fmt: skip


def minio(s: StackLayout, binary: Path, access: str, secret: str) -> Component:
    return Component(
        "minio",
        (str(binary), "server", str(s.dir / "minio" / "data"), "--address", f"{s.service_host}:{s.ports['minio']}",
         "--console-address", f"{HOST}:{s.ports['minio_console']}", "--quiet"),
        env={"MINIO_ROOT_USER": access, "MINIO_ROOT_PASSWORD": secret, "MINIO_BROWSER": "on",
             "MINIO_UPDATE": "off", "MINIO_API_REQUESTS_MAX": "200", "HOME": str(s.dir / "minio")},
    )  # fmt: skip


def ray_head(
    s: StackLayout, ray: Path, temp_dir: Path, env: Mapping[str, str], path: str, pythonpath: str, cache: Path
) -> Component:
    """The local Ray head on loopback. `env` is the stack's environment (<dir>/env), `path` the PATH it
    runs with (the project venv's bin first)."""
    p = s.ports
    return Component(
        "ray",
        (str(ray), "start", "--head", "--block", "--node-ip-address", HOST, "--port", str(p["ray_gcs"]),
         "--include-dashboard", "true", "--dashboard-host", HOST, "--dashboard-port", str(p["ray_dashboard"]),
         "--ray-client-server-port", str(p["ray_client"]),
         "--dashboard-agent-listen-port", str(p["ray_agent"]),
         "--dashboard-agent-grpc-port", str(p["ray_dashboard_agent_grpc"]),
         "--node-manager-port", str(p["ray_node_manager"]),
         "--object-manager-port", str(p["ray_object_manager"]),
         "--metrics-export-port", str(p["ray_metrics"]),
         "--runtime-env-agent-port", str(p["ray_runtime_env_agent"]),
         # Logical CPUs: two training workers, an evaluation task and a Serve replica fit at once.
         "--num-cpus", "4", "--num-gpus", "0", "--object-store-memory", str(1 << 30),
         "--temp-dir", str(temp_dir), "--disable-usage-stats"),
        # Ray 2.60 enables token authentication by default; the token is ours, not ~/.ray/auth_token.
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's switch that keeps `--node-ip-address 127.0.0.1`
        # on loopback (otherwise Ray swaps it for the host's routable IP and listens on every interface).
        env={"RAY_USAGE_STATS_ENABLED": "0", **{k: env[k] for k in env if k.startswith("RAY_") and k != "RAY_ADDRESS"},
             # Jobs on this head get what a tune's Ray pods get: S3 credentials in their environment
             # (pods: by secretKeyRef), never through job info or runtime_env. Entrypoints run
             # `python -m instructune_jobs` with this clone's code and the project venv first on PATH.
             **{k: env[k] for k in ("AWS_ENDPOINT_URL", "INSTRUCTUNE_S3_ENDPOINT", "AWS_ACCESS_KEY_ID",
                                     "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")},
             "PATH": path, "PYTHONPATH": pythonpath, "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions")},
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Address ranges: the node's pod range and the service range must collide with nothing


@dataclass(frozen=True)
class Route:
    network: IPv4Network
    line: str


_ROUTE_TYPES = {"unicast", "local", "broadcast", "multicast", "throw", "unreachable", "prohibit",
                "blackhole", "nat", "anycast"}  # fmt: skip


def parse_routes(text: str) -> list[Route]:
    """Routes of ``ip -4 route show table all`` output; default routes are left out (they cover
    everything by design, and the stack adds none)."""
    routes = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in _ROUTE_TYPES:
            words = words[1:]
        if not words or words[0] == "default":
            continue
        try:
            net = ipaddress.ip_network(words[0], strict=False)
        except ValueError:
            continue
        if isinstance(net, IPv4Network) and net.prefixlen > 0:
            routes.append(Route(net, line.strip()))
    return routes


def range_conflicts(
    ranges: Mapping[str, IPv4Network], routes: Iterable[Route], protected: Mapping[str, Iterable[str]]
) -> list[str]:
    """Why the given ranges are unsafe here (empty: safe). ``protected`` maps a reason (say, "package
    index host") to the addresses it resolves to: a range over one of them would capture its traffic."""
    problems = []
    routes = list(routes)
    for what, net in ranges.items():
        for r in routes:
            if net.overlaps(r.network):
                problems.append(f"{what} {net} overlaps the route `{r.line}`")
        for reason, addrs in protected.items():
            for a in addrs:
                try:
                    addr = ipaddress.ip_address(a)
                except ValueError:
                    continue
                if addr in net:
                    problems.append(f"{what} {net} contains {addr} ({reason})")
    names = list(ranges)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if ranges[a].overlaps(ranges[b]):
                problems.append(f"{a} {ranges[a]} overlaps {b} {ranges[b]}")
    return problems


def choose_pod_cidr(
    service_cidr: IPv4Network,
    routes: Iterable[Route],
    protected: Mapping[str, Iterable[str]],
    candidates: Sequence[str] = POD_CIDR_CANDIDATES,
) -> IPv4Network:
    """The first candidate pod range that is safe beside the service range; ValueError (saying why each
    was refused, and why the service range is unsafe) when none is."""
    routes = list(routes)
    svc = range_conflicts({"service range": service_cidr}, routes, protected)
    if svc:
        raise ValueError("; ".join(svc))
    refused = []
    for c in candidates:
        net = IPv4Network(c)
        problems = range_conflicts({"pod range": net, "service range": service_cidr}, routes, protected)
        if not problems:
            return net
        refused.append(problems[0])
    raise ValueError("no safe pod range: " + "; ".join(refused[:3]) + (" ..." if len(refused) > 3 else ""))


def reverse_zone(net: IPv4Network) -> str:
    """The in-addr.arpa zone that covers `net` (whole octets only, rounded down)."""
    octets = str(net.network_address).split(".")[: max(1, net.prefixlen // 8)]
    return ".".join(reversed(octets)) + ".in-addr.arpa"


# ---------------------------------------------------------------------------------------------------
# The real node


@dataclass(frozen=True)
class NodeLayout:
    """Where the real node keeps everything, its network and its ports: the input of every renderer."""

    dir: Path  # <state>/node: sockets, state, configs, kubelet root; all removed by `down`
    containerd_root: Path  # images and snapshots: kept in the cache, so images are imported once
    pki: Path
    apiserver: str  # https://127.0.0.1:PORT
    bridge: str
    pod_cidr: IPv4Network
    service_cidr: IPv4Network
    cgroup_root: str  # /instructune-<hash>: every pod's cgroup lives below it
    pause_image: str
    ports: Mapping[str, int]
    name: str = NODE_NAME

    @property
    def gateway(self) -> IPv4Address:
        """The bridge's address: the node IP, the pods' gateway and the cluster DNS server."""
        return self.pod_cidr.network_address + 1

    @property
    def containerd_socket(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def cni_network(self) -> str:
        return f"instructune-{self.bridge}"

    @property
    def kubelet_dir(self) -> Path:
        return self.dir / "kubelet"

    @property
    def pod_logs_dir(self) -> Path:
        return self.dir / "pod-logs"


def containerd_config(n: NodeLayout) -> str:
    """containerd's own config file (format 2, containerd 1.6): everything below the node's dirs."""
    cri = '[plugins."io.containerd.grpc.v1.cri"]'
    runc = f"{cri[:-1]}.containerd.runtimes.runc]"
    return f"""version = 2
root = "{n.containerd_root}"
state = "{n.dir / "containerd"}"
oom_score = 0

[grpc]
  address = "{n.containerd_socket}"
[ttrpc]
  address = "{n.containerd_socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{n.dir / "opt"}"

{cri}
  sandbox_image = "{n.pause_image}"
  # This machine refuses to lower any process's oom_score_adj below 0 (the kubelet asks -998 for
  # pause containers): without this the sandbox dies at start.
  restrict_oom_score_adj = true
  stream_server_address = "{HOST}"
  stream_server_port = "{n.ports["containerd_stream"]}"
  enable_selinux = false
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  max_container_log_line_size = 16384

{cri[:-1]}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

{runc}
  runtime_type = "io.containerd.runc.v2"

{runc[:-1]}.options]
  SystemdCgroup = false
  BinaryName = "runc"
  Root = "{n.dir / "runc"}"

{cri[:-1]}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{n.dir / "cni"}"
  max_conf_num = 1
"""


def cni_conflist(n: NodeLayout) -> str:
    """The pod network: veths on the node's bridge, addresses from its pod range. The bridge plugin
    is not the gateway (the stack gives the bridge its address, and leaves IP forwarding alone), and
    the only route a pod gets is the service range through the bridge: no default route, so pods
    reach the stack's own addresses only."""
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": n.cni_network,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": n.bridge,
                    "isGateway": False,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(n.dir / "cni-ipam"),
                        "ranges": [[{"subnet": str(n.pod_cidr), "gateway": str(n.gateway)}]],
                        "routes": [{"dst": str(n.service_cidr), "gw": str(n.gateway)}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}, "snat": False},
            ],
        },
        indent=2,
    )


def kubelet_config(n: NodeLayout) -> str:
    """KubeletConfiguration (JSON is YAML)."""
    cfg: dict[str, Any] = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": str(n.gateway),
        "port": n.ports["kubelet"],
        "readOnlyPort": 0,
        "healthzBindAddress": HOST,
        "healthzPort": n.ports["kubelet_healthz"],
        "tlsCertFile": str(n.pki / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(n.pki / "kubelet-serving.key"),
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True, "cacheTTL": "30s"},
            "x509": {"clientCAFile": str(n.pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{n.containerd_socket}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": n.cgroup_root,
        "cgroupsPerQOS": True,
        "failSwapOn": False,
        "clusterDNS": [str(n.gateway)],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(n.dir / "resolv.conf"),
        "podLogsDir": str(n.pod_logs_dir),
        "makeIPTablesUtilChains": False,
        "maxPods": 110,
        # The job image is large and imported once: never garbage-collect images, never evict on disk.
        # No disk signal at all: an image build beside the stack fills the disk for minutes, and the
        # eviction manager then deletes every image no pod uses at that moment, the pause image too.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi"},
        "serializeImagePulls": False,
        "nodeStatusUpdateFrequency": "5s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "0s",
        "shutdownGracePeriod": "0s",
    }
    return json.dumps(cfg, indent=2)


def kube_proxy_config(n: NodeLayout) -> str:
    """KubeProxyConfiguration: iptables mode; NodePorts only on the bridge's address; leaves the
    machine's sysctls (conntrack sizes, route_localnet) as they are."""
    cfg = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(n.pki / "kube-proxy.kubeconfig")},
        "mode": "iptables",
        "hostnameOverride": n.name,
        "bindAddress": str(n.gateway),
        "clusterCIDR": str(n.pod_cidr),
        "healthzBindAddress": f"{HOST}:{n.ports['kube_proxy_healthz']}",
        "metricsBindAddress": f"{HOST}:{n.ports['kube_proxy_metrics']}",
        "nodePortAddresses": [f"{n.gateway}/32"],
        "iptables": {
            "localhostNodePorts": False,
            "masqueradeAll": False,
            "syncPeriod": "30s",
            "minSyncPeriod": "1s",
        },
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }
    return json.dumps(cfg, indent=2)


def corefile(n: NodeLayout) -> str:
    """Cluster DNS on the bridge's address: cluster.local and the reverse zones of the pod and service
    ranges from the API server; every other name is refused (nothing is forwarded anywhere)."""
    zones = [CLUSTER_DOMAIN, reverse_zone(n.service_cidr), reverse_zone(n.pod_cidr)]
    return f"""{" ".join(f"{z}:53" for z in zones)} {{
    bind {n.gateway}
    errors
    health {HOST}:{n.ports["coredns_health"]}
    ready {HOST}:{n.ports["coredns_ready"]}
    kubernetes {" ".join(zones)} {{
        kubeconfig {n.pki / "coredns.kubeconfig"} instructune
        pods insecure
        ttl 5
    }}
    cache 5
    loadbalance
}}
"""


def containerd(n: NodeLayout) -> Component:
    config = n.dir / "containerd.toml"
    return Component(
        "containerd",
        ("containerd", "--config", str(config), "--log-level", "warn"),
        files={
            str(config): containerd_config(n),
            str(n.dir / "cni" / "10-instructune.conflist"): cni_conflist(n),
        },
    )


def kubelet(n: NodeLayout, binary: Path) -> Component:
    config = n.dir / "kubelet.yaml"
    resolv = n.dir / "resolv.conf"
    return Component(
        "kubelet",
        (str(binary), f"--config={config}", f"--kubeconfig={n.pki / 'kubelet.kubeconfig'}",
         f"--hostname-override={n.name}", f"--node-ip={n.gateway}", f"--root-dir={n.kubelet_dir}",
         f"--cert-dir={n.kubelet_dir / 'pki'}", f"--node-labels={POOL_LABEL}={NODE_POOL},type=real", "--v=1"),
        env={"GOMAXPROCS": "2"},
        # Pods with dnsPolicy Default get this (no name servers: nothing outside the stack);
        # cluster-DNS pods get the bridge's address and no search domain of the host's.
        files={str(config): kubelet_config(n), str(resolv): "# the local node's pods resolve no outside names\n"},
    )  # fmt: skip


def kube_proxy(n: NodeLayout, binary: Path) -> Component:
    config = n.dir / "kube-proxy.yaml"
    return Component(
        "kube-proxy",
        (str(binary), f"--config={config}", "--v=1"),
        env={"GOMAXPROCS": "1"},
        files={str(config): kube_proxy_config(n)},
    )


def coredns(n: NodeLayout, binary: Path) -> Component:
    config = n.dir / "Corefile"
    return Component(
        "coredns",
        (str(binary), "-conf", str(config)),
        env={"GOMAXPROCS": "1"},
        files={str(config): corefile(n)},
    )


def node_rbac() -> list[dict[str, Any]]:
    """What the node's components may do beyond the built-in roles: CoreDNS reads Services and
    EndpointSlices; the API server's kubelet client may use the kubelet API (logs, exec). The
    kubelet is authorized by the Node authorizer; kube-proxy by the built-in system:node-proxier binding."""
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "instructune:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        _binding("instructune:coredns", "instructune:coredns", "instructune:coredns"),
        _binding(
            "instructune:apiserver-kubelet-client",
            "system:kubelet-api-admin",
            "instructune:apiserver-kubelet-client",
        ),
    ]


def _binding(name: str, role: str, user: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }


# ---------------------------------------------------------------------------------------------------
# Images of the stack's own: an OCI image layout of one layer, written without any image tool


def oci_archive(ref: str, files: Mapping[str, bytes], entrypoint: Sequence[str]) -> bytes:
    """An OCI image archive (what `ctr images import` reads) of one layer holding `files` (path ->
    content, every file executable), named `ref`. Deterministic: the same files give the same digest."""
    layer = _tar({name.lstrip("/"): (data, 0o755) for name, data in files.items()})
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = _canonical(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": list(entrypoint), "Env": ["PATH=/"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    )
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": _descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [_descriptor("application/vnd.oci.image.layer.v1.tar", layer)],
        }
    )
    desc = _descriptor("application/vnd.oci.image.manifest.v1+json", manifest)
    desc["annotations"] = {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref}
    index = _canonical({"schemaVersion": 2, "manifests": [desc]})
    blobs = {f"blobs/sha256/{hashlib.sha256(b).hexdigest()}": b for b in (layer, config, manifest)}
    return _tar(
        {"oci-layout": (b'{"imageLayoutVersion":"1.0.0"}', 0o644), "index.json": (index, 0o644)}
        | {k: (v, 0o644) for k, v in blobs.items()}
    )


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _descriptor(media_type: str, blob: bytes) -> dict[str, Any]:
    return {
        "mediaType": media_type,
        "digest": "sha256:" + hashlib.sha256(blob).hexdigest(),
        "size": len(blob),
    }


def _tar(members: Mapping[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name in sorted(members):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            data, mode = members[name]
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
