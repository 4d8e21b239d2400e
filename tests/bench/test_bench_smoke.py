"""`make bench` at a small size: it runs end to end and its figures are sane.
Speed itself is never asserted here; that is what `make bench` prints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the bench smoke test needs root (BPF, a network namespace)")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--backends", "2000", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "peer/ours" in r.stdout
    return json.loads(out.read_text())


def test_full_sync_programmed_every_backend(figures):
    f = figures["full"]
    assert f["n"] == 2000 and 0 < f["write_s"] <= f["full_s"]


def test_change_latencies_ordered(figures):
    c = figures["change"]
    assert c["services"] == 20 and 0 < c["p50_s"] <= c["p99_s"] <= c["max_s"]


def test_packet_cost_measured_on_a_service_hit(figures):
    for k in ("packet_1", "packet_many"):
        assert figures[k]["verdict"] == 0 and figures[k]["ns_per_packet"] > 0


def test_peer_rulesets_loaded(figures):
    for k in ("iptables_legacy", "iptables_nft"):
        p = figures[k]
        # 4 lines per endpoint plus the fixed chains and jumps.
        assert p["lines"] == 4 * p["n"] + 17
        assert p["first_s"] is not None and p["first_s"] > 0
