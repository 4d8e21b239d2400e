"""Tier 3: `sliceproxy dump` filters and flows, read from the pinned maps
while real traffic flows."""

from __future__ import annotations

import json

import pytest

from scripts.harness.topo import Topology

from .agent import SLICEPROXY, endpoint_slice, service
from .conftest import BACKENDS, CLIENT_IP, VIP, Agents, http, web_backends

pytestmark = pytest.mark.root

OTHER_VIP = "198.19.0.11"


def run_dump(topo: Topology, agents: Agents, *args: str) -> str:
    cp = topo.exec_in("node", [str(SLICEPROXY), "dump", "--pin-dir", str(agents.pin_dir), *args], timeout=30)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


def test_dump_filters_by_service_and_lists_flows(topo: Topology, agents: Agents) -> None:
    agents.src.write(
        "other.yaml",
        service("other", OTHER_VIP, [("http", 80, "TCP", 8080)]),
        endpoint_slice("other-a", "other", [("http", 8080, "TCP")], [BACKENDS["backend-4"]]),
    )
    agents.start_ready(
        {
            **web_backends("backend-1", "backend-2", "backend-3"),
            f"{OTHER_VIP}:80/TCP": {f"{BACKENDS['backend-4']}:8080"},
        }
    )
    res = http(topo, count=30)
    assert res["errors"] == 0

    web = json.loads(run_dump(topo, agents, "--json", "--service", "default/web", "--conntrack"))
    assert {s["name"].split(":")[0] for s in web["services"]} == {"default/web"}
    assert len(web["services"]) == 3  # http, dns, echo
    flows = web["conntrack"]
    assert len(flows) >= 30
    web_backends_http = {f"{ip}:8080" for name, ip in BACKENDS.items() if name != "backend-4"}
    for f in flows:
        assert f["frontend"] == f"{VIP}:80" and f["proto"] == "TCP"
        assert f["client"].startswith(f"{CLIENT_IP}:") and f["backend"] in web_backends_http
        assert f["idle_seconds"] >= 0

    other = json.loads(run_dump(topo, agents, "--json", "--service", "default/other", "--conntrack"))
    assert [s["frontend"] for s in other["services"]] == [f"{OTHER_VIP}:80/TCP"]
    assert other["conntrack"] == []  # no traffic went to it

    table = run_dump(topo, agents, "--service", "default/web", "--conntrack")
    assert "default/web:http/TCP" in table and "default/other" not in table
    assert "PROTO" in table and f"{VIP}:80" in table
