"""First-packet latency of new TCP connections through a ClusterIP, between
network namespaces (scripts/harness/topo.py: a node and two pods on veths),
from a pod and from a host client.

For each dataplane and each number of Services (10 and 10,000, 10
endpoints each), a fresh topology: a client pod, a backend pod listening on
8080-8089, and the node between them. The Service under test is the one in
the middle of the list; its 10 endpoints are the backend pod's 10 ports, the
other Services' endpoints are addresses nobody answers (never used).

Then S1's shape: 1 Service of WIDE (100,000) endpoints, every one of them
answering: the backend pod holds WIDE_NET as a local route (any address in
it is its own) and listens on all 10 ports, and the endpoints are WIDE / 10
of those addresses times the 10 ports. A new connection's cost then includes
what each dataplane pays to pick one of 100,000: ours a random slot, the
iptables ruleset a walk down a probability chain of one rule per endpoint,
the nftables ruleset a numgen map.

  direct     client -> backend pod address, no Service: the floor
  ours       the tc program attached to the node side of the pods' veths,
             its maps written with ctrl.model.plan and ctrl.dataplane, from a process
             started in the node namespace (nsenter), as the agent runs
  iptables   kube-proxy's iptables ruleset (scripts/bench/iptables.py)
             restored with iptables-legacy-restore into the node namespace,
             where the pods' packets meet nat PREROUTING
  nftables   kube-proxy's nftables ruleset (scripts/bench/nft.py)

The client pod times connect() (SYN out, SYN-ACK back, through the NAT both
ways) over N new connections, after 20 not counted.

Then, in the same topology, a host client: a process in the node
namespace, in a cgroup v2 directory the bench makes for the run (never the
machine's root cgroup), times connect(), one byte echoed and close() over N
new connections to the same Service (direct: to the backend pod). Ours
serves it with the cgroup socket programs (ebpf/host_sock.c), which the
attach worker attaches to that cgroup; the peers with their rulesets' nat
OUTPUT hooks (iptables' OUTPUT -> KUBE-SERVICES, nftables' nat-output
chain), where kube-proxy meets locally generated traffic. The node's own
address (NODE_IP) is outside the cluster CIDR, as a node's is, so the peers
mark it for masquerade as kube-proxy does. The node routes the Service
range to an interface of its own that leads nowhere (a bridge without
ports), as a node's default route would take it: the peers need a route
before their OUTPUT DNAT re-routes the packet to the backend; nothing is
ever sent there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import iptables, nft
from .common import ROOT, Cluster, Scenario, progress, summary, topology_class, vip

CLIENT_IP = "198.18.255.2"
BACKEND_IP = "198.18.255.3"
BACKEND_PORTS = list(range(8080, 8090))
CONNECT_PY = Path(__file__).resolve().parent / "connect.py"
# The node's own address: in the test range, outside common.CLUSTER_CIDR
# and above the ClusterIPs (common.vip), on the interface SERVICE_RANGE is
# routed to.
NODE_IP = "198.19.255.254"
SERVICE_RANGE = "198.19.0.0/16"
# The wide Service's endpoints: addresses of this network, all the backend
# pod's own (a local route), away from the pods' 198.18.255.x and the
# gateway 198.18.0.1.
WIDE_NET = "198.18.128.0/18"
WIDE = 100_000


def _cluster(nsvc: int) -> tuple[Cluster, int]:
    cl = Cluster(Scenario("L", nsvc, 10))
    return cl, nsvc // 2


def _backend_eps() -> list[tuple[str, int]]:
    return [(BACKEND_IP, p) for p in BACKEND_PORTS]


def wide_eps(n: int) -> list[tuple[str, int]]:
    """n endpoints in WIDE_NET: n/10 addresses (.1-.254 of each /24) times
    the backend pod's 10 ports."""
    per = len(BACKEND_PORTS)
    out = []
    for i in range(n):
        a = i // per
        out.append((f"198.18.{128 + a // 254}.{1 + a % 254}", BACKEND_PORTS[i % per]))
    return out


