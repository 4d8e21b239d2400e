"""Tier 3: the external programs on --external-interfaces are attached,
replaced in place on restart and removed by uninstall like the pod ones.
The "uplinks" are veth pairs inside the node namespace (peers `<prefix>v<n>`):
attaching needs no traffic."""

from __future__ import annotations

import json
import platform
import re
import subprocess
from pathlib import Path

import pytest

from scripts.harness.topo import Topology

from .agent import SLICEPROXY, our_filters
from .conftest import Agents

pytestmark = pytest.mark.root

HOOKS = (("ingress", "sp_ext_ingress"), ("egress", "sp_ext_egress"))


def add_uplink(topo: Topology, i: int) -> str:
    name, peer = f"{topo.prefix}u{i}", f"{topo.prefix}v{i}"
    for argv in (
        ["ip", "link", "add", name, "type", "veth", "peer", "name", peer],
        ["ip", "link", "set", name, "up"],
        ["ip", "link", "set", peer, "up"],
    ):
        cp = topo.exec_in("node", argv)
        assert cp.returncode == 0, cp.stderr
    return name


def add_uplinks(topo: Topology, n: int = 2) -> list[str]:
    return [add_uplink(topo, i) for i in range(n)]


def assert_external_filters(topo: Topology, uplinks: list[str]) -> None:
    for ifname in uplinks:
        for hook, prog in HOOKS:
            found = our_filters(topo, ifname, hook)
            assert len(found) == 1, f"{ifname}: expected one sliceproxy filter at {hook}, found {found}"
            assert found[0]["options"]["prog"]["name"] == prog, found[0]
    # The pod interfaces keep the pod programs.
    for pod in topo.pods.values():
        found = our_filters(topo, pod.host_if, "ingress")
        assert [f["options"]["prog"]["name"] for f in found] == ["sp_tc_ingress"]


def test_external_interfaces_attach_restart_and_uninstall(topo: Topology, agents: Agents) -> None:
    uplinks = add_uplinks(topo)
    # A glob that also matches the pod veths' prefix would take them over:
    # `<prefix>u*` matches the uplinks only.
    extra = ("--external-interfaces", f"{topo.prefix}u*")
    first = agents.start_ready(extra=extra)
    first.wait_attached(uplinks)
    assert_external_filters(topo, uplinks)

    first.terminate()
    second = agents.start_ready(extra=extra)
    second.wait_attached(uplinks)
    # Replaced in place: still exactly one filter per hook.
    assert_external_filters(topo, uplinks)

    # An uplink that appears later is picked up while running.
    late = add_uplink(topo, 9)
    second.wait_attached([late])
    assert_external_filters(topo, [*uplinks, late])
    second.terminate()

    for _ in range(2):  # the second uninstall has nothing left to do
        cp = topo.exec_in(
            "node",
            [
                str(SLICEPROXY), "uninstall", "--pin-dir", str(agents.pin_dir),
                "--interfaces", topo.iface_glob, "--external-interfaces", f"{topo.prefix}u*",
            ],
        )  # fmt: skip
        assert cp.returncode == 0, cp.stderr
        for ifname in [*uplinks, late]:
            for hook, _ in HOOKS:
                assert our_filters(topo, ifname, hook) == [], f"{ifname} still has our filter at {hook}"


def test_an_interface_in_both_sets_gets_the_external_programs(topo: Topology, agents: Agents) -> None:
    """--interfaces '<prefix>*' also matches the uplink: the external set wins."""
    (uplink,) = add_uplinks(topo, 1)
    a = agents.start(extra=("--interfaces", f"{topo.prefix}*", "--external-interfaces", uplink))
    agents.wait_ready(a)
    a.wait_attached([uplink])
    assert_external_filters(topo, [uplink])


# -- XDP -------------------------------------------------------------------------

XDP_MODE_NAMES = {1: "native", 2: "generic", 3: "offload"}


