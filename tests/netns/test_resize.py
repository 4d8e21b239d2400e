"""Tier 3: map sizes changed between two runs of the agent on one pin
directory, as an operator does when a log line says to raise --max-*.

Bigger maps: the pinned maps are carried into new ones (service and backend
ids, conntrack, affinity), so connections established through the old maps
keep their backends. Smaller ones: an LRU map (conntrack) keeps the most
recently used entries that fit; any other map refuses to shrink below what
it holds, changes nothing and says which flag to raise. A resize stopped
half way is finished by the next start.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ctrl.dataplane import loader
from ctrl.dataplane.abi import MapSizes, map_name
from ctrl.dataplane.maps import Map
from scripts.harness.topo import Topology

from .agent import dump, finish_client, frontends, start_client
from .conftest import THREE, VIP, Agents, assert_spread, http

pytestmark = pytest.mark.root

# The web Service: 3 frontends (http, dns, echo), 3 backends each: 9
# backends, 9 slots, 3 names.
SMALL = ("--max-services", "4", "--max-backends", "12", "--max-slots", "12", "--max-conntrack", "4096")
BIG = ("--max-services", "64", "--max-backends", "64", "--max-slots", "128", "--max-conntrack", "8192")
# This build's map names (sp_be_v5...): the layout version is the header's.
SVC, NAMES, BE, SLOT, CT, AFF = (map_name(b) for b in ("sp_svc", "sp_names", "sp_be", "sp_slot", "sp_ct", "sp_aff"))


def capacities(pin_dir: Path) -> dict[str, int]:
    out = {}
    for p in sorted(pin_dir.iterdir()):
        m = Map.open_pinned(str(p))
        try:
            out[p.name] = m.max_entries
        finally:
            m.close()
    return out


def ids(doc: dict) -> dict[str, tuple[int, list[str]]]:
    return {f: (s["svc_id"], s["backends"]) for f, s in frontends(doc).items()}


def echo_clients(topo: Topology, n: int = 6, lines: int = 120) -> list[subprocess.Popen[bytes]]:
    """Long-lived connections through the ClusterIP, a line every 50 ms.
    Re-balanced by a restart that lost their conntrack entries, each would
    land on another backend (and be reset by it) with probability 2/3."""
    return [
        start_client(topo, "client", "echo", "--target", f"{VIP}:8081", "--count", str(lines),
                     "--interval", "0.05", "--timeout", "2")
        for _ in range(n)
    ]  # fmt: skip


def finish_echoes(topo: Topology, echoes: list[subprocess.Popen[bytes]], lines: int = 120) -> None:
    try:
        results = [finish_client(topo, e, timeout=60) for e in echoes]
    finally:
        for e in echoes:
            if e.poll() is None:
                topo.stop(e)
    for res in results:
        assert res["errors"] == 0, res["error_samples"]
        assert len(res["counts"]) == 1 and sum(res["counts"].values()) == lines, res["counts"]


def test_bigger_maps_keep_established_connections(topo: Topology, agents: Agents) -> None:
    old = agents.start_ready(extra=SMALL)
    before = ids(dump(topo, agents.pin_dir))
    assert capacities(agents.pin_dir)[BE] == 12
    echoes = echo_clients(topo)
    try:
        assert old.terminate() == 0
        new = agents.start(extra=BIG)
        agents.wait_ready(new)
        new.wait_log(rf"resizing {BE} from 12 to 64 entries")
        new.wait_log(rf"resizing {CT} from 4096 to 8192 entries")
        new.wait_log(rf"migrated \d+ entries of {CT}_old into {CT}")
        assert all(e.poll() is None for e in echoes), "a connection ended before the restart; the test proved nothing"
    except BaseException:
        for e in echoes:
            topo.stop(e)
        raise
    finish_echoes(topo, echoes)
    caps = capacities(agents.pin_dir)
    assert not [n for n in caps if n.endswith("_old")], caps
    assert (caps[SVC], caps[NAMES], caps[BE], caps[SLOT]) == (64, 64, 64, 128)
    assert (caps[CT], caps[AFF]) == (8192, 8192)
    after = dump(topo, agents.pin_dir)
    assert ids(after) == before, "service ids or backend slots changed across the resize"
    full = new.wait_log(r"sync \(full\):")
    assert "frontends +0/-0, slots +0/-0, backends +0/-0" in full[0], full[0]
    assert_spread(http(topo), THREE)


def test_shrinking_below_what_is_held_is_refused_and_changes_nothing(topo: Topology, agents: Agents) -> None:
    first = agents.start_ready(extra=BIG)
    before = ids(dump(topo, agents.pin_dir))
    caps = capacities(agents.pin_dir)
    assert first.terminate() == 0

    small = agents.start(extra=("--max-backends", "4", "--max-slots", "8", "--max-services", "64"))
    rc = small.proc.wait(60)
    small.terminate()
    assert rc == 1, f"expected exit status 1, got {rc}:\n{small.log_tail()}"
    msg = "\n".join(small.log())
    assert f"{BE} holds 9 entries, more than --max-backends 4 allows: raise --max-backends to at least 9" in msg
    assert f"{SLOT} holds 9 entries, more than --max-slots 8 allows" in msg
    assert "Nothing was changed" in msg
    assert "kernel" not in msg, msg  # not the misleading "kernel does not support" of before
    assert capacities(agents.pin_dir) == caps
    assert_spread(http(topo), THREE)  # served all along by the pinned maps

    # Raised as told: it starts, with every id in place.
    ok = agents.start(extra=("--max-backends", "9", "--max-slots", "9", "--max-services", "64"))
    agents.wait_ready(ok)
    assert ids(dump(topo, agents.pin_dir)) == before
    assert capacities(agents.pin_dir)[BE] == 9


def test_smaller_conntrack_keeps_the_flows_in_use(topo: Topology, agents: Agents) -> None:
    old = agents.start_ready(extra=BIG)
    # 300 finished connections: 600 conntrack entries, idle from now on.
    assert_spread(http(topo, count=300), THREE)
    echoes = echo_clients(topo)
    try:
        assert old.terminate() == 0
        new = agents.start(extra=(*BIG[:6], "--max-conntrack", "256"))
        agents.wait_ready(new)
        lines = new.wait_log(rf"{CT} has room for 256 entries: the \d+ least recently used")
        dropped = int(lines[0].split("the ")[1].split()[0])
        assert dropped >= 600 - 256, lines[0]
        assert all(e.poll() is None for e in echoes), "a connection ended before the restart; the test proved nothing"
    except BaseException:
        for e in echoes:
            topo.stop(e)
        raise
    # The six connections in use were among the most recently used: kept.
    finish_echoes(topo, echoes)
    assert capacities(agents.pin_dir)[CT] == 256
    assert_spread(http(topo), THREE)


def _sizes(args: tuple[str, ...]) -> MapSizes:
    kv = dict(zip(args[::2], args[1::2], strict=True))
    return MapSizes(
        int(kv["--max-services"]), int(kv["--max-backends"]), int(kv["--max-slots"]), int(kv["--max-conntrack"])
    )


@pytest.mark.parametrize("then", ["same-size", "another-size"])
def test_a_resize_stopped_half_way_is_finished_by_the_next_start(topo: Topology, agents: Agents, then: str) -> None:
    first = agents.start_ready(extra=SMALL)
    before = ids(dump(topo, agents.pin_dir))
    echoes = echo_clients(topo)
    try:
        assert first.terminate() == 0
        # A resize that died after libbpf made the new maps and before any
        # entry was carried: the old ones set aside as <name>_old (still
        # used by the attached programs), empty new ones under the names.
        dp = loader.load(None, str(agents.pin_dir), _sizes(BIG))
        dp.close()
        names = {p.name for p in agents.pin_dir.iterdir()}
        assert {f"{BE}_old", BE, f"{CT}_old"} <= names, names
        assert os.path.exists(agents.pin_dir / CT)
        extra = BIG if then == "same-size" else (*BIG[:6], "--max-conntrack", "16384")
        new = agents.start(extra=extra)
        agents.wait_ready(new)
        assert all(e.poll() is None for e in echoes), "a connection ended before the restart; the test proved nothing"
    except BaseException:
        for e in echoes:
            topo.stop(e)
        raise
    finish_echoes(topo, echoes)
    assert ids(dump(topo, agents.pin_dir)) == before
    caps = capacities(agents.pin_dir)
    assert not [n for n in caps if n.endswith("_old")], caps
    assert caps[CT] == (8192 if then == "same-size" else 16384)
    assert_spread(http(topo), THREE)


def test_flows_written_to_the_old_map_during_the_switch_are_carried_too(agents: Agents) -> None:
    """Between the copy and the attach of the new programs, the old ones
    keep writing flows into the old conntrack map: the second pass after
    the attach carries those, without overwriting what the new programs
    wrote meanwhile (their entry of a flow is newer)."""
    from ctrl.dataplane import abi
    from ctrl.dataplane.migrate import Carry

    pin = str(agents.pin_dir)

    def k(i: int) -> bytes:
        client = b"\0" * 10 + b"\xff\xff" + bytes([198, 18, 1, i])
        return abi.pack("sp_ct_key", saddr=client, daddr=b"\0" * 16, sport=40000 + i, dport=80, proto=6, dir=0)

    def v(backend: int) -> bytes:
        return abi.pack("sp_ct_val", nat_port=8080, backend_id=backend, svc_id=1, last_seen=1000 + backend)

    ct = map_name("sp_ct")
    dp = loader.load(None, pin, _sizes(SMALL))
    dp.maps[ct].update(k(1), v(1))
    dp.maps[ct].update(k(2), v(2))
    dp.close()
    dp = loader.load(None, pin, _sizes(BIG))  # the conntrack map set aside, a new one made
    try:
        carry = Carry(pin, dp.maps)
        assert carry.copy() >= 2
        new = dp.maps[ct]
        assert new.lookup(k(1)) == v(1) and new.lookup(k(2)) == v(2)
        old = Map.open_pinned(str(agents.pin_dir / f"{ct}_old"))
        try:
            old.update(k(3), v(3))  # a flow the old programs took on after the copy
            old.update(k(2), v(20))  # and one they refreshed...
        finally:
            old.close()
        new.update(k(2), v(21))  # ...which the new programs have seen since: theirs stands
        carry.finish()
        assert new.lookup(k(3)) == v(3)
        assert new.lookup(k(2)) == v(21)
        assert new.lookup(k(1)) == v(1)
        assert not (agents.pin_dir / f"{ct}_old").exists()
    finally:
        dp.close()