class _Bench:
    """The topology (client and backend pods, the node with its address and
    route) and the host client's cgroup; cleanup() removes both, also after
    a failure."""

    def __init__(self, wide: bool = False) -> None:
        from scripts.harness.cgroup import TestCgroup
        from scripts.harness.topo import wait_for_line

        self.topo = topology_class()()
        self.cgroup: TestCgroup | None = None
        try:
            # Named after the topology: a killed run's cgroup is removed by
            # the harness's stale cleanup, as its namespaces are.
            self.cgroup = TestCgroup(self.topo.prefix)
            self.topo.add_pod("client", CLIENT_IP)
            backend = self.topo.add_pod("backend", BACKEND_IP)
            if wide:
                # Every address of WIDE_NET is the backend pod's own, and
                # the node routes WIDE_NET to the backend pod's address: one
                # neighbour entry. (A route on the link itself would want
                # one per address; past the neighbour table's gc_thresh3,
                # 1,024 by default, connections then fail.)
                self.topo.exec_in("backend", ["ip", "route", "add", "local", WIDE_NET, "dev", "lo"], check=True)
                self.topo.exec_in(
                    "node", ["ip", "route", "add", WIDE_NET, "via", BACKEND_IP, "dev", backend.host_if], check=True
                )
            # A bridge without ports: what is sent there goes nowhere (a
            # dummy interface would do, but not every kernel has the driver).
            sink = f"{self.topo.prefix}s0"
            for cmd in (
                ["link", "add", sink, "type", "bridge"],
                ["link", "set", sink, "up"],
                ["addr", "add", f"{NODE_IP}/32", "dev", sink],
                ["route", "add", SERVICE_RANGE, "dev", sink, "src", NODE_IP],
            ):
                self.topo.exec_in("node", ["ip", *cmd], check=True)
            proc = self.topo.run_in(
                "backend",
                [sys.executable, str(CONNECT_PY), "serve", "--ports", f"{BACKEND_PORTS[0]}-{BACKEND_PORTS[-1]}"],
                stdout=subprocess.PIPE,
            )
            wait_for_line(proc, "ready", 10, what="latency server")
        except BaseException:
            self.cleanup()
            raise

    def cleanup(self) -> None:
        # The topology first: its processes (the attach worker, which holds
        # the cgroup's links) end before the cgroup is removed.
        try:
            self.topo.cleanup()
        finally:
            if self.cgroup is not None:
                self.cgroup.cleanup()

    def measure(self, target: str, count: int, host: bool) -> dict:
        """N new connections to target from the client pod, or (host) from
        the node namespace in the cgroup: connect, echo, close."""
        argv = [sys.executable, str(CONNECT_PY), "connect", "--target", target, "--count", str(count)]
        if host:
            assert self.cgroup is not None
            argv += ["--echo", "--cgroup", str(self.cgroup.path)]
        cp = self.topo.exec_in("node" if host else "client", argv, timeout=300)
        who = "host client" if host else "latency client"
        if cp.returncode != 0:
            raise RuntimeError(f"{who} failed: {cp.stderr.strip()[-500:]}")
        r = json.loads(cp.stdout)
        if r["errors"]:
            raise RuntimeError(f"{who}: {r['errors']} of {count} connections to {target} failed: {r['error_samples']}")
        out = {"connect_us": summary(r["connect_us"]), "ttfb_us": summary(r["ttfb_us"]), "backends": r["backends"]}
        if host:
            out |= {"echo_us": summary(r["echo_us"]), "total_us": summary(r["total_us"])}
        return out

    def both(self, target: str, count: int, host_count: int) -> dict:
        """The pod's figure, then the host client's, in this topology."""
        return {"pod": self.measure(target, count, host=False), "host": self.measure(target, host_count, host=True)}


def run_direct(count: int, host_count: int) -> dict:
    bench = _Bench()
    try:
        return bench.both(f"{BACKEND_IP}:{BACKEND_PORTS[0]}", count, host_count)
    finally:
        bench.cleanup()


