"""Tier 3: traffic from outside the cluster, through two nodes.

    outside "client" 198.18.200.100 --+
    outside "other"  198.18.200.101 --+-- br0 (namespace "lan")
                                      |
           node-1 uplink 198.18.200.1 +-- web-1 198.18.1.11 (its pod)
           node-2 uplink 198.18.200.2 +-- web-2 198.18.2.11 (its pod)

Each node routes the other's pod subnet over the segment and runs its own
agent, with --external-interfaces on its uplink. The outside client reaches
NodePorts on the nodes' addresses directly and LB IPs / externalIPs
(198.19.0.0/16) through node-1, as an upstream router would send them.
Every node namespace drops what netfilter's conntrack finds INVALID
(`iptables -A FORWARD -m conntrack --ctstate INVALID -j DROP`), as Calico
and kube-proxy rulesets do. servers.py answers with its name and the client
address it saw, so the tests see who served and whether the source was
masqueraded.

Every test runs twice: with the XDP program on the uplinks (--xdp auto,
native on veth: source ranges dropped there, the rest handed to tc) and
with tc alone (--xdp off); the answers must not differ.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ctrl.model import maglev
from ctrl.util.addrs import addr16
from scripts.harness.topo import Lan, Topology

from .agent import BPFFS, PIN_PREFIX, AgentProc, SourceDir, dump, endpoint_slice, wait_dump

pytestmark = pytest.mark.root

CLIENT, OTHER = "198.18.200.100", "198.18.200.101"
NODE1, NODE2 = "198.18.200.1", "198.18.200.2"
WEB1, WEB2 = "198.18.1.11", "198.18.2.11"
CPOD = "198.18.1.50"
VIP = "198.19.0.10"
LB_IP, FW_LB_IP, EXT_IP = "198.19.5.5", "198.19.5.7", "198.19.6.6"
N = 60

INVALID_DROP = ["FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]


def web_service(etp: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": VIP,
            "clusterIPs": [VIP],
            "externalTrafficPolicy": etp,
            "externalIPs": [EXT_IP],
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": 30053},
            ],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}},
    }


def fw_service() -> dict[str, Any]:
    """An LB IP that admits the outside client only."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "fw", "namespace": "default"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "198.19.0.11",
            "loadBalancerSourceRanges": [f"{CLIENT}/32"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30081}],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": FW_LB_IP}]}},
    }


def slice_of(service: str, ports: list[tuple[str, int, str]]) -> dict[str, Any]:
    sl = endpoint_slice(f"{service}-a", service, ports, [WEB1, WEB2])
    sl["endpoints"][0]["nodeName"] = "node-1"
    sl["endpoints"][1]["nodeName"] = "node-2"
    return sl


def node_obj(name: str, ip: str, ip6: str | None = None) -> dict[str, Any]:
    addrs = [{"type": "InternalIP", "address": a} for a in (ip, ip6) if a]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": [*addrs, {"type": "Hostname", "address": name}]},
    }


@dataclass
class Node:
    name: str
    topo: Topology
    ip: str
    uplink: str
    src: SourceDir
    pin_dir: Path
    agent: AgentProc | None = None


@dataclass
class Cluster:
    lan: Lan
    nodes: list[Node] = field(default_factory=list)
    xdp: bool = True  # the agents attach the XDP program on their uplinks
    xdp_mode: str = "native"  # ... in this mode (--xdp auto gives native on veth; or generic)
    forward: bool = False  # ... and it sends flows to other nodes' backends back out

    def write(self, name: str, *docs: dict[str, Any]) -> None:
        for n in self.nodes:
            n.src.write(name, *docs)

    def start_agents(self, *extra: str, wait_xdp: bool = True) -> None:
        """An agent per node, each waited for until it attached (and,
        with wait_xdp, until its XDP program is on the uplink)."""
        for n in self.nodes:
            n.agent = AgentProc(
                n.topo,
                n.src.path,
                n.pin_dir,
                (
                    "--external-interfaces", n.uplink, "--node-name", n.name,
                    "--metrics-bind-address", "", "--healthz-bind-address", "",
                    "--xdp", ("auto" if self.xdp_mode == "native" else self.xdp_mode) if self.xdp else "off",
                    *(("--xdp-forward",) if self.forward else ()),
                    *extra,
                ),
            )  # fmt: skip
        for n in self.nodes:
            assert n.agent is not None
            n.agent.wait_attached([n.uplink, *(p.host_if for p in n.topo.pods.values())])
            if self.xdp and wait_xdp:
                n.agent.wait_log(rf"XDP attached to interface {re.escape(n.uplink)} \({self.xdp_mode} mode\)$")

    def wait_external(self, frontend: str, backends: set[str], nodes: list[Node] | None = None) -> None:
        """Every node's (or these nodes') dump shows frontend (scope
        external) with backends."""

        def ok(doc: dict[str, Any]) -> bool:
            return any(
                s["frontend"] == frontend and s["scope"] == "external" and set(s["backends"]) == backends
                for s in doc["services"]
            )

        for n in nodes or self.nodes:
            wait_dump(n.topo, n.pin_dir, ok, f"{frontend} (external) -> {sorted(backends)}", agent=n.agent)

    def client(self, host: str, mode: str, target: str, count: int = N) -> dict[str, Any]:
        return self.lan.client(host, mode, "--target", target, "--count", str(count), "--timeout", "1")


# IPv6 on the same segment (the cluster6 fixture): a /64 for the LAN, a
# /64 of pods per node.
CLIENT6, OTHER6 = "2001:db8:200::100", "2001:db8:200::101"
NODE1_6, NODE2_6 = "2001:db8:200::1", "2001:db8:200::2"
WEB1_6, WEB2_6 = "2001:db8:1::11", "2001:db8:2::11"
FW_LB6 = "2001:db8:5::7"

