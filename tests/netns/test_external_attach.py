"""Tier 3: the external programs on --external-interfaces are attached,
replaced in place on restart and removed by uninstall like the pod ones.
The "uplinks" are veth pairs inside the node namespace (peers `<prefix>v<n>`):
attaching needs no traffic."""

from __future__ import annotations

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
