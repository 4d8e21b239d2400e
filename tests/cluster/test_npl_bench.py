"""The network programming latency bench (scripts/bench/npl.py) end to end
at its smoke size, on a control plane of its own: every proxy syncs the
scenario, follows a short rolling update written through the API, and
reports its histograms; our agent programs every write into its maps and
observes every write's trigger time. Nothing here is a timing assertion:
speed is `make bench-npl`'s (docs/benchmarks.md).

Needs root, and kube-proxy from `make k8s-node`.
"""

from __future__ import annotations

import math

import pytest

from scripts.bench import npl

WRITES = 10


@pytest.mark.parametrize("key", ["S1", "S2"])
def test_npl_bench_smoke(key, tmp_path):
    scn = npl.QUICK_SCENARIOS[key]
    # A generous bound on each wait (a full sync, catching up) on a busy
    # machine; never a speed goal.
    res = npl.run_scenario(scn, WRITES, 10.0, npl.PROXIES, timeout=300)
    assert res["scenario"] == key and res["populate_s"] > 0
    assert set(res["proxies"]) == set(npl.PROXIES)
    for name, p in res["proxies"].items():
        assert "error" not in p, f"{name}: {p.get('error')}"
        assert p["writes"] == WRITES
        assert p["full_sync"]["count"] >= 1 and p["full_sync"]["mean_s"] > 0, (name, p["full_sync"])
        assert p["sync"]["count"] >= 1, (name, p["sync"])
        # Every proxy observed trigger times of the rolling update's writes
        # (kube-proxy may fold a Service's changes of one sync into one).
        assert 1 <= p["npl"]["count"], (name, p["npl"])
        assert p["npl"]["mean_s"] > 0 and p["npl"]["p99_le_s"] is not None
    for name in npl.OURS:
        ours = res["proxies"][name]
        # Every write reached the frontend map with its new backend count,
        # and each one's trigger time was observed once.
        assert ours["programmed_writes"] == WRITES, ours
        assert ours["npl"]["count"] == WRITES, ours["npl"]
        assert ours["client"]["n"] == WRITES
        assert all(s > 0 and math.isfinite(s) for s in ours["client_samples_s"])
    table = npl.report([res])
    for name in npl.PROXIES:
        assert f"{key:9} {name:15} " in table
    png = tmp_path / "npl.png"
    assert npl.plot([res], png) and png.stat().st_size > 0