# A program that passes every frame: on the bridge-side ends of the
# uplinks when XDP sends frames back out of an uplink (XDP_TX on a veth
# needs an XDP program, or GRO, on the receiving peer). The test topology's
# own, compiled by the fixture.
PASS_XDP = """
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("xdp") int lan_pass(struct xdp_md *ctx) { return XDP_PASS; }
char LICENSE[] SEC("license") = "GPL";
"""


@contextmanager
def make_cluster(
    tmp_path: Path, xdp: bool, ip6: bool = False, forward: bool = False, xdp_mode: str = "native"
) -> Iterator[Cluster]:
    """Two nodes and two outside hosts on one segment, as the module
    docstring draws them; ip6: IPv6 addresses and routes alongside (servers
    answering both families); xdp_mode: native (--xdp auto) or generic;
    forward: --xdp-forward, the uplinks' peers
    given a pass-through XDP program, and no INVALID drop rule (XDP sends
    a flow's packets past the node's netfilter: it sees only the replies),
    and the outside hosts sending whole checksums, as from a wire."""
    stack: list[Topology] = []
    c: Cluster | None = None
    try:
        lan = Lan()
        stack.append(lan)
        lan.add_host("client", CLIENT, ip6=CLIENT6 if ip6 else None)
        lan.add_host("other", OTHER, ip6=OTHER6 if ip6 else None)
        c = Cluster(lan, xdp=xdp, xdp_mode=xdp_mode, forward=forward)
        nodes = [
            (NODE1, NODE1_6, WEB1, WEB1_6, "198.18.2.0/24", "2001:db8:2::/64", NODE2, NODE2_6),
            (NODE2, NODE2_6, WEB2, WEB2_6, "198.18.1.0/24", "2001:db8:1::/64", NODE1, NODE1_6),
        ]
        for i, (ip, v6, pod_ip, pod6, other_subnet, other6, other_ip, other_v6) in enumerate(nodes, start=1):
            t = Topology()
            stack.append(t)
            t.add_pod(f"web-{i}", pod_ip, ip6=pod6 if ip6 else None)
            if i == 1:
                t.add_pod("cpod", CPOD)  # a client pod on node-1
            uplink = t.add_uplink(lan, ip, ip6=v6 if ip6 else None)
            t.add_route("node", other_subnet, other_ip)
            if ip6:
                t.add_route("node", other6, other_v6)
            if not forward:
                cp = t.exec_in("node", ["iptables-legacy", "-A", *INVALID_DROP])
                assert cp.returncode == 0, cp.stderr
            t.start_server(f"web-{i}", bind="::" if ip6 else "0.0.0.0")
            src = SourceDir(tmp_path / f"node-{i}")
            src.write("node.yaml", node_obj(f"node-{i}", ip, v6 if ip6 else None))
            c.nodes.append(Node(f"node-{i}", t, ip, uplink, src, BPFFS / f"{PIN_PREFIX}{t.prefix}"))
        # LB IPs and externalIPs reach node-1, as an upstream router would send them.
        for h in ("client", "other"):
            lan.add_route(h, "198.19.0.0/16", NODE1)
            if ip6:
                lan.add_route(h, "2001:db8:5::/64", NODE1_6)
        if forward:
            for h in ("client", "other"):
                lan.full_checksums(h)
            src_c, obj = tmp_path / "lan_pass.c", tmp_path / "lan_pass.o"
            src_c.write_text(PASS_XDP)
            arch = f"/usr/include/{platform.machine()}-linux-gnu"
            subprocess.run(
                ["clang", "-O2", "-target", "bpf", f"-I{arch}", "-c", str(src_c), "-o", str(obj)], check=True
            )
            for n in c.nodes:
                assert n.topo.uplink_peer is not None
                cp = lan.exec_in(
                    "node", ["ip", "link", "set", "dev", n.topo.uplink_peer, "xdp", "obj", str(obj), "sec", "xdp"]
                )
                assert cp.returncode == 0, cp.stderr
        yield c
    finally:
        if c is not None:
            for n in c.nodes:
                if n.agent is not None and n.agent.alive():
                    n.agent.terminate()
                shutil.rmtree(n.pin_dir, ignore_errors=True)
        for t in reversed(stack):
            t.cleanup()


