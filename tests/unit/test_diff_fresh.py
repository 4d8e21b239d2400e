"""Programmed's one-pass sync of owners new to the maps (_sync_fresh,
many owners a batch) against the general path (_sync_owner): random
sequences of syncs, run both ways, give the same change sets (each
owner's mark included) and leave the same mirror."""

import random
import socket

import pytest

from ctrl.dataplane import programmed
from ctrl.dataplane.abi import MapSizes
from ctrl.dataplane.changeset import _LISTS
from ctrl.dataplane.programmed import Programmed
from ctrl.model.plan import NO_FLAGS, Frontend, FrontendFlag, Scope
from ctrl.util.addrs import addr16

TCP = socket.IPPROTO_TCP
OWNERS = [f"default/svc-{k}" for k in range(8)]


def be(i):
    return (addr16(f"198.18.2.{i}"), 8080 + i % 2, TCP)


def rand_owner(rnd, owner, versions, long_name):
    """0-3 groups of 1-3 frontends each (some with no group), their keys
    from a small pool so that owners claim each other's."""
    fronts = []
    for g in range(rnd.choice([0, 1, 1, 1, 1, 2, 3])):
        backends = tuple(be(i) for i in rnd.sample(range(14), rnd.randrange(0, 6)))
        group = None if rnd.random() < 0.15 else ("g", g)
        version = next(versions)
        for _ in range(rnd.randrange(1, 4)):
            vip = addr16(f"198.19.0.{rnd.randrange(1, 7)}")
            name = f"{owner}:p{g}/TCP"
            if long_name and rnd.random() < 0.3:
                name = "n" * 300
            ranges = ()
            flags = NO_FLAGS if backends else FrontendFlag.REJECT
            if rnd.random() < 0.1:
                ranges = ((addr16("198.18.64.0"), 96 + 18),)
                flags |= FrontendFlag.SRC_RANGES
            if rnd.random() < 0.2:
                flags |= FrontendFlag.AFFINITY
            scope = Scope.EXTERNAL if rnd.random() < 0.3 else Scope.INTERNAL
            fronts.append(
                Frontend(
                    vip,
                    rnd.choice([80, 443]),
                    TCP,
                    scope,
                    name,
                    backends,
                    flags=flags,
                    affinity_timeout=30 if FrontendFlag.AFFINITY in flags else 0,
                    source_ranges=ranges,
                    version=version,
                    group=group if group is None else (*group, version),
                )
            )
    return fronts


def mirror(p: Programmed):
    """Everything the diff keeps, comparable."""
    return (
        {
            k: (s.svc_id, s.owner, s.name, s.table.tid, s.count, s.flags, s.affinity_timeout, s.slots_id, s.ranges)
            for k, s in p.frontends.items()
        },
        {
            tid: (t.key, list(t.slots), set(t.users), t.version, t.slot_of, t.adopted)
            for tid, t in p.slot_tables.items()
        },
        {k: t.tid for k, t in p.table_of.items()},
        {o: set(ks) for o, ks in p.by_owner.items() if ks},
        dict(p.bids.backends),
        {b: n for b, n in p.bids.refs.items() if n},
        (p.bids.next_id, p.sids.next_id, p.slot_count, p.range_count),
        p.blocked,
        p.waiting,
        dict(p.drains.until),
        set(p._unindexed),
    )


def written(cs):
    return (
        {f: list(getattr(cs, f)) for f in _LISTS},
        cs.services,
        cs.rejected,
        cs.refused,
        cs.conflicts,
        cs.resync,
        cs.slot_tables,
        cs.marks,
    )


def recorder(into: list):
    """A stream callback noting how far the change set has come each time."""
    return lambda cs: into.append(cs.lengths())


