"""Tier 3: host-network clients served by the running agent.

A process in the node's network namespace (scripts/harness/hostclient.py,
in a cgroup of the test's own: the agent gets it as --cgroup, never the
machine's root cgroup) reaches Services through the cgroup socket programs
the agent attached by pinned BPF links: ClusterIP over TCP, UDP connected
and unconnected, IPv6, a NodePort on the node's own address, an
externalIP, session affinity; a removed backend's connected UDP socket is
destroyed; an agent killed and restarted under a connect loop costs no
connection; `uninstall` leaves no link behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scripts.harness import cgroup as cgroups
from scripts.harness.topo import GATEWAY4, Topology

from .agent import SLICEPROXY, WAIT, AgentProc, SourceDir, dump, endpoint_slice, service
from .conftest import Agents

HOSTCLIENT = str(Path(cgroups.__file__).with_name("hostclient.py"))

VIP, VIP6, STICKY_VIP, EXT_IP = "198.19.0.10", "2001:db8:ffff::10", "198.19.0.12", "198.19.6.6"
NODE_IP = GATEWAY4  # the node's address (on its pod-facing veths): its InternalIP
NODE_IP6 = "2001:db8:0:ffff::1"  # a global IPv6 address of the node, its source towards pods
PODS = {
    "backend-1": ("198.18.1.11", "2001:db8:1::11"),
    "backend-2": ("198.18.1.12", "2001:db8:1::12"),
    "backend-3": ("198.18.1.13", "2001:db8:1::13"),
}
PORTS = [("http", 80, "TCP", 8080), ("dns", 53, "UDP", 5353)]
SLICE_PORTS = [("http", 8080, "TCP"), ("dns", 5353, "UDP")]
LINKS = 8  # connect, sendmsg, recvmsg, getpeername; 4 and 6


def web() -> dict[str, Any]:
    svc = service("web", VIP, PORTS)
    svc["spec"]["type"] = "NodePort"
    svc["spec"]["externalIPs"] = [EXT_IP]
    for p, node_port in zip(svc["spec"]["ports"], (30080, 30053), strict=True):
        p["nodePort"] = node_port
    return svc


def node_obj() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-a"},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]},
    }


def slice_of(name: str, svc: str, pods: list[str], v6: bool = False) -> dict[str, Any]:
    sl = endpoint_slice(name, svc, SLICE_PORTS, [PODS[p][1 if v6 else 0] for p in pods])
    if v6:
        sl["addressType"] = "IPv6"
    return sl


@dataclass
class HostNode:
    topo: Topology
    src: SourceDir
    cg: cgroups.TestCgroup
    agents: Agents
    tmp: Path

    def start(self, *extra: str) -> AgentProc:
        a = self.agents.start(("--cgroup", str(self.cg.path), "--node-name", "node-a", *extra))
        self.agents.wait(
            {
                f"{VIP}:80/TCP": {f"{PODS[p][0]}:8080" for p in PODS},
                f"{NODE_IP}:30080/TCP": {f"{PODS[p][0]}:8080" for p in PODS},
            },
            agent=a,
        )
        a.wait_log(rf"host clients: {LINKS} links on cgroup {self.cg.path}")
        return a

    def client(self, mode: str, *args: str, timeout: float = 60) -> dict[str, Any]:
        cp = self.topo.exec_in(
            "node",
            [sys.executable, HOSTCLIENT, "--cgroup", str(self.cg.path), mode, *args],
            timeout=timeout,
        )
        assert cp.returncode == 0, f"hostclient {mode} {args} exited {cp.returncode}: {cp.stderr[-2000:]}"
        result: dict[str, Any] = json.loads(cp.stdout)
        return result

    def spawn(self, mode: str, *args: str) -> subprocess.Popen[bytes]:
        return self.topo.run_in(
            "node",
            [sys.executable, HOSTCLIENT, "--cgroup", str(self.cg.path), mode, *args],
            stdout=subprocess.PIPE,
        )

    def finish(self, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            self.topo.stop(proc)
        assert proc.returncode == 0, f"hostclient exited {proc.returncode}"
        result: dict[str, Any] = json.loads(out)
        return result

    def bpftool(self, *args: str) -> Any:
        cp = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=30)
        assert cp.returncode == 0, f"bpftool {args}: {cp.stderr}"
        return json.loads(cp.stdout.strip() or "[]")  # an empty cgroup: an empty line

    def cgroup_progs(self) -> list[dict[str, Any]]:
        """`bpftool cgroup show` of the test cgroup: what is attached there."""
        out: list[dict[str, Any]] = self.bpftool("cgroup", "show", str(self.cg.path))
        return out

    def links(self) -> list[dict[str, Any]]:
        """`bpftool link show`: the links on the test cgroup."""
        cg_id = self.cg.path.stat().st_ino
        return [link for link in self.bpftool("link", "show") if link.get("cgroup_id") == cg_id]


def wait_lines(path: Path, want, what: str, timeout: float = WAIT) -> list[str]:
    """Poll a --progress-file until want(lines) holds."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().split() if path.exists() else []
        if want(lines):
            return lines
        assert time.monotonic() < deadline, f"the client did not get {what} within {timeout:g}s: {lines[-10:]}"
        time.sleep(0.05)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[HostNode]:
    cgroups.cleanup_stale()
    with ExitStack() as stack:
        topo = stack.enter_context(Topology())
        topo.exec_in("node", ["ip", "-6", "addr", "add", f"{NODE_IP6}/128", "dev", "lo", "nodad"], check=True)
        for name, (ip4, ip6) in PODS.items():
            topo.add_pod(name, ip4, ip6=ip6)
            topo.start_server(name, bind="::")
        cg = stack.enter_context(cgroups.TestCgroup(topo.prefix))
        src = SourceDir(tmp_path)
        src.write("node.yaml", node_obj())
        src.write("web.yaml", web())
        src.write("web-a.yaml", slice_of("web-a", "web", list(PODS)))
        agents = Agents(topo, src)
        stack.callback(agents.teardown)  # first out: links unpinned before the cgroup goes
        yield HostNode(topo, src, cg, agents, tmp_path)