@pytest.fixture(params=[True, False], ids=["xdp", "tc-only"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    with make_cluster(tmp_path, xdp=request.param) as c:
        yield c


@pytest.fixture(params=[True, False], ids=["xdp", "tc-only"])
def cluster6(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """The same two nodes, dual-stack: every address above has an IPv6 twin."""
    with make_cluster(tmp_path, xdp=request.param, ip6=True) as c:
        yield c


def start(cluster: Cluster, etp: str = "Cluster") -> None:
    cluster.write("web.yaml", web_service(etp), slice_of("web", [("http", 8080, "TCP"), ("dns", 5353, "UDP")]))
    cluster.start_agents()
    for n, local in zip(cluster.nodes, (WEB1, WEB2), strict=True):
        # Each node serves NodePorts on its own address only.
        backends = {f"{WEB1}:8080", f"{WEB2}:8080"} if etp == "Cluster" else {f"{local}:8080"}
        cluster.wait_external(f"{n.ip}:30080/TCP", backends, [n])


def assert_all_answered(res: dict[str, Any], by: set[str]) -> None:
    assert res["errors"] == 0, f"{res['errors']} of {res['requests']} failed: {res['error_samples']}"
    assert set(res["counts"]) == by, f"answered by {res['counts']}, expected {sorted(by)}"


def invalid_rule_held(cluster: Cluster) -> None:
    for n in cluster.nodes:
        cp = n.topo.exec_in("node", ["iptables-legacy", "-S", "FORWARD"])
        assert "INVALID -j DROP" in cp.stdout, cp.stdout


def test_nodeport_from_outside_reaches_pods_on_both_nodes(cluster: Cluster) -> None:
    """externalTrafficPolicy Cluster: each node spreads over both pods; the
    pod on the other node sees the entry node's address (masqueraded), and
    every reply reaches the client from the NodePort it called."""
    start(cluster)
    for entry, other_pod in ((NODE1, "web-2"), (NODE2, "web-1")):
        res = cluster.client("client", "http", f"{entry}:30080")
        assert_all_answered(res, {"web-1", "web-2"})
        # The local pod saw the client itself, the remote one the entry node.
        assert set(res["client_ips_seen"]) == {CLIENT, entry}, (other_pod, res["client_ips_seen"])
        res = cluster.client("client", "udp", f"{entry}:30053")
        assert_all_answered(res, {"web-1", "web-2"})
    counters = dump(cluster.nodes[0].topo, cluster.nodes[0].pin_dir)["counters"]
    assert counters["snat"]["packets"] > 0 and counters["unsnat"]["packets"] > 0
    invalid_rule_held(cluster)


def test_nodeport_policy_local_keeps_the_client_address(cluster: Cluster) -> None:
    start(cluster, etp="Local")
    res = cluster.client("client", "http", f"{NODE1}:30080")
    assert_all_answered(res, {"web-1"})
    assert res["client_ips_seen"] == [CLIENT]
    res = cluster.client("client", "udp", f"{NODE1}:30053")
    assert_all_answered(res, {"web-1"})
    counters = dump(cluster.nodes[0].topo, cluster.nodes[0].pin_dir)["counters"]
    assert counters["snat"]["packets"] == 0
    invalid_rule_held(cluster)


@pytest.mark.parametrize("target", [f"{LB_IP}:80", f"{EXT_IP}:80"], ids=["lb-ip", "external-ip"])
def test_lb_ip_and_external_ip_from_outside(cluster: Cluster, target: str) -> None:
    start(cluster)
    cluster.wait_external(f"{target}/TCP", {f"{WEB1}:8080", f"{WEB2}:8080"})
    res = cluster.client("client", "http", target)
    assert_all_answered(res, {"web-1", "web-2"})
    assert set(res["client_ips_seen"]) == {CLIENT, NODE1}
    invalid_rule_held(cluster)


def test_lb_source_ranges_admit_one_client_and_drop_another(cluster: Cluster) -> None:
    cluster.write("fw.yaml", fw_service(), slice_of("fw", [("http", 8080, "TCP")]))
    cluster.start_agents()
    cluster.wait_external(f"{FW_LB_IP}:80/TCP", {f"{WEB1}:8080", f"{WEB2}:8080"})
    res = cluster.client("client", "http", f"{FW_LB_IP}:80", count=20)
    assert_all_answered(res, {"web-1", "web-2"})
    res = cluster.client("other", "http", f"{FW_LB_IP}:80", count=3)
    assert res["errors"] == 3 and not res["counts"], res
    counters = dump(cluster.nodes[0].topo, cluster.nodes[0].pin_dir)["counters"]
    assert counters["drop_source_range"]["packets"] >= 3
    # The NodePort of the same Service has no source filter (kube-proxy's too).
    res = cluster.client("other", "http", f"{NODE1}:30081", count=10)
    assert_all_answered(res, {"web-1", "web-2"})
    invalid_rule_held(cluster)


@pytest.mark.parametrize("etp", ["Cluster", "Local"])
def test_pod_reaching_a_nodeport_gets_the_cluster_set(cluster: Cluster, etp: str) -> None:
    """kube-proxy short-circuits traffic from pods to external addresses to
    the cluster endpoints, whatever externalTrafficPolicy says. The remote
    pod sees the client pod's own address (no masquerade: see
    docs/semantics.md) and the reply finds its way back through node-1's
    pod-side reverse NAT."""
    start(cluster, etp)
    n1 = cluster.nodes[0]
    res = n1.topo.client("cpod", "http", "--target", f"{NODE1}:30080", "--count", str(N), "--timeout", "1")
    assert_all_answered(res, {"web-1", "web-2"})
    assert res["client_ips_seen"] == [CPOD]
    res = n1.topo.client("cpod", "http", "--target", f"{LB_IP}:80", "--count", str(N), "--timeout", "1")
    assert_all_answered(res, {"web-1", "web-2"})
    invalid_rule_held(cluster)


def test_nodeport_follows_a_node_address_change(cluster: Cluster) -> None:
    """The Node's InternalIP changes (a second address on the uplink): the
    NodePort moves to it and leaves the old one, without a restart."""
    start(cluster)
    n1 = cluster.nodes[0]
    new_ip = "198.18.200.11"
    cp = n1.topo.exec_in("node", ["ip", "addr", "add", f"{new_ip}/24", "dev", n1.uplink])
    assert cp.returncode == 0, cp.stderr
    n1.src.write("node.yaml", node_obj("node-1", new_ip))
    cluster.wait_external(f"{new_ip}:30080/TCP", {f"{WEB1}:8080", f"{WEB2}:8080"}, [n1])
    res = cluster.client("client", "http", f"{new_ip}:30080")
    assert_all_answered(res, {"web-1", "web-2"})
    assert set(res["client_ips_seen"]) == {CLIENT, new_ip}  # masqueraded to the new address
    doc = dump(n1.topo, n1.pin_dir)
    assert not [s for s in doc["services"] if s["frontend"] == f"{NODE1}:30080/TCP"]
    res = cluster.client("client", "http", f"{NODE1}:30080", count=3)
    assert res["errors"] == 3, res  # nothing serves the old address any more


# -- SNAT ports of closed connections --------------------------------------------

ECHO_NODEPORT = 30082

# Runs in the outside client: short connections to the echo port, each
# closed by the client first (the server closes when it reads EOF), in
# batches of `batch` with a pause after each; then `hold` connections kept
# open while one more is tried, then closed. A connect timeout below the
# first SYN retransmission (1 s) makes a SYN the datapath dropped an error.
SHORT_CONNS = r"""
import json, socket, sys, time

host, port, count, batch, pause, hold = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:])
out = {"ok": 0, "errors": [], "peers": set()}

def conn(line):
    s = socket.create_connection((host, port), timeout=0.8)
    s.sendall(line.encode() + b"\n")
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        reply += chunk
    name, _, echoed = reply.decode().strip().partition(" ")
    assert echoed == line, reply
    out["peers"].add(name)
    return s

def one(i, tag):
    try:
        conn(f"{tag}-{i}").close()  # the client's FIN first
        out["ok"] += 1
    except (OSError, AssertionError) as e:
        out["errors"].append(f"{tag} {i}: {type(e).__name__}: {e}")

for i in range(int(count)):
    if i and i % int(batch) == 0:
        time.sleep(pause)
    one(i, "short")
if hold:
    time.sleep(pause)
    held = []
    for i in range(int(hold)):
        try:
            held.append(conn(f"held-{i}"))
        except (OSError, AssertionError) as e:
            out["errors"].append(f"held {i}: {type(e).__name__}: {e}")
    time.sleep(pause)
    before = len(out["errors"])
    one(0, "while-held")
    out["while_held_failed"] = len(out["errors"]) > before
    for s in held:
        s.close()
    time.sleep(pause)
    one(1, "after-held")
out["peers"] = sorted(out["peers"])
print(json.dumps(out))
"""


def echo_service() -> list[dict[str, Any]]:
    """A NodePort to the line-echo port of web-2 only: entered through
    node-1, every connection is masqueraded."""
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo", "namespace": "default"},
        "spec": {
            "type": "NodePort",
            "clusterIP": "198.19.0.12",
            "externalTrafficPolicy": "Cluster",
            "ports": [{"name": "echo", "port": 81, "protocol": "TCP", "targetPort": 8081, "nodePort": ECHO_NODEPORT}],
        },
    }
    sl = endpoint_slice("echo-a", "echo", [("echo", 8081, "TCP")], [WEB2])
    sl["endpoints"][0]["nodeName"] = "node-2"
    return [svc, sl]


PORTS = 4


def short_connections(cluster: Cluster, count: int, hold: int = 0) -> dict[str, Any]:
    cp = cluster.lan.exec_in(
        "client",
        [sys.executable, "-c", SHORT_CONNS, NODE1, str(ECHO_NODEPORT), str(count), str(PORTS), "1.5", str(hold)],
        timeout=120,
    )
    assert cp.returncode == 0, cp.stderr
    result: dict[str, Any] = json.loads(cp.stdout)
    return result


def snat_drops(cluster: Cluster) -> int:
    counters = dump(cluster.nodes[0].topo, cluster.nodes[0].pin_dir)["counters"]
    return int(counters["drop_snat"]["packets"])


@pytest.mark.parametrize("tracked", [True, False], ids=["close-tracked", "close-not-tracked"])
def test_closed_connections_give_their_snat_ports_back(cluster: Cluster, tracked: bool) -> None:
    """Four SNAT ports and six times as many short connections, the client
    closing each: with close tracking (--snat-reclaim-closed 1) a pause of
    1.5 s after every four frees the ports and every connection succeeds;
    without it (0: closed flows hold their ports for --snat-reclaim), the
    fifth is dropped. A connection kept open holds its port either way."""
    cluster.write("echo.yaml", *echo_service())
    cluster.start_agents(
        "--snat-port-range", f"61000-{61000 + PORTS - 1}", "--snat-reclaim-closed", "1" if tracked else "0"
    )  # fmt: skip
    cluster.wait_external(f"{NODE1}:{ECHO_NODEPORT}/TCP", {f"{WEB2}:8081"}, cluster.nodes[:1])
    doc = dump(cluster.nodes[0].topo, cluster.nodes[0].pin_dir)
    assert doc["config"]["snat_reclaim_closed"] == (1 if tracked else 0)
    assert (doc["config"]["snat_port_min"], doc["config"]["snat_port_max"]) == (61000, 61000 + PORTS - 1)

    n = 6 * PORTS
    if not tracked:
        res = short_connections(cluster, n)
        assert res["ok"] == PORTS and len(res["errors"]) == n - PORTS, res
        assert snat_drops(cluster) >= n - PORTS
        invalid_rule_held(cluster)
        return
    res = short_connections(cluster, n, hold=PORTS)
    assert res["peers"] == ["web-2"]
    # Every short connection, and the one after the held ones closed.
    assert res["ok"] == n + 1, res["errors"]
    # One more while PORTS connections stay open: no port for it.
    assert res["while_held_failed"] and len(res["errors"]) == 1, res["errors"]
    assert snat_drops(cluster) >= 1
    invalid_rule_held(cluster)


def test_nodeport_without_endpoints_refuses_outside_clients(cluster: Cluster) -> None:
    """kube-proxy's REJECT on the external path: a NodePort of a Service
    with no endpoint answers an outside client's TCP connect() and UDP
    datagram with an ICMP port unreachable, sent back out of the uplink,
    so the client fails at once with ECONNREFUSED (each request waits up
    to 5 s: a drop would show as a timeout)."""
    gone = web_service("Cluster")
    gone["metadata"]["name"] = "gone"
    gone["spec"].update(clusterIP="198.19.0.12", clusterIPs=["198.19.0.12"], externalIPs=[])
    gone["spec"]["ports"] = [
        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30090},
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": 30091},
    ]
    gone["status"] = {}
    cluster.write("gone.yaml", gone)
    cluster.start_agents()
    cluster.wait_external(f"{NODE1}:30090/TCP", set(), cluster.nodes[:1])
    cluster.wait_external(f"{NODE1}:30091/UDP", set(), cluster.nodes[:1])
    node = cluster.nodes[0]
    before = dump(node.topo, node.pin_dir)["counters"]["reject_no_backend"]["packets"]
    tries = 3
    for mode, port in (("http", 30090), ("udp", 30091)):
        res = cluster.lan.client("client", mode, "--target", f"{NODE1}:{port}", "--count", str(tries), "--timeout", "5")
        assert res["counts"] == {} and res["errors"] == tries, res
        assert all("ConnectionRefusedError" in e for e in res["error_samples"]), res["error_samples"]
    after = dump(node.topo, node.pin_dir)["counters"]["reject_no_backend"]["packets"]
    assert after - before == 2 * tries, f"reject_no_backend moved by {after - before}"


@pytest.mark.parametrize("size", [2000, 8000])
def test_big_udp_datagrams_to_a_nodeport_are_echoed_whole(cluster: Cluster, size: int) -> None:
    """Fragmented datagrams from outside to a NodePort: DNAT at the
    uplink's ingress and, towards the other node's pod, the masquerade at
    its egress, fragment by fragment; the echoes come back whole."""
    start(cluster)
    for entry in (NODE1, NODE2):
        res = cluster.lan.client(
            "client", "udp", "--target", f"{entry}:30053", "--count", "30", "--timeout", "2", "--size", str(size)
        )
        assert_all_answered(res, {"web-1", "web-2"})


# -- Maglev: a flow moved to another node keeps its backend ----------------------

STICKY_LB_IP = "198.19.5.9"
STICKY_PORT = 81
# A link between the nodes that is not an --external-interface (a cluster
# network beside the uplink, as an overlay or a second NIC is): pod traffic
# between nodes crosses it without the uplink's masquerade.
INTERCONNECT = {"node-1": "198.18.210.1", "node-2": "198.18.210.2"}

# Runs in the outside client: one TCP connection from a given source port
# to the line-echo port; one line and its echo, then (after "go" on stdin,
# once the test moved the route) another on the same connection.
MOVED_CONN = r"""
import socket, sys

host, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", sport))
s.settimeout(5)
s.connect((host, port))
f = s.makefile("rwb")

def line(text):
    f.write(text.encode() + b"\n")
    f.flush()
    reply = f.readline().decode().strip()
    print(reply or "EOF", flush=True)

line("before")
sys.stdin.readline()
try:
    line("after")
except OSError as e:
    print(f"ERROR {type(e).__name__}: {e}", flush=True)
"""


def sticky_service() -> list[dict[str, Any]]:
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "sticky", "namespace": "default"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "198.19.0.13",
            "clusterIPs": ["198.19.0.13"],
            "externalTrafficPolicy": "Cluster",
            "ports": [{"name": "echo", "port": STICKY_PORT, "protocol": "TCP", "targetPort": 8081, "nodePort": 30085}],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": STICKY_LB_IP}]}},
    }
    return [svc, slice_of("sticky", [("echo", 8081, "TCP")])]


