"""Maglev tables (ctrl.model.maglev) and how the dataplane keeps them
(ctrl.dataplane.programmed): balance, minimal disruption, the same table
whatever the endpoints' order or the node's backend ids, only changed
entries written, and the size checks."""

from __future__ import annotations

import random
import socket
from collections import Counter

import pytest

from ctrl.cli.parser import build_parser, settings
from ctrl.dataplane import abi
from ctrl.dataplane.abi import MapSizes
from ctrl.dataplane.programmed import Programmed
from ctrl.model import maglev
from ctrl.model.plan import Frontend, FrontendFlag, Scope
from ctrl.util.addrs import addr16

TCP = socket.IPPROTO_TCP
M = maglev.DEFAULT_SIZE
LB = addr16("198.19.0.10")
SIZE = abi.MGL_SIZE
MAGLEV_BIT = abi.frontend_flags(FrontendFlag.MAGLEV)


def ep(i: int) -> tuple[bytes, int]:
    """Endpoint i: an address in 198.18.0.0/15 (up to 65,536 of them)."""
    return addr16(f"198.18.{i // 256}.{i % 256}"), 8080


def owners(backends: list[tuple[bytes, int]], m: int = M) -> list[tuple[bytes, int]]:
    """The endpoint each entry names."""
    ordered, table = maglev.build_for(backends, m)
    return [ordered[i] for i in table]


@pytest.mark.parametrize("n", [3, 10, 100, 1000], ids=lambda n: f"N={n}")
def test_balance(n):
    counts = Counter(owners([ep(i) for i in range(n)]))
    assert len(counts) == n
    # The round-robin fill: every backend takes one entry per round, so
    # their shares differ by one entry at most...
    assert max(counts.values()) - min(counts.values()) <= 1
    # ... which is within a few percent of the mean at M > 16 N.
    mean = M / n
    assert max(counts.values()) / mean < 1.07
    assert min(counts.values()) / mean > 0.93


