"""Tier 3: a dual-stack Service, IPv6 end to end through the same programs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.harness.topo import Topology

from .agent import BPFFS, PIN_PREFIX, AgentProc, SourceDir, endpoint_slice, has_backends, service, wait_dump

pytestmark = pytest.mark.root

VIP4, VIP6 = "198.19.0.10", "2001:db8:ffff::10"
PODS = {
    "backend-1": ("198.18.1.11", "2001:db8:1::11"),
    "backend-2": ("198.18.1.12", "2001:db8:1::12"),
    "backend-3": ("198.18.1.13", "2001:db8:1::13"),
}
PORTS = [("http", 80, "TCP", 8080), ("dns", 53, "UDP", 5353)]
SLICE_PORTS = [("http", 8080, "TCP"), ("dns", 5353, "UDP")]


@pytest.fixture
def dual() -> Iterator[tuple[Topology, Path]]:
    with Topology() as t:
        t.add_pod("client", "198.18.1.2", ip6="2001:db8:1::2")
        for name, (ip4, ip6) in PODS.items():
            t.add_pod(name, ip4, ip6=ip6)
            t.start_server(name, bind="::")  # both families on one socket
        pin = BPFFS / f"{PIN_PREFIX}{t.prefix}"
        try:
            yield t, pin
        finally:
            shutil.rmtree(pin, ignore_errors=True)


def test_dual_stack_service_serves_ipv6_and_ipv4(dual, tmp_path) -> None:
    topo, pin = dual
    src = SourceDir(tmp_path)
    svc = service("web", VIP4, PORTS)
    svc["spec"]["clusterIPs"] = [VIP4, VIP6]
    svc["spec"]["ipFamilies"] = ["IPv4", "IPv6"]
    svc["spec"]["ipFamilyPolicy"] = "RequireDualStack"
    v6 = endpoint_slice("web-v6", "web", SLICE_PORTS, [ip6 for _, ip6 in PODS.values()])
    v6["addressType"] = "IPv6"
    src.write("service.yaml", svc)
    src.write("slice-v4.yaml", endpoint_slice("web-v4", "web", SLICE_PORTS, [ip4 for ip4, _ in PODS.values()]))
    src.write("slice-v6.yaml", v6)
    agent = AgentProc(topo, src.path, pin, ["--min-sync-period", "0.05"])
    try:
        want = {
            f"{VIP4}:80/TCP": {f"{ip4}:8080" for ip4, _ in PODS.values()},
            f"[{VIP6}]:80/TCP": {f"[{ip6}]:8080" for _, ip6 in PODS.values()},
            f"[{VIP6}]:53/UDP": {f"[{ip6}]:5353" for _, ip6 in PODS.values()},
        }
        wait_dump(topo, pin, has_backends(want), "dual-stack frontends", agent=agent)
        for target in (f"[{VIP6}]:80", f"{VIP4}:80"):
            res = topo.client("client", "http", "--target", target, "--count", "90", "--timeout", "1")
            assert res["errors"] == 0, res
            assert set(res["counts"]) == set(PODS), res
        res = topo.client("client", "udp", "--target", f"[{VIP6}]:53", "--count", "60", "--timeout", "1")
        assert res["errors"] == 0 and set(res["counts"]) == set(PODS), res
        # The backends saw the client's own IPv6 address (no source NAT).
        res = topo.client("client", "http", "--target", f"[{VIP6}]:80", "--count", "5", "--timeout", "1")
        assert res.get("client_ips_seen") == ["2001:db8:1::2"], res
    finally:
        agent.terminate()


def test_ipv6_service_without_endpoints_refuses(dual, tmp_path) -> None:
    """An IPv6 ClusterIP with no endpoint: ICMPv6 port unreachable back to
    the client, whose TCP connect() and connected UDP socket fail with
    ECONNREFUSED (not a 5 s timeout)."""
    topo, pin = dual
    src = SourceDir(tmp_path)
    svc = service("idle", VIP6, PORTS)
    svc["spec"]["clusterIPs"] = [VIP6]
    svc["spec"]["ipFamilies"] = ["IPv6"]
    src.write("service.yaml", svc)
    agent = AgentProc(topo, src.path, pin, ["--min-sync-period", "0.05"])
    try:
        want = {f"[{VIP6}]:80/TCP": set(), f"[{VIP6}]:53/UDP": set()}
        wait_dump(topo, pin, has_backends(want), "IPv6 frontends without backends", agent=agent)
        for mode, port in (("http", 80), ("udp", 53)):
            res = topo.client("client", mode, "--target", f"[{VIP6}]:{port}", "--count", "3", "--timeout", "5")
            assert res["counts"] == {} and res["errors"] == 3, res
            assert all("ConnectionRefusedError" in e for e in res["error_samples"]), res["error_samples"]
    finally:
        agent.terminate()


@pytest.mark.parametrize("size", [2000, 8000])
def test_big_ipv6_udp_datagrams_are_echoed_whole(dual, tmp_path, size: int) -> None:
    """IPv6 fragments (a Fragment header after the IPv6 header) to and from
    an IPv6 ClusterIP: each datagram echoed whole."""
    topo, pin = dual
    src = SourceDir(tmp_path)
    svc = service("web", VIP6, PORTS)
    svc["spec"]["clusterIPs"] = [VIP6]
    svc["spec"]["ipFamilies"] = ["IPv6"]
    v6 = endpoint_slice("web-v6", "web", SLICE_PORTS, [ip6 for _, ip6 in PODS.values()])
    v6["addressType"] = "IPv6"
    src.write("service.yaml", svc)
    src.write("slice-v6.yaml", v6)
    agent = AgentProc(topo, src.path, pin, ["--min-sync-period", "0.05"])
    try:
        want = {f"[{VIP6}]:53/UDP": {f"[{ip6}]:5353" for _, ip6 in PODS.values()}}
        wait_dump(topo, pin, has_backends(want), "IPv6 UDP frontend", agent=agent)
        res = topo.client(
            "client", "udp", "--target", f"[{VIP6}]:53", "--count", "30", "--timeout", "2", "--size", str(size)
        )
        assert res["errors"] == 0 and set(res["counts"]) == set(PODS), res
    finally:
        agent.terminate()