def xdp_on(topo: Topology, ifname: str) -> tuple[str, str] | None:
    """(program name, mode) of the XDP program on a node interface, as
    `ip link` reports it, or None."""
    cp = topo.exec_in("node", ["ip", "-j", "-d", "link", "show", "dev", ifname])
    assert cp.returncode == 0, cp.stderr
    x = json.loads(cp.stdout)[0].get("xdp")
    if not x:
        return None
    return x["prog"]["name"], XDP_MODE_NAMES.get(x["mode"], str(x["mode"]))


def wait_xdp(agent, ifnames: list[str]) -> None:
    for ifname in ifnames:
        agent.wait_log(rf"XDP attached to interface {re.escape(ifname)} \(")


def uninstall(topo: Topology, agents: Agents) -> None:
    cp = topo.exec_in(
        "node",
        [str(SLICEPROXY), "uninstall", "--pin-dir", str(agents.pin_dir), "--external-interfaces", f"{topo.prefix}u*"],
    )
    assert cp.returncode == 0, cp.stderr


def test_xdp_attached_replaced_removed_by_off_and_uninstall(topo: Topology, agents: Agents) -> None:
    """The default (--xdp auto) attaches the XDP program in native mode on
    veth; a restart replaces it in place (one program, ours); --xdp generic
    moves it to the generic hook; a start with --xdp off removes what an
    earlier agent left; uninstall removes it with the tc filters."""
    uplinks = add_uplinks(topo)
    ext = ("--external-interfaces", f"{topo.prefix}u*")
    a = agents.start_ready(extra=ext)
    wait_xdp(a, uplinks)
    assert [xdp_on(topo, u) for u in uplinks] == [("sp_ext_xdp", "native")] * 2
    a.terminate()
    # The program outlives the agent, as the tc filters do.
    assert [xdp_on(topo, u) for u in uplinks] == [("sp_ext_xdp", "native")] * 2

    b = agents.start_ready(extra=(*ext, "--xdp", "generic"))
    wait_xdp(b, uplinks)
    assert [xdp_on(topo, u) for u in uplinks] == [("sp_ext_xdp", "generic")] * 2
    b.terminate()

    c = agents.start_ready(extra=(*ext, "--xdp", "off"))
    c.wait_attached(uplinks)
    for u in uplinks:
        c.wait_log(rf"XDP off: removed the XDP program an earlier agent left on {re.escape(u)}$")
    assert [xdp_on(topo, u) for u in uplinks] == [None, None]
    assert_external_filters(topo, uplinks)
    c.terminate()

    d = agents.start_ready(extra=ext)
    wait_xdp(d, uplinks)
    d.terminate()
    uninstall(topo, agents)
    assert [xdp_on(topo, u) for u in uplinks] == [None, None]


FOREIGN = """
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("xdp") int other_tool(struct xdp_md *ctx) { return XDP_PASS; }
char LICENSE[] SEC("license") = "GPL";
"""


def test_another_tools_xdp_program_is_left_alone(topo: Topology, agents: Agents, tmp_path: Path) -> None:
    """An interface whose XDP hook another tool holds keeps that program:
    the agent says why it has no XDP there, and tc serves it alone. The
    other uplink gets ours. Uninstall leaves the other tool's too."""
    uplinks = add_uplinks(topo)
    src, obj = tmp_path / "other.c", tmp_path / "other.o"
    src.write_text(FOREIGN)
    arch = f"/usr/include/{platform.machine()}-linux-gnu"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I{arch}", "-c", str(src), "-o", str(obj)], check=True)
    cp = topo.exec_in("node", ["ip", "link", "set", "dev", uplinks[0], "xdpgeneric", "obj", str(obj), "sec", "xdp"])
    assert cp.returncode == 0, cp.stderr
    a = agents.start_ready(extra=("--external-interfaces", f"{topo.prefix}u*"))
    a.wait_log(rf"no XDP on interface {re.escape(uplinks[0])} \(tc serves it alone\): another XDP program \(other_tool")
    wait_xdp(a, [uplinks[1]])
    assert xdp_on(topo, uplinks[0]) == ("other_tool", "generic")
    assert xdp_on(topo, uplinks[1]) == ("sp_ext_xdp", "native")
    assert_external_filters(topo, uplinks)
    a.terminate()
    uninstall(topo, agents)
    assert [xdp_on(topo, u) for u in uplinks] == [("other_tool", "generic"), None]