def interconnect(cluster: Cluster, stack_lan: Lan) -> None:
    """Join the nodes by a second segment and route each one's pod subnet
    to the other over it."""
    for n in cluster.nodes:
        link = f"{n.topo.prefix}i0"
        port = stack_lan.new_port_name()
        cp = n.topo.exec_in(
            "node", ["ip", "link", "add", link, "type", "veth", "peer", "name", port, "netns", stack_lan.node_ns]
        )
        assert cp.returncode == 0, cp.stderr
        stack_lan.attach_port(port)
        for argv in (
            ["ip", "addr", "add", f"{INTERCONNECT[n.name]}/24", "dev", link],
            ["ip", "link", "set", link, "up"],
        ):
            cp = n.topo.exec_in("node", argv)
            assert cp.returncode == 0, cp.stderr
    for n, other, subnet in (
        (cluster.nodes[0], "node-2", "198.18.2.0/24"),
        (cluster.nodes[1], "node-1", "198.18.1.0/24"),
    ):
        cp = n.topo.exec_in("node", ["ip", "route", "replace", subnet, "via", INTERCONNECT[other]])
        assert cp.returncode == 0, cp.stderr


def source_port_for(backend: str) -> int:
    """A source port of the outside client whose flow to the sticky LB IP
    the Maglev table (ctrl.model.maglev, as both agents build it from the
    same endpoints) gives to `backend`."""
    ordered, table = maglev.build_for([(addr16(WEB1), 8081), (addr16(WEB2), 8081)], maglev.DEFAULT_SIZE)
    for sport in range(45000, 46000):
        h = maglev.flow_hash(addr16(CLIENT), sport, STICKY_PORT, socket.IPPROTO_TCP)
        if ordered[table[h % maglev.DEFAULT_SIZE]] == (addr16(backend), 8081):
            return sport
    raise AssertionError("no source port maps to " + backend)


