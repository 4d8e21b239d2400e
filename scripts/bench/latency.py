"""First-packet latency of new TCP connections through a ClusterIP, between
network namespaces (scripts/harness/topo.py: a node and two pods on veths).

For each dataplane and each number of Services (10 and 10,000, 10
endpoints each), a fresh topology: a client pod, a backend pod listening on
8080-8089, and the node between them. The Service under test is the one in
the middle of the list; its 10 endpoints are the backend pod's 10 ports, the
other Services' endpoints are addresses nobody answers (never used).

  direct     client -> backend pod address, no Service: the floor
  ours       the tc program attached to the node side of the pods' veths,
             its maps written with ctrl.model.plan and ctrl.dataplane, from a process
             started in the node namespace (nsenter), as the agent runs
  iptables   kube-proxy's iptables ruleset (scripts/bench/iptables.py)
             restored with iptables-legacy-restore into the node namespace,
             where the pods' packets meet nat PREROUTING
  nftables   kube-proxy's nftables ruleset (scripts/bench/nft.py)

The client times connect() (SYN out, SYN-ACK back, through the NAT both
ways) over N new connections, after 20 not counted.
"""

from __future__ import annotations

import json
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


def _cluster(nsvc: int) -> tuple[Cluster, int]:
    cl = Cluster(Scenario("L", nsvc, 10))
    return cl, nsvc // 2


def _backend_eps() -> list[tuple[str, int]]:
    return [(BACKEND_IP, p) for p in BACKEND_PORTS]


def _measure(topo, target: str, count: int) -> dict:
    cp = topo.exec_in(
        "client",
        [sys.executable, str(CONNECT_PY), "connect", "--target", target, "--count", str(count)],
        timeout=300,
    )
    if cp.returncode != 0:
        raise RuntimeError(f"latency client failed: {cp.stderr.strip()[-500:]}")
    r = json.loads(cp.stdout)
    if r["errors"]:
        raise RuntimeError(
            f"latency client: {r['errors']} of {count} connections to {target} failed: {r['error_samples']}"
        )
    return {"connect_us": summary(r["connect_us"]), "ttfb_us": summary(r["ttfb_us"])}


def _topology():
    Topology = topology_class()
    topo = Topology()
    try:
        topo.add_pod("client", CLIENT_IP)
        topo.add_pod("backend", BACKEND_IP)
        proc = topo.run_in(
            "backend",
            [sys.executable, str(CONNECT_PY), "serve", "--ports", f"{BACKEND_PORTS[0]}-{BACKEND_PORTS[-1]}"],
            stdout=subprocess.PIPE,
        )
        from scripts.harness.topo import wait_for_line

        wait_for_line(proc, "ready", 10, what="latency server")
    except BaseException:
        topo.cleanup()
        raise
    return topo


def run_direct(count: int) -> dict:
    topo = _topology()
    try:
        return _measure(topo, f"{BACKEND_IP}:{BACKEND_PORTS[0]}", count)
    finally:
        topo.cleanup()


def run_iptables(nsvc: int, count: int) -> dict:
    cl, k = _cluster(nsvc)
    rs = iptables.Ruleset(cl)
    rs.eps[k] = [f"{a}:{p}" for a, p in _backend_eps()]
    topo = _topology()
    try:
        with tempfile.TemporaryDirectory(prefix="sliceproxy-bench-") as td:
            for name, text in (("setup", iptables.SETUP), ("full", rs.render())):
                p = Path(td) / name
                p.write_text(text)
                if iptables.restore("iptables-legacy-restore", topo.node_ns, str(p), 300) is None:
                    raise RuntimeError("iptables-legacy-restore timed out")
        return _measure(topo, f"{vip(k)}:80", count)
    finally:
        topo.cleanup()


def run_nft(nsvc: int, count: int, timeout: float) -> dict | None:
    cl, k = _cluster(nsvc)
    rs = nft.Ruleset(cl)
    rs.eps[k] = _backend_eps()
    topo = _topology()
    try:
        with tempfile.TemporaryDirectory(prefix="sliceproxy-bench-") as td:
            p = Path(td) / "full.nft"
            p.write_text(rs.render_full())
            if nft.load(topo.node_ns, str(p), timeout) is None:
                return None
        return _measure(topo, f"{vip(k)}:80", count)
    finally:
        topo.cleanup()


def run_ours(nsvc: int, count: int) -> dict:
    topo = _topology()
    try:
        proc = topo.run_in(
            "node",
            [
                sys.executable,
                str(ROOT / "scripts" / "bench.py"),
                "--worker",
                "attach",
                "--services",
                str(nsvc),
                "--interfaces",
                topo.iface_glob,
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
        )
        from scripts.harness.topo import wait_for_line

        wait_for_line(proc, "ready", 120, what="sliceproxy dataplane in the node namespace")
        _, k = _cluster(nsvc)
        return _measure(topo, f"{vip(k)}:80", count)
    finally:
        topo.cleanup()


def attach_main(argv: list[str]) -> int:
    """`bench.py --worker attach`: in the node namespace (started there by
    nsenter: ctrl.dataplane.attach works on the current one), load the program, write
    the maps for nsvc Services and attach to the pods' veths; print ready;
    stay until stdin closes or SIGTERM (the topology's cleanup)."""
    import argparse

    ap = argparse.ArgumentParser(prog="bench.py --worker attach")
    ap.add_argument("--services", type=int, required=True)
    ap.add_argument("--interfaces", required=True)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from ctrl.dataplane import attach, loader
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
            slices = [
                parse(
                    {
                        "kind": "EndpointSlice",
                        "metadata": {
                            "name": f"real-{p}",
                            "namespace": "bench",
                            "labels": {"kubernetes.io/service-name": svc.name},
                        },
                        "addressType": "IPv4",
                        "ports": [{"name": "http", "port": p}],
                        "endpoints": [{"addresses": [ip]}],
                    }
                )
                for ip, p in _backend_eps()
            ]
        else:
            slices = [parse({"kind": "EndpointSlice", **cl.raw_slice(i, j)}) for j in range(len(cl.slices[i]))]
        desired[svc.key] = plan_service(svc, slices)[0]
    sizes = MapSizes()
    dp = loader.load(pin_dir=None, sizes=sizes)
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
    print("ready", flush=True)
    sys.stdin.read()
    return 0


def measure(sizes: list[int], count: int, nft_timeout: float, errors: list[str]) -> dict:
    """Every condition in its own topology; one that fails is reported in
    `errors` and left out (None), the others still run."""
    out: dict = {"count": count, "services": sizes, "direct": None, "ours": {}, "iptables": {}, "nft": {}}

    def one(what: str, fn):
        progress(f"latency: {what} ({count} new connections)")
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            progress(f"FAILED: latency {what}: {type(e).__name__}: {e}")
            errors.append(f"latency {what}: {type(e).__name__}: {e}")
            return None

    out["direct"] = one("direct to the pod, no Service", lambda: run_direct(count))
    for n in sizes:
        out["ours"][str(n)] = one(f"ours, {n:,} Services", lambda n=n: run_ours(n, count))
        out["iptables"][str(n)] = one(f"iptables (legacy) ruleset, {n:,} Services", lambda n=n: run_iptables(n, count))
        out["nft"][str(n)] = one(f"nftables ruleset, {n:,} Services", lambda n=n: run_nft(n, count, nft_timeout))
    return out
