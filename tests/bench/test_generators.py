"""The bench's inputs, without root: the cluster it describes (packed as the
EndpointSlice controller packs slices, addresses only from 198.18.0.0/15),
and the peers' rulesets (kube-proxy's iptables and nftables layouts)."""

import ipaddress
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from bench import iptables, nft  # noqa: E402
from bench.common import POOL_SIZE, Cluster, Scenario, pct  # noqa: E402

TEST_NET = ipaddress.ip_network("198.18.0.0/15")


@pytest.mark.parametrize(
    "scn, slices",
    [(Scenario("S1", 1, 1050), [11]), (Scenario("S2", 30, 10), [1] * 30), (Scenario("S3", 7, 50), [1] * 7)],
    ids=["one-service-many-slices", "many-small", "many-medium"],
)
def test_slices_packed_up_to_100(scn, slices):
    cl = Cluster(scn)
    assert [len(r) for r in cl.slices] == slices
    for row in cl.slices:
        assert all(len(s.addrs) <= 100 for s in row)
        assert sum(len(s.addrs) for s in row) == scn.endpoints
        assert [s.name for s in row] == sorted(s.name for s in row)


def test_endpoints_distinct_in_the_test_range_even_past_the_pool():
    cl = Cluster(Scenario("S", 1, 1000))
    cl.next_ep = POOL_SIZE - 250  # two slices fit before the pool wraps, the third would straddle it
    for j in range(len(cl.slices[0])):
        cl.replace(0, j)
    eps = cl.endpoints(0)
    assert len(set(eps)) == len(eps) == 1000
    assert all(ipaddress.ip_address(a) in TEST_NET for a, _ in eps)
    # A slice never straddles the wrap: its one port holds for all.
    assert {p for _, p in eps} == {8080, 8081}


def test_replace_gives_fresh_endpoints_same_slice_name():
    cl = Cluster(Scenario("S", 2, 100))
    before = cl.slices[1][0]
    after = cl.replace(1, 0)
    assert after.name == before.name and after.generation == before.generation + 1
    assert not set(before.addrs) & set(after.addrs)


def test_list_pages_are_what_the_api_server_sends():
    cl = Cluster(Scenario("S", 3, 400))  # 12 slices, one page
    pages = [json.loads(p) for p in cl.list_pages("EndpointSlice")]
    assert len(pages) == 1 and pages[0]["kind"] == "EndpointSliceList"
    item = pages[0]["items"][0]
    assert "kind" not in item  # list items carry no kind
    assert item["metadata"]["labels"]["kubernetes.io/service-name"] == "svc-00000"
    assert item["endpoints"][0]["conditions"] == {"ready": True, "serving": True, "terminating": False}
    big = Cluster(Scenario("S", 1, 60_000))  # 600 slices: two pages with continue
    pages = [json.loads(p) for p in big.list_pages("EndpointSlice")]
    assert [len(p["items"]) for p in pages] == [500, 100]
    assert pages[0]["metadata"]["continue"] == "1" and "continue" not in pages[1]["metadata"]
    ev = json.loads(big.watch_line(0, 3))
    assert ev["type"] == "MODIFIED" and ev["object"]["metadata"]["name"] == big.slices[0][3].name


def test_iptables_ruleset_has_kube_proxy_shape():
    cl = Cluster(Scenario("S", 2, 3))
    rs = iptables.Ruleset(cl)
    text = rs.render()
    nat = text.split("*nat\n", 1)[1]
    svc = iptables.svc_chain("bench/svc-00000:http")
    assert re.fullmatch(r"KUBE-SVC-[A-Z2-7]{16}", svc)
    want = '-A KUBE-SERVICES -m comment --comment "bench/svc-00000:http cluster IP" -m tcp -p tcp -d 198.19.0.1 '
    assert want + f"--dport 80 -j {svc}" in nat
    jumps = [line for line in nat.splitlines() if line.startswith(f"-A {svc}") and "KUBE-SEP-" in line]
    assert [re.search(r"--probability (\S+)", j).group(1) if "probability" in j else None for j in jumps] == [
        "0.3333333333",
        "0.5000000000",
        None,
    ]
    assert nat.count("-j DNAT --to-destination") == 6
    assert nat.rstrip().endswith("COMMIT")
    # Small cluster: comments on endpoint rules; over 1,000 endpoints none.
    assert '-m comment --comment "bench/svc-00000:http -> ' in nat
    big = iptables.Ruleset(Cluster(Scenario("S", 1, 1001))).render()
    assert " -> " not in big


