"""Tier 3: XDP forwarding on a node with two uplinks, a flow entering by one
and leaving by the other (a redirect through the device map sp_uplinks_v5).

    outside "client" 198.18.200.100 -- lan-a -- node-1 u0 198.18.200.1
                                                node-1 u1 198.18.210.1 -- lan-b -- node-2 u0 198.18.210.2
                                                                                   web-2 198.18.2.11 (its pod)

node-1 runs the agent with --external-interfaces on both uplinks and
--xdp-forward, and routes node-2's pod subnet through u1; node-2 runs no
agent: a router for its pod, which answers node-1's address (the flows are
masqueraded) through u1. A NodePort on node-1 whose only backend is web-2:
every flow enters by u0 and leaves by u1. The client sends whole checksums,
as from a wire (XDP rewrites them incrementally), and node-1 knows node-2's
MAC before the first packet (a permanent neighbour entry). The bridge-side
ends of the uplinks carry a pass-through XDP program: a frame XDP transmits
on a veth (XDP_TX, a redirect) reaches the peer only with one there (or
GRO). node-1's FORWARD chain counts, with a rule of the test's own, the
client's packets to the pod that the kernel forwarded: none when XDP sent
them all.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from ctrl.dataplane import abi
from ctrl.dataplane.maps import Map
from scripts.harness.topo import Lan, Topology

from .agent import BPFFS, PIN_PREFIX, AgentProc, SourceDir, dump, endpoint_slice, wait_dump
from .test_external import PASS_XDP, node_obj, web_service

pytestmark = pytest.mark.root

CLIENT = "198.18.200.100"
NODE1, NODE1_B, NODE2 = "198.18.200.1", "198.18.210.1", "198.18.210.2"
WEB2 = "198.18.2.11"
NODEPORT = 30080


@dataclass
class TwoUplinks:
    lan_a: Lan
    lan_b: Lan
    node1: Topology
    node2: Topology
    uplinks: list[str]  # node-1's: u0 (lan-a, the client's side), u1 (lan-b, node-2's)
    src: SourceDir
    pin_dir: Path
    pass_obj: Path  # PASS_XDP compiled
    agent: AgentProc | None = None

    def ifindex(self, name: str) -> int:
        cp = self.node1.exec_in("node", ["ip", "-j", "link", "show", "dev", name])
        assert cp.returncode == 0, cp.stderr
        return int(json.loads(cp.stdout)[0]["ifindex"])

    def listed(self) -> set[int]:
        """The ifindexes sp_uplinks_v5 holds."""
        m = Map.open_pinned(str(self.pin_dir / abi.map_name("sp_uplinks")))
        try:
            return {abi.U32.unpack(k)[0] for k, _ in m.items()}
        finally:
            m.close()

    def forwarded_by_netfilter(self) -> int:
        cp = self.node1.exec_in("node", ["iptables-legacy", "-L", "FORWARD", "-v", "-x", "-n"])
        assert cp.returncode == 0, cp.stderr
        for line in cp.stdout.splitlines():
            f = line.split()
            if len(f) >= 2 and f[-2:] == [CLIENT, WEB2]:
                return int(f[0])
        raise AssertionError(f"no counting rule in {cp.stdout}")

    def counters(self) -> dict[str, int]:
        return {k: int(v["packets"]) for k, v in dump(self.node1, self.pin_dir)["counters"].items()}


def _ok(cp: subprocess.CompletedProcess[str]) -> None:
    assert cp.returncode == 0, cp.stderr


@contextmanager
def two_uplinks(tmp_path: Path) -> Iterator[TwoUplinks]:
    """The topology of the module docstring, the Service written, no agent
    yet."""
    stack: list[Topology] = []
    env: TwoUplinks | None = None
    try:
        lan_a, lan_b = Lan(), Lan()
        stack += [lan_a, lan_b]
        lan_a.add_host("client", CLIENT)
        lan_a.full_checksums("client")
        node1, node2 = Topology(), Topology()
        stack += [node1, node2]
        uplinks = [node1.add_uplink(lan_a, NODE1), node1.add_uplink(lan_b, NODE1_B)]
        node1.add_route("node", "198.18.2.0/24", NODE2)
        node2.add_pod("web-2", WEB2)
        node2.add_uplink(lan_b, NODE2)
        node2.add_route("node", "198.18.200.0/24", NODE1_B)
        node2.start_server("web-2")
        # node-2's MAC known before the first packet: none waits in the kernel.
        cp = node2.exec_in("node", ["ip", "-j", "link", "show", "dev", f"{node2.prefix}u0"])
        _ok(cp)
        mac = json.loads(cp.stdout)[0]["address"]
        _ok(
            node1.exec_in(
                "node", ["ip", "neigh", "replace", NODE2, "lladdr", mac, "dev", uplinks[1], "nud", "permanent"]
            )
        )
        _ok(node1.exec_in("node", ["iptables-legacy", "-A", "FORWARD", "-s", CLIENT, "-d", WEB2, "-p", "tcp"]))

        src_c, obj = tmp_path / "lan_pass.c", tmp_path / "lan_pass.o"
        src_c.write_text(PASS_XDP)
        arch = f"/usr/include/{platform.machine()}-linux-gnu"
        subprocess.run(["clang", "-O2", "-target", "bpf", f"-I{arch}", "-c", str(src_c), "-o", str(obj)], check=True)
        ends = [(lan_a, node1.uplink_peers[uplinks[0]]), (lan_b, node1.uplink_peers[uplinks[1]])]
        ends += [(lan_b, port) for port in node2.uplink_peers.values()]
        for lan, port in ends:
            _ok(lan.exec_in("node", ["ip", "link", "set", "dev", port, "xdp", "obj", str(obj), "sec", "xdp"]))

        src = SourceDir(tmp_path / "node-1")
        svc = web_service("Cluster")
        ports = [("http", 8080, "TCP"), ("dns", 5353, "UDP")]
        sl = endpoint_slice("web-a", "web", ports, [WEB2])
        sl["endpoints"][0]["nodeName"] = "node-2"
        src.write("web.yaml", svc, sl)
        src.write("node.yaml", node_obj("node-1", NODE1))
        env = TwoUplinks(lan_a, lan_b, node1, node2, uplinks, src, BPFFS / f"{PIN_PREFIX}{node1.prefix}", obj)
        yield env
    finally:
        if env is not None:
            if env.agent is not None and env.agent.alive():
                env.agent.terminate()
            shutil.rmtree(env.pin_dir, ignore_errors=True)
        for t in reversed(stack):
            t.cleanup()


def start_agent(env: TwoUplinks, xdp: str) -> AgentProc:
    env.agent = AgentProc(
        env.node1,
        env.src.path,
        env.pin_dir,
        (
            "--external-interfaces", f"{env.node1.prefix}u*", "--node-name", "node-1",
            "--metrics-bind-address", "", "--healthz-bind-address", "",
            "--xdp", xdp, "--xdp-forward",
        ),
    )  # fmt: skip
    env.agent.wait_attached(env.uplinks)
    want = f"{NODE1}:{NODEPORT}/TCP"
    wait_dump(
        env.node1,
        env.pin_dir,
        lambda d: any(s["frontend"] == want and s["backends"] == [f"{WEB2}:8080"] for s in d["services"]),
        f"{want} -> {WEB2}:8080",
        agent=env.agent,
    )
    return env.agent


def http(env: TwoUplinks, count: int = 20) -> dict:
    res = env.lan_a.client("client", "http", "--target", f"{NODE1}:{NODEPORT}", "--count", str(count), "--timeout", "1")
    assert res["errors"] == 0, f"{res['errors']} of {res['requests']} failed: {res['error_samples']}"
    assert set(res["counts"]) == {"web-2"}, res["counts"]
    assert res["client_ips_seen"] == [NODE1], res  # masqueraded to node-1's address
    return res


def test_flow_out_of_the_other_uplink_is_redirected_by_xdp(tmp_path: Path) -> None:
    """Both uplinks run the XDP program in native mode: sp_uplinks_v5 lists
    both, and every packet of the client's flows is translated by XDP on
    u0 and redirected to u1 (xdp_redirect counts them, the FORWARD chain
    sees none); node-2's pod answers node-1's address and the replies come
    back through tc (UNSNAT on u1, REVNAT on u0)."""
    with two_uplinks(tmp_path) as env:
        a = start_agent(env, "auto")
        for u in env.uplinks:
            a.wait_log(rf"XDP attached to interface {re.escape(u)} \(native mode\)$")
        assert env.listed() == {env.ifindex(u) for u in env.uplinks}
        http(env)
        c = env.counters()
        assert env.forwarded_by_netfilter() == 0, "the kernel forwarded packets XDP should have redirected"
        assert c["xdp_redirect"] >= 20 * 3, c  # at least SYN, request, ACK of each of the 20 connections
        assert c["xdp_tx"] == 0 and c["drop_error"] == 0, c
        assert c["snat"] >= c["xdp_redirect"] and c["unsnat"] > 0, c

        # A restart in generic mode: the pinned device map loses what the
        # earlier agent listed, and the flows go through tc.
        a.terminate()
        a = start_agent(env, "generic")
        for u in env.uplinks:
            a.wait_log(rf"XDP attached to interface {re.escape(u)} \(generic mode\)$")
        assert env.listed() == set()
        http(env)
        assert env.counters()["xdp_redirect"] == c["xdp_redirect"]
        assert env.forwarded_by_netfilter() >= 20 * 3


@pytest.mark.parametrize("case", ["another-tools-xdp-on-u1", "generic-mode"])
def test_flow_out_of_an_uplink_without_native_xdp_goes_through_tc(tmp_path: Path, case: str) -> None:
    """u1 without our XDP program in native mode: another tool's XDP program
    holds its hook (the agent leaves it to tc), or every uplink runs ours
    in generic mode. sp_uplinks_v5 does not list u1, XDP on u0 hands the
    flows to tc, which translates them and the kernel forwards them (the
    FORWARD chain counts them): every connection answered, xdp_redirect
    stays 0."""
    with two_uplinks(tmp_path) as env:
        if case == "another-tools-xdp-on-u1":
            _ok(
                env.node1.exec_in(
                    "node",
                    ["ip", "link", "set", "dev", env.uplinks[1], "xdpgeneric", "obj", str(env.pass_obj), "sec", "xdp"],
                )
            )
            a = start_agent(env, "auto")
            a.wait_log(rf"XDP attached to interface {re.escape(env.uplinks[0])} \(native mode\)$")
            a.wait_log(rf"no XDP on interface {re.escape(env.uplinks[1])} \(tc serves it alone\)")
            assert env.listed() == {env.ifindex(env.uplinks[0])}
        else:
            a = start_agent(env, "generic")
            for u in env.uplinks:
                a.wait_log(rf"XDP attached to interface {re.escape(u)} \(generic mode\)$")
            assert env.listed() == set()
        http(env)
        c = env.counters()
        assert c["xdp_redirect"] == 0, c
        assert env.forwarded_by_netfilter() >= 20 * 3
        assert c["snat"] > 0 and c["unsnat"] > 0, c
