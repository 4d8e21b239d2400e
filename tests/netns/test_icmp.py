"""Tier 3: ICMP errors about translated flows, with real stacks.

A host learns of a closed UDP port or of a smaller path MTU from an ICMP
error that quotes the packet it sent. A Service's packets are translated on
the way (DNAT, masquerade), so the error quotes a packet its receiver never
sent, and the receiver's stack finds no socket for it unless the error is
translated back. Here the real stacks of the pods, the nodes and an outside
client send and judge those errors:

- a connected UDP socket to a ClusterIP, or to a NodePort masqueraded to
  another node, whose backend has no listener gets ECONNREFUSED (not a
  timeout);
- a datagram with DF to a ClusterIP or a NodePort whose path to the
  backend has a smaller MTU (a route of the node) makes the sender's socket
  learn that MTU (IP_MTU / IPV6_MTU) and refuse the next big datagram
  (EMSGSIZE);
- a TCP backend on another node whose large answers through a masqueraded
  NodePort exceed the MTU towards the outside client learns it from the
  node's error and resends in smaller segments: the client gets the whole
  answer.

Every node namespace drops what netfilter's conntrack finds INVALID.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.harness.topo import Topology

from .agent import BPFFS, PIN_PREFIX, AgentProc, SourceDir, endpoint_slice, has_backends, service, wait_dump
from .test_external import CLIENT, ECHO_NODEPORT, INVALID_DROP, NODE1, NODE2, WEB2, Cluster, echo_service
from .test_external import cluster as external_cluster  # noqa: F401 - a fixture, used by two_nodes
from .test_hairpin import HAIRPIN_FLAGS

pytestmark = pytest.mark.root

# Runs in a pod or an outside host. "refused": three datagrams on one
# connected socket, each answered, refused (ECONNREFUSED) or timed out.
# "pmtu": IP(V6)_MTU_DISCOVER DO, one datagram of 1400 bytes, then the
# socket's MTU (polled until it changes, at most 5 s) and what a second
# send of the same size does.
PROBE = r"""
import errno, json, socket, sys, time

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
v6 = ":" in host
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
out = {}
if mode == "refused":
    s.connect((host, port))
    out["results"] = []
    for i in range(3):
        s.send(b"knock")
        try:
            s.recv(100)
            out["results"].append("answered")
        except ConnectionRefusedError:
            out["results"].append("refused")
        except TimeoutError:
            out["results"].append("timeout")
else:
    # <linux/in.h> IP_MTU_DISCOVER 10, IP_PMTUDISC_DO 2, IP_MTU 14;
    # <linux/in6.h> IPV6_MTU_DISCOVER 23, IPV6_PMTUDISC_DO 2, IPV6_MTU 24.
    level, discover, mtu_opt = (socket.IPPROTO_IPV6, 23, 24) if v6 else (socket.IPPROTO_IP, 10, 14)
    s.setsockopt(level, discover, 2)
    s.connect((host, port))
    out["mtu_before"] = mtu = s.getsockopt(level, mtu_opt)
    s.send(b"x" * 1400)
    deadline = time.monotonic() + 5
    while mtu == out["mtu_before"] and time.monotonic() < deadline:
        time.sleep(0.05)
        mtu = s.getsockopt(level, mtu_opt)
    out["mtu_after"] = mtu
    try:
        s.send(b"x" * 1400)
        out["second_send"] = "sent"
    except OSError as e:
        out["second_send"] = errno.errorcode[e.errno]
