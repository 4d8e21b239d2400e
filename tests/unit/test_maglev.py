"""Maglev tables (ctrl.model.maglev) and how the dataplane keeps them
(ctrl.dataplane.programmed): balance, minimal disruption, the same table
whatever the endpoints' order or the node's backend ids, only changed
entries written, and the size checks."""

from __future__ import annotations

import json
import random
import socket
from array import array
from collections import Counter

import pytest

from ctrl.cli.parser import build_parser, settings
from ctrl.dataplane import abi, native
from ctrl.dataplane.abi import MapSizes
from ctrl.dataplane.programmed import Programmed
from ctrl.dataplane.tables import TURN, Turns, turn_id, turns_of
from ctrl.model import maglev
from ctrl.model.plan import Frontend, FrontendFlag, Scope
from ctrl.util.addrs import addr16

TCP = socket.IPPROTO_TCP
M = maglev.DEFAULT_SIZE
LB = addr16("198.19.0.10")
CHUNK = abi.MGL_CHUNK
NCH = abi.mgl_chunks(M)  # chunks of a table of the default size
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


@pytest.mark.parametrize(
    "addr, port, m, want",
    [
        ("198.18.0.1", 8080, 16381, (12503, 11710)),
        ("2001:db8::7", 443, 1021, (893, 772)),
        ("198.19.255.254", 65535, 65537, (42591, 35469)),
    ],
)
def test_permutation_is_pinned(addr, port, m, want):
    """A backend's (offset, skip) is the same on every node and in every
    version: nodes running different versions during an upgrade must
    build the same tables, so these values may never change."""
    assert maglev.hashed(maglev.identity(addr16(addr), port), m) == want


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


def ext(*nums: int, addr: bytes = LB, scope: Scope = Scope.EXTERNAL, port: int = 80, name: str = "http") -> Frontend:
    return Frontend(addr, port, TCP, scope, f"default/web:{name}/TCP", tuple(be(i) for i in nums))


def table_of(p: Programmed, f: Frontend) -> list[tuple[bytes, int, int]]:
    entries = p.tables.entries_of(f.key)
    assert entries is not None
    return [p.backends[b] for b in entries]


def owners_of(nums) -> list[int]:
    """The endpoint number each entry of the table of these names."""
    number = {ep(i): i for i in nums}
    return [number[e] for e in owners([ep(i) for i in nums])]


class Maps:
    """The Maglev maps as change sets leave them: chunks by (table id,
    chunk) and pointers by svc_id, written then deleted in a change set's
    order (ctrl.dataplane.apply)."""

    def __init__(self) -> None:
        self.chunks: dict[tuple[int, int], bytes] = {}
        self.ptrs: dict[int, tuple[int, int]] = {}

    def apply(self, cs) -> Maps:
        for i, k, b in cs.mgl_upd:
            assert len(b) == 4 * CHUNK
            self.chunks[i, k] = b
        for sid, tid, m in cs.mgl_ptr_upd:
            self.ptrs[sid] = (tid, m)
        for sid in cs.mgl_ptr_del:
            del self.ptrs[sid]
        for key in cs.mgl_del:
            del self.chunks[key]
        return self

    def table(self, sid: int) -> list[int]:
        """The backend ids of the table frontend sid's pointer names."""
        tid, m = self.ptrs[sid]
        out = array("I")
        for k in range(abi.mgl_chunks(m)):
            out.extend(abi.mgl_ids(self.chunks[tid, k]))
        assert not any(out[m:])  # zeros past the table's end
        return out[:m].tolist()

    def contents(self) -> tuple[dict[int, dict[int, array]], dict[int, tuple[int, int]]]:
        """As abi.read_contents decodes them."""
        tables: dict[int, dict[int, array]] = {}
        for (i, k), b in self.chunks.items():
            tables.setdefault(i, {})[k] = abi.mgl_ids(b)
        return tables, dict(self.ptrs)


