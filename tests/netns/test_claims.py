"""Tier 3: two Services in a directory of YAML claiming one ClusterIP:port.

The Service that holds the frontend keeps it (the API server would have
refused the second one; a directory of YAML cannot), the second one is
named in an error line with the address, its other frontends are served,
and it takes the frontend over when the first one goes.
"""

from __future__ import annotations

import pytest

from scripts.harness.topo import Topology

from .agent import endpoint_slice, service
from .conftest import BACKENDS, THREE, VIP, Agents, assert_spread, http, web_backends

pytestmark = pytest.mark.root

ALT = 8082


def test_a_second_service_on_a_held_clusterip_port_waits_for_it(topo: Topology, agents: Agents, src) -> None:
    agent = agents.start_ready()
    # "shadow" claims web's 198.19.0.10:80, and has a port of its own on
    # the same address; backend-4 serves both.
    be4 = f"{BACKENDS['backend-4']}:8080"
    src.write(
        "shadow.yaml",
        service("shadow", VIP, [("http", 80, "TCP", 8080), ("alt", ALT, "TCP", 8080)]),
        endpoint_slice("shadow-a", "shadow", [("http", 8080, "TCP"), ("alt", 8080, "TCP")], [BACKENDS["backend-4"]]),
    )
    lines = agent.wait_log(r"ERROR .*default/shadow Service: frontend 198\.19\.0\.10:80/TCP is already default/web")
    assert len(lines) == 1, lines
    agents.wait({**web_backends(*THREE), f"{VIP}:{ALT}/TCP": {be4}}, agent=agent)
    assert_spread(http(topo), THREE)  # the holder keeps it
    assert_spread(http(topo, target=f"{VIP}:{ALT}"), ["backend-4"])

    # web goes: shadow takes its address without a restart.
    src.remove("service.yaml")
    agents.wait({f"{VIP}:80/TCP": {be4}, f"{VIP}:{ALT}/TCP": {be4}}, agent=agent)
    assert_spread(http(topo), ["backend-4"])
    assert len(agent.matching(r"ERROR .*default/shadow Service: frontend")) == 1