def test_iptables_lb_ruleset_has_kube_proxy_shape():
    """A LoadBalancer Service with source ranges: KUBE-SERVICES sends the LB
    IP to KUBE-FW, which passes the ranges on to KUBE-EXT (masquerade, then
    the Service's chains) and lets the rest fall through to filter's
    KUBE-PROXY-FIREWALL DROP; other Services' rules sit around it; every
    chain jumped to is declared."""
    others = [(f"bench/o-{i}:http", f"198.19.16.{i}", f"198.18.64.{i}:8080") for i in range(4)]
    text = iptables.lb_ruleset(
        "bench/lb:udp", "udp", "198.19.0.10", "198.19.5.5", 80, 30080, "198.18.2.2:8080", ["198.18.100.0/24"], others
    )
    filt, nat = text.split("*nat\n", 1)
    h = iptables.svc_chain("bench/lb:udp", "udp")[len("KUBE-SVC-") :]
    fw, ext = f"KUBE-FW-{h}", f"KUBE-EXT-{h}"
    assert f"-m udp -p udp -d 198.19.5.5 --dport 80 -j {fw}" in nat
    assert f'-A {fw} -m comment --comment "bench/lb:udp loadbalancer IP" -s 198.18.100.0/24 -j {ext}' in nat
    assert f"-A {ext} -m comment" in nat and f"-j KUBE-MARK-MASQ\n-A {ext} -j KUBE-SVC-{h}" in nat
    assert "-m udp -p udp -j DNAT --to-destination 198.18.2.2:8080" in nat
    assert f'"bench/lb:udp traffic not accepted by {fw}" -m udp -p udp -d 198.19.5.5 --dport 80 -j DROP' in filt
    services = [line for line in nat.splitlines() if line.startswith("-A KUBE-SERVICES")]
    assert [("198.19.5.5" in s, "198.19.16." in s) for s in services] == [
        (False, True), (False, True), (False, False), (True, False), (False, True), (False, True), (False, False),
    ]  # fmt: skip
    declared = set(re.findall(r"^:(\S+)", nat, re.M))
    assert set(re.findall(r"-j (KUBE-\S+)", nat)) <= declared
    assert nat.rstrip().endswith("COMMIT") and filt.rstrip().endswith("COMMIT")


def test_iptables_partial_restore_only_rewrites_the_changed_service():
    cl = Cluster(Scenario("S", 3, 10))
    rs = iptables.Ruleset(cl)
    cl.replace(1, 0)
    rs.update(cl, 1)
    part = rs.render({1})
    assert part.count("-A KUBE-SERVICES") == 3 + 1  # every Service, and the nodeports rule
    assert iptables.svc_chain("bench/svc-00001:http") in part
    assert iptables.svc_chain("bench/svc-00000:http") + " - [0:0]" not in part
    assert part.count("DNAT") == 10


def test_nft_ruleset_has_kube_proxy_shape():
    cl = Cluster(Scenario("S", 2, 3))
    rs = nft.Ruleset(cl)
    text = rs.render_full()
    svc = rs.svc_chain(0)
    assert re.fullmatch(r"service-[A-Z2-7]{8}-bench/svc-00000/tcp/http", svc)
    assert f"add element ip kube-proxy service-ips {{ 198.19.0.1 . tcp . 80 : goto {svc} }}" in text
    vmap = next(line for line in text.splitlines() if line.startswith(f"add rule ip kube-proxy {svc} numgen"))
    assert "numgen random mod 3 vmap { 0 : goto endpoint-" in vmap
    ep = rs.ep_chain(0, *cl.endpoints(0)[0])
    assert re.fullmatch(r"endpoint-[A-Z2-7]{8}-bench/svc-00000/tcp/http__198\.18\.\d+\.\d+/8080", ep)
    # Endpoint chains exist before the vmap that jumps to them.
    assert text.index(f"add chain ip kube-proxy {ep}\n") < text.index(vmap)
    assert text.count("dnat to") == 6


def test_both_rulesets_meet_locally_generated_traffic_in_nat_output():
    """kube-proxy serves the node's own processes (host clients) from the nat
    OUTPUT hook, as pods from PREROUTING: the host client's latency figure
    goes through these jumps."""
    nat = iptables.SETUP.split("*nat\n", 1)[1]
    assert '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in nat.splitlines()
    assert '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in nat.splitlines()
    filt = iptables.SETUP.split("*nat\n", 1)[0]
    assert "-A OUTPUT -m conntrack --ctstate NEW" in filt and "-j KUBE-SERVICES" in filt
    lines = nft.SETUP.splitlines()
    assert "add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }" in lines
    assert "add rule ip kube-proxy nat-output jump services" in lines
    assert "add rule ip kube-proxy filter-output ct state new jump endpoints-check" in lines


def test_nft_incremental_rewrites_one_service_and_deletes_stale_chains():
    cl = Cluster(Scenario("S", 3, 10))
    rs = nft.Ruleset(cl)
    old = {rs.ep_chain(2, a, p) for a, p in cl.endpoints(2)}
    cl.replace(2, 0)
    rs.update(cl, 2)
    chg = rs.render_change(2)
    assert chg.count("dnat to") == 10 and rs.svc_chain(0) not in chg
    assert "add element" not in chg  # the service-ips element did not change
    assert set(rs.stale) == old and rs.render_stale().count("delete chain") == 10


@pytest.mark.parametrize(
    "values, p, want",
    [([1.0], 99, 1.0), (list(range(1, 101)), 50, 50), (list(range(1, 101)), 99, 99), (list(range(1, 11)), 99, 10)],
    ids=["one", "median", "p99-of-100", "p99-of-10"],
)
def test_nearest_rank_percentile(values, p, want):
    assert pct(sorted(values), p) == want


def test_ladder_grows_tenfold_to_the_scenario():
    assert [s.endpoints for s in Scenario("S1", 1, 100_000).ladder()] == [100, 1000, 10_000, 100_000]
    assert [s.endpoints for s in Scenario("S1", 1, 2000).ladder()] == [200, 2000]
    assert [s.services for s in Scenario("S2", 10_000, 10).ladder()] == [10, 100, 1000, 10_000]
