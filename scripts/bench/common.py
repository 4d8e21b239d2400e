"""What every part of the bench shares: the scenarios, the cluster they
describe (Services and EndpointSlices, as the API server would send them),
addresses, percentiles, throwaway namespaces, the machine and its load.

Addresses come only from 198.18.0.0/15 (docs/architecture.md, "Test tiers"): ClusterIPs from
198.19.0.0/16, endpoints from a pool of 65,000 addresses in 198.18.1.0 -
198.18.254.232. The scenarios need more endpoints than that (S3 has 250,000,
and a rolling update replaces all of them once more), so when the pool wraps
the endpoint port moves on (8080, 8081, ...): every endpoint is still a
distinct (address, port), which is what both dataplanes key backends on. A
slice never straddles a wrap (slice sizes divide 65,000), so its one port
entry holds for all its endpoints, as in a real slice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import random
import resource
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "bench"
NODE = "node-0"
NODE_ZONE = "zone-a"
POOL_BASE = 0xC6120100  # 198.18.1.0
POOL_SIZE = 65_000
VIP_BASE = 0xC6130001  # 198.19.0.1
BASE_PORT = 8080
CLUSTER_CIDR = "198.18.0.0/16"  # pod addresses: what kube-proxy's --cluster-cidr would say
LIST_PAGE = 500  # what ctrl.k8s.kube asks the API server for (limit=500)


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ipv4(n: int) -> str:
    return socket.inet_ntoa(n.to_bytes(4, "big"))


def vip(i: int) -> str:
    return ipv4(VIP_BASE + i)


# -- scenarios ---------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str
    services: int
    endpoints: int  # per Service
    slice_max: int = 100  # the EndpointSlice controller's maxEndpointsPerSlice
    # Local: every Service has internalTrafficPolicy Local, so the bench's
    # node (NODE, 1 endpoint in 100) uses only its own endpoints.
    internal_traffic_policy: str = "Cluster"
    shape: str = "ClusterIP"  # one of SHAPES

    @property
    def frontends(self) -> tuple[int, int]:
        """Frontends per Service on NODE (one InternalIP), as (those that
        take every endpoint, those that take NODE's own only)."""
        return SHAPES[self.shape][1]

    @property
    def slices_per_service(self) -> int:
        return -(-self.endpoints // self.slice_max)

    @property
    def slices(self) -> int:
        return self.services * self.slices_per_service

    @property
    def total(self) -> int:
        return self.services * self.endpoints

    @property
    def slice_size(self) -> int:
        """Endpoints in a full slice: what one change replaces."""
        return min(self.endpoints, self.slice_max)

    @property
    def label(self) -> str:
        s = "Service" if self.services == 1 else "Services"
        return f"{self.services:,} {s} x {self.endpoints:,}"

    def scaled(self, services: int | None = None, endpoints: int | None = None) -> Scenario:
        return Scenario(
            self.key,
            services or self.services,
            endpoints or self.endpoints,
            self.slice_max,
            self.internal_traffic_policy,
            self.shape,
        )

    def ladder(self) -> list[Scenario]:
        """From a small cluster to this one, each 10 times the last: the
        growth of one-change latency. S1 grows its one Service's endpoints,
        the others their number of Services."""
        out = []
        if self.services == 1:
            n = self.endpoints
            while n >= 100:
                out.append(self.scaled(endpoints=n))
                n //= 10
        else:
            n = self.services
            while n >= 4:
                out.append(self.scaled(services=n))
                n //= 10
        return out[::-1]


# Service shapes (`--only shapes`: S1's one Service in each): what the
# Service adds to the ClusterIP of the scenarios, and its frontends on NODE
# (see Scenario.frontends). A cluster IP, a NodePort and an LB IP each in
# both scopes (reached from pods, from outside) under Cluster policies all
# take every endpoint; under externalTrafficPolicy Local those reached from
# outside take NODE's own.
SHAPES: dict[str, tuple[str, tuple[int, int]]] = {
    "ClusterIP": ("the scenarios' Service", (1, 0)),
    "NodePort": ("type NodePort", (3, 0)),
    "LoadBalancer-Local": ("type LoadBalancer, externalTrafficPolicy Local, a healthCheckNodePort", (3, 2)),
    "ClientIP": ("sessionAffinity ClientIP", (1, 0)),
    "Hints": ("topology-mode Auto, every endpoint hinted for its zone", (1, 0)),
    "Maglev": ("type LoadBalancer, the agent run with --external-lb=maglev", (5, 0)),
}
SHAPE_LB_IP = "198.19.255.1"
SHAPE_NODE_PORT = 30080
SHAPE_HEALTH_PORT = 32000

FULL_SCENARIOS = [
    Scenario("S1", 1, 100_000),
    Scenario("S1b", 1, 120_000),
    Scenario("S2", 10_000, 10),
    Scenario("S3", 5_000, 50),
]
# --quick: the same shapes, small enough for `make test` (well under a minute).
QUICK_SCENARIOS = [
    Scenario("S1", 1, 2_000),
    Scenario("S2", 200, 10),
    Scenario("S3", 40, 50),
]


def taken(scn: Scenario, nodes: list[str], zones: list[str]) -> tuple[int, int]:
    """Of endpoints on these nodes in these zones, what NODE programs for
    one Service of scn as (backends, slots over its slot tables): the
    frontends that take every endpoint (those of NODE's zone under
    topology hints) share one table, and those that take NODE's own only
    another."""
    every, own = scn.frontends
    if scn.internal_traffic_policy == "Local":
        every, own = 0, every + own
    n_all = sum(1 for z in zones if z == NODE_ZONE) if scn.shape == "Hints" else len(nodes)
    n_own = sum(1 for n in nodes if n == NODE)
    return (n_all if every else n_own), (n_all if every else 0) + (n_own if own else 0)


# -- the cluster the scenarios describe -----------------------------------------


def _uid(*parts: object) -> str:
    h = hashlib.md5("/".join(map(str, parts)).encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _suffix(*parts: object) -> str:
    # generateName's 5 random characters, deterministic here.
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    n = int(hashlib.md5("/".join(map(str, parts)).encode()).hexdigest(), 16)
    return "".join(alphabet[(n >> (5 * k)) % len(alphabet)] for k in range(5))


@dataclass
class Slice:
    name: str
    port: int
    addrs: list[int]  # endpoint addresses as integers
    generation: int = 1


@dataclass
class Cluster:
    """Services and their slices; `replace` gives a slice fresh endpoints
    (a rolling update's new pods), the way the EndpointSlice controller
    updates a slice in place."""

    scn: Scenario
    slices: list[list[Slice]] = field(default_factory=list)
    next_ep: int = 0
    rv: int = 1000

    def __post_init__(self) -> None:
        for i in range(self.scn.services):
            row = []
            left = self.scn.endpoints
            j = 0
            while left > 0:
                n = min(left, self.scn.slice_max)
                port, addrs = self._alloc(n)
                row.append(Slice(f"{self.svc_name(i)}-{_suffix(i, j)}", port, addrs))
                left -= n
                j += 1
            # The API server lists slices sorted by name; kube-proxy and
            # sliceproxy merge them by name too.
            row.sort(key=lambda s: s.name)
            self.slices.append(row)

    def _alloc(self, n: int) -> tuple[int, list[int]]:
        off = self.next_ep % POOL_SIZE
        if off + n > POOL_SIZE:  # never straddle a wrap: one port per slice
            self.next_ep += POOL_SIZE - off
            off = 0
        port = BASE_PORT + self.next_ep // POOL_SIZE
        self.next_ep += n
        return port, [POOL_BASE + off + k for k in range(n)]

    @staticmethod
    def svc_name(i: int) -> str:
        return f"svc-{i:05d}"

    @staticmethod
    def node_of(addr: int) -> str:
        """The node an endpoint runs on: 100 nodes, NODE one of them."""
        return f"node-{addr % 100}"

    @staticmethod
    def zone_of(addr: int) -> str:
        return f"zone-{'abc'[addr % 3]}"

    def taken(self) -> tuple[int, int]:
        """What NODE's full sync programs: (backends, slots)."""
        addrs = [a for row in self.slices for sl in row for a in sl.addrs]
        return taken(self.scn, [self.node_of(a) for a in addrs], [self.zone_of(a) for a in addrs])

    def endpoints(self, i: int) -> list[tuple[str, int]]:
        """(address, port) of Service i in merge order."""
        return [(ipv4(a), s.port) for s in self.slices[i] for a in s.addrs]

    def replace(self, i: int, j: int) -> Slice:
        old = self.slices[i][j]
        port, addrs = self._alloc(len(old.addrs))
        new = Slice(old.name, port, addrs, old.generation + 1)
        self.slices[i][j] = new
        return new

    # -- the raw JSON -----------------------------------------------------
    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def raw_service(self, i: int) -> dict:
        name = self.svc_name(i)
        raw = {
            "metadata": {
                "name": name,
                "namespace": NAMESPACE,
                "uid": _uid("svc", i),
                "resourceVersion": self._next_rv(),
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"app": name},
                "managedFields": [
                    {
                        "manager": "kubectl-client-side-apply",
                        "operation": "Update",
                        "apiVersion": "v1",
                        "time": "2026-01-01T00:00:00Z",
                        "fieldsType": "FieldsV1",
                        "fieldsV1": {
                            "f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                            "f:spec": {
                                "f:internalTrafficPolicy": {},
                                "f:ports": {
                                    ".": {},
                                    'k:{"port":80,"protocol":"TCP"}': {
                                        ".": {},
                                        "f:name": {},
                                        "f:port": {},
                                        "f:protocol": {},
                                        "f:targetPort": {},
                                    },
                                },
                                "f:selector": {},
                                "f:sessionAffinity": {},
                                "f:type": {},
                            },
                        },
                    }
                ],
            },
            "spec": {
                "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http"}],
                "selector": {"app": name},
                "clusterIP": vip(i),
                "clusterIPs": [vip(i)],
                "type": "ClusterIP",
                "sessionAffinity": "None",
                "ipFamilies": ["IPv4"],
                "ipFamilyPolicy": "SingleStack",
                "internalTrafficPolicy": self.scn.internal_traffic_policy,
            },
            "status": {"loadBalancer": {}},
        }
        self._shape(raw)
        return raw

    def _shape(self, raw: dict) -> None:
        """The scenario's shape (SHAPES) made of a ClusterIP Service."""
        shape, spec = self.scn.shape, raw["spec"]
        if shape in ("NodePort", "LoadBalancer-Local", "Maglev"):
            spec["type"] = "NodePort" if shape == "NodePort" else "LoadBalancer"
            spec["ports"][0]["nodePort"] = SHAPE_NODE_PORT
        if spec["type"] == "LoadBalancer":
            raw["status"] = {"loadBalancer": {"ingress": [{"ip": SHAPE_LB_IP, "ipMode": "VIP"}]}}
            spec["externalTrafficPolicy"] = "Cluster"
        if shape == "LoadBalancer-Local":
            spec["externalTrafficPolicy"] = "Local"
            spec["healthCheckNodePort"] = SHAPE_HEALTH_PORT
        elif shape == "ClientIP":
            spec["sessionAffinity"] = "ClientIP"
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 10800}}
        elif shape == "Hints":
            raw["metadata"]["annotations"] = {"service.kubernetes.io/topology-mode": "Auto"}

    def raw_slice(self, i: int, j: int) -> dict:
        s = self.slices[i][j]
        svc = self.svc_name(i)
        owner = _uid("svc", i)
        return {
            "metadata": {
                "name": s.name,
                "generateName": f"{svc}-",
                "namespace": NAMESPACE,
                "uid": _uid("slice", s.name),
                "resourceVersion": self._next_rv(),
                "generation": s.generation,
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    "kubernetes.io/service-name": svc,
                },
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-01-01T00:00:00Z"},
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "name": svc,
                        "uid": owner,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
                "managedFields": [
                    {
                        "manager": "kube-controller-manager",
                        "operation": "Update",
                        "apiVersion": "discovery.k8s.io/v1",
                        "time": "2026-01-01T00:00:00Z",
                        "fieldsType": "FieldsV1",
                        "fieldsV1": {
                            "f:addressType": {},
                            "f:endpoints": {},
                            "f:metadata": {
                                "f:annotations": {
                                    ".": {},
                                    "f:endpoints.kubernetes.io/last-change-trigger-time": {},
                                },
                                "f:generateName": {},
                                "f:labels": {
                                    ".": {},
                                    "f:endpointslice.kubernetes.io/managed-by": {},
                                    "f:kubernetes.io/service-name": {},
                                },
                                "f:ownerReferences": {".": {}, f'k:{{"uid":"{owner}"}}': {}},
                            },
                            "f:ports": {},
                        },
                    }
                ],
            },
            "addressType": "IPv4",
            "endpoints": [
                {
                    "addresses": [ipv4(a)],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "targetRef": {
                        "kind": "Pod",
                        "namespace": NAMESPACE,
                        "name": f"{svc}-7d4b9c-{_suffix(a)}",
                        "uid": _uid("pod", a, s.generation),
                    },
                    "nodeName": self.node_of(a),
                    "zone": self.zone_of(a),
                }
                | ({"hints": {"forZones": [{"name": self.zone_of(a)}]}} if self.scn.shape == "Hints" else {})
                for a in s.addrs
            ],
            "ports": [{"name": "http", "protocol": "TCP", "port": s.port}],
        }

    def list_pages(self, kind: str) -> list[bytes]:
        """The list response, page by page (limit=500 with continue), as
        compact JSON like the API server's. Items carry no kind."""
        if kind == "Service":
            items = (self.raw_service(i) for i in range(self.scn.services))
            n, lk, api = self.scn.services, "ServiceList", "v1"
        else:
            items = (self.raw_slice(i, j) for i in range(self.scn.services) for j in range(len(self.slices[i])))
            n, lk, api = sum(len(r) for r in self.slices), "EndpointSliceList", "discovery.k8s.io/v1"
        pages = []
        page: list[dict] = []
        done = 0
        rv = str(self.rv + n + 1)
        for item in items:
            page.append(item)
            done += 1
            if len(page) == LIST_PAGE or done == n:
                meta = {"resourceVersion": rv}
                if done < n:
                    meta["continue"] = str(len(pages) + 1)
                    meta["remainingItemCount"] = n - done
                pages.append(
                    json.dumps(
                        {"kind": lk, "apiVersion": api, "metadata": meta, "items": page}, separators=(",", ":")
                    ).encode()
                )
                page = []
        if not pages:
            pages.append(
                json.dumps({"kind": lk, "apiVersion": api, "metadata": {"resourceVersion": rv}, "items": []}).encode()
            )
        return pages

    def watch_line(self, i: int, j: int) -> bytes:
        """One line of a watch response: the slice as it is now, MODIFIED."""
        return json.dumps({"type": "MODIFIED", "object": self.raw_slice(i, j)}, separators=(",", ":")).encode()

    def change_plan(self, count: int, seed: int = 5) -> list[tuple[int, int]]:
        """`count` slices to replace one at a time, spread over the cluster."""
        rnd = random.Random(seed)
        return [
            (s, rnd.randrange(len(self.slices[s]))) for s in (rnd.randrange(self.scn.services) for _ in range(count))
        ]

    def rolling_plan(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(self.scn.services) for j in range(len(self.slices[i]))]