def run_iptables(nsvc: int, count: int, host_count: int, wide: int = 0) -> dict:
    """wide: 1 Service of that many endpoints instead (nsvc is ignored)."""
    cl, k = _cluster(1 if wide else nsvc)
    rs = iptables.Ruleset(cl)
    rs.eps[k] = [f"{a}:{p}" for a, p in (wide_eps(wide) if wide else _backend_eps())]
    bench = _Bench(wide=bool(wide))
    try:
        with tempfile.TemporaryDirectory(prefix="sliceproxy-bench-") as td:
            for name, text in (("setup", iptables.SETUP), ("full", rs.render())):
                p = Path(td) / name
                p.write_text(text)
                if iptables.restore("iptables-legacy-restore", bench.topo.node_ns, str(p), 300) is None:
                    raise RuntimeError("iptables-legacy-restore timed out")
        return bench.both(f"{vip(k)}:80", count, host_count)
    finally:
        bench.cleanup()


def run_nft(nsvc: int, count: int, host_count: int, timeout: float, wide: int = 0) -> dict | None:
    cl, k = _cluster(1 if wide else nsvc)
    rs = nft.Ruleset(cl)
    rs.eps[k] = wide_eps(wide) if wide else _backend_eps()
    bench = _Bench(wide=bool(wide))
    try:
        with tempfile.TemporaryDirectory(prefix="sliceproxy-bench-") as td:
            p = Path(td) / "full.nft"
            p.write_text(rs.render_full())
            if nft.load(bench.topo.node_ns, str(p), timeout) is None:
                return None
        return bench.both(f"{vip(k)}:80", count, host_count)
    finally:
        bench.cleanup()