print(json.dumps(out))
"""

REFUSED = {"results": ["refused"] * 3}
LEARNED = {"mtu_before": 1500, "mtu_after": 1280, "second_send": "EMSGSIZE"}


def probe(topo: Topology, host: str, mode: str, target: str, port: int) -> dict[str, Any]:
    cp = topo.exec_in(host, [sys.executable, "-c", PROBE, mode, target, str(port)], timeout=60)
    assert cp.returncode == 0, cp.stderr
    result: dict[str, Any] = json.loads(cp.stdout)
    return result


def drop_invalid(topo: Topology) -> None:
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        cp = topo.exec_in("node", [tool, "-A", *INVALID_DROP])
        assert cp.returncode == 0, cp.stderr


# -- through a ClusterIP ----------------------------------------------------------

CPOD, CPOD6 = "198.18.1.2", "2001:db8:1::2"
BE, BE6 = "198.18.1.11", "2001:db8:1::11"
VIP, VIP6 = "198.19.0.30", "2001:db8:ffff::30"
CLOSED_PORT = 5999  # nothing listens there in the backend pod


def dual_stack(name: str, target_port: int) -> list[dict[str, Any]]:
    """A dual-stack Service on VIP / VIP6 port 53/UDP to backend-1."""
    svc = service(name, VIP, [("dns", 53, "UDP", target_port)])
    svc["spec"]["clusterIPs"] = [VIP, VIP6]
    svc["spec"]["ipFamilies"] = ["IPv4", "IPv6"]
    svc["spec"]["ipFamilyPolicy"] = "RequireDualStack"
    v4 = endpoint_slice(f"{name}-v4", name, [("dns", target_port, "UDP")], [BE])
    v6 = endpoint_slice(f"{name}-v6", name, [("dns", target_port, "UDP")], [BE6])
    v6["addressType"] = "IPv6"
    return [svc, v4, v6]


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[tuple[Topology, Path, SourceDir]]:
    """A node with a client pod and backend-1 (servers.py on UDP 5353), both
    dual-stack, and the source directory of one agent."""
    with Topology() as t:
        t.add_pod("client", CPOD, ip6=CPOD6)
        t.add_pod("backend-1", BE, ip6=BE6)
        t.start_server("backend-1", bind="::")
        drop_invalid(t)
        pin = BPFFS / f"{PIN_PREFIX}{t.prefix}"
        try:
            yield t, pin, SourceDir(tmp_path)
        finally:
            shutil.rmtree(pin, ignore_errors=True)


def serve(topo: Topology, pin: Path, src: SourceDir, target_port: int) -> AgentProc:
    src.write("svc.yaml", *dual_stack("probe", target_port))
    agent = AgentProc(topo, src.path, pin, HAIRPIN_FLAGS)
    want = {f"{VIP}:53/UDP": {f"{BE}:{target_port}"}, f"[{VIP6}]:53/UDP": {f"[{BE6}]:{target_port}"}}
    wait_dump(topo, pin, has_backends(want), "the probe Service", agent=agent)
    agent.wait_attached(p.host_if for p in topo.pods.values())
    return agent


@pytest.mark.parametrize("target", [VIP, VIP6], ids=["ipv4", "ipv6"])
def test_udp_to_a_clusterip_without_listener_is_refused(pods, target: str) -> None:
    topo, pin, src = pods
    agent = serve(topo, pin, src, CLOSED_PORT)
    try:
        assert probe(topo, "client", "refused", target, 53) == REFUSED
    finally:
        agent.terminate()


@pytest.mark.parametrize("target", [VIP, VIP6], ids=["ipv4", "ipv6"])
def test_udp_from_a_pod_to_its_own_service_without_listener_is_refused(pods, target: str) -> None:
    """Hairpin: backend-1 is the Service's only backend. Its own stack
    answers the hairpin address with port unreachable, which must come
    back into it from the ClusterIP."""
    topo, pin, src = pods
    agent = serve(topo, pin, src, CLOSED_PORT)
    try:
        assert probe(topo, "backend-1", "refused", target, 53) == REFUSED
    finally:
        agent.terminate()


@pytest.mark.parametrize("target", [VIP, VIP6], ids=["ipv4", "ipv6"])
def test_path_mtu_to_a_clusterip_is_learned(pods, target: str) -> None:
    """The node's route to the backend has MTU 1280 (locked: IPv6 forwarding
    honours only a locked route MTU); the node answers the 1400-byte
    datagram with fragmentation needed / packet too big."""
    topo, pin, src = pods
    agent = serve(topo, pin, src, 5353)
    try:
        # The service works for datagrams that fit.
        cp = topo.client("client", "udp", "--target", f"[{target}]:53" if ":" in target else f"{target}:53")
        assert cp["errors"] == 0 and cp["counts"] == {"backend-1": 1}, cp
        host_if = topo.pods["backend-1"].host_if
        fam, dst = ("-6", f"{BE6}/128") if ":" in target else ("-4", f"{BE}/32")
        cp2 = topo.exec_in("node", ["ip", fam, "route", "change", dst, "dev", host_if, "mtu", "lock", "1280"])
        assert cp2.returncode == 0, cp2.stderr
        assert probe(topo, "client", "pmtu", target, 53) == LEARNED
    finally:
        agent.terminate()


# -- through a NodePort masqueraded to another node ----------------------------------

NP_UDP = 30055


@pytest.fixture
def cluster(external_cluster: Cluster) -> Cluster:  # noqa: F811 - the fixture imported above
    """test_external.py's two nodes on a LAN with an outside client, with
    the XDP program on the uplinks and without (its parameters)."""
    return external_cluster


def closed_nodeport() -> list[dict[str, Any]]:
    """A UDP NodePort to web-2 (on node-2) on a port where nothing listens:
    entered through node-1, every flow is masqueraded."""
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "closed", "namespace": "default"},
        "spec": {
            "type": "NodePort",
            "clusterIP": "198.19.0.31",
            "externalTrafficPolicy": "Cluster",
            "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": CLOSED_PORT, "nodePort": NP_UDP}],
        },
    }
    sl = endpoint_slice("closed-a", "closed", [("dns", CLOSED_PORT, "UDP")], [WEB2])
    sl["endpoints"][0]["nodeName"] = "node-2"
    return [svc, sl]


def open_nodeport() -> list[dict[str, Any]]:
    """The same to web-2's UDP echo (5353)."""
    svc, sl = closed_nodeport()
    svc["metadata"]["name"] = sl["metadata"]["labels"]["kubernetes.io/service-name"] = "open"
    svc["spec"]["clusterIP"] = "198.19.0.32"
    svc["spec"]["ports"][0].update(targetPort=5353, nodePort=NP_UDP + 1)
    sl["metadata"]["name"] = "open-a"
    sl["ports"][0]["port"] = 5353
    return [svc, sl]