def test_maglev_flow_moved_to_another_node_keeps_its_backend(cluster: Cluster) -> None:
    """--external-lb=maglev on both nodes: a connection to an LB IP that
    enters node-1, then (the outside router now sending the LB IP to
    node-2) node-2, which never saw it, reaches the same backend there
    and goes on. Its backend is web-1, node-1's pod: node-1 took it
    without masquerade, so web-1 sees the client itself both times, and
    its replies still leave through node-1, whose flow entry turns them
    back into the LB IP. (With random picks node-2 may choose web-2, which
    resets the connection; not asserted.)"""
    ic = Lan()
    try:
        interconnect(cluster, ic)
        cluster.write("sticky.yaml", *sticky_service())
        cluster.start_agents("--external-lb", "maglev")
        target = f"{STICKY_LB_IP}:{STICKY_PORT}/TCP"
        cluster.wait_external(target, {f"{WEB1}:8081", f"{WEB2}:8081"})
        for n in cluster.nodes:
            fronts = {s["scope"]: s for s in dump(n.topo, n.pin_dir)["services"] if s["frontend"] == target}
            # The external frontend has a table, its pod-side twin none.
            assert fronts["external"]["maglev"]["size"] == maglev.DEFAULT_SIZE, fronts
            assert fronts["external"]["maglev"]["missing"] == 0
            assert "maglev" not in fronts["internal"]
        sport = source_port_for(WEB1)
        proc = cluster.lan.run_in(
            "client",
            [sys.executable, "-c", MOVED_CONN, STICKY_LB_IP, str(STICKY_PORT), str(sport)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "web-1 before"
        in1 = dump(cluster.nodes[0].topo, cluster.nodes[0].pin_dir)["counters"]["dnat_new"]["packets"]
        # The outside router fails over: the LB IP now goes to node-2.
        cp = cluster.lan.exec_in("client", ["ip", "route", "replace", "198.19.0.0/16", "via", NODE2])
        assert cp.returncode == 0, cp.stderr
        n2 = cluster.nodes[1]
        new2 = dump(n2.topo, n2.pin_dir)["counters"]["dnat_new"]["packets"]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "web-1 after"
        assert proc.wait(timeout=10) == 0
        # node-2 took the flow as a new one (it had no state of it) and
        # gave it web-1 from its own table; node-1 saw no new flow.
        assert dump(n2.topo, n2.pin_dir)["counters"]["dnat_new"]["packets"] > new2
        assert dump(cluster.nodes[0].topo, cluster.nodes[0].pin_dir)["counters"]["dnat_new"]["packets"] == in1
        invalid_rule_held(cluster)
    finally:
        ic.cleanup()


# -- IPv6 from outside -------------------------------------------------------------

VIP6 = "2001:db8:ffff::10"


def web6_objects() -> list[dict[str, Any]]:
    """web, dual-stack, and an IPv6-only LoadBalancer admitting the outside
    client's /128 only (fw6), each with a slice per family."""
    svc = web_service("Cluster")
    svc["spec"].update(clusterIPs=[VIP, VIP6], ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack")
    ports = [("http", 8080, "TCP"), ("dns", 5353, "UDP")]
    v6 = endpoint_slice("web-v6", "web", ports, [WEB1_6, WEB2_6])
    v6["addressType"] = "IPv6"
    v6["endpoints"][0]["nodeName"], v6["endpoints"][1]["nodeName"] = "node-1", "node-2"
    fw = fw_service()
    fw["metadata"]["name"] = "fw6"
    fw["spec"].update(
        clusterIP="2001:db8:ffff::11",
        clusterIPs=["2001:db8:ffff::11"],
        ipFamilies=["IPv6"],
        loadBalancerSourceRanges=[f"{CLIENT6}/128"],
    )
    fw["spec"]["ports"][0]["nodePort"] = 30083
    fw["status"] = {"loadBalancer": {"ingress": [{"ip": FW_LB6}]}}
    fw6 = endpoint_slice("fw6-a", "fw6", [("http", 8080, "TCP")], [WEB1_6, WEB2_6])
    fw6["addressType"] = "IPv6"
    fw6["endpoints"][0]["nodeName"], fw6["endpoints"][1]["nodeName"] = "node-1", "node-2"
    return [svc, slice_of("web", ports), v6, fw, fw6]


def test_ipv6_nodeport_and_source_ranges_from_outside(cluster6: Cluster) -> None:
    """IPv6 end to end through two nodes: a NodePort on each node's IPv6
    address spreads over both pods, the remote pod sees the entry node's
    IPv6 address (masqueraded) and every answer comes back from the
    NodePort (TCP and UDP); an IPv6 LB IP with loadBalancerSourceRanges
    admits the client's /128 and drops the other host."""
    cluster6.write("web.yaml", *web6_objects())
    cluster6.start_agents()
    for n, ip6 in zip(cluster6.nodes, (NODE1_6, NODE2_6), strict=True):
        want = {f"[{WEB1_6}]:8080", f"[{WEB2_6}]:8080"}
        cluster6.wait_external(f"[{ip6}]:30080/TCP", want, [n])
    cluster6.wait_external(f"[{FW_LB6}]:80/TCP", {f"[{WEB1_6}]:8080", f"[{WEB2_6}]:8080"}, cluster6.nodes[:1])
    for entry in (NODE1_6, NODE2_6):
        res = cluster6.client("client", "http", f"[{entry}]:30080")
        assert_all_answered(res, {"web-1", "web-2"})
        assert set(res["client_ips_seen"]) == {CLIENT6, entry}, res["client_ips_seen"]
        res = cluster6.client("client", "udp", f"[{entry}]:30053")
        assert_all_answered(res, {"web-1", "web-2"})
    res = cluster6.client("client", "http", f"[{FW_LB6}]:80", count=20)
    assert_all_answered(res, {"web-1", "web-2"})
    node = cluster6.nodes[0]
    before = dump(node.topo, node.pin_dir)["counters"]["drop_source_range"]["packets"]
    res = cluster6.client("other", "http", f"[{FW_LB6}]:80", count=3)
    assert res["errors"] == 3 and not res["counts"], res
    assert dump(node.topo, node.pin_dir)["counters"]["drop_source_range"]["packets"] - before >= 3
    invalid_rule_held(cluster6)


# -- XDP forwarding ------------------------------------------------------------------


def forwarded_by_netfilter(node: Node, client: str, pod: str) -> int:
    """Packets client -> pod (DNATed) that the node's FORWARD chain counted
    (a rule of its own, added by the test)."""
    tool = "ip6tables-legacy" if ":" in client else "iptables-legacy"
    cp = node.topo.exec_in("node", [tool, "-L", "FORWARD", "-v", "-x", "-n"])
    assert cp.returncode == 0, cp.stderr
    for line in cp.stdout.splitlines():
        f = line.split()
        if len(f) >= 2 and [x.removesuffix("/128") for x in f[-2:]] == [client, pod]:
            return int(f[0])
    raise AssertionError(f"no counting rule in {cp.stdout}")


def web_on_one_node(node: str, web4: str, web6: str, v6: bool) -> list[dict]:
    """web (http 8080/TCP, dns 5353/UDP; NodePort 30080) served by one
    node's pod alone: its IPv4 address, and with v6 its IPv6 one too (a
    dual-stack Service)."""
    ports = [("http", 8080, "TCP"), ("dns", 5353, "UDP")]
    svc = web_service("Cluster")
    sl = endpoint_slice("web-a", "web", ports, [web4])
    sl["endpoints"][0]["nodeName"] = node
    objs = [svc, sl]
    if v6:
        svc["spec"].update(clusterIPs=[VIP, VIP6], ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack")
        sl6 = endpoint_slice("web-v6", "web", ports, [web6])
        sl6["addressType"] = "IPv6"
        sl6["endpoints"][0]["nodeName"] = node
        objs.append(sl6)
    return objs


@pytest.mark.parametrize(
    "forward,v6,mode",
    [
        pytest.param(True, False, "native", id="xdp-forward-ipv4"),
        pytest.param(True, True, "native", id="xdp-forward-ipv6"),
        pytest.param(True, False, "generic", id="xdp-generic-forward-ipv4"),
        pytest.param(False, False, "native", id="tc-forward-ipv4"),
    ],
)
def test_xdp_sends_flows_to_the_other_nodes_pod_back_out(tmp_path: Path, forward: bool, v6: bool, mode: str) -> None:
    """--xdp-forward: a NodePort flow entered at node-1 whose backend is
    node-2's pod is translated and sent back out of node-1's uplink by XDP
    (XDP_TX, counted as xdp_tx), in native mode or generic: node-1's
    FORWARD chain never sees its packets (a counting rule stays at 0;
    without --xdp-forward it counts them all), the pod sees node-1's
    address, and every answer comes back from the NodePort through tc's
    UNSNAT and REVNAT. Only web-2 serves, so every flow is remote; node-1
    knows node-2's MAC before the first (a permanent neighbour entry), so
    no packet waits for the neighbour in the kernel. IPv4 also has an LB IP
    admitting only the client: the other outside host's connections are
    dropped (drop_source_range) while the client's are forwarded."""
    client, node1, node2, web2 = (CLIENT6, NODE1_6, NODE2_6, WEB2_6) if v6 else (CLIENT, NODE1, NODE2, WEB2)
    with make_cluster(tmp_path, xdp=True, ip6=v6, forward=forward, xdp_mode=mode) as c:
        c.write("web.yaml", *web_on_one_node("node-2", WEB2, WEB2_6, v6))
        if not v6:
            fw_remote = endpoint_slice("fw-a", "fw", [("http", 8080, "TCP")], [WEB2])
            fw_remote["endpoints"][0]["nodeName"] = "node-2"
            c.write("fw.yaml", fw_service(), fw_remote)
        c.start_agents()
        n1, n2 = c.nodes
        host = lambda a: f"[{a}]" if v6 else a  # noqa: E731
        c.wait_external(f"{host(node1)}:30080/TCP", {f"{host(web2)}:8080"}, [n1])
        if not v6:
            c.wait_external(f"{FW_LB_IP}:80/TCP", {f"{WEB2}:8080"}, [n1])
        tool = "ip6tables-legacy" if v6 else "iptables-legacy"
        cp = n1.topo.exec_in("node", [tool, "-A", "FORWARD", "-s", client, "-d", web2, "-p", "tcp"])
        assert cp.returncode == 0, cp.stderr
        cp = n2.topo.exec_in("node", ["ip", "-j", "link", "show", "dev", n2.uplink])
        mac = json.loads(cp.stdout)[0]["address"]
        cp = n1.topo.exec_in(
            "node", ["ip", "neigh", "replace", node2, "lladdr", mac, "dev", n1.uplink, "nud", "permanent"]
        )
        assert cp.returncode == 0, cp.stderr
        res = c.client("client", "http", f"{host(node1)}:30080", count=20)
        assert_all_answered(res, {"web-2"})
        assert res["client_ips_seen"] == [node1], res
        seen = forwarded_by_netfilter(n1, client, web2)
        counters = dump(n1.topo, n1.pin_dir)["counters"]
        assert counters["snat"]["packets"] > 0 and counters["unsnat"]["packets"] > 0
        assert counters["xdp_redirect"]["packets"] == 0  # one uplink: nowhere else to go
        if forward:
            assert seen == 0, f"node-1's netfilter forwarded {seen} packets XDP should have sent"
            # At least SYN, request and ACK of each of the 20 connections.
            assert counters["xdp_tx"]["packets"] >= 20 * 3, counters["xdp_tx"]
        else:
            assert seen > 0
            assert counters["xdp_tx"]["packets"] == 0
        if not v6:
            res = c.client("client", "http", f"{FW_LB_IP}:80", count=10)
            assert_all_answered(res, {"web-2"})
            before = counters["drop_source_range"]["packets"]
            res = c.client("other", "http", f"{FW_LB_IP}:80", count=3)
            assert res["errors"] == 3 and not res["counts"], res
            after = dump(n1.topo, n1.pin_dir)["counters"]
            assert after["drop_source_range"]["packets"] - before >= 3
            # The LB IP's flows took the same path as the NodePort's.
            now = forwarded_by_netfilter(n1, client, web2)
            assert now == 0 if forward else now > seen, (seen, now)


# -- XDP's handoff of flows to local backends to tc --------------------------------


def local_only(c: Cluster, v6: bool) -> None:
    """web served by node-1's pod alone (both families with v6), agents
    started, node-1's NodePort programmed."""
    c.write("web.yaml", *web_on_one_node("node-1", WEB1, WEB1_6, v6))
    c.start_agents()
    if v6:
        c.wait_external(f"[{NODE1_6}]:30080/TCP", {f"[{WEB1_6}]:8080"}, c.nodes[:1])
    else:
        c.wait_external(f"{NODE1}:30080/TCP", {f"{WEB1}:8080"}, c.nodes[:1])


@pytest.mark.parametrize(
    "xdp,forward,v6,mode",
    [
        pytest.param(True, True, False, "native", id="xdp-forward-ipv4"),
        pytest.param(True, True, True, "native", id="xdp-forward-ipv6"),
        pytest.param(True, True, False, "generic", id="xdp-generic-forward-ipv4"),
        pytest.param(True, False, False, "native", id="xdp-no-forward-ipv4"),
        pytest.param(False, False, True, "native", id="tc-only-ipv6"),
    ],
)
def test_xdp_hands_flows_to_local_pods_to_tc(tmp_path: Path, xdp: bool, forward: bool, v6: bool, mode: str) -> None:
    """--xdp-forward: a NodePort flow entered at node-1 whose backend is
    node-1's own pod is decided by XDP and handed to tc with its decision
    in metadata: TCP connections and UDP exchanges are all answered by the
    pod, which sees the client itself (no masquerade), and every packet
    tc's ingress translated (dnat_new, dnat_established) it took from the
    handoff (xdp_handoffs). Without forwarding, or without XDP, tc decides
    them all itself: the same answers, no handoff."""
    client, node1 = (CLIENT6, NODE1_6) if v6 else (CLIENT, NODE1)
    target = f"[{node1}]" if v6 else node1
    with make_cluster(tmp_path, xdp=xdp, ip6=v6, forward=forward, xdp_mode=mode) as c:
        local_only(c, v6)
        n1 = c.nodes[0]
        res = c.client("client", "http", f"{target}:30080", count=20)
        assert_all_answered(res, {"web-1"})
        assert res["client_ips_seen"] == [client], res
        res = c.client("client", "udp", f"{target}:30053", count=20)
        assert_all_answered(res, {"web-1"})
        doc = dump(n1.topo, n1.pin_dir)
        counters = doc["counters"]
        dnat = counters["dnat_new"]["packets"] + counters["dnat_established"]["packets"]
        # At least SYN, request and ACK of each connection, one datagram each.
        assert dnat >= 20 * 3 + 20, counters
        assert counters["xdp_tx"]["packets"] == 0
        if forward:
            assert doc["xdp_handoffs"] == dnat, (doc["xdp_handoffs"], counters)
        else:
            assert doc["xdp_handoffs"] == 0


def foreign_meta_xdp(backend: str) -> str:
    """C source of another tool's XDP program: in front of every frame, 32
    bytes of metadata laid out as sliceproxy's (struct sp_xdp_meta) with a
    cookie not the load's, naming backend (IPv4) with the verdict
    dnat_established."""
    meta = (
        (0x5EED5EED5EED5EED).to_bytes(8, "little")
        + addr16(backend)
        + (8080).to_bytes(2, "little")
        + bytes([6])  # SP_V_DNAT_ESTABLISHED
        + bytes(5)
    )
    assert len(meta) == 32
    words = [int.from_bytes(meta[i : i + 4], "little") for i in range(0, 32, 4)]
    stores = "\n".join(f"\tm[{i}] = {w:#x};" for i, w in enumerate(words))
    return f"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("xdp") int other_tool(struct xdp_md *ctx)
{{
	__u32 *m;

	if (bpf_xdp_adjust_meta(ctx, -32))
		return XDP_PASS;
	m = (void *)(long)ctx->data_meta;
	if ((void *)(m + 8) > (void *)(long)ctx->data)
		return XDP_PASS;
{stores}
	return XDP_PASS;
}}
char LICENSE[] SEC("license") = "GPL";
"""


def test_tc_ignores_metadata_another_xdp_program_wrote(tmp_path: Path) -> None:
    """Another tool's XDP program holds node-1's uplink (the agent leaves
    it there, tc serves the uplink alone) and writes metadata of
    sliceproxy's size and layout, but not this load's cookie, naming
    node-2's pod: tc ignores it (no handoff) and decides every flow itself,
    all answered by node-1's own pod, the only backend."""
    with make_cluster(tmp_path, xdp=True, forward=True) as c:
        n1 = c.nodes[0]
        src, obj = tmp_path / "other.c", tmp_path / "other.o"
        src.write_text(foreign_meta_xdp(WEB2))
        arch = f"/usr/include/{platform.machine()}-linux-gnu"
        subprocess.run(["clang", "-O2", "-target", "bpf", f"-I{arch}", "-c", str(src), "-o", str(obj)], check=True)
        cp = n1.topo.exec_in("node", ["ip", "link", "set", "dev", n1.uplink, "xdpdrv", "obj", str(obj), "sec", "xdp"])
        assert cp.returncode == 0, cp.stderr
        c.write("web.yaml", *web_on_one_node("node-1", WEB1, WEB1_6, False))
        c.start_agents(wait_xdp=False)  # node-1's uplink has the other program
        assert n1.agent is not None
        n1.agent.wait_log(rf"no XDP on interface {re.escape(n1.uplink)} \(tc serves it alone\)")
        c.wait_external(f"{NODE1}:30080/TCP", {f"{WEB1}:8080"}, [n1])
        res = c.client("client", "http", f"{NODE1}:30080", count=10)
        assert_all_answered(res, {"web-1"})
        res = c.client("client", "udp", f"{NODE1}:30053", count=10)
        assert_all_answered(res, {"web-1"})
        doc = dump(n1.topo, n1.pin_dir)
        assert doc["counters"]["dnat_established"]["packets"] > 0
        assert doc["xdp_handoffs"] == 0
