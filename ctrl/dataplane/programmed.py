"""What is programmed, and the smallest ordered change to reach what is wanted.

`Programmed` mirrors the contents of the service, slot, backend, name and
source range maps: its frontends, the slot tables they read (one per set of
frontends of a Service that select the same backends), backends with their
ids (ctrl.dataplane.ids), the drains under way (ctrl.dataplane.drain), all
read back from the pinned maps after a restart (`adopt`).

`Programmed.sync` takes the desired frontends of some services, updates the
mirror and returns a ChangeSet (ctrl.dataplane.changeset): only the entries
that differ, slots moved as little as possible (ctrl.dataplane.slots).
Pure Python; ctrl.dataplane.apply writes a ChangeSet to the kernel in its
phase order. The planner's symbols become the header's values here: scopes
when the maps are written and read (ctrl.dataplane.abi), frontend flags as
the mirror records them.
"""

from __future__ import annotations

import logging
import socket
from array import array
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from itertools import chain, filterfalse, repeat

from ..model.plan import Backend, FKey, Frontend, FrontendFlag, Scope, SourceRange, frontend_str
from . import abi, slots
from .abi import MapSizes
from .changeset import _LISTS, ChangeSet
from .drain import Drains
from .ids import BackendIds, ServiceIds
from .tables import IdSet, MaglevTables

# A slot table with at least this many slots gets its slot index right
# after the write that set it in full; a smaller one at its first delta.
EAGER_INDEX_FROM = 1000
# A table set in full of at least this many backends offers its new ones
# to sync's `stream` before its slots are assigned, not only once its
# owner is done (a small one's would wait for the next owner's anyway).
STREAM_WITHIN_FROM = 1000
# Owners new to the maps synced together at most (sync's batch): their
# backends' ids are found and allocated in one pass.
FRESH_BATCH = 256
_BE_UPD, _BE_MARK, _SLOT_UPD, _SVC_UPD, _NAME_UPD = map(
    _LISTS.index, ("be_upd", "be_mark", "slot_upd", "svc_upd", "name_upd")
)

log = logging.getLogger("sliceproxy.diff")  # the logger name operators filter on


@dataclass(eq=False)
class SlotTable:
    """The slots (sp_slot_v5 under `tid`) of the frontends of one Service
    that select the same backends: its cluster IP, NodePorts and
    load-balancer IPs of one port under Cluster policies. Written once for
    all of them; each frontend's entry names it (slots_id) and counts it."""

    tid: int  # key of its slots; from the frontends' id space (ServiceIds)
    key: tuple[str, object]  # (owner, group): what Programmed.table_of holds it under
    slots: list[int]  # backend id per slot
    users: set[FKey] = field(default_factory=set)  # frontends whose slots_id is tid
    # The plan number (Frontend.version) these slots hold, and each
    # backend's slot: what a Frontend's added/removed delta applies to.
    version: int = -1
    slot_of: dict[int, int] | None = None
    # Its backend ids as a set, and the version they are of, for the Maglev
    # tables of its external frontends (Programmed._table_ids).
    id_set: tuple[int, IdSet] | None = None
    # Read back from the maps: no group known yet; the first sync gives it
    # to a group of one of its frontends (Programmed._table_for).
    adopted: bool = False


@dataclass(eq=False)
class FrontendState:
    svc_id: int
    owner: str  # service key "namespace/name"; "" when unknown (adopted, unnamed)
    name: str
    table: SlotTable
    # What its entry in the frontend map holds: count, flags, affinity
    # timeout, slot table id (-1: not written yet).
    count: int = -1
    flags: int = 0  # SP_SVC_F_*
    affinity_timeout: int = 0
    slots_id: int = -1
    ranges: tuple[SourceRange, ...] = ()  # in the source range map under svc_id

    @property
    def slots(self) -> list[int]:
        """Backend id per slot: its table's."""
        return self.table.slots


def name_capacity() -> int:
    """Bytes of a frontend name the names map holds (its NUL aside)."""
    return abi.codec("sp_svc_name").size - 1


# _fresh_group's answer for an owner the general path takes.
_GENERAL = object()

# The protocol whose flows to a backend that left are purged (ChangeSet.removed).
_UDP = socket.IPPROTO_UDP


class _Room:
    """The room sync's batch has left in the maps (each owner _fresh_group
    takes counted as if all its backends were new), and the frontends its
    owners take."""

    __slots__ = ("keys", "services", "names", "slots", "backends")

    def __init__(self, p: Programmed, cs: ChangeSet) -> None:
        cap, n_svc = p.capacity, len(p.frontends)
        self.keys: set[FKey] = set()
        self.services = cap.services - n_svc - len(cs.svc_del)
        self.names = cap.services - n_svc - len(p.orphan_names) - len(cs.name_del)
        self.slots = cap.slots - p.slot_count - len(cs.slot_del)
        self.backends = cap.backends - len(p.bids)


