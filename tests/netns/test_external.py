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
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .agent import BPFFS, PIN_PREFIX, AgentProc, SourceDir, dump, endpoint_slice, wait_dump
from .topo import Lan, Topology

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

    def write(self, name: str, *docs: dict[str, Any]) -> None:
        for n in self.nodes:
            n.src.write(name, *docs)

    def start_agents(self) -> None:
        for n in self.nodes:
            n.agent = AgentProc(
                n.topo,
                n.src.path,
                n.pin_dir,
                (
                    "--external-interfaces", n.uplink, "--node-name", n.name,
                    "--metrics-bind-address", "", "--healthz-bind-address", "",
                ),
            )  # fmt: skip
        for n in self.nodes:
            assert n.agent is not None
            n.agent.wait_attached([n.uplink, *(p.host_if for p in n.topo.pods.values())])

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


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    stack: list[Topology] = []
    c: Cluster | None = None
    try:
        lan = Lan()
        stack.append(lan)
        lan.add_host("client", CLIENT)
        lan.add_host("other", OTHER)
        c = Cluster(lan)
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