def test_external_frontend_gets_table_and_flag():
    p = Programmed(maglev_size=M)
    f, internal = ext(1, 2, 3), ext(1, 2, 3, scope=Scope.INTERNAL)
    cs = p.sync({"default/web": [internal, f]})
    sid = p.frontends[f.key].svc_id
    flags = {k: v[2] for k, v in cs.svc_upd}
    assert flags[f.key] & MAGLEV_BIT
    assert not flags[internal.key] & MAGLEV_BIT  # ClusterIP scope keeps random
    mm = Maps().apply(cs)
    (tid, m) = mm.ptrs[sid]
    assert m == M and list(mm.ptrs) == [sid]
    assert len(cs.mgl_upd) == NCH and {i for i, _, _ in cs.mgl_upd} == {tid}
    want = owners([ep(1), ep(2), ep(3)])
    assert [p.backends[b][:2] for b in mm.table(sid)] == want
    assert len(p.sync({"default/web": [internal, f]})) == 0


def test_chunks_written_before_pointers_and_frontends_deleted_after():
    """The write order of ctrl.dataplane.apply: a table's chunks, then the
    pointers naming it, then the frontends flagged to read it; deletes
    the other way round, so a flow never reads a table being written."""
    from ctrl.dataplane.apply import encoded

    p = Programmed(maglev_size=maglev.MIN_SIZE)
    f = ext(1, 2)
    order = [(m, op) for m, op, _, _ in encoded(p.sync({"default/web": [f]}), abi.Codecs.get())]
    mn = abi.map_name
    assert order.index((mn("sp_mgl"), "update")) < order.index((mn("sp_mglptr"), "update"))
    assert order.index((mn("sp_mglptr"), "update")) < order.index((mn("sp_svc"), "update"))
    order = [(m, op) for m, op, _, _ in encoded(p.sync({"default/web": []}), abi.Codecs.get())]
    assert order.index((mn("sp_svc"), "delete")) < order.index((mn("sp_mglptr"), "delete"))
    assert order.index((mn("sp_mglptr"), "delete")) < order.index((mn("sp_mgl"), "delete"))


def test_random_mode_writes_no_table():
    p = Programmed()
    cs = p.sync({"default/web": [ext(1, 2, 3)]})
    assert cs.mgl_upd == [] and cs.mgl_ptr_upd == [] and not cs.svc_upd[0][1][2] & MAGLEV_BIT