def start_masquerading(cluster: Cluster) -> None:
    cluster.write("closed.yaml", *closed_nodeport())
    cluster.write("open.yaml", *open_nodeport())
    cluster.write("echo.yaml", *echo_service())
    cluster.start_agents()
    cluster.wait_external(f"{NODE1}:{NP_UDP}/UDP", {f"{WEB2}:{CLOSED_PORT}"}, cluster.nodes[:1])
    cluster.wait_external(f"{NODE1}:{NP_UDP + 1}/UDP", {f"{WEB2}:5353"}, cluster.nodes[:1])
    cluster.wait_external(f"{NODE1}:{ECHO_NODEPORT}/TCP", {f"{WEB2}:8081"}, cluster.nodes[:1])


def test_udp_to_a_masqueraded_nodeport_without_listener_is_refused(cluster: Cluster) -> None:
    """web-2 answers node-1:SNAT port; node-1's uplink gives the error back
    to the client (as UNSNAT) and then from the NodePort (reverse NAT)."""
    start_masquerading(cluster)
    assert probe(cluster.lan, "client", "refused", NODE1, NP_UDP) == REFUSED


def test_path_mtu_to_a_masqueraded_nodeport_is_learned(cluster: Cluster) -> None:
    """node-1's route to node-2's pods has MTU 1280: node-1 itself reports
    the client's DNATed datagram as too big, from its own address."""
    start_masquerading(cluster)
    res = cluster.client("client", "udp", f"{NODE1}:{NP_UDP + 1}", count=3)
    assert res["errors"] == 0 and res["counts"] == {"web-2": 3}, res
    node1 = cluster.nodes[0]
    cp = node1.topo.exec_in("node", ["ip", "route", "change", "198.18.2.0/24", "via", NODE2, "mtu", "lock", "1280"])
    assert cp.returncode == 0, cp.stderr
    assert probe(cluster.lan, "client", "pmtu", NODE1, NP_UDP + 1) == LEARNED


# Runs in the outside client: one line of `size` bytes to the echo
# NodePort, and the answer (servers.py prefixes it with its name), read to
# its newline within 10 s.
BIG_LINE = r"""
import json, socket, sys

host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
line = b"y" * size
out = {}
try:
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(line + b"\n")
    got = b""
    while not got.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    out["answer"] = got.rstrip(b"\n") == b"web-2 " + line
    out["bytes"] = len(got)
except OSError as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_large_answers_through_a_masqueraded_nodeport_follow_the_path_mtu(cluster: Cluster) -> None:
    """node-1's route to the client has MTU 1280: web-2's full-sized
    segments, already un-masqueraded towards the client, are too big there.
    node-1 reports it to web-2 about web-2 -> client; its uplink must
    masquerade the error (web-2 -> node-1:SNAT port) for web-2's TCP to
    find its connection and send smaller segments."""
    start_masquerading(cluster)
    node1 = cluster.nodes[0]
    cp = node1.topo.exec_in("node", ["ip", "route", "add", f"{CLIENT}/32", "dev", node1.uplink, "mtu", "lock", "1280"])
    assert cp.returncode == 0, cp.stderr
    run = cluster.lan.exec_in("client", [sys.executable, "-c", BIG_LINE, NODE1, str(ECHO_NODEPORT), "6000"], timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"answer": True, "bytes": 6000 + len("web-2 \n")}
