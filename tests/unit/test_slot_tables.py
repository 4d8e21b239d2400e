"""Slot tables shared by the frontends of a Service that select alike
(ctrl.dataplane.programmed.SlotTable): written once per change, counted by
every frontend that reads it, moved between as the groups change, and
merged from the per-frontend tables a layout 3 agent left."""

import socket
from dataclasses import replace

from ctrl.dataplane.programmed import Programmed
from ctrl.model.plan import Frontend, Scope
from ctrl.util.addrs import addr16

# UDP: a backend that leaves a frontend's table is listed for the purge of
# its flows (ChangeSet.removed); slot tables are the same for TCP.
UDP = socket.IPPROTO_UDP
VIP = addr16("198.19.0.10")
NODE1, NODE2 = addr16("198.18.0.2"), addr16("198.18.0.3")
INT, EXT = Scope.INTERNAL, Scope.EXTERNAL
NAME = "default/web:dns/UDP"
OWNER = "default/web"
CIP, NP1, NP2 = (VIP, 80, UDP, INT), (NODE1, 30080, UDP, EXT), (NODE2, 30080, UDP, EXT)


def be(i):
    return (addr16(f"198.18.1.{i}"), 8080, UDP)


def fronts(nums, group=("cluster",), np_nums=None, np_group=None, **plan):
    """A cluster IP and two NodePorts; the NodePorts take np_nums in
    np_group when given (a Local external policy), else the same."""
    bs = tuple(be(i) for i in nums)
    nps = bs if np_nums is None else tuple(be(i) for i in np_nums)
    npg = group if np_group is None else np_group
    return [
        Frontend(VIP, 80, UDP, INT, NAME, bs, group=group, **plan),
        Frontend(NODE1, 30080, UDP, EXT, NAME, nps, group=npg, **plan),
        Frontend(NODE2, 30080, UDP, EXT, NAME, nps, group=npg, **plan),
    ]


def tids(cs):
    return {s for s, _, _ in cs.slot_upd}


def test_frontends_of_one_group_share_one_table_written_once():
    p = Programmed()
    cs = p.sync({OWNER: fronts([1, 2, 3])})
    (tid,) = tids(cs)
    assert len(cs.slot_upd) == 3 and p.slot_count == 3 and len(p.slot_tables) == 1
    # The table of a new Service takes its first frontend's id.
    assert p.frontends[CIP].svc_id == tid
    assert sorted(v for _, v in cs.svc_upd) == sorted((p.frontends[k].svc_id, 3, v[2], 0, tid) for k, v in cs.svc_upd)
    assert {k for k, _ in cs.svc_upd} == {CIP, NP1, NP2}
    # One backend more: one slot, and every frontend counts it.
    cs = p.sync({OWNER: fronts([1, 2, 3, 4])})
    assert [(s, i) for s, i, _ in cs.slot_upd] == [(tid, 3)]
    assert sorted((k, v[1], v[4]) for k, v in cs.svc_upd) == sorted((k, 4, tid) for k in (CIP, NP1, NP2))
    # One less: the last slot moves into its hole, once; each frontend's
    # UDP flows to it are purged.
    cs = p.sync({OWNER: fronts([1, 2, 4])})
    assert [(s, i) for s, i, _ in cs.slot_upd] == [(tid, 2)] and cs.slot_del == [(tid, 3)]
    assert sorted(cs.removed) == sorted((k, be(3)) for k in (CIP, NP1, NP2))
    assert p.slot_count == 3 and all(p.frontends[k].slots == p.frontends[CIP].slots for k in (NP1, NP2))


def test_a_delta_applies_once_to_the_table():
    p = Programmed()
    p.sync({OWNER: fronts([1, 2, 3], version=1)})
    cs = p.sync({OWNER: fronts([1, 3, 4], version=2, base=1, added=(be(4),), removed=(be(2),))})
    (tid,) = tids(cs)
    assert [(s, i, b) for s, i, b in cs.slot_upd] == [(tid, 1, p.backend_ids[be(4)])]
    assert cs.svc_upd == [] and cs.slot_del == []  # counts unchanged
    assert p.frontends[CIP].table.slot_of == {b: i for i, b in enumerate(p.frontends[CIP].slots)}
    # Plans that disagree on the version they are relative to: in full.
    plans = fronts([1, 3, 5], version=3, base=2, added=(be(5),), removed=(be(4),))
    plans[2] = replace(plans[2], base=1)
    cs = p.sync({OWNER: plans})
    assert {b for _, _, b in cs.slot_upd} == {p.backend_ids[be(5)]}
    assert [p.backends[b] for b in p.frontends[NP2].slots] == [be(1), be(5), be(3)]


