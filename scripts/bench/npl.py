#!/usr/bin/env python3
"""Network programming latency on a real API server: sliceproxy and
kube-proxy (iptables and nftables modes) side by side.

A control plane (scripts/harness/controlplane.py: etcd, kube-apiserver,
kube-controller-manager on loopback) holds a scenario written through the
API: S1 (1 Service x 100,000 endpoints in 1,000 slices of 100) or S2
(10,000 Services x 10 endpoints). The Services have no selector and the
slices carry a managed-by label of the bench's own, so the EndpointSlice
controller leaves them to us; every slice write carries the
`endpoints.kubernetes.io/last-change-trigger-time` annotation, RFC 3339
with nanoseconds as the EndpointSlice controller writes it, stamped just
before the write.

Each proxy runs in a network namespace of its own (it reaches the API
server through a port forwarded from that namespace's loopback, and serves
/metrics there), one after the other against the same API server:

  sliceproxy   `sliceproxy run` with its default flags but for the ports,
               the map sizes the scenario needs, a pin dir of its own under
               /sys/fs/bpf, no interface attached and no host-client hooks.
  iptables     kube-proxy --proxy-mode=iptables, built from the same
  nftables     Kubernetes module (`make k8s-node`), default flags but for
               what would touch the machine (conntrack sizing is left
               alone) and the ports. iptables mode finds the legacy
               backend's iptables first on its PATH: the nf_tables
               backend's restore of S1 runs for minutes.

Once the proxy's full sync is done, a rolling update rewrites slices one
after another at a steady rate: each write gives a slice fresh addresses,
one endpoint fewer than it had (so the Service's backend count changes
with every write and a reader of the maps can tell when that write is
programmed), and a fresh trigger time. Before and after, the proxy's
/metrics are read: `kubeproxy_network_programming_duration_seconds` (from
the trigger time to the rules or maps written: both proxies define it the
same way) and `kubeproxy_sync_proxy_rules_duration_seconds` (and the full
sync's). The histograms' buckets are kube-proxy's (0.25 s, 0.5 s, 1 s, ...
for the latency), so their p50/p99 are the upper bound of the bucket the
quantile falls in; their sum / count gives the exact mean.

For sliceproxy the bench also reads the pinned frontend map itself, every
millisecond, and notes when each write's backend count is there: the time
from the trigger time to that moment, per write, is the client-side
figure (its percentiles are exact, within the polling period).

Figures are printed as a table, written as JSON with --json, and plotted
(matplotlib) with --plot. Run by `make bench` (`make bench-npl`) or alone:
    .venv/bin/python scripts/bench/npl.py [--only S1] [--writes 1000] [--rate 20] [--quick]
Needs root, and the binaries of `make k8s-node`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.common import (  # noqa: E402
    CLUSTER_CIDR,
    Cluster,
    LoadMeter,
    Scenario,
    fmt_s,
    ipv4,
    machine,
    progress,
    summary,
    vip,
)
from scripts.harness.controlplane import ControlPlane, k8s_bin_dir, wait_until  # noqa: E402
from scripts.harness.nsforward import pump, setns  # noqa: E402
from scripts.harness.topo import Topology, exit_on_signals  # noqa: E402

NS = "bench-npl"
NODE = "npl-node"
NODE_IP = "198.18.0.10"
MANAGED_BY = "npl-bench.sliceproxy.invalid"
TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"
SLICES = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
# ClusterIPs from here on: 198.19.0.1 is the `kubernetes` Service's.
VIP_OFFSET = 1000
# Inside each proxy's namespace: its own loopback, so the usual ports.
METRICS_PORT = 10249
HEALTHZ_PORT = 10256
POLL_S = 0.001  # how often the bench reads our frontend map

SCENARIOS = {"S1": Scenario("S1", 1, 100_000), "S2": Scenario("S2", 10_000, 10)}
# The smoke size: 10 slices of 100, and 20 Services of 10.
QUICK_SCENARIOS = {"S1": Scenario("S1", 1, 1_000), "S2": Scenario("S2", 20, 10)}
# sliceproxy-msp0: the same agent with --min-sync-period 0, what the
# latency is without any wait between syncs (the default, auto, waits 10
# times what the last sync took; docs/benchmarks.md).
OURS = {"sliceproxy": None, "sliceproxy-msp0": 0.0}
PROXIES = (*OURS, "iptables", "nftables")
TARGET_P99_S = 0.050
NPL = "kubeproxy_network_programming_duration_seconds"
SYNC = "kubeproxy_sync_proxy_rules_duration_seconds"
FULL_SYNC = "kubeproxy_sync_full_proxy_rules_duration_seconds"


def rfc3339nano(ns: int) -> str:
    """Go's time.RFC3339Nano in UTC, as the EndpointSlice controller writes
    the trigger time: nanoseconds with trailing zeros dropped."""
    s, frac = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))
    digits = f"{frac:09d}".rstrip("0")
    return f"{base}.{digits}Z" if digits else f"{base}Z"


# -- reaching into a network namespace ------------------------------------------


def ns_socket(ns_path: str, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket made inside the namespace at ns_path: it binds and
    connects there whatever thread uses it later. Made by a thread of its
    own that enters the namespace and ends, so no thread of the bench
    stays in it."""
    out: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            fd = os.open(ns_path, os.O_RDONLY)
            try:
                setns(fd)
            except OSError as e:
                raise OSError(e.errno, f"setns {ns_path}: {e.strerror}") from None
            finally:
                os.close(fd)
            out.append(socket.socket(family, socket.SOCK_STREAM))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out.append(e)

    t = threading.Thread(target=make, name="setns")
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