NODE_LIST = json.dumps(
    {
        "kind": "NodeList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": "1"},
        "items": [
            {
                "metadata": {
                    "name": NODE,
                    "resourceVersion": "1",
                    "labels": {"kubernetes.io/hostname": NODE, "topology.kubernetes.io/zone": NODE_ZONE},
                },
                "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.10"}]},
            }
        ],
    }
).encode()


# -- statistics -------------------------------------------------------------------


def pct(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def summary(values: list[float]) -> dict:
    v = sorted(values)
    return {
        "n": len(v),
        "p50": pct(v, 50),
        "p99": pct(v, 99),
        "mean": sum(v) / len(v) if v else None,
        "max": v[-1] if v else None,
        "min": v[0] if v else None,
    }


def fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1000:.3g} ms" if s < 0.01 else f"{s * 1000:.0f} ms"
    return f"{s:.2f} s" if s < 100 else f"{s:.0f} s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


# -- packets -------------------------------------------------------------------------


def inet_csum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of data: 0 over data that holds a
    right one."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


# -- the bench's own BPF programs ----------------------------------------------------


def compile_bpf(source: Path, obj: Path) -> Path:
    """Compile one of the bench's BPF programs (scripts/bench/*.bpf.c) with
    the flags the Makefile builds the dataplane with (ebpf/ on the include
    path); returns obj."""
    arch_inc = f"/usr/include/{os.uname().machine}-linux-gnu"
    cmd = [
        os.environ.get("CLANG", "clang"), "-O2", "-g", "-target", "bpf", "-mcpu=v3",
        f"-I{arch_inc}", f"-I{ROOT / 'ebpf'}", "-Wall", "-Werror", "-c", str(source), "-o", str(obj),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return obj


# -- throwaway namespaces ----------------------------------------------------------


def topology_class():
    sys.path.insert(0, str(ROOT))
    from scripts.harness.topo import Topology

    return Topology


@contextlib.contextmanager
def throwaway_netns() -> Iterator[str]:
    """A namespace of our own, deleted on the way out (also on errors and
    SIGTERM, and by scripts/harness/topo.py's atexit backstop)."""
    topo = topology_class()()
    try:
        yield topo.node_ns
    finally:
        topo.cleanup()


def in_netns(ns: str, argv: list[str]) -> list[str]:
    # nsenter, not `ip netns exec`: no /sys remount, and the pid is the tool's.
    return ["nsenter", f"--net=/run/netns/{ns}", "--", *argv]


# -- the machine --------------------------------------------------------------------


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "not found"


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    distro = ""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "distro": distro,
        "python": platform.python_version(),
        "iptables_legacy": tool_version(["iptables-legacy-restore", "--version"]),
        "iptables_nft": tool_version(["iptables-nft-restore", "--version"]),
        "nft": tool_version(["nft", "--version"]),
    }