def test_clusterip_tcp_and_udp_with_the_service_as_peer(host: HostNode) -> None:
    host.start()
    res = host.client("http", "--target", f"{VIP}:80", "--count", "60")
    assert res["errors"] == 0, res
    assert set(res["counts"]) == set(PODS), res["counts"]
    assert res["peers"] == {f"{VIP}:80": 60}  # getpeername() names the Service
    res = host.client("udp", "--target", f"{VIP}:53", "--count", "60")
    assert res["errors"] == 0 and set(res["counts"]) == set(PODS), res
    assert res["peers"] == {f"{VIP}:53": 60}
    res = host.client("udp-unconnected", "--target", f"{VIP}:53", "--count", "20")
    assert res["errors"] == 0 and res["sources"] == {f"{VIP}:53": 20}, res
    # `sliceproxy dump` says so, with the cgroup and the links.
    hc = dump(host.topo, host.agents.pin_dir)["host_clients"]
    assert hc["served"] and hc["cgroups"] == [{"id": host.cg.path.stat().st_ino, "path": str(host.cg.path)}], hc
    assert sorted(link["attach_type"] for link in hc["links"]) == sorted(
        f"{op}{v}" for op in ("connect", "sendmsg", "recvmsg", "getpeername") for v in (4, 6)
    )
    text = host.topo.exec_in("node", [str(SLICEPROXY), "dump", "--pin-dir", str(host.agents.pin_dir)]).stdout
    assert f"host clients: served on cgroup {host.cg.path} (8 links:" in text, text


@pytest.mark.parametrize("target", [f"{NODE_IP}:30080", f"{EXT_IP}:80"], ids=["nodeport-own-address", "external-ip"])
def test_nodeport_and_external_ip(host: HostNode, target: str) -> None:
    host.start()
    res = host.client("http", "--target", target, "--count", "60")
    assert res["errors"] == 0, res
    assert set(res["counts"]) == set(PODS), res["counts"]
    assert res["peers"] == {target: 60}


def test_session_affinity(host: HostNode) -> None:
    sticky = service("sticky", STICKY_VIP, PORTS)
    sticky["spec"]["sessionAffinity"] = "ClientIP"
    host.src.write("sticky.yaml", sticky, slice_of("sticky-a", "sticky", list(PODS)))
    a = host.start()
    host.agents.wait({f"{STICKY_VIP}:80/TCP": {f"{PODS[p][0]}:8080" for p in PODS}}, agent=a)
    res = host.client("http", "--target", f"{STICKY_VIP}:80", "--count", "40")
    assert res["errors"] == 0 and len(res["counts"]) == 1, res
    # Without affinity the same client spreads (so one backend above is the
    # affinity's doing).
    res = host.client("http", "--target", f"{VIP}:80", "--count", "40")
    assert len(res["counts"]) > 1, res


def test_ipv6(host: HostNode) -> None:
    web6 = service("web6", VIP6, PORTS)
    web6["spec"]["ipFamilies"] = ["IPv6"]
    host.src.write("web6.yaml", web6, slice_of("web6-a", "web6", list(PODS), v6=True))
    a = host.start()
    host.agents.wait({f"[{VIP6}]:80/TCP": {f"[{PODS[p][1]}]:8080" for p in PODS}}, agent=a)
    res = host.client("http", "--target", f"[{VIP6}]:80", "--count", "60")
    assert res["errors"] == 0 and set(res["counts"]) == set(PODS), res
    assert res["peers"] == {f"[{VIP6}]:80": 60}
    res = host.client("udp-unconnected", "--target", f"[{VIP6}]:53", "--count", "10")
    assert res["errors"] == 0 and res["sources"] == {f"[{VIP6}]:53": 10}, res