class NsForward:
    """The API server's port on the loopback of a proxy's namespace, pumped
    to the same port on the machine's loopback: the proxy uses the
    control plane's kubeconfig as it is. Only loopback on both sides."""

    def __init__(self, ns_path: str, port: int):
        self.port = port
        self.lsock = ns_socket(ns_path)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", port))
        self.lsock.listen(64)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, name=f"nsforward-{port}", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return  # closed
            try:
                up = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                up.settimeout(None)
            except OSError:
                conn.close()
                continue
            self.conns += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    def close(self) -> None:
        for s in (self.lsock, *self.conns):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.thread.join(5)


def scrape(ns_path: str, port: int = METRICS_PORT, timeout: float = 30) -> str:
    """GET /metrics from a server listening on a namespace's loopback."""
    s = ns_socket(ns_path)
    try:
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n")
        chunks = []
        while data := s.recv(262144):
            chunks.append(data)
    finally:
        s.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise RuntimeError(f"GET /metrics on port {port} in {ns_path}: {status.decode(errors='replace')}")
    return body.decode()


# -- Prometheus text ----------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? (\S+)", re.M)


@dataclass
class Histogram:
    buckets: list[tuple[float, float]] = field(default_factory=list)  # (le, cumulative count)
    sum: float = 0.0
    count: float = 0.0

    def minus(self, before: Histogram) -> Histogram:
        old = dict(before.buckets)
        return Histogram(
            [(le, c - old.get(le, 0.0)) for le, c in self.buckets], self.sum - before.sum, self.count - before.count
        )

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket the q-quantile falls in (inf past
        the last bound); None without observations."""
        if self.count <= 0:
            return None
        rank = q * self.count
        for le, c in self.buckets:
            if c >= rank:
                return le
        return math.inf

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None


def _ipv4(labels: str | None) -> bool:
    # kube-proxy runs a proxier per family (series labelled ip_family); the
    # scenarios are IPv4 only. Our agent's series carry no family.
    return 'ip_family="' not in (labels or "") or 'ip_family="IPv4"' in (labels or "")


def gauge(text: str, name: str) -> float | None:
    for m in _SAMPLE.finditer(text):
        if m.group(1) == name and _ipv4(m.group(2)):
            return float(m.group(3))
    return None


def histogram(text: str, name: str) -> Histogram:
    h = Histogram()
    for m in _SAMPLE.finditer(text):
        metric, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if not _ipv4(labels):
            continue
        if metric == f"{name}_bucket":
            le = re.search(r'le="([^"]+)"', labels)
            if le:
                h.buckets.append((float(le.group(1)), value))
        elif metric == f"{name}_sum":
            h.sum = value
        elif metric == f"{name}_count":
            h.count = value
    h.buckets.sort()
    return h


# -- the scenario in the API server ---------------------------------------------------


@dataclass
class Write:
    k: int
    service: int
    slice_name: str
    trigger_ns: int
    count: int  # the Service's ready endpoints once this write is programmed
    done_ns: int = 0  # the API server answered
    seen_ns: int = 0  # the bench saw the count in our frontend map


class Workload:
    """The Services and slices of a scenario as the API server holds them,
    and the rolling update's writes. Addresses come from
    scripts/bench/common.Cluster (198.18.0.0/15, distinct per endpoint)."""

    def __init__(self, cp: ControlPlane, scn: Scenario):
        self.cp, self.scn = cp, scn
        self.cluster = Cluster(scn)
        self.counts = [scn.endpoints] * scn.services
        self.plan = self.cluster.rolling_plan()
        self.cursor = 0

    def vip(self, i: int) -> str:
        return vip(VIP_OFFSET + i)

    def service_body(self, i: int) -> dict:
        # No selector: the EndpointSlice controller leaves its slices alone.
        return {
            "metadata": {"name": Cluster.svc_name(i), "namespace": NS},
            "spec": {
                "clusterIP": self.vip(i),
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            },
        }

    def slice_body(self, i: int, j: int, trigger: str) -> dict:
        s = self.cluster.slices[i][j]
        return {
            "metadata": {
                "name": s.name,
                "namespace": NS,
                "labels": {
                    "kubernetes.io/service-name": Cluster.svc_name(i),
                    "endpointslice.kubernetes.io/managed-by": MANAGED_BY,
                },
                "annotations": {TRIGGER: trigger},
            },
            "addressType": "IPv4",
            "endpoints": [
                {
                    "addresses": [ipv4(a)],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": Cluster.node_of(a),
                }
                for a in s.addrs
            ],
            "ports": [{"name": "http", "protocol": "TCP", "port": s.port}],
        }

    def populate(self, threads: int = 8) -> float:
        """Namespace, Node, Services and slices through the API; returns the
        seconds it took."""
        t0 = time.monotonic()
        self.cp.ok("POST", "/api/v1/namespaces", {"metadata": {"name": NS}})
        self.cp.ok(
            "POST",
            "/api/v1/nodes",
            {"metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}}},
        )
        self.cp.ok(
            "PATCH",
            f"/api/v1/nodes/{NODE}/status",
            {"status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}},
            content_type="application/strategic-merge-patch+json",
        )
        stamp = rfc3339nano(time.time_ns())
        with ThreadPoolExecutor(threads) as pool:
            list(
                pool.map(
                    lambda i: self.cp.ok("POST", f"/api/v1/namespaces/{NS}/services", self.service_body(i)),
                    range(self.scn.services),
                )
            )
            list(pool.map(lambda ij: self.cp.ok("POST", SLICES, self.slice_body(*ij, stamp)), self.plan))
        return time.monotonic() - t0

    def write_next(self, k: int, announce: Callable[[Write], None] | None = None) -> Write:
        """Replace the next slice of the rolling update: fresh addresses,
        one endpoint fewer (at least one), a fresh trigger time, written
        with PUT as the EndpointSlice controller updates a slice."""
        i, j = self.plan[self.cursor % len(self.plan)]
        self.cursor += 1
        s = self.cluster.slices[i][j]
        before = len(s.addrs)
        n = max(1, before - 1)
        s.port, s.addrs = self.cluster._alloc(n)
        s.generation += 1
        self.counts[i] += n - before
        w = Write(k, i, s.name, time.time_ns(), self.counts[i])
        if announce is not None:
            announce(w)  # before the write: a reader of the maps may see it at once
        self.cp.ok("PUT", f"{SLICES}/{s.name}", self.slice_body(i, j, rfc3339nano(w.trigger_ns)))
        w.done_ns = time.time_ns()
        return w

    def rolling_update(self, writes: int, rate: float, on_write: Callable[[Write], None] | None = None) -> dict:
        """`writes` slice writes at `rate` a second (each starts on its
        tick; a write that overruns delays the next, never skips it)."""
        out = []
        t0 = time.monotonic()
        for k in range(writes):
            delay = t0 + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            out.append(self.write_next(k, on_write))
        took = time.monotonic() - t0
        return {"writes": out, "seconds": took, "rate": writes / took if took > 0 else float("nan")}


# -- the proxies -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Proxy:
    """One proxy in a network namespace of its own, reaching the API
    server through NsForward; its log in workdir."""

    name = ""

    def __init__(self, cp: ControlPlane, wl: Workload, workdir: Path):
        self.cp, self.wl, self.workdir = cp, wl, workdir
        self.topo = Topology()
        self.ns_path = self.topo.ns_path("node")
        self.forward: NsForward | None = None
        self.proc: subprocess.Popen | None = None
        self.log = workdir / f"{self.name}-{wl.scn.key}.log"
        self.env: dict[str, str] | None = None  # the caller's

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        # The Node's address on the namespace's loopback: the proxy's node IP
        # is then one of its own, as on a real node.
        subprocess.run(["ip", "-n", self.topo.node_ns, "addr", "add", f"{NODE_IP}/32", "dev", "lo"], check=True)
        self.forward = NsForward(self.ns_path, int(self.cp.server.rsplit(":", 1)[1]))
        with open(self.log, "ab") as out:
            self.proc = self.topo.run_in("node", self.argv(), stdout=out, stderr=subprocess.STDOUT, env=self.env)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}; the end of its log:\n{tail}")

    def metrics(self) -> str:
        self.check_alive()
        return scrape(self.ns_path)

    def synced(self) -> bool:
        """The full sync of everything the API server holds is done."""
        raise NotImplementedError

    def caught_up(self, writes: list[Write]) -> bool:
        """Every write of the rolling update is programmed."""
        raise NotImplementedError

    def stop(self) -> None:
        try:
            if self.proc is not None:
                self.topo.stop(self.proc, timeout=15)
        finally:
            if self.forward is not None:
                self.forward.close()
            self.topo.cleanup()


class Ours(Proxy):
    def __init__(self, cp: ControlPlane, wl: Workload, workdir: Path, name: str = "sliceproxy"):
        self.name = name
        self.min_sync_period = OURS[name]
        super().__init__(cp, wl, workdir)
        self.pin_dir = Path("/sys/fs/bpf") / f"sliceproxy-bench-{self.topo.prefix}"
        self.svc_map = None
        self.keys: dict[int, bytes] = {}
        self.pending: list[Write] = []
        self.lock = threading.Lock()
        self.poll_stop = threading.Event()
        self.poller: threading.Thread | None = None

    def flags(self) -> list[str]:
        """`sliceproxy run`'s defaults but for where it listens, pins and
        attaches, and map sizes an operator would give for the scenario
        (replaced backends stay for the drain period: up to twice the
        endpoints, as scripts/bench/ours.py sizes them)."""
        from ctrl.dataplane.abi import MapSizes

        scn = self.wl.scn
        d = MapSizes()
        need_be = 2 * scn.total + 400 * scn.slice_size
        sizes = {
            "--max-services": max(d.services, 1 << int(scn.services * 1.1).bit_length()),
            "--max-backends": d.backends if need_be <= d.backends else 1 << need_be.bit_length(),
            "--max-slots": d.slots if scn.total * 1.05 <= d.slots else 1 << int(scn.total * 1.05).bit_length(),
        }
        defaults = {"--max-services": d.services, "--max-backends": d.backends, "--max-slots": d.slots}
        out = [
            "--kubeconfig", self.cp.kubeconfig,
            "--node-name", NODE,
            "--pin-dir", str(self.pin_dir),
            # Never the machine's root cgroup; no interface gets the program.
            "--host-clients", "off",
            "--metrics-bind-address", f"127.0.0.1:{METRICS_PORT}",
            "--healthz-bind-address", f"127.0.0.1:{HEALTHZ_PORT}",
        ]  # fmt: skip
        for flag, v in sizes.items():
            if v != defaults[flag]:
                out += [flag, str(v)]
        if self.min_sync_period is not None:
            out += ["--min-sync-period", f"{self.min_sync_period:g}"]
        return out

    def argv(self) -> list[str]:
        return [str(Path(sys.executable).parent / "sliceproxy"), "run", *self.flags()]

    def _count(self, i: int) -> int | None:
        from ctrl.dataplane import abi
        from ctrl.dataplane.maps import Map
        from ctrl.util.addrs import addr16

        if self.svc_map is None:
            path = self.pin_dir / abi.map_name("sp_svc")
            if not path.exists():
                return None
            self.svc_map = Map.open_pinned(str(path))
        key = self.keys.get(i)
        if key is None:
            key = abi.pack("sp_svc_key", addr=addr16(self.wl.vip(i)), port=80, proto=6, scope=abi.SCOPE_INTERNAL)
            self.keys[i] = key
        raw = self.svc_map.lookup(key)
        return None if raw is None else abi.unpack("sp_svc_val", raw)["count"]

    def synced(self) -> bool:
        self.check_alive()
        counts = self.wl.counts
        return all(self._count(i) == counts[i] for i in range(len(counts)))

    def announce(self, w: Write) -> None:
        with self.lock:
            self.pending.append(w)

    def _poll(self) -> None:
        # Counts only go down during the rolling update (one endpoint fewer
        # a write), so a write is programmed once its Service's count is at
        # most what that write left.
        while not self.poll_stop.is_set():
            with self.lock:
                pending = list(self.pending)
            seen = []
            now = 0
            for w in pending:
                c = self._count(w.service)
                if c is not None and c <= w.count:
                    now = now or time.time_ns()
                    w.seen_ns = now
                    seen.append(w)
            if seen:
                with self.lock:
                    self.pending = [w for w in self.pending if w.seen_ns == 0]
            time.sleep(POLL_S)

    def start_polling(self) -> None:
        self.poller = threading.Thread(target=self._poll, name="map-poller", daemon=True)
        self.poller.start()

    def caught_up(self, writes: list[Write]) -> bool:
        self.check_alive()
        return all(w.seen_ns for w in writes)

    def stop(self) -> None:
        self.poll_stop.set()
        if self.poller is not None:
            self.poller.join(5)
        if self.svc_map is not None:
            self.svc_map.close()
        try:
            super().stop()
        finally:
            shutil.rmtree(self.pin_dir, ignore_errors=True)


class KubeProxy(Proxy):
    def __init__(self, cp: ControlPlane, wl: Workload, workdir: Path, mode: str):
        self.mode = mode
        self.name = mode
        super().__init__(cp, wl, workdir)
        self.last_write_s = 0.0

    def flags(self) -> list[str]:
        return [
            f"--kubeconfig={self.cp.kubeconfig}",
            f"--hostname-override={NODE}",
            f"--proxy-mode={self.mode}",
            f"--cluster-cidr={CLUSTER_CIDR}",
            f"--metrics-bind-address=127.0.0.1:{METRICS_PORT}",
            f"--healthz-bind-address=127.0.0.1:{HEALTHZ_PORT}",
            # The conntrack table's size is machine-wide: leave it (and the
            # timeouts) as they are.
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
            "--v=1",
        ]

    def argv(self) -> list[str]:
        return [str(k8s_bin_dir() / "kube-proxy"), *self.flags()]

    def start(self) -> None:
        if self.mode == "iptables":
            self._legacy_path()
        super().start()

    def _legacy_path(self) -> None:
        """kube-proxy runs `iptables`, `iptables-save` and `iptables-restore`
        (and the ip6 ones) from PATH. The legacy backend's, as the restore
        figures of scripts/bench/iptables.py: the nf_tables backend's restore
        of S1's table runs for minutes (docs/benchmarks.md)."""
        d = self.workdir / "legacy-bin"
        d.mkdir(exist_ok=True)
        for fam in ("iptables", "ip6tables"):
            for suffix in ("", "-save", "-restore"):
                target = shutil.which(f"{fam}-legacy{suffix}")
                if target is None:
                    raise RuntimeError(f"{fam}-legacy{suffix} not found (scripts/install-deps.sh installs iptables)")
                link = d / f"{fam}{suffix}"
                if not link.exists():
                    link.symlink_to(target)
        self.env = dict(os.environ, PATH=f"{d}:{os.environ.get('PATH', '')}")

    def _settled(self, seen_after_s: float) -> bool:
        """A sync ended after the last change this family's proxier
        queued, and that change was queued after seen_after_s (the last
        write's trigger time: kube-proxy has it). Not the pending gauges:
        they carry no family, and the IPv6 proxier's syncs set them to 0
        while the IPv4 one has changes waiting."""
        text = self.metrics()
        last = gauge(text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") or 0.0
        queued = gauge(text, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") or 0.0
        return last > 0 and last >= queued >= seen_after_s

    def synced(self) -> bool:
        # kube-proxy's first sync waits for its Service and EndpointSlice
        # informers to have listed everything.
        return self._settled(0.0)

    def caught_up(self, writes: list[Write]) -> bool:
        return self._settled(max(w.trigger_ns for w in writes) / 1e9) if writes else True


# -- one proxy, one scenario ------------------------------------------------------------


def figures(h: Histogram) -> dict:
    finite = [le for le, _ in h.buckets if not math.isinf(le)]
    return {
        "count": h.count,
        "p50_le_s": h.quantile(0.5),
        "p99_le_s": h.quantile(0.99),
        "mean_s": h.mean,
        "top_bound_s": finite[-1] if finite else None,  # a quantile past it is inf
    }


def run_proxy(proxy: Proxy, writes: int, rate: float, timeout: float) -> dict:
    wl = proxy.wl
    out: dict = {"proxy": proxy.name, "argv": proxy.argv()[1:]}
    t0 = time.monotonic()
    proxy.start()
    try:
        wait_until(proxy.synced, timeout, interval=0.2, what=f"{proxy.name}'s full sync of {wl.scn.key}")
        out["start_to_synced_s"] = time.monotonic() - t0
        text = proxy.metrics()
        full = histogram(text, FULL_SYNC)
        if full.count == 0:  # a proxier without the full/partial split
            full = histogram(text, SYNC)
        out["full_sync"] = {"count": full.count, "mean_s": full.mean}
        npl0, sync0 = histogram(text, NPL), histogram(text, SYNC)
        assert proxy.proc is not None
        cpu0 = cpu_seconds(proxy.proc.pid)
        if isinstance(proxy, Ours):
            proxy.start_polling()
            announce: Callable[[Write], None] | None = proxy.announce
        else:
            announce = None
        progress(f"{wl.scn.key} {proxy.name}: synced; rolling update of {writes} slice writes at {rate:g}/s")
        ru = wl.rolling_update(writes, rate, announce)
        done: list[Write] = ru["writes"]
        wait_until(lambda: proxy.caught_up(done), timeout, interval=0.1, what=f"{proxy.name} programming every write")
        # Each write's trigger time is observed by the sync that wrote it
        # (both proxies keep every trigger time of a Service's slices until
        # a sync): wait for the histogram to hold them all. A sync that
        # began before the last write may end after it, which the
        # timestamps alone do not tell.
        wait_until(
            lambda: histogram(proxy.metrics(), NPL).count - npl0.count >= writes,
            timeout,
            what=f"{proxy.name}'s latency histogram holding every write",
        )
        out["cpu_s"] = cpu_seconds(proxy.proc.pid) - cpu0
        text = proxy.metrics()
        out["npl"] = figures(histogram(text, NPL).minus(npl0))
        out["sync"] = figures(histogram(text, SYNC).minus(sync0))
        out["writes"] = writes
        out["write_rate"] = ru["rate"]
        out["api_write_ms"] = summary([(w.done_ns - w.trigger_ns) / 1e6 for w in done])
        if isinstance(proxy, Ours):
            out["programmed_writes"] = sum(1 for w in done if w.seen_ns)
            out["client"] = summary([(w.seen_ns - w.trigger_ns) / 1e9 for w in done if w.seen_ns])
            out["client_samples_s"] = [(w.seen_ns - w.trigger_ns) / 1e9 for w in done if w.seen_ns]
    finally:
        proxy.stop()
    return out


def run_scenario(
    scn: Scenario,
    writes: int,
    rate: float,
    proxies: Iterable[str],
    timeout: float = 900,
    cp: ControlPlane | None = None,
    logs: Path | None = None,
) -> dict:
    """Populate a control plane with `scn` and run each proxy's rolling
    update against it in turn; a fresh control plane unless one is given."""
    own = cp is None
    if cp is None:
        cp = ControlPlane()
        cp.start()
    workdir = Path(tempfile.mkdtemp(prefix=f"sliceproxy-npl-{scn.key}-"))
    res: dict = {"scenario": scn.key, "label": scn.label, "total": scn.total, "slices": scn.slices, "proxies": {}}
    try:
        wl = Workload(cp, scn)
        progress(f"{scn.key}: writing {scn.services:,} Services and {scn.slices:,} slices through the API")
        res["populate_s"] = wl.populate()
        for name in proxies:
            load = LoadMeter()
            proxy: Proxy = Ours(cp, wl, workdir, name) if name in OURS else KubeProxy(cp, wl, workdir, name)
            try:
                res["proxies"][name] = run_proxy(proxy, writes, rate, timeout)
                # How busy the machine was meanwhile (the bench, the API
                # server and the proxy included): the figures are wall-clock.
                res["proxies"][name]["load"] = load.report()
            except Exception as e:  # noqa: BLE001 - one proxy's failure is reported, the others still run
                progress(f"{scn.key} {name} failed: {e}")
                res["proxies"][name] = {"proxy": name, "error": str(e)[-2000:]}
    finally:
        if own:
            cp.stop()
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            for f in workdir.glob("*.log"):
                shutil.copy(f, logs / f.name)
        shutil.rmtree(workdir, ignore_errors=True)
    return res


# -- output -------------------------------------------------------------------------------


def _le(h: dict, key: str) -> str:
    v = h.get(key)
    if v is None:
        return "-"
    return f"> {fmt_s(h.get('top_bound_s'))}" if math.isinf(v) else f"<= {fmt_s(v)}"


def report(results: list[dict]) -> str:
    lines = [
        "network programming latency on a real API server: trigger time to rules/maps written",
        f"{'scenario':9} {'proxy':15} {'full sync':>10} {'NPL p50':>11} {'NPL p99':>11} {'NPL mean':>9} "
        f"{'exact p50':>9} {'exact p99':>9} {'sync p50':>11} {'sync p99':>11} {'sync mean':>9} {'CPU s':>6}",
    ]
    for r in results:
        for name, p in r["proxies"].items():
            if "error" in p:
                lines.append(f"{r['scenario']:9} {name:15} failed: {p['error'].splitlines()[0][:90]}")
                continue
            c = p.get("client") or {}
            lines.append(
                f"{r['scenario']:9} {name:15} {fmt_s(p['full_sync']['mean_s']):>10} "
                f"{_le(p['npl'], 'p50_le_s'):>11} {_le(p['npl'], 'p99_le_s'):>11} {fmt_s(p['npl']['mean_s']):>9} "
                f"{fmt_s(c.get('p50')):>9} {fmt_s(c.get('p99')):>9} "
                f"{_le(p['sync'], 'p50_le_s'):>11} {_le(p['sync'], 'p99_le_s'):>11} {fmt_s(p['sync']['mean_s']):>9} "
                f"{p['cpu_s']:>6.1f}"
            )
    lines.append(
        "NPL p50/p99 and sync p50/p99: upper bounds of kube-proxy's histogram buckets (0.25 s, 0.5 s, 1 s, ... "
        "and 1 ms doubling); means: the histogram's sum / count; exact: the bench reading our frontend map "
        f"every {POLL_S * 1000:g} ms (target p99 <= {fmt_s(TARGET_P99_S)})"
    )
    for r in results:
        for name in OURS:
            ours = r["proxies"].get(name) or {}
            if "client" in ours:
                p99 = ours["client"]["p99"]
                met = "met" if p99 <= TARGET_P99_S else "missed"
                lines.append(
                    f"{r['scenario']} {name}: {ours['writes']} writes at {ours['write_rate']:.1f}/s, "
                    f"{ours['programmed_writes']} programmed; p99 {fmt_s(p99)}: target {met}"
                )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> bool:
    """Per scenario, each proxy's network programming latency (mean, and
    the histograms' p99 bound; ours also exact); ours as a CDF beside it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    names = [n for n in PROXIES if any(n in r["proxies"] and "npl" in r["proxies"][n] for r in results)]
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        xs, means, p99s = [], [], []
        for x, r in enumerate(results):
            p = r["proxies"].get(name) or {}
            if "npl" not in p:
                continue
            xs.append(x + (k - (len(names) - 1) / 2) * width)
            means.append(p["npl"]["mean_s"] or 0)
            p99 = p["client"]["p99"] if "client" in p else p["npl"]["p99_le_s"]
            p99s.append(p99 if p99 is not None and not math.isinf(p99) else 0)
        color = f"C{PROXIES.index(name)}"
        ax.bar(xs, means, width, label=f"{name} mean", color=color)
        ax.scatter(xs, p99s, marker="_", s=400, color=color)
    ax.axhline(TARGET_P99_S, color="grey", linestyle="--", linewidth=1, label="target p99 50 ms")
    ax.set_yscale("log")
    heights = [b.get_height() for b in ax.patches if b.get_height() > 0] + [TARGET_P99_S]
    ax.set_ylim(min(heights) / 3, max(heights) * 100)  # room for the legend above the bars
    ax.set_xticks(range(len(results)), [f"{r['scenario']}: {r['label']}" for r in results])
    ax.set_ylabel("seconds, trigger time to programmed")
    ax.set_title("network programming latency (bar: mean; dash: p99)")
    ax.legend(fontsize=8, ncol=2, loc="upper left")
    ax = axes[1]
    for r in results:
        for name in OURS:
            samples = sorted((r["proxies"].get(name) or {}).get("client_samples_s") or [])
            if samples:
                ys = [(i + 1) / len(samples) for i in range(len(samples))]
                style = "-" if r is results[0] else "--"
                ax.plot(
                    [s * 1000 for s in samples], ys, style, color=f"C{PROXIES.index(name)}",
                    label=f"{r['scenario']} {name}",
                )  # fmt: skip
    ax.axvline(TARGET_P99_S * 1000, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("ms, trigger time to the count in our frontend map")
    ax.set_ylabel("fraction of writes")
    ax.set_title("sliceproxy, per write (read from the map)")
    if ax.get_lines()[1:]:  # beyond the target line
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="scenario (repeatable; default all)")
    ap.add_argument("--proxies", default=",".join(PROXIES), help=f"comma-separated, of {', '.join(PROXIES)}")
    # 1,400 writes at 20/s: 70 s, so each run holds one of our agent's
    # periodic full reconciles (--sync-period, 60 s by default) as a
    # cluster-day would.
    ap.add_argument("--writes", type=int, default=1400, help="slice writes of the rolling update per proxy")
    ap.add_argument("--rate", type=float, default=20.0, help="slice writes a second (default 20)")
    ap.add_argument("--quick", action="store_true", help="the smoke size: 10 slices, 20 writes")
    ap.add_argument("--timeout", type=float, default=900, help="per wait (a full sync, catching up), seconds")
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    ap.add_argument("--logs", metavar="DIR", help="keep each proxy's log here")
    ap.add_argument("--plot", metavar="FILE", default=str(ROOT / "build" / "npl.png"), help="the plot (PNG)")
    ap.add_argument(
        "--from-json", metavar="FILE", nargs="+",
        help="print the table and draw the plot of earlier --json runs (a proxy of a later file replaces the "
        "same proxy of an earlier one: e.g. ours from one run, the peers from another); with --json, write them as one",
    )  # fmt: skip
    a = ap.parse_args(argv)
    if a.from_json:
        merged: dict[str, dict] = {}
        for f in a.from_json:
            for r in json.loads(Path(f).read_text())["scenarios"]:
                into = merged.setdefault(r["scenario"], {**r, "proxies": {}})
                into["proxies"].update(r["proxies"])
        results = [merged[k] for k in sorted(merged)]
        for r in results:  # the proxies in the usual order
            r["proxies"] = {n: r["proxies"][n] for n in PROXIES if n in r["proxies"]}
        print(report(results))
        if a.json:
            Path(a.json).write_text(json.dumps({"merged_from": a.from_json, "scenarios": results}, indent=2))
        if a.plot and plot(results, Path(a.plot)):
            print(f"plot: {a.plot}")
        return 0
    exit_on_signals()  # SIGTERM too stops the proxies and removes their namespaces
    table = QUICK_SCENARIOS if a.quick else SCENARIOS
    writes = 20 if a.quick else a.writes
    proxies = [p for p in a.proxies.split(",") if p]
    for p in proxies:
        if p not in PROXIES:
            ap.error(f"--proxies: unknown proxy {p!r}")
    logs = Path(a.logs) if a.logs else None
    results = [run_scenario(table[k], writes, a.rate, proxies, a.timeout, logs=logs) for k in (a.only or sorted(table))]
    print(report(results))
    if a.plot and plot(results, Path(a.plot)):
        print(f"plot: {a.plot}")
    if a.json:
        doc = {"machine": machine(), "rate": a.rate, "writes": writes, "scenarios": results}
        Path(a.json).write_text(json.dumps(doc, indent=2))
    return 0 if all("error" not in p for r in results for p in r["proxies"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
