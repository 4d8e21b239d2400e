"""Tier 3: hairpin, a pod reaching a Service of its own that picks the pod.

A backend pod connects to a ClusterIP whose chosen backend is the pod
itself. Without hairpin handling the DNATed packet enters the pod from the
pod's own address and is dropped there; with it, the pod's server sees the
connection come from the hairpin address (--hairpin-ipv4/-ipv6, set here to
addresses of the test range), and its client sees the answer come from the
ClusterIP. Every node namespace drops what netfilter's conntrack finds
INVALID, as Calico and kube-proxy rulesets do.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.harness.topo import Topology

from .agent import BPFFS, PIN_PREFIX, AgentProc, SourceDir, endpoint_slice, has_backends, service, wait_dump
from .conftest import BACKENDS, SLICE_PORTS, THREE, VIP, WEB_PORTS, Agents, web_backends

pytestmark = pytest.mark.root

HAIRPIN4 = "198.18.255.254"
HAIRPIN6 = "2001:db8:ffff:ffff::fe"
HAIRPIN_FLAGS = ("--hairpin-ipv4", HAIRPIN4, "--hairpin-ipv6", HAIRPIN6)
SELF_VIP = "198.19.0.20"  # a Service whose only backend is backend-1
POD = "backend-1"
INVALID_DROP = ["FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]


def drop_invalid(topo: Topology) -> None:
    cp = topo.exec_in("node", ["iptables-legacy", "-A", *INVALID_DROP])
    assert cp.returncode == 0, cp.stderr


def start(topo: Topology, agents: Agents, src: SourceDir) -> None:
    src.write(
        "self.yaml",
        service("self", SELF_VIP, WEB_PORTS),
        endpoint_slice("self-a", "self", SLICE_PORTS, [BACKENDS[POD]]),
    )
    want = web_backends(*THREE)
    ip = BACKENDS[POD]
    want |= {f"{SELF_VIP}:80/TCP": {f"{ip}:8080"}, f"{SELF_VIP}:53/UDP": {f"{ip}:5353"}}
    drop_invalid(topo)
    agents.start_ready(want, extra=HAIRPIN_FLAGS)


def request(topo: Topology, mode: str, target: str, count: int, *more: str) -> dict:
    return topo.client(POD, mode, "--target", target, "--count", str(count), "--timeout", "1", *more)


def assert_answered(res: dict, by: set[str]) -> None:
    assert res["errors"] == 0, f"{res['errors']} of {res['requests']} failed: {res['error_samples']}"
    assert set(res["counts"]) == by, res["counts"]


def test_a_pod_that_is_the_only_backend_reaches_itself_through_the_clusterip(
    topo: Topology, agents: Agents, src: SourceDir
) -> None:
    start(topo, agents, src)
    res = request(topo, "http", f"{SELF_VIP}:80", 30)
    assert_answered(res, {POD})
    # The pod's server saw the connections come from the hairpin address.
    assert res["client_ips_seen"] == [HAIRPIN4]
    # UDP on a connected socket: only an answer from the ClusterIP counts.
    assert_answered(request(topo, "udp", f"{SELF_VIP}:53", 30), {POD})


def test_an_established_hairpin_connection_carries_every_line(topo: Topology, agents: Agents, src: SourceDir) -> None:
    start(topo, agents, src)
    res = request(topo, "echo", f"{SELF_VIP}:8081", 40, "--interval", "0.02")
    assert_answered(res, {POD})
    assert res["connections"] == 1


# Runs in the pod: one line of `size` bytes to the echo port through the
# ClusterIP and the whole echo back (servers.py prefixes its name).
BIG_LINE = r"""
import json, socket, sys

host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
line = bytes(i % 251 + 1 for i in range(size)).replace(b"\n", b"x")
s = socket.create_connection((host, port), timeout=10)
s.sendall(line + b"\n")
got = b""
while not got.endswith(b"\n"):
    chunk = s.recv(1 << 20)
    if not chunk:
        break
    got += chunk
