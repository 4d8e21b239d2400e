"""Host clients: the cgroup socket programs (ebpf/host_sock.c) with real
sockets.

sock_addr programs do not run under BPF_PROG_TEST_RUN, so these tests load
the object with its host programs, attach them by BPF links to a cgroup of
the test's own (never the machine's root cgroup), seed the maps as the tc
tests do, and run scripts/harness/hostclient.py in the topology's node
namespace inside that cgroup, against servers.py in backend pods. No tc
program is attached: every translation seen is the socket programs'.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ctrl.dataplane import abi, hostclients, loader
from scripts.harness import cgroup as cgroups
from scripts.harness.topo import GATEWAY4, Topology

from .packets import TCP_P, UDP_P, Backend, Svc, mapname, mapped, put_backend, put_service

HOSTCLIENT = os.path.join(os.path.dirname(cgroups.__file__), "hostclient.py")

VIP = "198.19.0.10"
VIP6 = "2001:db8:ff::10"
PODS = {
    "be1": ("198.18.2.1", "2001:db8:2::1"),
    "be2": ("198.18.2.2", "2001:db8:2::2"),
    "be3": ("198.18.2.3", "2001:db8:2::3"),
}
NODE = GATEWAY4  # the node's source address towards the pods, and its address in sp_cfg
# A global IPv6 address of the node: its source towards the pods (with only
# the link-local gateway, a pod would answer from its link-local address).
NODE6 = "2001:db8:0:ffff::1"


@dataclass
class Host:
    dp: loader.Dataplane
    topo: Topology
    cg: cgroups.TestCgroup

    def run(self, mode: str, *args: str, ns: str = "node", timeout: float = 60) -> dict:
        cp = self.topo.exec_in(
            ns,
            [sys.executable, HOSTCLIENT, "--cgroup", str(self.cg.path), mode, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert cp.returncode == 0, f"hostclient {mode} {args} exited {cp.returncode}: {cp.stderr[-2000:]}"
        return json.loads(cp.stdout)

    def seed_web(self, proto: int = TCP_P, v6: bool = False, port: int = 80, be_port: int = 8080, **svc) -> None:
        """VIP (or VIP6):port over proto, served by be1..be3 on be_port."""
        base = 10 if v6 else 0
        base += 20 if proto == UDP_P else 0
        ids = []
        for i, (v4, a6) in enumerate(PODS.values(), start=1):
            put_backend(self.dp, Backend(base + i, a6 if v6 else v4, be_port, proto))
            ids.append(base + i)
        put_service(self.dp, Svc(VIP6 if v6 else VIP, port, proto, svc_id=base + 1, slots=tuple(ids), **svc))


@pytest.fixture
def host() -> Iterator[Host]:
    if os.geteuid() != 0:
        pytest.fail("the host client tests attach cgroup programs and make namespaces: they need root", pytrace=False)
    cgroups.cleanup_stale()
    dp = loader.load(pin_dir=None, host_clients=True)
    links: list[int] = []
    try:
        with Topology() as topo, cgroups.TestCgroup(topo.prefix) as cg:
            topo.exec_in("node", ["ip", "-6", "addr", "add", f"{NODE6}/128", "dev", "lo", "nodad"], check=True)
            for name, (v4, v6) in PODS.items():
                topo.add_pod(name, v4, v6)
                topo.start_server(name, bind="::")
            cg_fd = os.open(cg.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for name, (fd, attach_type) in dp.host_progs.items():
                    links.append(hostclients.create_link(fd, attach_type, cg_fd, name))
            finally:
                os.close(cg_fd)
            h = Host(dp, topo, cg)
            hostclients.write_host_config(dp.maps, h.run("cookie")["netns_cookie"])
            dp.maps[mapname("sp_cfg")].update(abi.u32(0), abi.NodeConfig(addr4=mapped(NODE)).packed())
            try:
                yield h
            finally:
                for fd in links:
                    os.close(fd)  # unpinned links: closing the fd detaches
    finally:
        dp.close()


def target(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def test_tcp_connect_gets_a_backend_and_getpeername_the_service(host):
    host.seed_web()
    res = host.run("http", "--target", target(VIP, 80), "--count", "60")
    assert res["errors"] == 0, res
    assert set(res["counts"]) == set(PODS), f"answers came from {res['counts']}"
    assert res["peers"] == {f"{VIP}:80": 60}


def test_connected_udp(host):
    host.seed_web(UDP_P, port=53, be_port=5353)
    res = host.run("udp", "--target", target(VIP, 53), "--count", "60")
    assert res["errors"] == 0, res
    assert set(res["counts"]) == set(PODS), f"answers came from {res['counts']}"
    assert res["peers"] == {f"{VIP}:53": 60}


def test_unconnected_udp_answers_come_from_the_service(host):
    """One unconnected socket: every datagram reaches a backend, every
    answer reads as from the Service, and the socket keeps one backend (as
    one netfilter conntrack entry would)."""
    host.seed_web(UDP_P, port=53, be_port=5353)
    res = host.run("udp-unconnected", "--target", target(VIP, 53), "--count", "30")
    assert res["errors"] == 0, res
    assert res["sources"] == {f"{VIP}:53": 30}
    assert len(res["counts"]) == 1 and sum(res["counts"].values()) == 30, res["counts"]
    # Many sockets: spread over the backends.
    seen: set[str] = set()
    for _ in range(30):
        seen |= set(host.run("udp-unconnected", "--target", target(VIP, 53), "--count", "1")["counts"])
        if seen == set(PODS):
            break
    assert seen == set(PODS)


def test_unconnected_udp_moves_when_its_backend_leaves_its_slot(host):
    host.seed_web(UDP_P, port=53, be_port=5353)
    first = host.run("udp-unconnected", "--target", target(VIP, 53), "--count", "5")
    (pod,) = first["counts"]
    # The control plane's removal of that backend: the last slot moves into
    # its place and the count drops.
    ids = [21, 22, 23]
    gone = ids[list(PODS).index(pod)]
    rest = tuple(i for i in ids if i != gone)
    put_service(host.dp, Svc(VIP, 53, UDP_P, svc_id=21, slots=rest))
    res = host.run("udp-unconnected", "--target", target(VIP, 53), "--count", "20")
    assert res["errors"] == 0 and pod not in res["counts"], res


def test_ipv6(host):
    host.seed_web(v6=True)
    res = host.run("http", "--target", target(VIP6, 80), "--count", "30")
    assert res["errors"] == 0, res
    assert set(res["counts"]) == set(PODS)
    assert res["peers"] == {f"[{VIP6}]:80": 30}
    host.seed_web(UDP_P, v6=True, port=53, be_port=5353)
    res = host.run("udp-unconnected", "--target", target(VIP6, 53), "--count", "10")
    assert res["errors"] == 0 and res["sources"] == {f"[{VIP6}]:53": 10}, res


def test_no_endpoint_refuses(host):
    """kube-proxy's REJECT: connect() and sendto() fail at once with
    ECONNREFUSED."""
    put_service(host.dp, Svc(VIP, 80, TCP_P, svc_id=1, slots=()))
    put_service(host.dp, Svc(VIP, 53, UDP_P, svc_id=2, slots=()))
    assert host.run("connect", "--target", target(VIP, 80))["errno"] == "ECONNREFUSED"
    res = host.run("udp-unconnected", "--target", target(VIP, 53), "--count", "3")
    assert res["error_samples"] == ["ECONNREFUSED"] * 3
    res = host.run("udp", "--target", target(VIP, 53), "--count", "1")
    assert res["error_samples"] == ["ECONNREFUSED"]


def test_external_scope_is_not_a_host_clients(host):
    """A host client is in-cluster: only scope internal frontends serve
    it (externalTrafficPolicy's scope does not)."""
    put_backend(host.dp, Backend(1, PODS["be1"][0], 8080))
    put_service(host.dp, Svc(VIP, 80, TCP_P, svc_id=1, slots=(1,), scope=abi.SCOPE_EXTERNAL))
    res = host.run("connect", "--target", target(VIP, 80), "--timeout", "0.5")
    assert res["errno"] != None and res["errno"] != "ECONNREFUSED", res  # noqa: E711 - untouched: no route


def test_socket_of_another_netns_is_untouched(host):
    """A process in the same cgroup but another network namespace (a pod)
    is left to the tc path: its connect to the VIP reaches whatever the VIP
    is there (here a local server of its own), not a backend."""
    other = host.topo.add_pod("other", "198.18.3.1")
    host.topo.exec_in("other", ["ip", "addr", "add", f"{VIP}/32", "dev", "lo"], check=True)
    host.topo.start_server("other", name="other", tcp_port=80)
    host.seed_web()
    res = host.run("http", "--target", target(VIP, 80), "--count", "10", ns=other.ns)
    assert res["counts"] == {"other": 10}, res
    # The node's own sockets are served meanwhile.
    assert set(host.run("http", "--target", target(VIP, 80), "--count", "30")["counts"]) == set(PODS)


def test_session_affinity_keys_on_the_node_address(host):
    host.seed_web(affinity_timeout=600)
    res = host.run("http", "--target", target(VIP, 80), "--count", "30")
    assert res["errors"] == 0 and len(res["counts"]) == 1, res
    aff = host.dp.maps[mapname("sp_aff")].items()
    keys = [abi.unpack("sp_aff_key", k) for k, _ in aff]
    assert [(k["svc_id"], k["addr"]) for k in keys] == [(1, mapped(NODE))]