def test_removed_backend_resets_a_connected_udp_socket(host: HostNode) -> None:
    """A resolver connects once and loops; when its backend is removed
    from the Service (the pod still answers: only the Service changed), its
    socket is destroyed, it sees the error, connects again and gets a
    serving backend."""
    dns = service("dns", "198.19.0.53", [("dns", 53, "UDP", 5353)])
    host.src.write("dns.yaml", dns, endpoint_slice("dns-a", "dns", [("dns", 5353, "UDP")], [PODS["backend-1"][0]]))
    a = host.start()
    host.agents.wait({"198.19.0.53:53/UDP": {f"{PODS['backend-1'][0]}:5353"}}, agent=a)
    progress, stop = host.tmp / "progress", host.tmp / "stop"
    proc = host.spawn(
        "resolver", "--target", "198.19.0.53:53", "--count", "100000", "--interval", "0.02",
        "--progress-file", str(progress), "--stop-file", str(stop), "--max-seconds", "90",
    )  # fmt: skip
    try:
        wait_lines(progress, lambda ls: len(ls) >= 5, "5 answers")
        host.src.write("dns.yaml", dns, endpoint_slice("dns-a", "dns", [("dns", 5353, "UDP")], [PODS["backend-2"][0]]))
        wait_lines(progress, lambda ls: "backend-2" in ls, "an answer from backend-2")
    finally:
        stop.touch()
        res = host.finish(proc)
    first = res["answers"].index("backend-2")
    assert set(res["answers"][:first]) == {"backend-1"} and set(res["answers"][first:]) == {"backend-2"}, res
    # One error, then a new socket: ECONNABORTED when the resolver waited
    # in recv() as its socket was destroyed, EDESTADDRREQ when its next
    # send() met the socket destroyed (disconnected) in between.
    assert len(res["errors"]) == 1 and res["errors"][0] in ("ECONNABORTED", "EDESTADDRREQ"), res
    assert res["sockets"] == 2
    assert a.matching(r"destroyed 1 host UDP sockets connected to removed backends")


def test_agent_killed_and_restarted_under_a_connect_loop(host: HostNode) -> None:
    a = host.start()
    progress, stop = host.tmp / "progress", host.tmp / "stop"
    proc = host.spawn(
        "http", "--target", f"{VIP}:80", "--count", "100000", "--timeout", "2",
        "--progress-file", str(progress), "--stop-file", str(stop), "--max-seconds", "90",
    )  # fmt: skip
    try:
        n = len(wait_lines(progress, lambda ls: len(ls) >= 20, "20 answers"))
        a.kill()
        # Nothing serves but the pinned links and maps now.
        n = len(wait_lines(progress, lambda ls: len(ls) >= n + 20, "20 answers with no agent"))
        b = host.start()
        assert b.matching(r"host clients: 8 links on cgroup .* \(adopted\)"), b.log_tail()
        wait_lines(progress, lambda ls: len(ls) >= n + 20, "20 answers after the restart")
        b.terminate()
    finally:
        stop.touch()
        res = host.finish(proc)
    assert res["errors"] == 0, res
    assert set(res["counts"]) == set(PODS)


def test_uninstall_leaves_no_hook(host: HostNode) -> None:
    a = host.start()
    assert sorted(p["name"] for p in host.cgroup_progs()) == sorted(
        f"sp_host_{op}{v}" for op in ("connect", "sendmsg", "recvmsg", "getpeername") for v in (4, 6)
    )
    assert len(host.links()) == LINKS
    a.terminate()
    cp = host.topo.exec_in(
        "node",
        [str(SLICEPROXY), "uninstall", "--pin-dir", str(host.agents.pin_dir), "--interfaces", host.topo.iface_glob],
    )
    assert cp.returncode == 0, cp.stderr
    assert host.cgroup_progs() == []
    assert host.links() == []
    assert not host.agents.pin_dir.exists()
    res = host.client("connect", "--target", f"{VIP}:80", "--timeout", "0.5")
    assert res["errno"] is not None, res  # nothing translates the ClusterIP any more


def test_host_clients_off_detaches_them(host: HostNode) -> None:
    a = host.start()
    a.terminate()
    b = host.agents.start(("--cgroup", str(host.cg.path), "--host-clients", "off", "--node-name", "node-a"))
    b.wait_log(r"host clients off \(--host-clients off\): detached 8 links")
    assert host.cgroup_progs() == [] and host.links() == []
    res = host.client("connect", "--target", f"{VIP}:80", "--timeout", "0.5")
    assert res["errno"] is not None, res