print(json.dumps({"echoed": got == b"backend-1 " + line + b"\n", "bytes": len(got)}))
"""


def test_a_large_transfer_over_a_hairpin_connection(topo: Topology, agents: Agents, src: SourceDir) -> None:
    """Megabytes both ways over one connection: the pod's stack hands its
    veth large (GSO) segments whose checksums are left to offload, which
    BPF_PROG_TEST_RUN never shows; rewritten and sent back into the pod,
    every byte must arrive in order."""
    start(topo, agents, src)
    size = 4 << 20
    cp = topo.exec_in(POD, [sys.executable, "-c", BIG_LINE, SELF_VIP, "8081", str(size)], timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout) == {"echoed": True, "bytes": size + len("backend-1 \n")}


def test_a_pod_reaching_a_service_with_other_backends(topo: Topology, agents: Agents, src: SourceDir) -> None:
    """Flows that pick another backend are not hairpinned (that backend sees
    the pod's own address); the ones that pick the pod itself are."""
    start(topo, agents, src)
    res = request(topo, "http", f"{VIP}:80", 90)
    assert_answered(res, set(THREE))
    assert sorted(res["client_ips_seen"]) == sorted([BACKENDS[POD], HAIRPIN4])
    assert_answered(request(topo, "udp", f"{VIP}:53", 90), set(THREE))
    # An ordinary client pod is not affected.
    res = topo.client("client", "http", "--target", f"{VIP}:80", "--count", "30", "--timeout", "1")
    assert_answered(res, set(THREE))
    assert res["client_ips_seen"] == ["198.18.1.2"]


# -- IPv6 ----------------------------------------------------------------------

POD4, POD6 = "198.18.1.11", "2001:db8:1::11"
VIP6 = "2001:db8:ffff::20"


@pytest.fixture
def single(tmp_path: Path) -> Iterator[tuple[Topology, Path, SourceDir]]:
    with Topology() as t:
        t.add_pod(POD, POD4, ip6=POD6)
        t.start_server(POD, bind="::")
        drop_invalid(t)
        cp = t.exec_in("node", ["ip6tables-legacy", "-A", *INVALID_DROP])
        assert cp.returncode == 0, cp.stderr
        pin = BPFFS / f"{PIN_PREFIX}{t.prefix}"
        try:
            yield t, pin, SourceDir(tmp_path)
        finally:
            shutil.rmtree(pin, ignore_errors=True)


def test_ipv6_pod_reaches_itself_through_the_clusterip(single) -> None:
    topo, pin, src = single
    svc = service("self", "198.19.0.20", [("http", 80, "TCP", 8080), ("dns", 53, "UDP", 5353)])
    svc["spec"]["clusterIPs"] = ["198.19.0.20", VIP6]
    svc["spec"]["ipFamilies"] = ["IPv4", "IPv6"]
    svc["spec"]["ipFamilyPolicy"] = "RequireDualStack"
    sl6 = endpoint_slice("self-v6", "self", [("http", 8080, "TCP"), ("dns", 5353, "UDP")], [POD6])
    sl6["addressType"] = "IPv6"
    src.write("self.yaml", svc, sl6)
    agent = AgentProc(topo, src.path, pin, HAIRPIN_FLAGS)
    try:
        want = {f"[{VIP6}]:80/TCP": {f"[{POD6}]:8080"}, f"[{VIP6}]:53/UDP": {f"[{POD6}]:5353"}}
        wait_dump(topo, pin, has_backends(want), "the IPv6 frontends", agent=agent)
        agent.wait_attached([topo.pods[POD].host_if])
        res = topo.client(POD, "http", "--target", f"[{VIP6}]:80", "--count", "30", "--timeout", "1")
        assert_answered(res, {POD})
        assert res["client_ips_seen"] == [HAIRPIN6]
        res = topo.client(POD, "udp", "--target", f"[{VIP6}]:53", "--count", "30", "--timeout", "1")
        assert_answered(res, {POD})
    finally:
        agent.terminate()
