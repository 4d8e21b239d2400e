"""`make bench` at its --quick size: it runs end to end (ours, the peers in
throwaway namespaces, first-packet latency between namespaces, a host
client's connections from the node namespace) and its
figures are sane. Speed itself is never asserted here; that is what `make
bench` prints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
S1_BACKENDS = 2000


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the bench smoke test needs root (BPF, network namespaces)")
    out = tmp_path_factory.mktemp("bench")
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench.py"),
            "--quick",
            "--backends",
            str(S1_BACKENDS),
            "--json",
            str(out / "bench.json"),
            "--markdown",
            str(out / "table.md"),
            "--plots",
            str(out / "plots"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r, json.loads((out / "bench.json").read_text()), out


@pytest.fixture(scope="module")
def figures(run):
    return run[1]


def test_prints_a_table_with_ratios_and_progress(run):
    r, _, out = run
    assert "peer/ours" in r.stdout and "Targets" in r.stdout
    assert "[bench" in r.stderr  # progress lines
    assert (out / "table.md").read_text().startswith("| figure |")


def test_scenarios_have_their_shapes(figures):
    sc = figures["scenarios"]
    assert set(sc) == {"S1", "S2", "S3"}
    assert sc["S1"]["services"] == 1 and sc["S1"]["endpoints"] == S1_BACKENDS
    for s in sc.values():
        assert s["total"] == s["services"] * s["endpoints"]
        assert s["slice_size"] == min(100, s["endpoints"])


def test_full_sync_programmed_every_entry(figures):
    for s in figures["scenarios"].values():
        f = s["ours"]["full"]
        assert f["entries"]["sp_svc"] == s["services"]
        assert f["entries"]["sp_slot"] == f["entries"]["sp_be"] == s["total"]
        assert 0 < f["list_decode_s"] < f["s"]
        assert f["median_s"] in f["rounds"]
        # The agent's own stages: each ran, and those before the last write
        # fit in the time to it.
        st = f["stages"]
        assert all(st[k] > 0 for k in ("plan", "diff", "write", "index", "gc")), st
        assert f["list_decode_s"] + st["plan"] + st["diff"] + st["write"] < f["s"]
        assert s["ours"]["list_bytes"] > 100 * s["total"]  # realistic JSON, not a stub


def test_change_latencies_ordered_and_growth_measured(figures):
    for s in figures["scenarios"].values():
        c = s["ours"]["change"]
        assert c["n"] >= 20 and 0 < c["min"] <= c["p50"] <= c["p99"] <= c["max"]
        g = s["ours"]["growth"]
        assert len(g) >= 2 and g[-1]["total"] == s["total"]
        assert [x["total"] for x in g] == sorted(x["total"] for x in g)


def test_rolling_update_replaced_slices(figures):
    for s in figures["scenarios"].values():
        r = s["ours"]["rolling"]
        assert r["slices"] == -(-s["endpoints"] // 100) * s["services"]
        assert 0 < r["done"] <= r["slices"] and (r["stopped"] or r["done"] == r["slices"])
        assert r["s"] > 0


def test_memory_measured(figures):
    for s in figures["scenarios"].values():
        m = s["ours"]["memory"]
        assert 0 < m["rss_before"] <= m["rss_peak"]
        assert m["maps_total"] == sum(v["memlock"] for v in m["maps"].values()) > 0


def test_packet_cost_measured_on_service_hits(figures):
    for s in figures["scenarios"].values():
        p = s["ours"]["packet"]
        assert p["one"]["services"] == 1 and p["scaled"]["services"] == s["services"]
        for side in ("one", "scaled"):
            for k in ("est", "new", "new_spread", "est_spread"):
                assert p[side][k] > 0
        # The memory-system control ran at both slot counts, both ways (the
        # probe refuses to time a flow whose slot or backend it missed).
        pr = p["probe"]
        assert pr["sizes"] == [p["one"]["endpoints"], s["total"]]
        for kind in ("full", "no_backend"):
            assert all(pr[kind][str(n)] > 0 for n in pr["sizes"])


def test_external_packets_through_xdp_and_tc(figures):
    """Every figure of the XDP part measured (the part checks each run's
    action: a drop dropped, a forwarded packet sent back out, a served one
    handed on)."""
    x = figures["xdp"]
    for k in ("xdp_drop", "tc_drop", "xdp_forward", "tc_forward", "xdp_pass"):
        assert x["ns"][k] > 0, k
    assert x["drops_per_s"]["xdp"] > 0 and x["drops_per_s"]["tc"] > 0


def test_external_traffic_under_load(figures):
    """Every dataplane of the load part finished frames; what the node
    forwarded arrived translated, checksums right, and nothing else did."""
    x = figures["xdp_load"]
    assert set(x["pps"]) == {
        "floor", "xdp_drop", "tc_drop", "iptables_drop", "iptables_drop_many", "xdp_forward", "tc_forward",
        "iptables_forward",
    }  # fmt: skip
    for mode, runs in x["runs"].items():
        for r in runs:
            assert 0 < r["handled"] <= r["sent"], (mode, r)
            if mode.endswith("forward"):
                translated, bad_csum, _ = r["sink"]
                assert translated == r["handled"] and bad_csum == 0, (mode, r)
            elif mode != "floor":
                assert r["sink"][0] == r["sink"][1] == 0, (mode, r)


def test_peer_rulesets_loaded(figures):
    for s in figures["scenarios"].values():
        for key in ("iptables_legacy", "iptables_nft"):
            p = s[key]
            assert p["full_s"] and p["full_s"] > 0, p
            assert p["change_partial_s"] > 0
        ipt = s["iptables_legacy"]
        # The nat rules kube-proxy's ruleset holds: 3 jumps from built-in
        # chains, 4 masquerade rules, per Service a KUBE-SERVICES rule and a
        # masquerade rule, the nodeports rule, and 3 rules per endpoint.
        assert ipt["nat_rules_loaded"] == 8 + 2 * s["services"] + 3 * s["total"]
        assert ipt["change_full_s"] > 0
        if s["services"] > 1:  # a partial restore leaves the other Services' chains out
            assert ipt["partial_lines"] < ipt["lines"]
        n = s["nft"]
        assert n["full_s"] > 0 and n["change_s"] > 0


def test_first_packet_latency_through_every_dataplane(figures):
    lat = figures["latency"]
    assert lat["direct"]["connect_us"]["n"] == lat["count"]
    for n in lat["services"]:
        for dp in ("ours", "iptables", "nft"):
            c = lat[dp][str(n)]["connect_us"]
            assert c["n"] == lat["count"] and 0 < c["p50"] <= c["p99"]
    # S1's shape: 1 Service whose every endpoint answers; connections spread
    # over the backend pod's ports (the reply names the port's digit).
    assert lat["wide"] > 1000
    for dp in ("ours", "iptables", "nft"):
        r = lat[dp]["wide"]
        assert r["connect_us"]["n"] == lat["count"] and len(r["backends"]) >= 5, (dp, r["backends"])


def test_host_client_through_every_dataplane(figures):
    """A process in the node namespace (in the bench's cgroup) reached the
    Service through our cgroup hook and the peers' nat OUTPUT rules: every
    connection timed, its phases in order, and the Service's 10 backends
    all answered (straight to the pod, only the first port does)."""
    host = figures["latency"]["host"]
    d = host["direct"]
    assert d["total_us"]["n"] == host["count"] and d["backends"] == {"0": host["count"]}
    for n in host["services"]:
        for dp in ("ours", "iptables", "nft"):
            r = host[dp][str(n)]
            c, e, t = r["connect_us"], r["echo_us"], r["total_us"]
            assert c["n"] == e["n"] == t["n"] == host["count"], (dp, n)
            assert 0 < c["p50"] <= e["p50"] <= t["p50"] <= t["p99"] <= t["max"], (dp, n, r)
            assert t["min"] <= t["mean"] <= t["max"]
            assert sorted(r["backends"]) == [str(i) for i in range(10)], (dp, n, r["backends"])
            assert sum(r["backends"].values()) == host["count"]


def test_load_and_machine_reported(figures):
    assert figures["machine"]["cores"] >= 1
    assert figures["load"]["busy_cores"] >= 0 and figures["load"]["wall_s"] > 0


def test_draws_both_plots(run):
    _, _, out = run
    for name in ("sync-vs-endpoints.png", "packet-vs-services.png"):
        png = (out / "plots" / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n") and len(png) > 10_000


def test_renders_the_same_table_again_from_its_json(run, tmp_path):
    _, _, out = run
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench.py"),
            "--from-json",
            str(out / "bench.json"),
            "--markdown",
            str(tmp_path / "table.md"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "table.md").read_text() == (out / "table.md").read_text()


def test_the_agent_ran_as_sliceproxy_run_builds_it(figures):
    """The bench's agent comes from ctrl.cli.run.build_agent with `sliceproxy
    run`'s default flags: its own /metrics counted every sync and change
    it made, and its /healthz answered. (Built without metrics, the bench
    never saw a cost production pays on every change.)"""
    for s in figures["scenarios"].values():
        o = s["ours"]
        assert o["agent_flags"][:2] == ["sliceproxy", "run"]
        got = o["scraped"]
        n, done = o["change"]["n"], o["rolling"]["done"]
        assert got["syncs"] == 1 + n + done, got  # the full sync, each change, each rolling step
        assert got["endpoint_changes"] == o["rolling"]["slices"] + n + done, got  # listed, changed, rolled
        assert got["healthz"] == 200


def test_service_shapes_programmed_and_changed(figures):
    """S1's Service in each shape: the worker checked every map's entries
    after the full sync (frontends, slots over their tables, backends) and the
    backends each change added; here, that each shape is what it says."""
    sh = figures["shapes"]
    assert set(sh) == {"ClusterIP", "NodePort", "LoadBalancer-Local", "ClientIP", "Hints", "Maglev"}
    for name, x in sh.items():
        e, c = x["entries"], x["change"]
        assert e["sp_svc"] == x["frontends"], name
        assert e["sp_slot"] >= e["sp_be"] > 0, name
        assert c["n"] >= 20 and 0 < c["min"] <= c["p50"] <= c["p99"] <= c["max"], name
        assert (e["sp_mgl"] > 0) == (name == "Maglev"), name
        # Maglev: one table, and a pointer to it from each frontend of the
        # outside's (the LB IP and the NodePort on the node's address).
        assert e["sp_mglptr"] == (2 if name == "Maglev" else 0), name
    # The NodePort's 3 frontends read one slot table; under a Local
    # external policy the external frontends read a second, of this node's
    # endpoints (1 in 100).
    assert sh["NodePort"]["entries"]["sp_slot"] == sh["ClusterIP"]["entries"]["sp_slot"]
    lb_local = sh["LoadBalancer-Local"]["entries"]
    assert lb_local["sp_slot"] == sh["ClusterIP"]["entries"]["sp_slot"] + sh["ClusterIP"]["entries"]["sp_slot"] // 100
    # Hinted for their zones, this node's zone takes about a third.
    assert sh["Hints"]["entries"]["sp_be"] < sh["ClusterIP"]["entries"]["sp_be"] / 2
    # The health check answered with this node's ready endpoints (1 in 100).
    hc = sh["LoadBalancer-Local"]["scraped"]["health_check"]
    assert hc["code"] == 200 and hc["body"]["localEndpoints"] > 0, hc