@pytest.mark.parametrize("n", [3, 10, 100, 1000], ids=lambda n: f"N={n}")
def test_removal_moves_about_one_nth(n):
    eps = [ep(i) for i in range(n)]
    gone = eps[n // 2]
    before = owners(eps)
    after = owners([e for e in eps if e != gone])
    own = sum(1 for b in before if b == gone)
    # Every entry of the removed backend moves; of the others, only a few
    # (the paper's minimal disruption): here under 2% of the table.
    assert all(a != gone for a in after)
    others_moved = sum(1 for b, a in zip(before, after, strict=True) if b != a and b != gone)
    assert others_moved < 0.02 * M
    moved = own + others_moved
    assert moved / M < 1 / n + 0.02


@pytest.mark.parametrize("n", [3, 10, 100, 1000], ids=lambda n: f"N={n}")
def test_addition_moves_about_one_nth(n):
    eps = [ep(i) for i in range(n + 1)]
    before = owners(eps[:n])
    after = owners(eps)
    new = eps[n]
    taken = sum(1 for a in after if a == new)
    moved = sum(1 for b, a in zip(before, after, strict=True) if b != a)
    # The new backend takes its share; few other entries change hands.
    assert abs(taken - M / (n + 1)) <= 1
    assert moved - taken < 0.02 * M


def test_same_table_whatever_the_order():
    eps = [ep(i) for i in range(200)]
    shuffled = list(eps)
    random.Random(7).shuffle(shuffled)
    assert owners(eps) == owners(shuffled)
    assert owners(eps) == owners(eps + eps[:10])  # an endpoint listed twice counts once


def test_empty_table():
    assert maglev.build([], M) == []


def test_more_backends_than_entries_fills_every_entry():
    m = maglev.MIN_SIZE
    counts = Counter(owners([ep(i) for i in range(m + 50)], m))
    assert sum(counts.values()) == m
    assert set(counts.values()) == {1}


@pytest.mark.parametrize(
    "m,ok",
    [
        pytest.param(16381, True, id="default"),
        pytest.param(1021, True, id="floor"),
        pytest.param(65537, True, id="larger-prime"),
        pytest.param(16383, False, id="not-prime"),
        pytest.param(16384, False, id="even"),
        pytest.param(1019, False, id="prime-below-floor"),
        pytest.param(251, False, id="small-prime"),
        pytest.param(0, False, id="zero"),
        pytest.param(1048583, False, id="prime-above-max"),
    ],
)
def test_size_check(m, ok):
    if ok:
        assert maglev.check_size(m) == m
    else:
        with pytest.raises(maglev.TableSizeError, match="--maglev-table-size"):
            maglev.check_size(m)


def test_flag_refuses_bad_size():
    args = build_parser().parse_args(["run", "--source", "x", "--external-lb", "maglev", "--maglev-table-size", "1000"])
    with pytest.raises(SystemExit, match="--maglev-table-size 1000: must be a prime"):
        settings(args)


def test_flags():
    args = build_parser().parse_args(["run", "--source", "x"])
    assert (settings(args).external_lb, settings(args).maglev_size) == ("random", 0)
    args = build_parser().parse_args(["run", "--source", "x", "--external-lb", "maglev", "--maglev-table-size", "1021"])
    assert settings(args).maglev_size == 1021


def test_flow_hash_spreads_and_keeps_its_inputs():
    a = addr16("198.18.7.7")
    h = maglev.flow_hash(a, 40000, 80, TCP)
    assert h == maglev.flow_hash(a, 40000, 80, TCP)
    assert h != maglev.flow_hash(a, 40001, 80, TCP)
    assert h != maglev.flow_hash(addr16("198.18.7.8"), 40000, 80, TCP)
    assert h != maglev.flow_hash(a, 40000, 81, TCP)
    assert h != maglev.flow_hash(a, 40000, 80, socket.IPPROTO_UDP)
    # Consecutive source ports spread over the entries.
    hits = Counter(maglev.flow_hash(a, p, 80, TCP) % 10 for p in range(32768, 32768 + 10000))
    assert min(hits.values()) > 900


# -- the dataplane's tables ------------------------------------------------------------


def be(i: int) -> tuple[bytes, int, int]:
    return (*ep(i), TCP)


def ext(*nums: int, addr: bytes = LB, scope: Scope = Scope.EXTERNAL) -> Frontend:
    return Frontend(addr, 80, TCP, scope, "default/web:http/TCP", tuple(be(i) for i in nums))


def table_of(p: Programmed, f: Frontend) -> list[tuple[bytes, int, int]]:
    st = p.frontends[f.key]
    assert st.maglev is not None
    return [p.backends[b] for b in st.maglev]


def test_external_frontend_gets_table_and_flag():
    p = Programmed(maglev_size=M)
    f, internal = ext(1, 2, 3), ext(1, 2, 3, scope=Scope.INTERNAL)
    cs = p.sync({"default/web": [internal, f]})
    sid = p.frontends[f.key].svc_id
    flags = {k: v[2] for k, v in cs.svc_upd}
    assert flags[f.key] & MAGLEV_BIT
    assert not flags[internal.key] & MAGLEV_BIT  # ClusterIP scope keeps random
    entries = {i: b for s, i, b in cs.mgl_upd if s == sid}
    assert len(entries) == M + 1 and entries[SIZE] == M
    assert cs.mgl_upd[-1] == (sid, SIZE, M)  # the size last: the entries are there before it
    assert {s for s, _, _ in cs.mgl_upd} == {sid}
    want = owners([ep(1), ep(2), ep(3)])
    assert [p.backends[entries[i]][:2] for i in range(M)] == want
    assert len(p.sync({"default/web": [internal, f]})) == 0


def test_random_mode_writes_no_table():
    p = Programmed()
    cs = p.sync({"default/web": [ext(1, 2, 3)]})
    assert cs.mgl_upd == [] and not cs.svc_upd[0][1][2] & MAGLEV_BIT


def test_same_table_whatever_the_node_ids():
    # Two nodes: one learnt the backends in another order (other ids).
    a, b = Programmed(maglev_size=M), Programmed(maglev_size=M)
    a.sync({"default/other": [ext(9, 8, 7, addr=addr16("198.19.0.99"))]})
    a.sync({"default/web": [ext(*range(50))]})
    b.sync({"default/web": [ext(*reversed(range(50)))]})
    assert a.backend_ids[be(0)] != b.backend_ids[be(0)]  # other ids, the same backends
    assert table_of(a, ext(*range(50))) == table_of(b, ext(*range(50)))


def test_removal_writes_only_changed_entries():
    p = Programmed(maglev_size=M)
    before = ext(*range(100))
    p.sync({"default/web": [before]})
    old = list(p.frontends[before.key].maglev or [])
    after = ext(*range(1, 100))
    cs = p.sync({"default/web": [after]})
    new = p.frontends[after.key].maglev or []
    changed = [i for i in range(M) if old[i] != new[i]]
    sid = p.frontends[after.key].svc_id
    assert sorted(i for _, i, _ in cs.mgl_upd) == changed
    assert all(new[i] == b and s == sid for s, i, b in cs.mgl_upd)
    assert cs.mgl_del == []
    # Its own ~1/100 and few others.
    assert 0.01 * M <= len(changed) < (0.01 + 0.02) * M


def test_removed_frontend_deletes_its_table_size_first():
    p = Programmed(maglev_size=M)
    f = ext(1, 2)
    p.sync({"default/web": [f]})
    sid = p.frontends[f.key].svc_id
    cs = p.sync({"default/web": []})
    assert cs.mgl_del[0] == (sid, SIZE)
    assert sorted(cs.mgl_del[1:]) == [(sid, i) for i in range(M)]
    assert p.maglev_count == 0


def test_last_backend_gone_deletes_table():
    p = Programmed(maglev_size=M)
    p.sync({"default/web": [ext(1, 2)]})
    cs = p.sync({"default/web": [ext()]})
    assert len(cs.mgl_del) == M + 1 and p.maglev_count == 0


def test_adopted_tables_diff_empty_and_mode_change():
    p = Programmed(maglev_size=M)
    f = ext(*range(20))
    cs = p.sync({"default/web": [f]})
    tables: dict[int, dict[int, int]] = {}
    for s, i, b in cs.mgl_upd:
        tables.setdefault(s, {})[i] = b
    svc = {k: v for k, v in cs.svc_upd}
    slots = {(s, i): b for s, i, b in cs.slot_upd}
    names = dict(cs.name_upd)
    # A restart in the same mode: nothing to write.
    q = Programmed(maglev_size=M)
    q.adopt(svc, slots, dict(p.backends), names, tables=tables)
    assert q.maglev_count == M + 1
    assert len(q.sync({"default/web": [f]}, prune_except={"default/web"})) == 0
    # Restarted in random mode: the table goes, the flag with it.
    r = Programmed()
    r.adopt(svc, slots, dict(p.backends), names, tables=tables)
    cs = r.sync({"default/web": [f]})
    assert len(cs.mgl_del) == M + 1 and not cs.svc_upd[0][1][2] & MAGLEV_BIT
    # Another table size: every entry rewritten, the tail deleted.
    small = maglev.MIN_SIZE
    s2 = Programmed(maglev_size=small)
    s2.adopt(svc, slots, dict(p.backends), names, tables=tables)
    cs = s2.sync({"default/web": [f]})
    assert len(cs.mgl_upd) == small + 1
    assert len(cs.mgl_del) == M - small


def test_orphan_tables_go_at_the_first_full_sync():
    p = Programmed(maglev_size=M)
    p.adopt({}, {}, {}, {}, tables={77: {0: 1, SIZE: 1}})
    assert p.sync({}).mgl_del == []
    assert sorted(p.sync({}, prune_except=set()).mgl_del) == [(77, 0), (77, SIZE)]


def test_full_map_refuses_the_service():
    p = Programmed(MapSizes(maglev=M + 1), maglev_size=M)
    assert p.sync({"default/a": [ext(1)]}).rejected == {}
    cs = p.sync({"default/b": [ext(2, addr=addr16("198.19.0.11"))]})
    assert "--max-maglev-entries" in cs.rejected["default/b"]
    assert cs.mgl_upd == []
