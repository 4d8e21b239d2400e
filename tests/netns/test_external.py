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
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

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


def node_obj(name: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]},
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

    def write(self, name: str, *docs: dict[str, Any]) -> None:
        for n in self.nodes:
            n.src.write(name, *docs)

    def start_agents(self, *extra: str) -> None:
        for n in self.nodes:
            n.agent = AgentProc(
                n.topo,
                n.src.path,
                n.pin_dir,
                (
                    "--external-interfaces", n.uplink, "--node-name", n.name,
                    "--metrics-bind-address", "", "--healthz-bind-address", "",
                    "--xdp", "auto" if self.xdp else "off",
                    *extra,
                ),
            )  # fmt: skip
        for n in self.nodes:
            assert n.agent is not None
            n.agent.wait_attached([n.uplink, *(p.host_if for p in n.topo.pods.values())])
            if self.xdp:
                n.agent.wait_log(rf"XDP attached to interface {re.escape(n.uplink)} \(native mode\)$")

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


@pytest.fixture(params=[True, False], ids=["xdp", "tc-only"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    stack: list[Topology] = []
    c: Cluster | None = None
    try:
        lan = Lan()
        stack.append(lan)
        lan.add_host("client", CLIENT)
        lan.add_host("other", OTHER)
        c = Cluster(lan, xdp=request.param)
        for i, (ip, pod_ip, other_subnet, other_ip) in enumerate(
            [(NODE1, WEB1, "198.18.2.0/24", NODE2), (NODE2, WEB2, "198.18.1.0/24", NODE1)], start=1
        ):
            t = Topology()
            stack.append(t)
            t.add_pod(f"web-{i}", pod_ip)
            if i == 1:
                t.add_pod("cpod", CPOD)  # a client pod on node-1
            uplink = t.add_uplink(lan, ip)
            t.add_route("node", other_subnet, other_ip)
            cp = t.exec_in("node", ["iptables-legacy", "-A", *INVALID_DROP])
            assert cp.returncode == 0, cp.stderr
            t.start_server(f"web-{i}")
            src = SourceDir(tmp_path / f"node-{i}")
            src.write("node.yaml", node_obj(f"node-{i}", ip))
            c.nodes.append(Node(f"node-{i}", t, ip, uplink, src, BPFFS / f"{PIN_PREFIX}{t.prefix}"))
        # LB IPs and externalIPs reach node-1, as an upstream router would send them.
        _ = [lan.add_route(h, "198.19.0.0/16", NODE1) for h in ("client", "other")]
        yield c
    finally:
        if c is not None:
            for n in c.nodes:
                if n.agent is not None and n.agent.alive():
                    n.agent.terminate()
                shutil.rmtree(n.pin_dir, ignore_errors=True)
        for t in reversed(stack):
            t.cleanup()


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