class LoadMeter:
    """How busy the machine was while the bench ran, and how much of that
    was the bench itself (this process and the children it waited for)."""

    def __init__(self) -> None:
        self.start = self._sample()
        self.loadavg_start = os.getloadavg()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        ticks = os.sysconf("SC_CLK_TCK")
        parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        vals = [int(x) for x in parts]
        idle = vals[3] + vals[4]  # idle + iowait
        busy = sum(vals[:8]) - idle  # user..steal
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        mine = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        return time.monotonic(), busy / ticks, mine

    def report(self) -> dict:
        t1, busy1, mine1 = self._sample()
        t0, busy0, mine0 = self.start
        wall = max(t1 - t0, 1e-9)
        cores = os.cpu_count() or 1
        busy = (busy1 - busy0) / wall
        mine = (mine1 - mine0) / wall
        return {
            "wall_s": wall,
            "cores": cores,
            "busy_cores": busy,
            "bench_cores": min(mine, busy),
            "others_cores": max(0.0, busy - mine),
            "loadavg_start": self.loadavg_start,
            "loadavg_end": os.getloadavg(),
        }


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def scratch_dir() -> Path:
    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"sliceproxy-bench-{os.getpid()}-{secrets.token_hex(2)}"
    d.mkdir(parents=True)
    return d