class Programmed:
    # Owners new to the maps in the simple shape of _fresh_group synced in
    # one pass (_sync_fresh); off, every owner takes _sync_owner (the
    # tests compare the two).
    fresh_in_one_pass = True

    def __init__(self, capacity: MapSizes | None = None, drain_period: float = 0.0, maglev_size: int = 0):
        """maglev_size: the Maglev table size M of --external-lb=maglev
        (ctrl.model.maglev.check_size has checked it); 0: random mode."""
        self.capacity = capacity or MapSizes()
        self.maglev_size = maglev_size
        # The external frontends' Maglev tables (ctrl.dataplane.tables).
        self.tables = MaglevTables(maglev_size)
        self.name_max = name_capacity()
        # Frontends two Services claim: the one that holds it keeps it
        # (owner -> {key: holder} of what it waits for; key -> who waits),
        # and a claimant gets it when the holder lets it go.
        self.blocked: dict[str, dict[FKey, str]] = {}
        self.waiting: dict[FKey, set[str]] = {}
        self._freed: list[FKey] = []
        # How long a backend no frontend uses stays in the backend map
        # (ctrl.dataplane.drain).
        self.drain_period = drain_period
        self.drains = Drains()
        self._clear_marks: list[int] = []  # adopted with the draining flag but in use
        # Adopted backends no slot names and no drain holds: their drain
        # starts at the next sync (a restart's first sync is a full one
        # anyway; after a failed write the re-adopted maps can hold such).
        self._adopted_unused: list[int] = []
        self.frontends: dict[FKey, FrontendState] = {}
        self.by_owner: dict[str, set[FKey]] = defaultdict(set)
        # Slot tables by id, and by (owner, group): Frontend.group, or for a
        # frontend planned without one ("frontend", its key).
        self.slot_tables: dict[int, SlotTable] = {}
        self.table_of: dict[tuple[str, object], SlotTable] = {}
        self.bids = BackendIds()
        self.sids = ServiceIds()
        # Entries found in the maps at adoption that nothing owns; removed at
        # the first full sync, never before (a restart must not drop traffic).
        self.orphan_slots: list[tuple[int, int]] = []
        self.orphan_names: list[int] = []
        self.orphan_ranges: list[tuple[int, bytes, int]] = []
        self.slot_count = 0
        self.range_count = 0  # entries in the source range map
        self._unused: set[int] = set()
        self._unindexed: set[int] = set()  # slot tables (ids) to index
        # The external frontends of the owner being synced, for its tables.
        self._tabled: list[tuple[FKey, int, IdSet | None]] = []
        # sync's `stream`, while it runs.
        self._stream: Callable[[ChangeSet], None] | None = None
        # _growth's ids of an owner's backends: (backends, ids, how many
        # ids there were).
        self._looked: tuple[Collection[Backend], list[int | None], int] | None = None

    # The backend ids, and the drains, as dicts (tests, the bench).
    @property
    def backends(self) -> dict[int, Backend]:
        return self.bids.backends

    @property
    def backend_ids(self) -> dict[Backend, int]:
        return self.bids.ids

    @property
    def draining(self) -> dict[int, float]:
        return self.drains.until

    # -- reading back what a previous agent left --------------------------
    def adopt(
        self,
        svc: dict[FKey, tuple[int, int, int, int, int]],
        slots: dict[tuple[int, int], int],
        backends: dict[int, Backend],
        names: dict[int, str],
        ranges: dict[int, set[SourceRange]] | None = None,
        draining: dict[int, float] | None = None,
        tables: dict[int, dict[int, array]] | None = None,
        pointers: dict[int, tuple[int, int]] | None = None,
    ) -> None:
        """Rebuild the mirror from decoded map contents. `draining` holds
        the drain end of every backend the kernel has flagged draining (on
        the clock sync's `now` uses): a periodic re-adoption or a restart
        keeps each deadline instead of starting a new drain period."""
        # Who waits for which frontend is this process's knowledge, not the
        # kernel's: a re-adoption keeps it (a restart starts without).
        blocked, waiting = self.blocked, self.waiting
        self.__init__(self.capacity, self.drain_period, self.maglev_size)  # type: ignore[misc]
        self.blocked, self.waiting = blocked, waiting
        self.bids = bids = BackendIds(backends)
        refs = bids.refs
        stables = self.slot_tables
        for key, (svc_id, count, flags, timeout, slots_id) in svc.items():
            name = names.get(svc_id, "")
            owner = name.split(":", 1)[0] if ":" in name else ""
            t = stables.get(slots_id)
            if t is None:
                t = stables[slots_id] = SlotTable(slots_id, (owner, ("adopted", slots_id)), [], adopted=True)
                self.table_of[t.key] = t
            # Its frontends count the same slots, unless the agent stopped
            # between their writes: the table holds the most any counts.
            sl: list[int | None] = t.slots  # type: ignore[assignment]
            for i in range(len(sl), count):
                b = slots.get((slots_id, i))
                sl.append(b if b in bids.backends else None)
            t.users.add(key)
            st = FrontendState(svc_id, owner, name, t, count, flags, timeout, slots_id)
            st.ranges = tuple(sorted((ranges or {}).get(svc_id, ())))
            self.frontends[key] = st
            self.by_owner[owner].add(key)
        for t in stables.values():
            refs.update({b for b in t.slots if b is not None})
        self.slot_count = len(slots)
        self.range_count = sum(len(rs) for rs in (ranges or {}).values())
        self.orphan_slots = [k for k in slots if k[0] not in stables or k[1] >= len(stables[k[0]].slots)]
        live_ids = {st.svc_id for st in self.frontends.values()}
        self.orphan_names = [i for i in names if i not in live_ids]
        self.orphan_ranges = [(i, a, n) for i, rs in (ranges or {}).items() if i not in live_ids for a, n in rs]
        self.sids = ServiceIds(list(live_ids) + list(names) + list(stables) + [sid for sid, _ in slots])
        self.tables.adopt(
            tables or {}, pointers or {}, ((k, st.svc_id, st.owner) for k, st in self.frontends.items()), bids.backends
        )
        kept = {}
        for bid, until in sorted((draining or {}).items(), key=lambda kv: (kv[1], kv[0])):
            if bid not in bids.backends:
                continue
            if refs.get(bid, 0) > 0:
                # Flagged, yet a slot names it (the agent stopped between
                # the mark and the slot deletes, then the Service kept it):
                # serving; the next sync clears the flag.
                self._clear_marks.append(bid)
            else:
                kept[bid] = until
        self.drains = Drains(kept)
        self._adopted_unused = [b for b in bids.backends if refs.get(b, 0) == 0 and b not in self.drains]

    # -- the diff ----------------------------------------------------------
    def owners(self) -> set[str]:
        return {o for o, keys in self.by_owner.items() if keys}

    def sync(
        self,
        desired: dict[str, list[Frontend]],
        prune_except: set[str] | None = None,
        now: float = 0.0,
        stream: Callable[[ChangeSet], None] | None = None,
    ) -> ChangeSet:
        """Bring the owners in `desired` to their frontends (an empty list
        removes them). With prune_except, also remove every owner not in it
        and every orphan entry: only after the first full list of every
        resource. `now` (seconds, any clock the caller keeps using) times
        the draining of unused backends. `stream` is called with the
        change set after each owner, and after the new backends of a
        table of STREAM_WITHIN_FROM or more set in full
        (ctrl.dataplane.apply.Writer.stream)."""
        cs = ChangeSet(slot_tables=set())
        if prune_except is not None:
            for owner in list(self.by_owner):
                if owner not in prune_except and owner not in desired and self.by_owner[owner]:
                    desired = {**desired, owner: []}
        self._unused = set(self._adopted_unused)
        self._adopted_unused = []
        for bid in self._clear_marks:
            if bid in self.bids.backends and bid not in self.drains:
                cs.be_mark.append((bid, self.bids.backends[bid], 0, 0.0))
        self._clear_marks = []
        self._freed = []
        self.tables.begin()
        self._stream = stream
        try:
            # Frontends of no known owner (adopted without a name) go last:
            # a Service that claims one takes it over with its id first.
            # Owners _fresh_group takes wait in `batch` and are synced
            # together when the next owner is not one, or the batch is full.
            fresh = self._fresh_group if self.fresh_in_one_pass else None
            batch: list[tuple[str, object, list[Frontend]]] = []
            room = _Room(self, cs)
            order = sorted(desired)
            if order and order[0] == "":
                order.append(order.pop(0))
            for owner in order:
                fronts = desired[owner]
                group = fresh(owner, fronts, cs, room) if fresh is not None else _GENERAL
                if group is not _GENERAL and len(fronts[0].backends) < STREAM_WITHIN_FROM:
                    batch.append((owner, group, fronts))
                    if len(batch) < FRESH_BATCH:
                        continue
                    group = None  # the batch is full: synced below
                if batch:
                    self._sync_fresh(batch, cs)
                    batch = []
                if group is _GENERAL:
                    cs.mark(owner)
                    self._sync_owner(owner, fronts, cs)
                    if stream is not None:
                        stream(cs)
                elif group is not None:
                    self._sync_fresh([(owner, group, fronts)], cs)
                room = _Room(self, cs)
            if batch:
                self._sync_fresh(batch, cs)
        finally:
            self._stream = None
        cs.mark(None)
        for key in self._freed:
            if key not in self.frontends:
                cs.resync.update(self.waiting.get(key, ()))
        refs = self.bids.refs
        if prune_except is not None:
            # An orphan slot past the count its frontend had when adopted
            # (the count was lowered, the slots above not yet deleted) may
            # have been written again since, by the frontend growing into
            # it: only those still past its count go. Every orphan was
            # counted at adoption and again when rewritten.
            if self.orphan_slots:
                counts = {t.tid: len(t.slots) for t in self.slot_tables.values()}
                cs.slot_del.extend((sid, i) for sid, i in self.orphan_slots if i >= counts.get(sid, 0))
            self.slot_count -= len(self.orphan_slots)
            cs.name_del.extend(self.orphan_names)
            cs.src_del.extend(self.orphan_ranges)
            self.range_count -= len(self.orphan_ranges)
            self.orphan_slots, self.orphan_names, self.orphan_ranges = [], [], []
            self.tables.prune(cs)
            self._unused.update(filterfalse(refs.get, self.bids.backends))  # no count, or 0
        # Backends drain once every owner is done, so one that moves from
        # one service to another in the same sync keeps its id; and they go
        # only after draining.
        backends, drains = self.bids.backends, self.drains
        draining = drains.until
        starting = [b for b in sorted(self._unused) if refs.get(b, 0) <= 0 and b in backends and b not in draining]
        until = now + self.drain_period
        drains.start_many(starting, until)
        if self.drain_period > 0:
            flag = abi.BE_F_DRAINING
            cs.be_mark.extend([(b, backends[b], flag, until) for b in starting])
        for bid, serving in self.drains.due(now, lambda b: refs.get(b, 0) > 0):
            if serving:  # normally undrained when it was used again
                cs.be_mark.append((bid, self.bids.backends[bid], 0, 0.0))
            else:
                self._drop_backend(bid, cs)
        return cs

    def index_pending(self) -> int:
        """Build the slot index (backend -> slot) of the slot tables set in
        full since the last call, which their next delta needs. Called
        after a sync's write; returns how many were built."""
        n = 0
        for tid in self._unindexed:
            t = self.slot_tables.get(tid)
            if t is not None and t.slot_of is None and t.version >= 0:
                t.slot_of = dict(zip(t.slots, range(len(t.slots)), strict=True))
                n += 1
        self._unindexed.clear()
        return n

    def next_drain_end(self) -> float | None:
        """When the next draining backend is due to go, if any."""
        return self.drains.next_end()

    def _evict_draining(self, n: int, keep: list[Frontend], cs: ChangeSet) -> None:
        """Make room for n backends by ending the drain of the oldest
        draining ones early: the drain is a grace period for flows already
        on them, a new Service's backends are not to be refused for it.
        Their flows then count as new (the datapath finds no backend).
        Backends the frontends in `keep` use are spared (they are about to
        serve again); when that cannot make enough room, nothing is evicted."""
        refs, backends = self.bids.refs, self.bids.backends
        wanted: set[Backend] | None = None

        def spare(bid: int) -> bool:
            nonlocal wanted
            if refs.get(bid, 0) > 0:
                return True  # in service again: undrained by this sync
            if wanted is None:
                wanted = {b for f in keep for b in (f.added if self._delta_applies(f) else f.backends) or ()}
            return backends[bid] in wanted

        evicted = self.drains.oldest(n, spare)
        if len(evicted) < n:
            return  # would not be enough: the change is refused, the drains go on
        for bid in evicted:
            self.drains.stop(bid)
            self.bids.drop(bid)
        cs.be_evict.extend(evicted)
        if evicted:
            log.warning(
                "backend map full: %d draining backends removed before their drain period ended "
                "(raise --max-backends to keep draining through updates this large)",
                len(evicted),
            )

    def _undrain(self, bid: int, cs: ChangeSet) -> None:
        """A draining backend used again: back in service, same id."""
        if self.drains.stop(bid):
            cs.be_mark.append((bid, self.bids.backends[bid], 0, 0.0))

    def _delta_applies(self, f: Frontend) -> bool:
        """f's added/removed are relative to what this frontend's table holds."""
        cur = self.frontends.get(f.key)
        return cur is not None and self._delta_for(cur.table, [f])

    @staticmethod
    def _groups(fronts: list[Frontend]) -> dict[object, list[Frontend]]:
        """An owner's frontends by the slot table they share: the planner
        gives one group to frontends that select the same backends, in the
        same order, with the same plan numbers; a frontend without one has
        a table of its own."""
        groups: dict[object, list[Frontend]] = {}
        for f in fronts:
            groups.setdefault(("frontend", f.key) if f.group is None else f.group, []).append(f)
        return groups

    def _table_for(self, owner: str, group: object, fs: list[Frontend]) -> SlotTable | None:
        """The slot table a group of an owner's frontends is to use: the
        group's own; else one of these frontends' tables that would
        otherwise be left behind (read back at adoption, or every frontend
        using it now joins this group: a changed traffic policy); else
        None (a new one)."""
        t = self.table_of.get((owner, group))
        if t is not None:
            return t
        keys = None
        for f in fs:
            cur = self.frontends.get(f.key)
            if cur is None or cur.owner not in (owner, ""):
                continue
            t = cur.table
            if t.adopted:
                return t
            if keys is None:
                keys = {f.key for f in fs}
            if t.key[0] == owner and t.users <= keys:
                return t
        return None

    @staticmethod
    def _delta_for(t: SlotTable | None, fs: list[Frontend]) -> bool:
        """The group's added/removed apply to table t: every frontend's
        plan is relative to the version t holds."""
        if t is None or t.version < 0:
            return False
        v = t.version
        for f in fs:
            if f.added is None or f.base != v:
                return False
        return True

    def _growth(self, owner: str, groups: dict[object, list[Frontend]]) -> tuple[int, int, int, int]:
        """Entries this owner's change adds (services, slots, backends,
        source ranges) at its peak."""
        self._looked = None
        new_fronts = 0
        wanted: list[Collection[Backend]] = []  # each group's backends that may be new
        slot_growth = 0
        range_growth = 0
        for group, fs in groups.items():
            for f in fs:
                cur = self.frontends.get(f.key)
                if cur is None:
                    new_fronts += 1
                if f.source_ranges:
                    range_growth += len(set(f.source_ranges).difference(cur.ranges if cur else ()))
            f = fs[0]
            t = self._table_for(owner, group, fs)
            if self._delta_for(t, fs):
                wanted.append(f.added)  # type: ignore[arg-type]
                slot_growth += max(0, len(f.added) - len(f.removed))  # type: ignore[arg-type]
            else:
                wanted.append(f.backends)
                slot_growth += max(0, len(f.backends) - (len(t.slots) if t is not None else 0))
        if len(wanted) == 1:
            # One group (most Services): its backends are listed once each
            # (a plan has no duplicates), so counting them is enough, in C,
            # without a set of 100,000 tuples made to be thrown away. Their
            # ids, looked up for that, are kept for _table_full: a tuple
            # does not keep its hash, so each lookup hashes every backend.
            (bs,) = wanted
            looked = list(map(self.bids.ids.get, bs))
            new_be = looked.count(None)
            self._looked = (bs, looked, len(self.bids))
        else:  # groups share backends: each new one counts once
            known = self.bids.ids.__contains__
            new_be = len(set(chain.from_iterable(filterfalse(known, bs) for bs in wanted)))
        return new_fronts, slot_growth, new_be, range_growth

    def _fresh_group(self, owner: str, fronts: list[Frontend], cs: ChangeSet, room: _Room) -> object:
        """The group of an owner _sync_fresh can take, else _GENERAL: an
        owner with nothing programmed, waiting for nothing, whose
        frontends are all new (nor taken by an owner before it in the
        batch), share one group and so one slot table, have names that
        fit and no source ranges, on a node without Maglev tables, and
        whose entries fit in the room the batch has left even if every
        backend is new (else _sync_owner finds out exactly); that room
        then taken. A cold start's full sync of 10,000 small Services
        takes this path for almost every one: _sync_owner's steps
        (claims, growth, the table found twice, the frontend moved onto
        it) each find nothing to do."""
        if not fronts or owner in self.by_owner or owner in self.blocked or self.maglev_size or self.tables.of:
            return _GENERAL
        group = fronts[0].group
        if group is None:
            return _GENERAL
        frontends, name_max, taken = self.frontends, self.name_max, room.keys
        keys = set()
        for f in fronts:
            key = f.key
            if f.group != group or key in frontends or key in taken or f.source_ranges:
                return _GENERAL
            if len(f.name) * 4 > name_max:
                return _GENERAL
            keys.add(key)
        nf, nb = len(fronts), len(fronts[0].backends)
        if (
            len(keys) != nf
            or (owner, group) in self.table_of
            or nf > room.services
            or nf > room.names
            or nb > room.slots
            or nb > room.backends
        ):
            return _GENERAL
        taken |= keys
        room.services -= nf
        room.names -= nf
        room.slots -= nb
        room.backends -= nb
        return group

    def _sync_fresh(self, batch: list[tuple[str, object, list[Frontend]]], cs: ChangeSet) -> None:
        """What _sync_owner does for owners _fresh_group took (owner,
        group, frontends), in one pass each: one new slot table of the
        group's backends (its id also the first frontend's, as _sync_group
        gives it), each frontend's entry and name. The backends of the
        whole batch get their ids together; each owner's entries are one
        run in each list of cs all the same (its mark computed)."""
        bids = self.bids
        be_at = len(cs.be_upd)
        first = bids.next_id
        if len(batch) == 1:
            wanted_all = bids.get(batch[0][2][0].backends, cs.be_upd)
            if self._stream is not None and len(wanted_all) >= STREAM_WITHIN_FROM:
                self._stream(cs)
        else:
            wanted_all = bids.get(list(chain.from_iterable(b[2][0].backends for b in batch)), cs.be_upd)
        seen = first  # one past the highest id the owners so far allocated
        pos = 0
        # Each owner's mark: where its entries begin in each list of cs.
        # Within the batch only these lists grow, each owner's entries one
        # run after the last one's.
        mark = list(cs.lengths())
        marks, drains, be_mark = cs.marks, self.drains, cs.be_mark
        new_id, slot_tables, table_of, by_owner = self.sids.new, self.slot_tables, self.table_of, self.by_owner
        frontends, services = self.frontends, cs.services
        svc_upd, name_upd = cs.svc_upd, cs.name_upd
        flags_of = abi.frontend_flags
        tids: list[int] = []
        tables: list[list[int]] = []
        for owner, group, fronts in batch:
            mark[_BE_UPD] = be_at + seen - first
            mark[_BE_MARK] = len(be_mark)
            mark[_SVC_UPD] = len(svc_upd)
            mark[_NAME_UPD] = len(name_upd)
            marks.append((owner, tuple(mark)))
            f0 = fronts[0]
            nb = len(f0.backends)
            wanted = wanted_all[pos : pos + nb] if len(batch) > 1 else wanted_all
            pos += nb
            before = seen
            if wanted:
                seen = max(seen, max(wanted) + 1)
            tid = new_id()
            # A new table's slots: its backends in order, each once (as
            # they are when each was given a new id).
            sl = wanted if seen - before == nb else list(dict.fromkeys(wanted))
            t = SlotTable(tid, (owner, group), sl)
            slot_tables[tid] = t
            table_of[t.key] = t
            tids.append(tid)
            tables.append(sl)
            n = len(sl)
            mark[_SLOT_UPD] += n
            if drains:
                for b in sl:
                    self._undrain(b, cs)
            t.version = f0.version
            if f0.version >= 0 and n >= EAGER_INDEX_FROM:
                self._unindexed.add(tid)
            users = t.users
            keys = by_owner[owner]
            for i, f in enumerate(fronts):
                sid = new_id() if i else tid
                key, timeout = f.key, f.affinity_timeout
                flags = flags_of(f.flags)
                frontends[key] = FrontendState(sid, owner, f.name, t, n, flags, timeout, tid)
                users.add(key)
                keys.add(key)
                svc_upd.append((key, (sid, n, flags, timeout, tid)))
                if f.name:
                    name_upd.append((sid, f.name))
            services.add(owner)
        # The tables' slot rows, (table id, slot, backend id), and their
        # backends counted, in bulk.
        counts = list(map(len, tables))
        self.slot_count += sum(counts)
        table_col, slot_col, backend_col = cs.slot_upd.cols
        table_col.extend(chain.from_iterable(map(repeat, tids, counts)))
        slot_col.extend(chain.from_iterable(map(range, counts)))
        backend_col.extend(chain.from_iterable(tables))
        if cs.slot_tables is not None:
            cs.slot_tables.update(tids)  # each table's slots named once (_slots_of)
        bids.refs.update(chain.from_iterable(tables))
        if self._stream is not None:
            self._stream(cs)

    def _long_name(self, fronts: list[Frontend]) -> str | None:
        """Why a frontend's name cannot go into the names map whole. A cut
        name would lose its owner at the next adoption (restart, reconcile),
        or worse name another: refuse instead."""
        for f in fronts:
            if len(f.name) * 4 <= self.name_max:
                continue  # fits whatever its characters (UTF-8: 4 bytes at most)
            n = len(f.name.encode())
            if n > self.name_max:
                return (
                    f"frontend name {f.name[:60]!r}... is {n} bytes, the names map holds {self.name_max} "
                    f"(Kubernetes allows 63 characters for a namespace, a Service name or a port name)"
                )
        return None

    def _claims(self, owner: str, fronts: list[Frontend], cs: ChangeSet) -> list[Frontend]:
        """The frontends of `fronts` this owner may program: not those
        another Service holds. In a cluster the API server refuses a
        second Service on a ClusterIP, but externalIPs, LoadBalancer IPs
        and a directory of YAML can claim one twice; kube-proxy's rules
        then let either win, by rule order. Here the holder keeps it, the
        claimant is reported once (and when the holder changes) and gets
        it when the holder lets go (cs.resync)."""
        held: dict[FKey, str] = {}
        for f in fronts:
            cur = self.frontends.get(f.key)
            if cur is not None and cur.owner not in (owner, ""):
                held[f.key] = cur.owner
        before = self.blocked.pop(owner, {})
        for key in before.keys() - held.keys():
            waiters = self.waiting.get(key)
            if waiters is not None:
                waiters.discard(owner)
                if not waiters:
                    del self.waiting[key]
        if not held:
            return fronts
        self.blocked[owner] = held
        for key, holder in held.items():
            self.waiting.setdefault(key, set()).add(owner)
            if before.get(key) != holder:
                cs.conflicts.append((owner, holder, key))
        return [f for f in fronts if f.key not in held]

    def _sync_owner(self, owner: str, fronts: list[Frontend], cs: ChangeSet) -> None:
        why = self._long_name(fronts)
        if why is not None:
            cs.refused[owner] = why
            return
        fronts = self._claims(owner, fronts, cs)
        groups = self._groups(fronts)
        g_svc, g_slots, g_be, g_src = self._growth(owner, groups)
        cap = self.capacity
        # Deletes happen after upserts in one apply: count additions only.
        full = []
        # Entries this change set deletes are still in the kernel while its
        # additions are written: count them towards the peak.
        if g_svc and len(self.frontends) + len(cs.svc_del) + g_svc > cap.services:
            full.append(f"the service map holds at most {cap.services} frontends (raise --max-services)")
        # One name per frontend, and the names nothing owns until the
        # first full sync removes them; sized by --max-services too.
        elif g_svc and len(self.frontends) + len(self.orphan_names) + len(cs.name_del) + g_svc > cap.services:
            full.append(
                f"the names map holds at most {cap.services} entries, {len(self.orphan_names)} of them "
                f"names of frontends gone before a restart (raise --max-services)"
            )
        if g_src and self.range_count + len(cs.src_del) + g_src > cap.source_ranges:
            full.append(
                f"the source range map holds at most {cap.source_ranges} entries, {g_src} more needed "
                f"(raise --max-source-ranges)"
            )
        g_mgl = (
            self.tables.growth(f.key for f in fronts if f.scope == Scope.EXTERNAL and f.backends)
            if self.maglev_size
            else 0
        )
        if g_mgl and self.tables.count + len(cs.mgl_del) + g_mgl > cap.maglev_chunks:
            chunk = abi.MGL_CHUNK
            full.append(
                f"the Maglev map holds at most {cap.maglev_chunks * chunk} table entries, {g_mgl * chunk} more "
                f"needed (a table of {abi.mgl_chunks(self.maglev_size) * chunk} per external frontend at most; "
                "raise --max-maglev-entries)"
            )
        if g_slots and self.slot_count + len(cs.slot_del) + g_slots > cap.slots:
            full.append(f"the slot map holds at most {cap.slots} entries, {g_slots} more needed (raise --max-slots)")
        if g_be and len(self.bids) + g_be > cap.backends:
            self._evict_draining(len(self.bids) + g_be - cap.backends, fronts, cs)
        if g_be and len(self.bids) + g_be > cap.backends:
            full.append(
                f"the backend map holds at most {cap.backends} backends, {g_be} more needed (raise --max-backends)"
            )
        if full:
            cs.rejected[owner] = "; ".join(full)
            return
        wanted_keys = {f.key for f in fronts}
        for key in sorted(self.by_owner.get(owner, set()) - wanted_keys):
            self._remove_frontend(key, cs)
        self._tabled = []
        for group, fs in groups.items():
            self._sync_group(owner, group, fs, cs)
        # The Maglev tables once every frontend has its backends: those
        # sharing a table change it together (ctrl.dataplane.tables).
        if self._tabled and self.tables.sync_owner(owner, self._tabled, self.bids.backends, cs):
            cs.services.add(owner)
        if not self.by_owner.get(owner):
            self.by_owner.pop(owner, None)

    def _drop_backend(self, bid: int, cs: ChangeSet) -> None:
        self.bids.drop(bid)
        cs.be_del.append(bid)

    def _sync_group(self, owner: str, group: object, fs: list[Frontend], cs: ChangeSet) -> None:
        """A group's slot table to its planned backends, once for all its
        frontends: from their delta when their plans are relative to what
        the table holds (O(change)), else in full. Then each frontend's
        entry, name and source ranges."""
        t = self._table_for(owner, group, fs)
        # A new table of a new frontend takes that frontend's id too (a
        # Service of one frontend reads the same number twice in a dump).
        shared_id = None
        if t is None:
            if fs[0].key not in self.frontends:
                shared_id = self.sids.new()
            t = SlotTable(shared_id or self.sids.new(), (owner, group), [])
            self.slot_tables[t.tid] = t
            self.table_of[t.key] = t
        elif t.key != (owner, group):
            # Adopted, or left behind by every frontend now in this group.
            if self.table_of.get(t.key) is t:
                del self.table_of[t.key]
            t.key, t.adopted = (owner, group), False
            self.table_of[t.key] = t
        f = fs[0]
        delta = None
        if self._delta_for(t, fs):
            changed, rem, add = self._table_delta(t, f, cs)
            delta = (t.version, rem, add)
        else:
            changed = self._table_full(t, f, cs)
        t.version = f.version
        if f.version >= 0 and t.slot_of is None and len(t.slots) >= EAGER_INDEX_FROM:
            # A large table's index right after the write; a small one's at
            # its first delta, in a fraction of a millisecond.
            self._unindexed.add(t.tid)
        if changed:
            cs.services.add(owner)
        for f in fs:
            cur = self._frontend_on(owner, f.key, t, cs, shared_id)
            shared_id = None
            self._finish_frontend(owner, f, cur, cs, delta)

    def _table_full(self, t: SlotTable, f: Frontend, cs: ChangeSet) -> bool:
        """Table t to f's backends in full; whether a slot changed."""
        wanted = self.bids.get(f.backends, cs.be_upd, self._looked_up(f.backends))
        if self._stream is not None and len(wanted) >= STREAM_WITHIN_FROM:
            # New backends can go to the kernel now (no slot names them):
            # at 100,000 they are written while the slots are assigned.
            self._stream(cs)
        sl: list[int | None] = t.slots  # type: ignore[assignment]
        n_old = len(sl)
        old_set: set[int] = set(sl) if n_old else set()  # type: ignore[arg-type]
        old_set.discard(None)  # type: ignore[arg-type]
        before = len(cs.slot_upd)
        self._slots_of(t, cs)
        slots.assign(t.tid, sl, wanted, cs.slot_upd)
        changed = self._slots_written(t, before, n_old, cs)
        new_set: set[int]
        if n_old:
            new_set = set(sl)  # type: ignore[arg-type]
            added: Collection[int] = new_set - old_set
        else:  # a new table: assign gave each backend once
            new_set = set()
            added = sl  # type: ignore[assignment]
        self.bids.refs.update(added)
        if self.drains:
            for b in added:
                self._undrain(b, cs)
        self._released(t, old_set - new_set, cs)
        t.slot_of = None  # built by index_pending or the first delta
        return changed

    def _looked_up(self, bs: Collection[Backend]) -> list[int | None] | None:
        """The ids of bs as _growth looked them up (None for the new
        ones), taken once; None when it looked up others, or an id went
        since (an eviction)."""
        looked, self._looked = self._looked, None
        if looked is None or looked[0] is not bs or looked[2] != len(self.bids):
            return None
        return looked[1]

    def _table_delta(self, t: SlotTable, f: Frontend, cs: ChangeSet) -> tuple[bool, list[int], list[int]]:
        """The same from f's added and removed backends only: the removed
        ones' slots (from the slot index) are the holes. Returns whether a
        slot changed, and the ids removed and added."""
        sl: list[int | None] = t.slots  # type: ignore[assignment]
        slot_of = t.slot_of
        if slot_of is None:
            slot_of = t.slot_of = dict(zip(sl, range(len(sl)), strict=True))  # type: ignore[arg-type]
        n_old = len(sl)
        ids = self.bids.ids
        rem = list(map(ids.__getitem__, f.removed))  # type: ignore[arg-type]
        add = self.bids.get(f.added, cs.be_upd, self._looked_up(f.added))  # type: ignore[arg-type]
        holes = sorted(map(slot_of.pop, rem))
        before = len(cs.slot_upd)
        self._slots_of(t, cs)
        slots.fill(t.tid, sl, holes, add, slot_of, cs.slot_upd)
        changed = self._slots_written(t, before, n_old, cs)
        self.bids.refs.update(add)
        if self.drains:
            draining = self.drains.until
            for b in add:
                if b in draining:
                    self._undrain(b, cs)
        self._released(t, rem, cs)
        return changed, rem, add

    def _frontend_on(
        self, owner: str, key: FKey, t: SlotTable, cs: ChangeSet, svc_id: int | None = None
    ) -> FrontendState:
        """The owner's frontend `key`, reading table t: made (with svc_id
        when given), or moved to it from the table it read (which goes once
        no frontend reads it)."""
        cur = self.frontends.get(key)
        if cur is None:
            cur = self.frontends[key] = FrontendState(svc_id or self.sids.new(), owner, "", t)
            t.users.add(key)
        else:
            if cur.owner != owner:
                # Adopted without a name (_claims lets no other owner here):
                # this Service takes it over, id and slots included.
                log.info("frontend %s of no known owner is %s's", frontend_str(key), owner)
                self.by_owner[cur.owner].discard(key)
            old = cur.table
            if old is not t:
                if key[2] == _UDP:
                    backends = self.bids.backends
                    gone = set(old.slots).difference(t.slots)
                    gone.discard(None)  # type: ignore[arg-type]
                    cs.removed.extend((key, backends[b]) for b in gone)
                cur.table = t
                t.users.add(key)
                self._leave(key, old, cs)
        self.by_owner[owner].add(key)
        cur.owner = owner
        return cur

    def _leave(self, key: FKey, t: SlotTable, cs: ChangeSet) -> None:
        """Frontend `key` reads table t no more: its slots go with its last
        frontend (deleted after the frontends' entries that named them)."""
        t.users.discard(key)
        if t.users:
            return
        cs.slot_del.extend((t.tid, i) for i in range(len(t.slots)))
        self.slot_count -= len(t.slots)
        del self.slot_tables[t.tid]
        if self.table_of.get(t.key) is t:
            del self.table_of[t.key]
        self._released(t, {b for b in t.slots if b is not None}, cs)
        t.slots = []

    @staticmethod
    def _slots_of(t: SlotTable, cs: ChangeSet) -> None:
        """Table t's slots are about to be written into cs (assign and fill
        name each slot once): a second time, cs's slot rows may name one
        slot twice (ChangeSet.slot_tables)."""
        if cs.slot_tables is not None:
            if t.tid in cs.slot_tables:
                cs.slot_tables = None
            else:
                cs.slot_tables.add(t.tid)

    def _slots_written(self, t: SlotTable, before: int, n_old: int, cs: ChangeSet) -> bool:
        """Record the deletes of a table's slots past its new count (it had
        n_old), its slot writes being in cs.slot_upd past `before`; whether
        any slot changed."""
        n = len(t.slots)
        if n < n_old:
            cs.slot_del.extend((t.tid, i) for i in range(n, n_old))
        self.slot_count += n - n_old
        return len(cs.slot_upd) > before or n < n_old

    def _released(self, t: SlotTable, bids: Collection[int], cs: ChangeSet) -> None:
        """Backends that left table t: their UDP flows to its frontends are
        purged after the write, and each starts draining once no table
        uses it (end of sync)."""
        refs = self.bids.refs
        users = [key for key in t.users if key[2] == _UDP]
        if users:
            bes = list(map(self.bids.backends.__getitem__, bids))
            if len(users) == 1:
                cs.removed.extend(zip(repeat(users[0]), bes))
            else:
                cs.removed.extend([(key, be) for be in bes for key in users])
        for b in bids:
            refs[b] -= 1
        self._unused.update(bids)

    def _finish_frontend(
        self,
        owner: str,
        f: Frontend,
        cur: FrontendState,
        cs: ChangeSet,
        delta: tuple[int, list[int], list[int]] | None = None,
    ) -> None:
        """The frontend entry (count, flags, affinity, slot table), its
        name and its source ranges, where they changed. delta: the version
        its table's slots were of and the backend ids the change removed
        and added, when it was applied as a delta."""
        t = cur.table
        n = len(t.slots)
        fflags = f.flags
        if self.maglev_size and f.scope == Scope.EXTERNAL:
            fflags |= FrontendFlag.MAGLEV
        flags = abi.frontend_flags(fflags)
        if FrontendFlag.MAGLEV in fflags:
            self._tabled.append((f.key, cur.svc_id, self._table_ids(t, delta)))
        elif f.key in self.tables.of:
            self._tabled.append((f.key, cur.svc_id, None))
        changed = False
        if n != cur.count or cur.flags != flags or cur.affinity_timeout != f.affinity_timeout or cur.slots_id != t.tid:
            cur.count, cur.flags, cur.affinity_timeout, cur.slots_id = n, flags, f.affinity_timeout, t.tid
            cs.svc_upd.append((f.key, (cur.svc_id, n, flags, f.affinity_timeout, t.tid)))
            changed = True
        if cur.name != f.name:
            cur.name = f.name
            cs.name_upd.append((cur.svc_id, f.name))
            changed = True
        if cur.ranges != f.source_ranges and set(cur.ranges) != set(f.source_ranges):
            old_r, new_r = set(cur.ranges), set(f.source_ranges)
            cs.src_upd.extend((cur.svc_id, a, n) for a, n in f.source_ranges if (a, n) not in old_r)
            cs.src_del.extend((cur.svc_id, a, n) for a, n in cur.ranges if (a, n) not in new_r)
            self.range_count += len(new_r) - len(old_r)
            cur.ranges = f.source_ranges
            changed = True
        if changed:
            cs.services.add(owner)

    def _table_ids(self, t: SlotTable, delta: tuple[int, list[int], list[int]] | None) -> IdSet:
        """The backend ids of a slot table, for the Maglev tables of its
        external frontends: one set object per slot table and plan (a
        Service's NodePort and LoadBalancer IP, one change of 100,000
        backends: one set of 100,000 built, hashed and compared, not one
        per frontend). From the last sync's set and the delta when there is
        one, else from the slots."""
        prev = t.id_set
        if prev is not None and t.version >= 0 and prev[0] == t.version:
            return prev[1]  # another frontend of the table, this sync
        ids = None
        if delta is not None and prev is not None and prev[0] == delta[0]:
            ids = self.tables.derive(prev[1], delta[1], delta[2])
        # A delta leaves no hole below the count (ctrl.dataplane.slots):
        # one slot per backend.
        if ids is None or len(ids) != len(t.slots):
            ids = self.tables.id_set(t.slots)
        t.id_set = (t.version, ids)
        return ids

    def _remove_frontend(self, key: FKey, cs: ChangeSet) -> None:
        st = self.frontends.pop(key)
        self.tables.remove(key, st.svc_id, cs)
        if key in self.waiting:
            self._freed.append(key)
        self.by_owner[st.owner].discard(key)
        cs.svc_del.append(key)
        cs.name_del.append(st.svc_id)
        cs.src_del.extend((st.svc_id, a, n) for a, n in st.ranges)
        self.range_count -= len(st.ranges)
        cs.services.add(st.owner)
        if key[2] == _UDP:
            backends = self.bids.backends
            cs.removed.extend((key, backends[b]) for b in set(st.slots) if b is not None)
        self._leave(key, st.table, cs)