def run_ours(nsvc: int, count: int, host_count: int, wide: int = 0) -> dict:
    bench = _Bench(wide=bool(wide))
    try:
        assert bench.cgroup is not None
        proc = bench.topo.run_in(
            "node",
            [
                sys.executable,
                str(ROOT / "scripts" / "bench.py"),
                "--worker",
                "attach",
                "--services",
                str(1 if wide else nsvc),
                "--wide",
                str(wide),
                "--interfaces",
                bench.topo.iface_glob,
                "--cgroup",
                str(bench.cgroup.path),
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
        )
        from scripts.harness.topo import wait_for_line

        wait_for_line(proc, "ready", 120, what="sliceproxy dataplane in the node namespace")
        _, k = _cluster(1 if wide else nsvc)
        return bench.both(f"{vip(k)}:80", count, host_count)
    finally:
        bench.cleanup()


def attach_main(argv: list[str]) -> int:
    """`bench.py --worker attach`: in the node namespace (started there by
    nsenter: ctrl.dataplane.attach works on the current one), load the program, write
    the maps for nsvc Services and attach to the pods' veths; with --cgroup,
    also serve host clients in that cgroup (as `sliceproxy run --cgroup`,
    but by links this process holds rather than pins: they go with it);
    print ready; stay until stdin closes or SIGTERM (the topology's cleanup)."""
    import argparse

    ap = argparse.ArgumentParser(prog="bench.py --worker attach")
    ap.add_argument("--services", type=int, required=True)
    ap.add_argument("--wide", type=int, default=0, help="the Service under test has this many endpoints (wide_eps)")
    ap.add_argument("--interfaces", required=True)
    ap.add_argument("--cgroup", help="cgroup v2 directory to attach the host clients' programs to")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from ctrl.dataplane import attach, hostclients, loader
    from ctrl.dataplane.abi import MapSizes
    from ctrl.dataplane.apply import Writer
    from ctrl.dataplane.programmed import Programmed
    from ctrl.k8s.objects import parse
    from ctrl.model.plan import plan_service

    cl, k = _cluster(a.services)
    desired = {}
    for i in range(a.services):
        svc = parse({"kind": "Service", **cl.raw_service(i)})
        if i == k:
            # One slice per port (a slice has one port set), at most 100
            # endpoints each, as the EndpointSlice controller packs them.
            by_port: dict[int, list[str]] = {}
            for ip, p in wide_eps(a.wide) if a.wide else _backend_eps():
                by_port.setdefault(p, []).append(ip)
            slices = [
                parse(
                    {
                        "kind": "EndpointSlice",
                        "metadata": {
                            "name": f"real-{p}-{j}",
                            "namespace": "bench",
                            "labels": {"kubernetes.io/service-name": svc.name},
                        },
                        "addressType": "IPv4",
                        "ports": [{"name": "http", "port": p}],
                        "endpoints": [{"addresses": [ip]} for ip in ips[j : j + 100]],
                    }
                )
                for p, ips in by_port.items()
                for j in range(0, len(ips), 100)
            ]
        else:
            slices = [parse({"kind": "EndpointSlice", **cl.raw_slice(i, j)}) for j in range(len(cl.slices[i]))]
        desired[svc.key] = plan_service(svc, slices)[0]
    sizes = MapSizes()
    dp = loader.load(pin_dir=None, sizes=sizes, host_clients=a.cgroup is not None)
    cs = Programmed(sizes).sync(desired)
    Writer(dp.maps).apply(cs)
    names = attach.match_interfaces([a.interfaces])
    if len(names) < 2:
        raise SystemExit(f"attach worker: expected the pods' veths matching {a.interfaces}, found {names}")
    egress = getattr(dp, "egress_fd", None)  # reverse NAT at the pods' egress, where the product has it
    for n in names:
        if egress is not None:
            attach.attach(n, dp.prog_fd, egress)
        else:
            attach.attach(n, dp.prog_fd)
    links = []  # held open: a link stays attached while its fd does
    if a.cgroup is not None:
        hostclients.check_cgroup(a.cgroup)
        hostclients.write_host_config(dp.maps, hostclients.netns_cookie())
        cg_fd = os.open(a.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name, (fd, attach_type) in dp.host_progs.items():
                links.append(hostclients.create_link(fd, attach_type, cg_fd, f"{name} to {a.cgroup}"))
        finally:
            os.close(cg_fd)
    print("ready", flush=True)
    sys.stdin.read()
    return 0


def measure(
    sizes: list[int], count: int, host_count: int, nft_timeout: float, errors: list[str], wide: int = 0
) -> dict:
    """Every condition in its own topology, the pod's figure and the host
    client's from it (the host's under "host", shaped as the pod's); one
    that fails is reported in `errors` and left out (None), the others
    still run."""
    out: dict = {"count": count, "services": sizes, "wide": wide, "direct": None, "ours": {}, "iptables": {}, "nft": {}}
    host: dict = {
        "count": host_count, "services": sizes, "wide": wide, "direct": None, "ours": {}, "iptables": {}, "nft": {},
    }  # fmt: skip
    out["host"] = host

    def one(what: str, fn) -> tuple[dict | None, dict | None]:
        progress(f"latency: {what} ({count} new connections from a pod, then {host_count} from the node)")
        try:
            r = fn()
        except Exception as e:  # noqa: BLE001
            progress(f"FAILED: latency {what}: {type(e).__name__}: {e}")
            errors.append(f"latency {what}: {type(e).__name__}: {e}")
            return None, None
        return (r["pod"], r["host"]) if r else (None, None)

    out["direct"], host["direct"] = one("direct to the backend pod, no Service", lambda: run_direct(count, host_count))
    for n in sizes:
        for dp, what, fn in (
            ("ours", "ours", lambda n=n: run_ours(n, count, host_count)),
            ("iptables", "iptables (legacy) ruleset", lambda n=n: run_iptables(n, count, host_count)),
            ("nft", "nftables ruleset", lambda n=n: run_nft(n, count, host_count, nft_timeout)),
        ):
            out[dp][str(n)], host[dp][str(n)] = one(f"{what}, {n:,} Services", fn)
    if wide:
        for dp, what, fn in (
            ("ours", "ours", lambda: run_ours(1, count, host_count, wide)),
            ("iptables", "iptables (legacy) ruleset", lambda: run_iptables(1, count, host_count, wide)),
            ("nft", "nftables ruleset", lambda: run_nft(1, count, host_count, nft_timeout, wide)),
        ):
            out[dp]["wide"], host[dp]["wide"] = one(f"{what}, 1 Service of {wide:,} endpoints", fn)
    return out