@pytest.mark.parametrize("seed", range(60))
def test_owners_new_to_the_maps_sync_in_one_pass_as_in_general(seed, monkeypatch):
    rnd = random.Random(seed)
    monkeypatch.setattr(programmed, "STREAM_WITHIN_FROM", rnd.choice([3, 1000]))
    small = rnd.random() < 0.4
    # Small maps, each of the three the first to fill up (the batch's
    # room counts what the owners before it will add).
    tight = rnd.choice(
        [
            dict(services=9, slots=14, backends=11),
            dict(services=40, slots=60, backends=11),
            dict(services=6, slots=60, backends=40),
            dict(services=40, slots=12, backends=40),
        ]
    )
    sizes = MapSizes(**tight) if small else MapSizes()
    drain = rnd.choice([0.0, 5.0])
    fast, general = Programmed(sizes, drain), Programmed(sizes, drain)
    general.fresh_in_one_pass = False
    taken = []
    one_pass = Programmed._sync_fresh

    def counted(self, batch, cs):
        if self is fast:
            taken.extend(owner for owner, _, _ in batch)
        return one_pass(self, batch, cs)

    monkeypatch.setattr(Programmed, "_sync_fresh", counted)
    versions = iter(range(1, 10**6))
    now = 0.0
    for step in range(12):
        desired = {
            o: rand_owner(rnd, o, versions, long_name=seed % 3 == 0)
            for o in rnd.sample(OWNERS, rnd.randrange(1, len(OWNERS)))
        }
        if step == 0:  # one that takes the one-pass path whatever the others do
            vip = addr16("198.19.9.1")
            desired["default/first"] = [
                Frontend(vip, 80, TCP, Scope.INTERNAL, "default/first:80/TCP", (be(1),), version=0, group=(0,))
            ]
        prune = set(desired) if rnd.random() < 0.2 else None
        now += rnd.choice([1.0, 6.0])
        seen_fast, seen_general = [], []
        a = fast.sync(desired, prune, now, stream=recorder(seen_fast))
        b = general.sync(desired, prune, now, stream=recorder(seen_general))
        assert written(a) == written(b), (seed, step)
        # A batch is streamed once, after its last owner: the batched
        # path streams at some of the points the general one does, and
        # at its last.
        it = iter(seen_general)
        assert all(point in it for point in seen_fast), (seed, step)
        assert seen_fast[-1:] == seen_general[-1:], (seed, step)
        assert mirror(fast) == mirror(general), (seed, step)
    assert "default/first" in taken


def test_the_one_pass_path_takes_a_cold_start_of_small_services(monkeypatch):
    """Owners new to empty maps, one group each: every one in one pass."""
    taken = []
    one_pass = Programmed._sync_fresh

    def counted(self, batch, cs):
        taken.extend(owner for owner, _, _ in batch)
        return one_pass(self, batch, cs)

    monkeypatch.setattr(Programmed, "_sync_fresh", counted)
    desired = {}
    for k in range(20):
        owner = f"default/svc-{k}"
        vip = addr16(f"198.19.1.{k}")
        bs = tuple(be(i) for i in range(k % 5 + 1))
        desired[owner] = [
            Frontend(vip, port, TCP, Scope.INTERNAL, f"{owner}:{port}/TCP", bs, version=k, group=(port, k))
            for port in (80,)
        ]
    p = Programmed()
    cs = p.sync(desired)
    assert taken == sorted(desired)
    assert len(cs.svc_upd) == 20 and len(cs.name_upd) == 20
    assert p.slot_count == sum(k % 5 + 1 for k in range(20))
    assert not p._unindexed


@pytest.mark.parametrize(
    "caps",
    [
        dict(services=40, slots=60, backends=10),
        dict(services=4, slots=60, backends=40),
        dict(services=40, slots=10, backends=40),
    ],
)
def test_a_batch_measures_room_with_the_owners_before_it(caps):
    """Six new owners of three new backends each into maps with room for
    three or four of them: those past the room are refused as the general
    path refuses them, though none of the batch is in the maps yet when
    the later ones are looked at."""
    desired = {}
    for k in range(6):
        owner = f"default/svc-{k}"
        bs = tuple(be(3 * k + i) for i in range(3))
        vip = addr16(f"198.19.1.{k}")
        desired[owner] = [Frontend(vip, 80, TCP, Scope.INTERNAL, f"{owner}:80/TCP", bs, version=k, group=(k,))]
    fast, general = Programmed(MapSizes(**caps)), Programmed(MapSizes(**caps))
    general.fresh_in_one_pass = False
    a, b = fast.sync(desired), general.sync(desired)
    assert written(a) == written(b)
    assert mirror(fast) == mirror(general)
    assert sorted(a.rejected) in ([f"default/svc-{i}" for i in range(k, 6)] for k in (3, 4))
