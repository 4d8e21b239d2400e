"""A real Kubernetes node in a network namespace, for the node tier
(docs/architecture.md, "Test tiers").

* ``NodeControlPlane``: the cluster tier's control plane (etcd,
  kube-apiserver, kube-controller-manager on loopback) plus kube-scheduler,
  and an egress selector that sends the API server's connections to
  kubelets and pods through tests/node/egress.py, which dials inside the
  test's LAN namespace.
* ``Lan``: the namespace the nodes' uplinks plug into (198.18.10.0/24), with
  routes to every node's pod range; the API server's egress dials from here.
* ``KubeNode``: one node: its own network namespace holding containerd (own
  root, state and socket), the CNI bridge/host-local/loopback plugins and a
  kubelet (cgroupfs driver, private directories, its cgroups under a root of
  its own), reaching the API server through scripts/harness/nsforward.py.
  No kube-proxy.

Only 198.18.0.0/15 addresses, only in namespaces made here. Stopping removes
every process (found by cgroup, so the shims and pods too), every mount
under the node's directory, the cgroups and the namespaces, also after a
failure half-way through starting.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from scripts.harness import controlplane
from scripts.harness.controlplane import (
    REPO,
    ControlPlane,
    ControlPlaneError,
    _Proc,
    free_port,
    k8s_bin_dir,
    wait_until,
)
from scripts.harness.topo import Lan as NetnsLan
from scripts.harness.topo import Topology, wait_for_line

from .cgroups import hierarchies, remove_tree
from .images import image

HERE = Path(__file__).resolve().parent
NSFORWARD = REPO / "scripts" / "harness" / "nsforward.py"
EGRESS = HERE / "egress.py"

LAN_NET = ipaddress.ip_network("198.18.10.0/24")
LAN_GW = "198.18.10.1"
TEST_RANGE_V4 = "198.18.0.0/15"
HAIRPIN_V4 = "198.18.255.1"  # no node, pod or Service range holds it
CLUSTER_DOMAIN = "cluster.local"
# The cluster DNS Service (kube-system/kube-dns, as kubeadm names it): its
# ClusterIP goes through the proxy under test like any Service; its one
# endpoint is CoreDNS on the LAN.
DNS_CLUSTER_IP = "198.19.0.10"


def node_bin(name: str) -> Path:
    p = k8s_bin_dir() / name
    if not os.access(p, os.X_OK):
        raise ControlPlaneError(f"{p} is missing: run `make k8s-node` (scripts/build-k8s.sh node)")
    return p


def _run(argv: list[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout, **kw)
    if cp.returncode != 0:
        out = (cp.stderr or cp.stdout).strip()[-2000:]
        raise ControlPlaneError(f"{' '.join(argv)} failed ({cp.returncode}): {out}")
    return cp


class NodeControlPlane(ControlPlane):
    """The cluster tier's control plane, plus a scheduler and the egress
    proxy (started by ``attach_lan`` once the LAN namespace exists)."""

    def __init__(self, egress_socket: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.egress_socket = egress_socket
        self.bins["kube-scheduler"] = node_bin("kube-scheduler")

    def _apiserver_argv(self) -> list[str]:
        assert self.dir is not None
        egress = self.dir / "egress.yaml"
        egress.write_text(
            "apiVersion: apiserver.k8s.io/v1beta1\n"
            "kind: EgressSelectorConfiguration\n"
            "egressSelections:\n"
            "- name: cluster\n"
            "  connection:\n"
            "    proxyProtocol: HTTPConnect\n"
            "    transport:\n"
            "      uds:\n"
            f"        udsName: {self.egress_socket}\n"
        )
        return [
            *super()._apiserver_argv(),
            f"--egress-selector-config-file={egress}",
            # Node names resolve nowhere: dial kubelets at their InternalIP.
            "--kubelet-preferred-address-types=InternalIP",
        ]

    def _start_kcm(self) -> None:
        # With real kubelets the node-lifecycle controller has heartbeats to
        # read, and is needed: it lifts the not-ready taint a kubelet
        # registers with (pods stay unschedulable otherwise) and taints a
        # node whose kubelet stops. The cluster tier's list of disabled
        # controllers is read when the controller-manager starts.
        saved = controlplane.DISABLED_CONTROLLERS
        controlplane.DISABLED_CONTROLLERS = tuple(c for c in saved if c != "node-lifecycle-controller")
        try:
            super()._start_kcm()
        finally:
            controlplane.DISABLED_CONTROLLERS = saved

    def start(self) -> None:
        super().start()
        try:
            self._start_scheduler()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc = self._procs.pop("kube-scheduler", None)
        if proc is not None:
            proc.stop()
        super().stop()

    def _start_scheduler(self) -> None:
        port = free_port()
        self.ports["kube-scheduler"] = port
        kc = self.kubeconfig
        proc = self._spawn(
            "kube-scheduler",
            [
                str(self.bins["kube-scheduler"]),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self._path('scheduler-certs')}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
        )

        def healthy() -> bool:
            proc.check_alive()
            # Its serving certificate is self-signed (--cert-dir): only
            # whether it answers matters here.
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=2, context=ctx) as r:
                return r.read() == b"ok"

        self._wait(proc, healthy, "kube-scheduler /healthz")


class Lan:
    """The nodes' shared segment: a bridge in its own namespace holding
    ``LAN_GW``, routes to each node's pod range, and the API server's egress
    proxy dialing from it."""

    def __init__(self) -> None:
        self.net = NetnsLan()
        self.ns = self.net.node_ns
        self.egress: subprocess.Popen[bytes] | None = None
        self._dns_forward: subprocess.Popen[bytes] | None = None
        try:
            subprocess.run(["ip", "-n", self.ns, "addr", "add", f"{LAN_GW}/24", "dev", NetnsLan.BRIDGE], check=True)
        except BaseException:
            self.net.cleanup()
            raise

    def start_egress(self, socket_path: str) -> None:
        self.egress = subprocess.Popen(
            [sys.executable, str(EGRESS), socket_path, self.net.ns_path("node")], stdout=subprocess.PIPE
        )
        wait_for_line(self.egress, "ready", 10, "egress proxy")

    def start_dns(self, cp: ControlPlane, workdir: Path) -> None:
        """CoreDNS (the `kubernetes` plugin, as in a kubeadm cluster) on
        ``LAN_GW``:53, reading Services and EndpointSlices through an
        nsforward to the API server. No upstream: names outside the
        cluster domain fail, as nothing may leave the test's namespaces."""
        port = int(cp.server.rsplit(":", 1)[1])
        # nsforward listens in the LAN namespace and dials the API server on
        # the machine's loopback.
        fwd = subprocess.Popen(
            [sys.executable, str(NSFORWARD), self.net.ns_path("node"), str(port)], stdout=subprocess.PIPE
        )
        self._dns_forward = fwd
        wait_for_line(fwd, "ready", 10, "nsforward for CoreDNS")
        corefile = workdir / "Corefile"
        corefile.write_text(
            f""".:53 {{
    bind {LAN_GW}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {cp.kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    loop
}}
"""
        )
        log = open(workdir / "coredns.log", "ab")  # noqa: SIM115 - closed with the process
        self.dns = self.net.run_in(
            "node", [str(node_bin("coredns")), "-conf", str(corefile)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

        def up() -> bool:
            if self.dns.poll() is not None:
                raise ControlPlaneError(
                    f"coredns exited {self.dns.returncode}: {(workdir / 'coredns.log').read_text()}"
                )
            return "CoreDNS-" in (workdir / "coredns.log").read_text(errors="replace")

        wait_until(up, 60, what="CoreDNS")

    def route(self, cidr: str, via: str) -> None:
        self.net.add_route("node", cidr, via)

    def cleanup(self) -> None:
        fwd = self._dns_forward
        if fwd is not None:
            fwd.kill()
            fwd.wait(10)
            self._dns_forward = None
        if self.egress is not None:
            self.egress.kill()
            self.egress.wait(10)
            self.egress = None
        self.net.cleanup()


def _enter_cgroup(rel: str) -> None:
    """preexec_fn: move the child into cgroup ``rel`` of the unified and the
    pids hierarchies (neither needs settings first), so everything it forks
    (containerd's shims, the containers) can be found and killed by cgroup."""
    pid = str(os.getpid())
    for h in hierarchies():
        if h.name not in ("unified", "pids") and h != Path("/sys/fs/cgroup"):
            continue
        d = h / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.procs").write_text(pid)


def cgroup_pids(rel: str) -> set[int]:
    pids: set[int] = set()
    for h in hierarchies():
        top = h / rel
        if not top.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(top):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError):
                    pids.update(int(x) for x in Path(dirpath, "cgroup.procs").read_text().split())
    return pids


def kill_cgroup(rel: str, timeout: float = 30.0) -> set[int]:
    """SIGKILL every process in cgroup tree ``rel`` until none is left;
    returns the survivors (empty on success)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = cgroup_pids(rel)
        if not pids or time.monotonic() >= deadline:
            return pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def unmount_under(path: Path) -> list[str]:
    """Lazily unmount every mount at or below ``path``, deepest first."""
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1].encode().decode("unicode_escape") for line in f]
    ours = sorted({m for m in mounts if m.startswith(prefix) or m == str(path)}, key=len, reverse=True)
    failed = []
    for m in ours:
        if subprocess.run(["umount", "-l", m], capture_output=True).returncode != 0:
            failed.append(m)
    return failed


class KubeNode:
    """One kubelet node in a network namespace of its own.

    ``index`` picks its addresses: uplink 198.18.10.(10+index), pods
    198.18.(64+index).0/24 behind the CNI bridge.
    """

    def __init__(self, cp: NodeControlPlane, lan: Lan, index: int, zone: str = "zone-a") -> None:
        self.cp = cp
        self.lan = lan
        self.index = index
        self.zone = zone
        self.topo = Topology()
        self.name = f"{self.topo.prefix}-n{index}"
        self.ip = str(LAN_NET.network_address + 10 + index)
        self.pod_cidr = f"198.18.{64 + index}.0/24"
        self.pod_gw = f"198.18.{64 + index}.1"
        self.uplink = ""
        # Short: containerd's sockets live here (108-byte limit on their paths).
        self.dir = Path(tempfile.mkdtemp(prefix=f"spn-{self.topo.prefix}-", dir="/tmp"))
        # Named after the node: the DaemonSet's --cgroup mount finds it by
        # $(NODE_NAME) (NodeCluster.deploy_sliceproxy).
        self.cgroup = f"sliceproxy-test-{self.name}"
        self.procs: dict[str, _Proc] = {}
        self._forward: subprocess.Popen[bytes] | None = None

    # -- paths ---------------------------------------------------------------

    @property
    def ns(self) -> str:
        return self.topo.node_ns

    @property
    def ns_path(self) -> str:
        return self.topo.ns_path("node")

    @property
    def containerd_sock(self) -> str:
        return str(self.dir / "containerd.sock")

    def log(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 60) -> str:
        try:
            return "\n".join(self.log(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"<{e}>"

    # -- lifecycle -----------------------------------------------------------

    def start(self, images: list[str]) -> None:
        try:
            self._network()
            self._write_configs()
            self._start_containerd()
            self._import_images(images)
            self._start_forward()
            self._start_kubelet()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def _network(self) -> None:
        self.uplink = self.topo.add_uplink(self.lan.net, self.ip)
        # The node's pods and the other nodes' pods: routed by the LAN.
        self.lan.route(self.pod_cidr, self.ip)
        # What a real node's default route gives it, within the test range:
        # a ClusterIP or external IP is routable from the node, so a
        # host-network client's connect() and a pod's packet to a Service
        # without endpoints reach the proxy's rules instead of failing with
        # "network unreachable" first. The LAN namespace has no route out,
        # so nothing leaves the test's namespaces.
        self.topo.add_route("node", TEST_RANGE_V4, LAN_GW)

    def add_peer_route(self, other: KubeNode) -> None:
        self.topo.add_route("node", other.pod_cidr, other.ip)

    def _write_configs(self) -> None:
        d = self.dir
        for sub in ("cni", "containerd", "kubelet", "pod-logs", "pki", "ipam"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "cni" / "10-sliceproxy-test.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "sliceproxy-test",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": "cni0",
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "dataDir": str(d / "ipam"),
                                "ranges": [[{"subnet": self.pod_cidr, "gateway": self.pod_gw}]],
                                # The test range only: no default route, so a
                                # packet the dataplane failed to rewrite
                                # cannot leave the test's namespaces.
                                "routes": [{"dst": "198.18.0.0/15"}],
                            },
                        }
                    ],
                },
                indent=2,
            )
        )
        pause = image("pause").ref
        (d / "containerd.toml").write_text(
            f"""version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
[grpc]
  address = "{self.containerd_sock}"
[ttrpc]
  address = "{self.containerd_sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # runc may not lower oom_score_adj on this kind of machine (no
  # CAP_SYS_RESOURCE): without this, every sandbox fails to start.
  restrict_oom_score_adj = true
  # Pod network namespaces under our state dir, not the machine's /run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"""
        )
        (d / "resolv.conf").write_text("")
        port = int(self.cp.server.rsplit(":", 1)[1])
        ca = self.cp.ca_file
        (d / "kubelet.kubeconfig").write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: t\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {ca}\n"
            f"users:\n- name: kubelet\n  user:\n    token: {self.cp.token}\n"
            "contexts:\n- name: t\n  context:\n    cluster: t\n    user: kubelet\ncurrent-context: t\n"
        )
        (d / "kubelet.yaml").write_text(
            f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# kubelet 1.35 refuses cgroup v1 (this machine's hybrid layout) otherwise.
failCgroupV1: false
cgroupDriver: cgroupfs
# Every pod cgroup under a root of this node's own, removed at the end.
cgroupRoot: /{self.cgroup}
containerRuntimeEndpoint: unix://{self.containerd_sock}
imageServiceEndpoint: unix://{self.containerd_sock}
failSwapOn: false
address: {self.ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
podLogsDir: {d}/pod-logs
resolvConf: {d}/resolv.conf
clusterDomain: {CLUSTER_DOMAIN}
clusterDNS: [{DNS_CLUSTER_IP}]
# The API server calls the kubelet (logs, exec) with no client certificate
# of its own here; the kubelet listens only inside the test's namespaces.
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization:
  mode: AlwaysAllow
# Never evict or collect the images imported by the test (nothing can be
# pulled back), whatever the machine's disk looks like.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
serializeImagePulls: false
"""
        )

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> _Proc:
        """``argv`` inside the node namespace (nsenter: bpffs and cgroup
        mounts stay visible, unlike with `ip netns exec`), in this node's
        cgroup, logging to a file. Also in a UTS namespace of its own named
        as the node: host-network pods share the UTS namespace of the
        runtime that starts them, and upstream's tests expect such a pod's
        hostname to be its node's name (the machine's would be the same
        on every node)."""
        full = [
            *("unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', self.name),
            *("nsenter", f"--net={self.ns_path}", "--", *argv),
        ]
        proc = _Proc(name, full, self.log(name), env or self.cp._env())
        rel = f"{self.cgroup}/{name}"
        with open(proc.log, "ab") as out:
            proc.popen = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=proc.env,
                preexec_fn=lambda: _enter_cgroup(rel),
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def _start_containerd(self) -> None:
        proc = self._spawn("containerd", ["containerd", "--config", str(self.dir / "containerd.toml")])

        def up() -> bool:
            proc.check_alive()
            return (
                subprocess.run(
                    ["ctr", "--address", self.containerd_sock, "version"], capture_output=True, timeout=10
                ).returncode
                == 0
            )

        wait_until(up, 60, what=f"containerd of {self.name}")

    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return _run(["ctr", "--address", self.containerd_sock, "-n", "k8s.io", *args], timeout=timeout)

    def _import_images(self, names: list[str]) -> None:
        for name in ["pause", *names]:
            self.ctr("images", "import", str(image(name).archive))

    def _start_forward(self) -> None:
        port = int(self.cp.server.rsplit(":", 1)[1])
        self._forward = subprocess.Popen(
            [sys.executable, str(NSFORWARD), self.ns_path, str(port)], stdout=subprocess.PIPE
        )
        wait_for_line(self._forward, "ready", 10, "nsforward")

    def _make_cgroup_root(self) -> None:
        """The kubelet wants its cgroupRoot to exist in every hierarchy; a
        v1 cpuset cgroup serves no task until given cpus and mems."""
        for h in hierarchies():
            d = h / self.cgroup
            d.mkdir(exist_ok=True)
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if (d / knob).exists() and not (d / knob).read_text().strip():
                    (d / knob).write_text((h / knob).read_text())

    def _start_kubelet(self) -> None:
        self._make_cgroup_root()
        self._spawn(
            "kubelet",
            [
                str(node_bin("kubelet")),
                f"--config={self.dir / 'kubelet.yaml'}",
                f"--kubeconfig={self.dir / 'kubelet.kubeconfig'}",
                f"--root-dir={self.dir / 'kubelet'}",
                f"--cert-dir={self.dir / 'pki'}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.ip}",
                f"--node-labels=topology.kubernetes.io/zone={self.zone}",
                "--v=2",
            ],
        )

    def wait_ready(self, timeout: float = 180) -> dict[str, Any]:
        kubelet = self.procs["kubelet"]

        def ready() -> dict[str, Any] | None:
            kubelet.check_alive()
            status, node = self.cp.request("GET", f"/api/v1/nodes/{self.name}")
            if status != 200:
                return None
            conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            return node if conds.get("Ready") == "True" else None

        try:
            return wait_until(ready, timeout, interval=1, what=f"node {self.name} Ready")
        except (TimeoutError, ControlPlaneError) as e:
            raise ControlPlaneError(f"{e}\nkubelet log:\n{self.log_tail('kubelet')}") from None

    def stop(self) -> None:
        """Remove everything this node made; idempotent, keeps going after
        errors and reports the first at the end."""
        problems: list[str] = []
        kubelet = self.procs.pop("kubelet", None)
        if kubelet is not None:
            kubelet.stop(20)
        # Pods, shims and containerd: every process of the node's cgroup.
        containerd = self.procs.pop("containerd", None)
        if containerd is not None:
            containerd.stop(10)
        left = kill_cgroup(self.cgroup)
        if left:
            problems.append(f"processes left in cgroup {self.cgroup}: {sorted(left)}")
        if self._forward is not None:
            self._forward.kill()
            self._forward.wait(10)
            self._forward = None
        failed = unmount_under(self.dir)
        if failed:
            problems.append(f"could not unmount {failed}")
        cg_left = remove_tree(self.cgroup)
        if cg_left:
            problems.append(f"cgroups left: {cg_left[:5]}")
        self.topo.cleanup()
        if os.environ.get("SLICEPROXY_KEEP_NODE_DIR"):
            print(f"node dir kept: {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        # Not found is fine: a second stop, or start failed before.
        with contextlib.suppress(Exception):
            self.cp.request("DELETE", f"/api/v1/nodes/{self.name}")
        if problems:
            raise ControlPlaneError(f"node {self.name} teardown: " + "; ".join(problems))


# Bit numbers of the capabilities deploy/daemonset.yaml adds (linux/capability.h).
_CAP_BITS = {"NET_ADMIN": 12, "SYS_ADMIN": 21, "SYS_RESOURCE": 24, "PERFMON": 38, "BPF": 39}


def capability_available(name: str) -> bool:
    """Whether this process's bounding set holds capability ``name``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return bool(int(line.split()[1], 16) >> _CAP_BITS[name] & 1)
    return False


def ensure_shared_bpffs() -> None:
    """The DaemonSet mounts the host's /sys/fs/bpf with HostToContainer
    propagation, which runtimes refuse unless the host mount is shared or a
    slave. systemd makes every mount shared at boot; a machine without
    systemd (this kind of CI machine) leaves it private, so make it shared
    as systemd would. Propagation only concerns mounts made later below
    /sys/fs/bpf; pins and the tests' pin directories are unaffected."""
    cp = subprocess.run(["findmnt", "-no", "PROPAGATION", "/sys/fs/bpf"], capture_output=True, text=True)
    if cp.returncode != 0:
        raise ControlPlaneError("no bpf filesystem at /sys/fs/bpf: run `make bpffs`")
    if "shared" not in cp.stdout:
        _run(["mount", "--make-shared", "/sys/fs/bpf"])


class NodeCluster:
    """The control plane, the LAN and the nodes of one test session, with
    kubectl and the repository's DaemonSet applied as a user would."""

    AGENT_LABEL = "app.kubernetes.io/name=sliceproxy"

    def __init__(self, nodes: int = 1) -> None:
        self.egress_socket = tempfile.mktemp(prefix="spegress-", suffix=".sock", dir="/tmp")
        self.cp = NodeControlPlane(self.egress_socket)
        self.lan: Lan | None = None
        self.nodes: list[KubeNode] = []
        self.n_nodes = nodes
        self.dir = Path(tempfile.mkdtemp(prefix="sliceproxy-nodecluster-"))
        self._had_var_lib_kubelet = Path("/var/lib/kubelet").exists()

    def start(self, images: list[str]) -> None:
        ensure_shared_bpffs()
        try:
            self.cp.start()
            self.lan = Lan()
            self.lan.start_egress(self.egress_socket)
            self.lan.start_dns(self.cp, self.dir)
            self._dns_service()
            for i in range(1, self.n_nodes + 1):
                node = KubeNode(self.cp, self.lan, i, zone=f"zone-{'abc'[(i - 1) % 3]}")
                self.nodes.append(node)
                node.start(images)
            for a in self.nodes:
                for b in self.nodes:
                    if a is not b:
                        a.add_peer_route(b)
        except BaseException:
            self.stop()
            raise

    def _dns_service(self) -> None:
        """kube-system/kube-dns: a Service without selector whose one
        endpoint is CoreDNS on the LAN (kubelets give pods its ClusterIP)."""
        ports = [("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")]
        self.cp.ok(
            "POST",
            "/api/v1/namespaces/kube-system/services",
            {
                "metadata": {"name": "kube-dns", "labels": {"k8s-app": "kube-dns"}},
                "spec": {
                    "clusterIP": DNS_CLUSTER_IP,
                    "ports": [{"name": n, "port": p, "protocol": pr, "targetPort": p} for n, p, pr in ports],
                },
            },
        )
        self.cp.ok(
            "POST",
            "/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices",
            {
                "metadata": {
                    "name": "kube-dns-lan",
                    "labels": {
                        "kubernetes.io/service-name": "kube-dns",
                        "endpointslice.kubernetes.io/managed-by": "sliceproxy-test",
                    },
                },
                "addressType": "IPv4",
                "ports": [{"name": n, "port": p, "protocol": pr} for n, p, pr in ports],
                "endpoints": [{"addresses": [LAN_GW], "conditions": {"ready": True}}],
            },
        )

    @property
    def api_port(self) -> int:
        return int(self.cp.server.rsplit(":", 1)[1])

    def kubectl_argv(self, *args: str) -> list[str]:
        return [str(node_bin("kubectl")), f"--kubeconfig={self.cp.kubeconfig}", *args]

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None) -> str:
        argv = self.kubectl_argv(*args)
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input, env=self.cp._env())
        if check and cp.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {cp.returncode}: {cp.stderr.strip()[-3000:]}")
        return cp.stdout

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    # -- sliceproxy's own manifests --------------------------------------------

    def deploy_sliceproxy(self, image_ref: str, extra_args: tuple[str, ...] = ()) -> Path:
        """deploy/rbac.yaml and deploy/daemonset.yaml applied with kubectl,
        with only what a user sets for their cluster changed: the image,
        the interface patterns of this node (the CNI bridge's veth*, the
        uplink), the API server's address, and a pin directory per node
        (several test nodes share the machine's one bpffs)."""
        import yaml

        ds = yaml.safe_load((REPO / "deploy" / "daemonset.yaml").read_text())
        c = ds["spec"]["template"]["spec"]["containers"][0]
        c["image"] = image_ref
        args = []
        for a in c["command"]:
            if a.startswith("--interfaces="):
                a = "--interfaces=veth*"
            elif a.startswith("--pin-dir="):
                a = "--pin-dir=/sys/fs/bpf/sliceproxy-test-$(NODE_NAME)"
            args.append(a)
        # The hairpin source inside the test range: the pods here route
        # only that range (no default route, so nothing can leave), and a
        # pod answers its hairpin flows by routing to that address
        # (docs/semantics.md, "Hairpin").
        args += ["--external-interfaces=sp??????u0", f"--hairpin-ipv4={HAIRPIN_V4}", *extra_args]
        c["command"] = args
        # The host's paths the manifest mounts, made this node's: its
        # kubelet's kubeconfig (--api-server-from), and its own cgroup v2
        # subtree for the host clients' hooks (--cgroup): the test must
        # never hook the machine's root cgroup, where every process lives.
        # One DaemonSet serves every node, so both go by $(NODE_NAME).
        confs = self.dir / "kubelet-conf"
        confs.mkdir(exist_ok=True)
        for node in self.nodes:
            shutil.copyfile(node.dir / "kubelet.kubeconfig", confs / f"{node.name}.kubeconfig")
        cgroup2 = [h for h in hierarchies() if h.name == "unified"]
        pod = ds["spec"]["template"]["spec"]
        for v in pod["volumes"]:
            if v["name"] == "kubelet-conf":
                v["hostPath"] = {"path": str(confs), "type": "Directory"}
            elif v["name"] == "cgroup2":
                v["hostPath"] = {"path": str(cgroup2[0] if cgroup2 else Path("/sys/fs/cgroup")), "type": "Directory"}
        for m in c["volumeMounts"]:
            if m["name"] == "kubelet-conf":
                m["subPathExpr"] = "$(NODE_NAME).kubeconfig"
            elif m["name"] == "cgroup2":
                m["subPathExpr"] = "sliceproxy-test-$(NODE_NAME)"
        # A capability outside the machine's bounding set cannot be granted
        # (runc: "unable to apply caps"). This CI machine lacks
        # CAP_SYS_RESOURCE, which the manifest asks for kernels before 5.11
        # only (RLIMIT_MEMLOCK); leave out what the machine does not have.
        caps = c["securityContext"]["capabilities"]
        caps["add"] = [x for x in caps["add"] if capability_available(x)]
        path = self.dir / "daemonset.yaml"
        path.write_text(yaml.safe_dump(ds, sort_keys=False))
        self.kubectl("apply", "-f", str(REPO / "deploy" / "rbac.yaml"), "-f", str(path))
        return path

    def agent_pods(self) -> list[dict[str, Any]]:
        pods: list[dict[str, Any]] = self.kubectl_json("-n", "kube-system", "get", "pods", "-l", self.AGENT_LABEL)[
            "items"
        ]
        return pods

    def wait_agents_ready(
        self, timeout: float = 180, exclude_uids: frozenset[str] = frozenset()
    ) -> list[dict[str, Any]]:
        """Every node has a Ready agent pod (none of ``exclude_uids``)."""

        def ready() -> list[dict[str, Any]] | None:
            pods = [
                p
                for p in self.agent_pods()
                if p["metadata"]["uid"] not in exclude_uids and not p["metadata"].get("deletionTimestamp")
            ]
            ok = [
                p
                for p in pods
                if any(
                    c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", [])
                )
            ]
            return ok if len(ok) == len(self.nodes) else None

        try:
            return wait_until(ready, timeout, interval=1, what="sliceproxy agent pods Ready")
        except TimeoutError as e:
            detail = self.kubectl("-n", "kube-system", "describe", "pods", "-l", self.AGENT_LABEL, check=False)
            raise AssertionError(f"{e}\n{detail[-4000:]}\nkubelet:\n{self.nodes[0].log_tail('kubelet', 30)}") from None

    # -- teardown ----------------------------------------------------------------

    def delete_workloads(self, timeout: float = 90) -> None:
        """Delete every namespace the tests made and the DaemonSet, and give
        the kubelets the time to stop the pods (CNI teardown included)."""
        if not self.nodes:
            return
        with contextlib.suppress(Exception):
            self.kubectl("delete", "namespace", "-l", "sliceproxy-test=1", "--wait=false", check=False)
            self.kubectl("-n", "kube-system", "delete", "daemonset", "sliceproxy", "--wait=false", check=False)

            def drained() -> bool:
                pods = self.kubectl_json("get", "pods", "-A")["items"]
                return not pods

            with contextlib.suppress(TimeoutError):
                wait_until(drained, timeout, interval=1, what="pods gone")

    def stop(self) -> None:
        problems = []
        self.delete_workloads()
        for node in reversed(self.nodes):
            try:
                node.stop()
            except Exception as e:  # noqa: BLE001 - reported below
                problems.append(str(e))
            shutil.rmtree(Path("/sys/fs/bpf") / f"sliceproxy-test-{node.name}", ignore_errors=True)
        self.nodes = []
        if self.lan is not None:
            self.lan.cleanup()
            self.lan = None
        self.cp.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.egress_socket)
        # The kubelet's device-plugin socket has a fixed path.
        if not self._had_var_lib_kubelet:
            shutil.rmtree("/var/lib/kubelet", ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        if problems:
            raise ControlPlaneError("; ".join(problems))