def test_frontends_with_the_same_backends_share_a_table():
    """An LB IP, a NodePort and a second port to the same endpoints: one
    table, three pointers; a change rewrites the one table once."""
    p = Programmed(maglev_size=M)
    fronts = [
        ext(*range(10)),
        ext(*range(10), addr=addr16("198.18.0.1"), port=30080),
        ext(*range(10), port=8080, name="alt"),
    ]
    cs = p.sync({"default/web": fronts})
    mm = Maps().apply(cs)
    sids = [p.frontends[f.key].svc_id for f in fronts]
    tids = {mm.ptrs[s][0] for s in sids}
    assert len(tids) == 1 and len(cs.mgl_upd) == NCH and len(cs.mgl_ptr_upd) == 3
    assert p.tables.count == NCH
    before = mm.table(sids[0])
    fewer = [Frontend(f.addr, f.port, f.proto, f.scope, f.name, tuple(be(i) for i in range(1, 10))) for f in fronts]
    cs = p.sync({"default/web": fewer})
    assert {i for i, _, _ in cs.mgl_upd} == tids and cs.mgl_ptr_upd == []  # no pointer moved
    after = mm.apply(cs).table(sids[0])
    assert all(mm.table(s) == after for s in sids)
    moved = [i for i in range(M) if before[i] != after[i]]
    assert len(moved) < (1 / 10 + 0.02) * M  # one backend of 10 removed
    assert sorted(k for _, k, _ in cs.mgl_upd) == sorted({i // CHUNK for i in moved})
    # One of them gets other backends: a table of its own; the old one stays.
    other = Frontend(fewer[2].addr, 8080, TCP, Scope.EXTERNAL, fewer[2].name, (be(50), be(51)))
    cs = p.sync({"default/web": [fewer[0], fewer[1], other]})
    ((sid, new_tid, _),) = cs.mgl_ptr_upd
    assert sid == p.frontends[other.key].svc_id and new_tid not in tids
    assert {i for i, _, _ in cs.mgl_upd} == {new_tid}
    assert cs.mgl_del == [] and cs.mgl_ptr_del == []
    # The same planned in the other order (the odd one first): the two
    # that still share keep their table untouched.
    p = Programmed(maglev_size=M)
    p.sync({"default/web": fewer})
    (tid,) = {p.tables.of[f.key] for f in fewer}
    cs = p.sync({"default/web": [other, fewer[0], fewer[1]]})
    assert {p.tables.of[fewer[0].key], p.tables.of[fewer[1].key]} == {tid}
    assert p.tables.of[other.key] != tid
    assert {i for i, _, _ in cs.mgl_upd} == {p.tables.of[other.key]}
    assert [s for s, _, _ in cs.mgl_ptr_upd] == [p.frontends[other.key].svc_id]
    assert table_of(p, fewer[0]) == [be(i) for i in owners_of(range(1, 10))]
    # Two other Services with the same endpoints do not share (owner's own).
    q = Programmed(maglev_size=M)
    cs = q.sync({"default/a": [ext(1, 2)], "default/b": [ext(1, 2, addr=addr16("198.19.0.11"))]})
    assert len({t for _, t, _ in cs.mgl_ptr_upd}) == 2


def test_same_table_whatever_the_node_ids():
    # Two nodes: one learnt the backends in another order (other ids).
    a, b = Programmed(maglev_size=M), Programmed(maglev_size=M)
    a.sync({"default/other": [ext(9, 8, 7, addr=addr16("198.19.0.99"))]})
    a.sync({"default/web": [ext(*range(50))]})
    b.sync({"default/web": [ext(*reversed(range(50)))]})
    assert a.backend_ids[be(0)] != b.backend_ids[be(0)]  # other ids, the same backends
    assert table_of(a, ext(*range(50))) == table_of(b, ext(*range(50)))


def test_removal_writes_only_changed_chunks():
    p = Programmed(maglev_size=M)
    before = ext(*range(100))
    mm = Maps().apply(p.sync({"default/web": [before]}))
    sid = p.frontends[before.key].svc_id
    old = mm.table(sid)
    after = ext(*range(1, 100))
    cs = p.sync({"default/web": [after]})
    new = mm.apply(cs).table(sid)
    assert new == p.tables.entries_of(after.key)
    changed = [i for i in range(M) if old[i] != new[i]]
    assert sorted(k for _, k, _ in cs.mgl_upd) == sorted({i // CHUNK for i in changed})
    assert cs.mgl_del == [] and cs.mgl_ptr_upd == []
    # Its own ~1/100 and few others.
    assert 0.01 * M <= len(changed) < (0.01 + 0.02) * M


@pytest.mark.parametrize(
    "n_old,n_new", [(M, M), (1021, 1021), (1021, M), (M, 1021), (0, 1021), (1500, 1700), (2000, 2000)]
)
def test_changed_chunks_are_those_whose_padded_bytes_differ(n_old, n_new):
    """A table's chunks to write: each of the new one whose entries
    (zeros past the table's end) differ from the old one's, or that the
    old one had not; each written as those bytes."""
    from ctrl.dataplane.tables import _changed_chunks

    rnd = random.Random(n_old * 7 + n_new)
    old = array("I", [rnd.randrange(1, 50) for _ in range(n_old)])
    new = array("I", old[:n_new]) + array("I", [rnd.randrange(1, 50) for _ in range(n_new - min(n_old, n_new))])
    for i in rnd.sample(range(n_new), min(n_new, 3)):
        new[i] = 99  # a few entries change hands
    if n_old and n_new and n_old != n_new:
        # Past the shorter one's end: the longer one's entries all zero
        # in the chunk both share, so padded alike.
        last = (min(n_old, n_new) - 1) // CHUNK
        for t in (old, new):
            for i in range(min(n_old, n_new), min(len(t), (last + 1) * CHUNK)):
                t[i] = 0

    def padded(t, k):
        b = t[k * CHUNK : (k + 1) * CHUNK].tobytes()
        return b + bytes(4 * CHUNK - len(b))

    had = -(-n_old // CHUNK)
    want = [
        (7, k, padded(new, k))
        for k in range(-(-n_new // CHUNK))
        if k >= had or padded(new, k) != padded(old, k)
    ]
    assert _changed_chunks(7, old, new) == want


def test_removed_frontend_deletes_pointer_then_table():
    p = Programmed(maglev_size=M)
    f, g = ext(1, 2), ext(1, 2, port=30080)
    p.sync({"default/web": [f, g]})
    tid = p.tables.of[f.key]
    sid_f, sid_g = p.frontends[f.key].svc_id, p.frontends[g.key].svc_id
    cs = p.sync({"default/web": [g]})
    assert cs.mgl_ptr_del == [sid_f] and cs.mgl_del == []  # g still reads the table
    cs = p.sync({"default/web": []})
    assert cs.mgl_ptr_del == [sid_g]
    assert sorted(cs.mgl_del) == [(tid, k) for k in range(NCH)]
    assert p.tables.count == 0


def test_last_backend_gone_deletes_table():
    p = Programmed(maglev_size=M)
    p.sync({"default/web": [ext(1, 2)]})
    cs = p.sync({"default/web": [ext()]})
    assert len(cs.mgl_del) == NCH and len(cs.mgl_ptr_del) == 1 and p.tables.count == 0


def adopted(cs) -> tuple[dict, dict, dict, dict[int, dict[int, array]], dict[int, tuple[int, int]]]:
    tables, ptrs = Maps().apply(cs).contents()
    return dict(cs.svc_upd), {(s, i): b for s, i, b in cs.slot_upd}, dict(cs.name_upd), tables, ptrs


def test_adopted_tables_diff_empty_and_mode_change(monkeypatch):
    builds = []
    real_fill = native.fill
    monkeypatch.setattr(native, "fill", lambda perms, ids, m: builds.append(m) or real_fill(perms, ids, m))
    p = Programmed(maglev_size=M)
    f = ext(*range(20))
    svc, slots, names, tables, ptrs = adopted(p.sync({"default/web": [f]}))
    (tid,) = tables
    # A restart in the same mode: nothing to write.
    q = Programmed(maglev_size=M)
    q.adopt(svc, slots, dict(p.backends), names, tables=tables, pointers=ptrs)
    assert q.tables.count == NCH
    builds.clear()
    assert len(q.sync({"default/web": [f]}, prune_except={"default/web"})) == 0
    assert builds == []  # a whole table is taken as it is: the reconcile builds nothing
    # An entry lost: the first sync writes its chunk back, and only it.
    damaged = {tid: dict(tables[tid])}
    chunk = array("I", damaged[tid][1])
    lost, chunk[7] = chunk[7], 0
    damaged[tid][1] = chunk
    q = Programmed(maglev_size=M)
    q.adopt(svc, slots, dict(p.backends), names, tables=damaged, pointers=ptrs)
    cs = q.sync({"default/web": [f]})
    assert [(i, k) for i, k, _ in cs.mgl_upd] == [(tid, 1)] and abi.mgl_ids(cs.mgl_upd[0][2])[7] == lost
    assert builds == [M]
    # A chunk lost: the same.
    q = Programmed(maglev_size=M)
    q.adopt(
        svc,
        slots,
        dict(p.backends),
        names,
        tables={tid: {k: c for k, c in tables[tid].items() if k != 3}},
        pointers=ptrs,
    )
    cs = q.sync({"default/web": [f]})
    assert [(i, k) for i, k, _ in cs.mgl_upd] == [(tid, 3)] and cs.mgl_upd[0][2] == tables[tid][3].tobytes()
    # Restarted in random mode: the table goes, the flag with it.
    r = Programmed()
    r.adopt(svc, slots, dict(p.backends), names, tables=tables, pointers=ptrs)
    cs = r.sync({"default/web": [f]})
    assert len(cs.mgl_del) == NCH and cs.mgl_ptr_del == list(ptrs) and not cs.svc_upd[0][1][2] & MAGLEV_BIT
    # Another table size: every chunk of it rewritten, the pointer with
    # its new size, the tail deleted.
    small = maglev.MIN_SIZE
    s2 = Programmed(maglev_size=small)
    s2.adopt(svc, slots, dict(p.backends), names, tables=tables, pointers=ptrs)
    cs = s2.sync({"default/web": [f]})
    assert [k for _, k, _ in cs.mgl_upd] == list(range(abi.mgl_chunks(small)))
    assert cs.mgl_ptr_upd == [(next(iter(ptrs)), tid, small)]
    assert cs.mgl_del == [(tid, k) for k in range(abi.mgl_chunks(small), NCH)]
    assert Maps().apply(adopted_cs(tables, ptrs)).apply(cs).table(next(iter(ptrs))) == s2.tables.entries_of(f.key)


def adopted_cs(tables: dict[int, dict[int, array]], ptrs: dict[int, tuple[int, int]]):
    """A change set writing these map contents (a Maps start)."""
    from ctrl.dataplane.changeset import ChangeSet

    return ChangeSet(
        mgl_upd=[(i, k, c.tobytes()) for i, cs in tables.items() for k, c in cs.items()],
        mgl_ptr_upd=[(s, t, m) for s, (t, m) in ptrs.items()],
    )


def test_pointers_that_disagree_on_the_size_are_rewritten():
    """Two frontends' pointers to one table, one with a wrong M (maps
    that disagree): the first full sync points both at a whole table of
    the right size, and nothing is left to repair."""
    p = Programmed(maglev_size=M)
    f, g = ext(*range(20)), ext(*range(20), port=30080)
    svc, slots, names, tables, ptrs = adopted(p.sync({"default/web": [f, g]}))
    sid_f, sid_g = p.frontends[f.key].svc_id, p.frontends[g.key].svc_id
    (tid,) = tables
    for wrong in ({sid_f: (tid, 1000), sid_g: ptrs[sid_g]}, {sid_f: ptrs[sid_f], sid_g: (tid, 1000)}):
        q = Programmed(maglev_size=M)
        q.adopt(svc, slots, dict(p.backends), names, tables=tables, pointers=wrong)
        cs = q.sync({"default/web": [f, g]}, prune_except={"default/web"})
        mm = Maps().apply(adopted_cs(tables, wrong)).apply(cs)
        assert mm.ptrs[sid_f][1] == mm.ptrs[sid_g][1] == M
        assert mm.table(sid_f) == mm.table(sid_g) == p.tables.entries_of(f.key)
        assert len(q.sync({"default/web": [f, g]}, prune_except={"default/web"})) == 0


def test_orphan_tables_go_at_the_first_full_sync():
    p = Programmed(maglev_size=M)
    ones = array("I", [1] * CHUNK)
    p.adopt({}, {}, {}, {}, tables={77: {0: ones, 3: ones}}, pointers={5: (77, 1)})
    cs = p.sync({})
    assert cs.mgl_del == [] and cs.mgl_ptr_del == []
    cs = p.sync({}, prune_except=set())
    assert cs.mgl_ptr_del == [5] and sorted(cs.mgl_del) == [(77, 0), (77, 3)]


def test_full_map_refuses_the_service():
    p = Programmed(MapSizes(maglev=NCH * CHUNK), maglev_size=M)
    assert p.sync({"default/a": [ext(1)]}).rejected == {}
    cs = p.sync({"default/b": [ext(2, addr=addr16("198.19.0.11"))]})
    assert "--max-maglev-entries" in cs.rejected["default/b"]
    assert cs.mgl_upd == [] and cs.mgl_ptr_upd == []


def test_dry_run_lists_the_tables():
    from ctrl.cli.run import render_changes

    p = Programmed(maglev_size=maglev.MIN_SIZE)
    f = ext(1, 2)
    cs = p.sync({"default/web": [f]})
    doc = json.loads(render_changes(cs, "json"))
    chunks = doc[abi.map_name("sp_mgl")]
    assert [c["key"]["chunk"] for c in chunks] == list(range(abi.mgl_chunks(maglev.MIN_SIZE)))
    assert sum(len(c["value"]["backend"]) for c in chunks) == abi.mgl_chunks(maglev.MIN_SIZE) * CHUNK
    (ptr,) = doc[abi.map_name("sp_mglptr")]
    assert ptr == {
        "key": p.frontends[f.key].svc_id,
        "value": {"table": chunks[0]["key"]["id"], "size": maglev.MIN_SIZE},
    }
    assert abi.map_name("sp_mgl") not in json.loads(
        render_changes(Programmed().sync({"default/web": [ext(1)]}), "json")
    )


def delta_of(before: set[int], have: set[int], step: int) -> dict:
    """A Frontend's delta fields for step (the planner's form): the
    endpoints added and removed since the step before; none at step 0."""
    if not step:
        return dict(version=step)
    return dict(
        added=tuple(be(i) for i in sorted(have - before)),
        removed=tuple(be(i) for i in sorted(before - have)),
        base=step - 1,
        version=step,
    )


def test_tables_follow_deltas_as_if_built_from_scratch():
    """A Service's LB IP and NodePort through a run of changes given as
    deltas (as the planner gives them), more backends than entries and
    fewer: after each, both read one table, the maps hold exactly it, and
    it is the table of their backends built from nothing. A change only
    past the first M turns writes nothing."""
    m = maglev.MIN_SIZE
    rng = random.Random(15)
    p = Programmed(maglev_size=m)
    mm = Maps()
    have: set[int] = set()
    nodeport = addr16("198.18.200.1")
    pasts = 0
    for step in range(40):
        before = set(have)
        past = False
        if step == 0:
            have = set(rng.sample(range(4000), 1500))
        elif step % 10 == 5:  # most replaced, fewer than M or more
            n = rng.randrange(300, 900) if step // 10 % 2 else rng.randrange(1300, 2500)
            have = set(rng.sample(range(4000), n))
        elif past := step % 10 == 7 and len(have) > m + 40:  # past the first M turns only
            cut = sorted(have)[m]
            gone = set(rng.sample([i for i in have if i > cut], 20))
            new = set(rng.sample([i for i in range(cut + 1, 4000) if i not in have], 20))
            have = (have - gone) | new
        else:
            gone = set(rng.sample(sorted(have), rng.randrange(0, 60)))
            new = set(rng.sample([i for i in range(4000) if i not in have], rng.randrange(0, 60)))
            have = (have - gone) | new
        delta = delta_of(before, have, step)
        fronts = [
            Frontend(LB, 80, TCP, Scope.EXTERNAL, "default/web:http/TCP", tuple(be(i) for i in have), **delta),
            Frontend(nodeport, 30080, TCP, Scope.EXTERNAL, "default/web:http/TCP", tuple(be(i) for i in have), **delta),
        ]
        cs = p.sync({"default/web": fronts})
        assert cs.rejected == {}
        if past:
            assert cs.mgl_upd == [] and cs.mgl_del == [] and cs.mgl_ptr_upd == []
            pasts += 1
        mm.apply(cs)
        (tid,) = {p.tables.of[f.key] for f in fronts}
        want = [(*e, TCP) for e in owners([ep(i) for i in have], m)]
        assert table_of(p, fronts[0]) == want
        for f in fronts:
            sid = p.frontends[f.key].svc_id
            assert mm.ptrs[sid] == (tid, m)
            assert [p.backends[b] for b in mm.table(sid)] == want
    assert pasts >= 2


def test_head_edited_with_the_turn_order_gives_the_table_built_anew(monkeypatch):
    """Tables filled from a head (the first M turns' ids and permutations)
    edited change after change: after each change the table is the one
    built from nothing and the head holds the first M turns, with turns
    gone from and added to the first M, past them only, and more or
    fewer backends than M (steps 20 to 29)."""
    m = maglev.MIN_SIZE
    rng = random.Random(3)
    p = Programmed(maglev_size=m)
    have: set[int] = set(rng.sample(range(3000), 1100))
    fills = []
    real_fill = native.fill
    monkeypatch.setattr(native, "fill", lambda perms, ids, mm: fills.append(len(ids)) or real_fill(perms, ids, mm))
    for step in range(60):
        before = set(have)
        if step == 20:  # fewer than M
            gone = set(sorted(have)[m - 60 :])
            new = set()
            have = have - gone
        elif step == 25:  # fewer than M, turns added past the last: the table changes all the same
            new = set(range(max(have) + 1, max(have) + 6))
            gone = set()
            have = have | new
        elif step == 30:  # more again
            new = set(rng.sample([i for i in range(3000) if i not in have], 150))
            gone = set()
            have = have | new
        elif step % 3 == 2 and len(have) > m + 4:  # past the first M turns only: the same table
            gone = set(rng.sample(sorted(have)[m:], rng.randrange(1, 4)))
            new = set(rng.sample(range(max(have) + 1, max(have) + 50), rng.randrange(0, 4)))
            have = (have - gone) | new
        elif step:
            head = sorted(have)[:m]
            gone = set(rng.sample(head, rng.randrange(0, 5))) | set(rng.sample(sorted(have), rng.randrange(0, 5)))
            new = set(rng.sample([i for i in range(3000) if i not in have], rng.randrange(0, 12)))
            have = (have - gone) | new
        delta = delta_of(before, have, step)
        f = Frontend(LB, 80, TCP, Scope.EXTERNAL, "default/web:http/TCP", tuple(be(i) for i in have), **delta)
        filled = len(fills)
        assert p.sync({"default/web": [f]}).rejected == {}
        assert table_of(p, f) == [(*e, TCP) for e in owners([ep(i) for i in have], m)], step
        (t,) = p.tables.tables.values()
        assert t.turns is not None
        assert [p.bids.backends[b] for b in t.turns.ids] == [be(i) for i in sorted(have)[:m]], step
        assert t.turns.ids.tolist() == [turn_id(k) for k in t.turns.head], step
        assert t.turns.perms.tolist() == [native.pack(*maglev.hashed(k[:18], m)) for k in t.turns.head], step
        # Filled again exactly when the first M turns changed (ids order
        # as their addresses do here).
        assert (len(fills) > filled) == (not step or sorted(before)[:m] != sorted(have)[:m]), step
    assert len(fills) > 20  # most changes reached the first M turns


def test_kept_permutations_stay_bounded():
    """Each backend's permutation is kept by id (hashed once); backends
    replaced change after change do not grow that store past a few
    tables' worth."""
    m = maglev.MIN_SIZE
    p = Programmed(maglev_size=m)
    for step in range(40):
        f = Frontend(LB, 80, TCP, Scope.EXTERNAL, "default/web:http/TCP", tuple(be(step * 200 + i) for i in range(200)))
        assert p.sync({"default/web": [f]}).rejected == {}
    assert len(p.tables._perms) <= 2 * m * (len(p.tables.tables) + 1) + 200


def test_turns_order_as_the_backends_and_start_with_the_identity():
    """A turn (ctrl.dataplane.tables.turns_of), compared as bytes, orders
    backends as their (address, port, protocol) tuples do, IPv4 and IPv6,
    ports across the byte boundary, whatever their ids; its first 18 bytes
    are the Maglev identity the permutation is hashed from, its last 4 the
    id."""
    rng = random.Random(5)
    prefixes = ("198.18.0.", "198.19.3.", "2001:db8::")
    bs = list(
        {
            (addr16(rng.choice(prefixes) + str(rng.randrange(1, 250))), rng.choice((1, 255, 256, 8080, 65535)), proto)
            for proto in (6, 17, 132)
            for _ in range(150)
        }
    )
    ids = rng.sample(range(1, 1 << 32), len(bs))
    turns = turns_of(ids, dict(zip(ids, bs, strict=True)))
    assert len(turns) == len(bs) and all(len(t) == TURN for t in turns)
    assert [bs[ids.index(turn_id(t))] for t in sorted(turns)] == sorted(bs)
    for t, i, b in zip(turns, ids, bs, strict=True):
        assert turn_id(t) == i and t[:18] == maglev.identity(b[0], b[1])
    assert turns_of([], {}) == []


def turn(i: int, bid: int | None = None) -> bytes:
    """The turn of backend be(i) under id bid (i by default)."""
    return turns_of([i if bid is None else bid], {i if bid is None else bid: be(i)})[0]


def fake_perms(ids, turns) -> array:
    """A permutation per backend made from its id alone: what Turns must
    carry along with each turn of its head."""
    return array(native.U64, [i * 7 + 1 for i in ids])


def test_turn_order_edit_refuses_a_head_turn_not_there():
    """ctrl.dataplane.tables.Turns.edit: a turn gone from the head that
    is not there, or one added to it that is (not expected: an id keeps
    its backend), makes it answer None and change nothing; the caller
    sorts the turns anew."""
    old = [turn(i, 100 + i) for i in range(0, 40, 2)]
    t = Turns(old, 5, fake_perms)
    assert t.edit([turn(3, 103)], [turn(1, 101)]) is None
    assert t.edit([], [turn(4, 104), turn(5, 105)]) is None
    assert list(t) == old and t.head == old[:5] and len(t) == len(old)
    # Past the head a turn gone is only marked: the order is right.
    assert t.edit([turn(30, 130)], [turn(1, 101)]) is True
    assert list(t) == sorted([x for x in old if turn_id(x) != 130] + [turn(1, 101)])


def test_turn_order_keeps_its_head_sorted_and_says_whether_it_changed(monkeypatch):
    """Turns through random edits (turns that leave and come back, the
    head losing and gaining turns, the marks of the heap tidied): always
    the sorted order and its first m turns as the head, with their ids
    and permutations alongside; edit() says whether the head changed; a
    copy edited apart stays as it was."""
    tidied = []
    real_tidy = Turns.tidy
    monkeypatch.setattr(Turns, "tidy", lambda self: tidied.append(len(self._dead)) or real_tidy(self))
    rng = random.Random(7)
    m = 20
    have = set(rng.sample(range(2000), 300))
    t = Turns(sorted(turn(i) for i in have), m, fake_perms)
    changes = 0
    for step in range(300):
        k = rng.randrange(0, 30)
        if step % 5 == 4:  # the head only
            gone = set(sorted(have)[: min(k, len(have))])
        elif step % 7 == 6:  # past the head only
            gone = set(rng.sample(sorted(have)[m:], min(len(have) - m, k))) if len(have) > m else set()
        else:
            gone = set(rng.sample(sorted(have), min(len(have), k)))
        pool = [i for i in range(2000) if i not in have]
        new = set(rng.sample(pool, rng.randrange(0, 30))) if step % 7 != 6 else {max(have) + 1 + i for i in range(k)}
        before, head_before = list(t), t.head
        c = t.copy()
        changed = t.edit(sorted(turn(i) for i in gone), sorted(turn(i) for i in new))
        have = (have - gone) | new
        want = sorted(turn(i) for i in have)
        assert list(t) == want and len(t) == len(want), step
        assert t.head == want[:m], step
        assert t.ids.tolist() == [turn_id(x) for x in want[:m]], step
        assert t.perms.tolist() == [i * 7 + 1 for i in t.ids], step
        assert changed is (head_before != t.head), step
        changes += changed
        assert list(c) == before and c.head == head_before
    assert tidied and max(tidied) > 64
    assert 0 < changes < 300


def test_id_set_fingerprint_follows_its_deltas():
    """ctrl.dataplane.tables.IdSet: a set derived through a delta takes
    the old one's ids and is equal (and hashes equal) to the same ids
    made from scratch; the old one keeps standing for what it held; sets
    of other ids differ, the same number of them too."""
    from ctrl.dataplane.tables import IdSet

    a = IdSet(set(range(1000)))
    b, gone, new = a.derived([3, 5, 5000], [5, 2000, 2001])
    assert (gone, new) == (frozenset({3}), frozenset({2000, 2001}))  # 5 removed and added: kept
    want = (set(range(1000)) - {3, 5, 5000}) | {5, 2000, 2001}
    assert b.ids == want and len(b) == len(want)
    assert b == IdSet(set(want)) and hash(b) == hash(IdSet(set(want)))
    assert a.ids is None and a == IdSet(set(range(1000))) and a != b
    assert IdSet({1, 4}) != IdSet({2, 3})  # same size and same sum of ids
    assert IdSet({1, 2}) != IdSet({1, 2, 3})
    with pytest.raises(RuntimeError):
        list(a)
