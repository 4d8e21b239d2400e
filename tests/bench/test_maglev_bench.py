"""scripts/bench/maglev.py at its --quick size: it runs end to end (the
agent on real maps in both modes) and its figures are sane. No speed is
asserted: the bench prints it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctrl.dataplane import abi

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> dict:
    if os.geteuid() != 0:
        pytest.fail("the Maglev bench smoke test needs root (BPF)")
    out = tmp_path_factory.mktemp("maglev") / "maglev.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench" / "maglev.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result: dict = json.loads(out.read_text())
    return result


def test_disruption_is_at_least_one_nth_and_near_it(figures):
    for d in figures["disruption"]:
        # The removed backend's own entries move, and not many others.
        assert d["removal_own"] == pytest.approx(d["ideal"], abs=1 / figures["table_size"] + 1e-9)
        assert d["ideal"] <= d["removal_moved"] < d["ideal"] + 0.03


def test_the_agent_writes_tables_only_in_maglev_mode(figures):
    (r,) = figures["agent"]
    assert r["random"]["maglev_map_bytes"] == 0
    assert r["random"]["maglev_writes_per_change"] == 0
    # One table per Service (its LB IP and NodePort share it), in the
    # kernel: 4 bytes an entry at least, in chunks.
    assert r["maglev"]["maglev_map_bytes_per_service"] > figures["table_size"] * 4
    # A change writes some of a table's chunks, not its entries one by one.
    chunks = abi.mgl_chunks(figures["table_size"])
    assert 0 < r["maglev"]["maglev_writes_per_change"] <= chunks


def test_the_fill_is_timed_in_c_and_in_python(figures):
    # The C the agent runs (build/libsliceproxy.so) was there to be timed,
    # next to the reference.
    for b in figures["build"]:
        assert b["native"] and b["fill_c_s"] > 0 and b["fill_python_s"] > 0
