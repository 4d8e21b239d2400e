"""Tier 3: /metrics and /healthz of a running agent, scraped from inside
its node namespace while real traffic flows."""

from __future__ import annotations

import json
import sys

import pytest

from ctrl.dataplane.abi import map_name
from scripts.harness.topo import Topology

from .conftest import THREE, Agents, assert_spread, http, web_backends

pytestmark = pytest.mark.root

FETCH = (
    "import sys, urllib.request, urllib.error\n"
    "try:\n"
    "    r = urllib.request.urlopen(sys.argv[1], timeout=5)\n"
    "    code, body = r.status, r.read()\n"
    "except urllib.error.HTTPError as e:\n"
    "    code, body = e.code, e.read()\n"
    "sys.stdout.write(str(code) + '\\n' + body.decode())\n"
)


def fetch(topo: Topology, url: str) -> tuple[int, str]:
    cp = topo.exec_in("node", [sys.executable, "-c", FETCH, url], timeout=15)
    assert cp.returncode == 0, cp.stderr
    code, body = cp.stdout.split("\n", 1)
    return int(code), body


def samples(text: str) -> dict[str, float]:
    """'name{labels}' -> value, from the Prometheus text format."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_metrics_count_syncs_changes_packets_and_map_entries(topo: Topology, agents: Agents) -> None:
    agent = agents.start_ready()
    assert_spread(http(topo), THREE)
    # One change through the source: counted as an endpoint change.
    agents.src.remove("slice-b.yaml")  # backend-3 leaves
    agents.wait(web_backends("backend-1", "backend-2"))

    code, text = fetch(topo, "http://127.0.0.1:10249/metrics")
    assert code == 200
    m = samples(text)
    assert m["kubeproxy_sync_proxy_rules_duration_seconds_count"] >= 2
    assert m["kubeproxy_sync_full_proxy_rules_duration_seconds_count"] >= 1
    assert m["kubeproxy_sync_proxy_rules_last_timestamp_seconds"] > 0
    assert m["kubeproxy_sync_proxy_rules_endpoint_changes_total"] >= 3  # two slices listed, one removed
    assert m["kubeproxy_sync_proxy_rules_service_changes_total"] >= 1
    assert m["kubeproxy_sync_proxy_rules_endpoint_changes_pending"] == 0
    # Read from the kernel at scrape time.
    assert m['sliceproxy_packets_total{verdict="dnat_new"}'] >= 200
    assert m['sliceproxy_packets_total{verdict="revnat"}'] >= 200
    # No external interface here: nothing handed on by XDP, but exported.
    assert m["sliceproxy_xdp_handoffs_total"] == 0
    svc = map_name("sp_svc")
    assert m[f'sliceproxy_map_entries{{map="{svc}"}}'] == 3  # http, dns, echo
    assert m[f'sliceproxy_map_capacity{{map="{svc}"}}'] == 65536
    assert m["sliceproxy_conntrack_entries"] >= 2 * 200
    # The trace's per-CPU state and ring buffer hold no entries to count.
    for base in ("sp_trace", "sp_events"):
        assert f'sliceproxy_map_capacity{{map="{map_name(base)}"}}' not in m
    assert not agent.matching("counting map"), agent.matching("counting map")


def test_healthz_body_and_counter(topo: Topology, agents: Agents) -> None:
    agents.start_ready()
    code, body = fetch(topo, "http://127.0.0.1:10256/healthz")
    assert code == 200
    doc = json.loads(body)
    assert set(doc) == {"lastUpdated", "currentTime", "nodeEligible"} and doc["lastUpdated"]
    _, text = fetch(topo, "http://127.0.0.1:10249/metrics")
    assert samples(text)['kubeproxy_proxy_healthz_total{code="200"}'] >= 1