def test_a_frontend_that_leaves_its_group_reads_a_table_of_its_own():
    p = Programmed(drain_period=30.0)
    p.sync({OWNER: fronts([1, 2, 3])}, now=0.0)
    shared = p.frontends[CIP].table.tid
    # externalTrafficPolicy Local: the NodePorts take the local endpoint only.
    cs = p.sync({OWNER: fronts([1, 2, 3], np_nums=[1], np_group=("local",))}, now=1.0)
    local = p.frontends[NP1].table.tid
    assert local != shared and p.frontends[NP2].table.tid == local
    assert [(s, i) for s, i, _ in cs.slot_upd] == [(local, 0)] and cs.slot_del == []
    assert sorted((k, v[1], v[4]) for k, v in cs.svc_upd) == [(NP1, 1, local), (NP2, 1, local)]
    assert sorted(cs.removed) == sorted((k, be(b)) for k in (NP1, NP2) for b in (2, 3))
    assert p.slot_count == 4 and not p.draining  # every backend still serves the cluster IP
    # Back to Cluster: the NodePorts read the shared table again, and the
    # one they leave goes (after their entries stop naming it).
    cs = p.sync({OWNER: fronts([1, 2, 3])}, now=2.0)
    assert len(cs.slot_upd) == 0 and cs.slot_del == [(local, 0)]
    assert sorted((k, v[4]) for k, v in cs.svc_upd) == [(NP1, shared), (NP2, shared)]
    assert set(p.slot_tables) == {shared} and p.slot_count == 3 and not p.draining


def test_a_table_follows_its_frontends_into_another_group():
    """A policy change that moves every frontend of a table to one new
    group keeps the table: nothing is written again."""
    p = Programmed()
    p.sync({OWNER: fronts([1, 2, 3])})
    tid = p.frontends[CIP].table.tid
    cs = p.sync({OWNER: fronts([1, 2, 3], group=("local",))})
    assert len(cs) == 0 and p.frontends[NP2].table.tid == tid and list(p.table_of) == [(OWNER, ("local",))]


def test_removing_the_frontends_of_a_shared_table():
    p = Programmed(drain_period=30.0)
    p.sync({OWNER: fronts([1, 2])}, now=0.0)
    tid = p.frontends[CIP].table.tid
    cs = p.sync({OWNER: fronts([1, 2])[:2]}, now=1.0)
    assert cs.svc_del == [NP2] and cs.slot_del == [] and sorted(cs.removed) == [(NP2, be(1)), (NP2, be(2))]
    assert p.slot_tables[tid].users == {CIP, NP1} and not p.draining
    cs = p.sync({OWNER: []}, now=2.0)
    assert sorted(cs.svc_del) == sorted([CIP, NP1]) and sorted(cs.slot_del) == [(tid, 0), (tid, 1)]
    assert not p.slot_tables and p.slot_count == 0 and sorted(p.draining) == sorted(p.backends)


def test_per_frontend_tables_of_layout_3_merge_at_the_first_sync():
    """Entries carried over from layout 3 read their own svc_id's slots
    (slots_id 0 reads as svc_id): the first sync gives the group the first
    frontend's table, points the others at it and deletes their slots."""
    q = Programmed()
    svc = {CIP: (7, 2, 0, 0, 7), NP1: (8, 2, 0, 0, 8), NP2: (9, 2, 0, 0, 9)}
    slots = {(sid, i): b for sid in (7, 8, 9) for i, b in enumerate((1, 2) if sid != 9 else (2, 1))}
    q.adopt(svc, slots, {1: be(1), 2: be(2)}, {sid: NAME for sid in (7, 8, 9)})
    assert len(q.slot_tables) == 3 and q.slot_count == 6
    cs = q.sync({OWNER: fronts([1, 2])}, prune_except={OWNER})
    assert len(cs.slot_upd) == 0
    assert sorted(cs.slot_del) == [(8, 0), (8, 1), (9, 0), (9, 1)]
    assert sorted((k, v[0], v[4]) for k, v in cs.svc_upd) == [(NP1, 8, 7), (NP2, 9, 7)]
    assert set(q.slot_tables) == {7} and q.slot_count == 2 and cs.removed == [] and not q.draining
    assert len(q.sync({OWNER: fronts([1, 2])})) == 0
    # The ids stay apart from every id read back, tables' included.
    cs = q.sync(
        {OWNER: fronts([1, 2]), "default/other": [Frontend(VIP, 81, UDP, INT, "default/other:x/UDP", (be(1),))]}
    )
    assert min(tids(cs)) > 9
