"""What is programmed, and the smallest ordered change to reach what is wanted.

`Programmed` mirrors the contents of the service, slot, backend and name
maps, with stable ids: a frontend keeps its service id and an
(address, port, protocol) keeps its backend id for as long as it exists, and
both are read back from the pinned maps after a restart (`adopt`).

`Programmed.sync` takes the desired frontends of some services, updates the
mirror and returns a ChangeSet: only the entries that differ. Pure Python;
ctrl.apply writes a ChangeSet to the kernel in its phase order.

Slots move as little as possible: a backend that stays keeps its slot, a new
one fills a hole or is appended, and holes left at the end are filled by
moving the last slot into them. Removing one backend of 100 rewrites at most
one slot and deletes one.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from itertools import filterfalse, repeat
from operator import attrgetter

from . import layout
from .objects import addr_str, is_v4
from .plan import PROTO_NAMES, SCOPE_EXTERNAL, Backend, Frontend, SourceRange
from .sizes import MapSizes

log = logging.getLogger("sliceproxy.diff")

FKey = tuple[bytes, int, int, int]  # (addr16, port, proto, scope)

BE_F_DRAINING = layout.const("SP_BE_F_DRAINING")  # read from ebpf/sliceproxy.h, never copied


@dataclass
class FrontendState:
    svc_id: int
    owner: str  # service key "namespace/name"; "" when unknown (adopted, unnamed)
    name: str
    slots: list[int]  # backend id per slot
    flags: int = 0
    affinity_timeout: int = 0
    # The plan number (Frontend.version) these slots hold, and each
    # backend's slot: what a Frontend's added/removed delta applies to.
    version: int = -1
    slot_of: dict[int, int] | None = None
    ranges: tuple[SourceRange, ...] = ()  # in the source range map under svc_id


# The ChangeSet lists, each an ordered list of map writes or removed pairs.
_LISTS = (
    "be_evict",
    "be_upd",
    "be_mark",
    "slot_upd",
    "svc_upd",
    "name_upd",
    "src_upd",
    "src_del",
    "svc_del",
    "slot_del",
    "be_del",
    "name_del",
    "removed",
)


_lists_of = attrgetter(*_LISTS)


@dataclass
class ChangeSet:
    """Map writes in the order that keeps every packet consistent:
    backends and slots exist before a count points at them, and a count is
    lowered before the slots above it go."""

    # Draining backends removed early to make room (written first).
    be_evict: list[int] = field(default_factory=list)
    be_upd: list[tuple[int, Backend]] = field(default_factory=list)
    # (id, backend, flags, drain end) of backends that start or stop
    # draining; the drain end (seconds on the caller's clock, 0.0 when not
    # draining) goes into the backend's entry, so it outlives this process.
    be_mark: list[tuple[int, Backend, int, float]] = field(default_factory=list)
    slot_upd: list[tuple[int, int, int]] = field(default_factory=list)  # svc_id, slot, be_id
    svc_upd: list[tuple[FKey, tuple[int, int, int, int]]] = field(default_factory=list)
    name_upd: list[tuple[int, str]] = field(default_factory=list)
    # loadBalancerSourceRanges entries (svc_id, addr16, prefix length over
    # 128 bits): written before the frontend that flags them, deleted after
    # it, so no packet meets the flag without its ranges.
    src_upd: list[tuple[int, bytes, int]] = field(default_factory=list)
    src_del: list[tuple[int, bytes, int]] = field(default_factory=list)
    svc_del: list[FKey] = field(default_factory=list)
    slot_del: list[tuple[int, int]] = field(default_factory=list)
    be_del: list[int] = field(default_factory=list)
    name_del: list[int] = field(default_factory=list)
    # Backends that stopped serving some frontend: (frontend, backend) pairs
    # whose conntrack entries may be purged.
    removed: list[tuple[FKey, Backend]] = field(default_factory=list)
    services: set[str] = field(default_factory=set)  # owners that changed
    # Owners not programmed (their previous entries kept), and why: a map
    # would overflow (retried: room may come), or the Service itself
    # cannot be programmed as it is (refused until it changes).
    rejected: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    # (claimant, holder, frontend key): a Service claiming a frontend
    # another one serves, new in this sync (the holder keeps it).
    conflicts: list[tuple[str, str, FKey]] = field(default_factory=list)
    # Owners waiting for a frontend this sync freed: plan them again.
    resync: set[str] = field(default_factory=set)
    # Owners whose writes failed (set by the agent after a per-Service
    # write, ctrl.apply.Writer.apply_each), and why.
    failed: dict[str, str] = field(default_factory=dict)
    # (owner, length of every list before its entries): each owner's
    # entries are one run in each list, so split() can cut them out.
    marks: list[tuple[str | None, tuple[int, ...]]] = field(default_factory=list, repr=False)

    def lengths(self) -> tuple[int, ...]:
        return tuple(map(len, _lists_of(self)))  # in C: a mark per owner of a full sync

    def mark(self, owner: str | None) -> None:
        """The entries from here on are owner's (None: the node's)."""
        self.marks.append((owner, self.lengths()))

    def split(self) -> tuple[list[tuple[str, ChangeSet]], ChangeSet]:
        """This change set as one part per owner, in the order they were
        synced, and the rest: what belongs to no Service (drains started
        and ended, orphans of a restart removed). Writing the parts one
        after another and then the rest writes the same entries; a part
        holds its owner's writes in phase order, so one Service can be
        written (or fail) alone."""
        parts: list[tuple[str, ChangeSet]] = []
        marks = self.marks
        for (owner, start), (_, end) in zip(marks, marks[1:], strict=False):
            if owner is None or start == end:
                continue
            part = ChangeSet(**{f: getattr(self, f)[a:b] for f, a, b in zip(_LISTS, start, end, strict=True)})
            part.services = self.services & {owner}
            parts.append((owner, part))
        first = marks[0][1] if marks else self.lengths()
        last = marks[-1][1] if marks else self.lengths()
        rest = ChangeSet()
        for f, a, b in zip(_LISTS, first, last, strict=True):
            entries = getattr(self, f)
            setattr(rest, f, entries[:a] + entries[b:])
        return parts, rest

    def __len__(self) -> int:
        return (
            len(self.be_evict)
            + len(self.be_upd)
            + len(self.be_mark)
            + len(self.slot_upd)
            + len(self.svc_upd)
            + len(self.name_upd)
            + len(self.svc_del)
            + len(self.slot_del)
            + len(self.be_del)
            + len(self.name_del)
            + len(self.src_upd)
            + len(self.src_del)
        )

    def summary(self) -> dict[str, int]:
        return {
            "services": len(self.services),
            "frontends_set": len(self.svc_upd),
            "frontends_deleted": len(self.svc_del),
            "slots_set": len(self.slot_upd),
            "slots_deleted": len(self.slot_del),
            "backends_added": len(self.be_upd),
            "backends_deleted": len(self.be_del) + len(self.be_evict),
        }


def assign_slots(current: list[int | None], wanted: list[int]) -> list[int]:
    """New slot list for `wanted` backend ids, moving as few as possible."""
    if not current:  # a new frontend: wanted's order, duplicates once
        return list(dict.fromkeys(wanted))
    want = set(wanted)
    slots: list[int | None] = []
    present: set[int] = set()
    for b in current:
        if b is not None and b in want and b not in present:
            slots.append(b)
            present.add(b)
        else:
            slots.append(None)
    holes = [i for i, b in enumerate(slots) if b is None]
    hi = 0
    for b in wanted:
        if b in present:
            continue
        present.add(b)
        if hi < len(holes):
            slots[holes[hi]] = b
            hi += 1
        else:
            slots.append(b)
    for h in holes[hi:]:
        while slots and slots[-1] is None:
            slots.pop()
        if h >= len(slots):
            break
        slots[h] = slots.pop()
    while slots and slots[-1] is None:
        slots.pop()
    return slots  # type: ignore[return-value]


def name_capacity() -> int:
    """Bytes of a frontend name the names map holds (its NUL aside)."""
    return layout.codec("sp_svc_name").size - 1


def frontend_str(key: FKey) -> str:
    """198.19.0.10:80/TCP (external) for people."""
    addr, port, proto, scope = key
    host = addr_str(addr) if is_v4(addr) else f"[{addr_str(addr)}]"
    where = " (external)" if scope == SCOPE_EXTERNAL else ""
    return f"{host}:{port}/{PROTO_NAMES.get(proto, proto)}{where}"


class Programmed:
    def __init__(self, capacity: MapSizes | None = None, drain_period: float = 0.0):
        self.capacity = capacity or MapSizes()
        self.name_max = name_capacity()
        # Frontends two Services claim: the one that holds it keeps it
        # (owner -> {key: holder} of what it waits for; key -> who waits),
        # and a claimant gets it when the holder lets it go.
        self.blocked: dict[str, dict[FKey, str]] = {}
        self.waiting: dict[FKey, set[str]] = {}
        self._freed: list[FKey] = []
        # A backend no frontend uses any more stays in the backend map this
        # long: flows already on it keep going (a terminating Pod finishes
        # its requests), while no new flow can pick it (no slot names it).
        self.drain_period = drain_period
        # backend id -> when it goes, in time order (see sync). Also in the
        # kernel (sp_backend.drain_end): a re-adoption reads it back.
        self.draining: dict[int, float] = {}
        self._clear_marks: list[int] = []  # adopted with the draining flag but in use
        # Adopted backends no slot names and no drain holds: their drain
        # starts at the next sync (a restart's first sync is a full one
        # anyway; after a failed write the re-adopted maps can hold such).
        self._adopted_unused: list[int] = []
        self.frontends: dict[FKey, FrontendState] = {}
        self.by_owner: dict[str, set[FKey]] = defaultdict(set)
        self.backend_ids: dict[Backend, int] = {}
        self.backends: dict[int, Backend] = {}
        self.refs: dict[int, int] = defaultdict(int)  # backend id -> frontends using it
        self.next_svc_id = 1
        self.next_be_id = 1
        # Entries found in the maps at adoption that nothing owns; removed at
        # the first full sync, never before (a restart must not drop traffic).
        self.orphan_slots: list[tuple[int, int]] = []
        self.orphan_names: list[int] = []
        self.orphan_ranges: list[tuple[int, bytes, int]] = []
        self.slot_count = 0
        self.range_count = 0  # entries in the source range map
        self._unused: set[int] = set()
        self._unindexed: set[FKey] = set()

    # -- reading back what a previous agent left --------------------------
    def adopt(
        self,
        svc: dict[FKey, tuple[int, int, int, int]],
        slots: dict[tuple[int, int], int],
        backends: dict[int, Backend],
        names: dict[int, str],
        ranges: dict[int, set[SourceRange]] | None = None,
        draining: dict[int, float] | None = None,
    ) -> None:
        """Rebuild the mirror from decoded map contents. `draining` holds
        the drain end of every backend the kernel has flagged draining (on
        the clock sync's `now` uses): a periodic re-adoption or a restart
        keeps each deadline instead of starting a new drain period."""
        # Who waits for which frontend is this process's knowledge, not the
        # kernel's: a re-adoption keeps it (a restart starts without).
        blocked, waiting = self.blocked, self.waiting
        self.__init__(self.capacity, self.drain_period)  # type: ignore[misc]
        self.blocked, self.waiting = blocked, waiting
        self.backends = dict(backends)
        self.backend_ids = {b: i for i, b in backends.items()}
        used_slots: set[tuple[int, int]] = set()
        for key, (svc_id, count, flags, timeout) in svc.items():
            name = names.get(svc_id, "")
            owner = name.split(":", 1)[0] if ":" in name else ""
            sl: list[int | None] = []
            for i in range(count):
                b = slots.get((svc_id, i))
                sl.append(b if b in self.backends else None)
                used_slots.add((svc_id, i))
            st = FrontendState(svc_id, owner, name, sl, flags, timeout)  # type: ignore[arg-type]
            st.ranges = tuple(sorted((ranges or {}).get(svc_id, ())))
            self.frontends[key] = st
            self.by_owner[owner].add(key)
            for b in set(sl):
                if b is not None:
                    self.refs[b] += 1
        self.slot_count = len(slots)
        self.range_count = sum(len(rs) for rs in (ranges or {}).values())
        self.orphan_slots = [k for k in slots if k not in used_slots]
        live_ids = {st.svc_id for st in self.frontends.values()}
        self.orphan_names = [i for i in names if i not in live_ids]
        self.orphan_ranges = [(i, a, n) for i, rs in (ranges or {}).items() if i not in live_ids for a, n in rs]
        self.next_svc_id = max([st.svc_id for st in self.frontends.values()] + list(names) + [0]) + 1
        self.next_be_id = max(list(backends) + [0]) + 1
        for bid, until in sorted((draining or {}).items(), key=lambda kv: (kv[1], kv[0])):
            if bid not in self.backends:
                continue
            if self.refs.get(bid, 0) > 0:
                # Flagged, yet a slot names it (the agent stopped between
                # the mark and the slot deletes, then the Service kept it):
                # serving; the next sync clears the flag.
                self._clear_marks.append(bid)
            else:
                self.draining[bid] = until
        self._adopted_unused = [b for b in self.backends if self.refs.get(b, 0) == 0 and b not in self.draining]

    # -- the diff ----------------------------------------------------------
    def owners(self) -> set[str]:
        return {o for o, keys in self.by_owner.items() if keys}

    def sync(
        self, desired: dict[str, list[Frontend]], prune_except: set[str] | None = None, now: float = 0.0
    ) -> ChangeSet:
        """Bring the owners in `desired` to their frontends (an empty list
        removes them). With prune_except, also remove every owner not in it
        and every orphan entry: only after the first full list of every
        resource. `now` (seconds, any clock the caller keeps using) times
        the draining of unused backends."""
        cs = ChangeSet()
        if prune_except is not None:
            for owner in list(self.by_owner):
                if owner not in prune_except and owner not in desired and self.by_owner[owner]:
                    desired = {**desired, owner: []}
        self._unused = set(self._adopted_unused)
        self._adopted_unused = []
        for bid in self._clear_marks:
            if bid in self.backends and bid not in self.draining:
                cs.be_mark.append((bid, self.backends[bid], 0, 0.0))
        self._clear_marks = []
        self._freed = []
        # Frontends of no known owner (adopted without a name) go last: a
        # Service that claims one takes it over with its id first.
        for owner in sorted(desired, key=lambda o: (o == "", o)):
            cs.mark(owner)
            self._sync_owner(owner, desired[owner], cs)
        cs.mark(None)
        for key in self._freed:
            if key not in self.frontends:
                cs.resync.update(self.waiting.get(key, ()))
        if prune_except is not None:
            cs.slot_del.extend(self.orphan_slots)
            self.slot_count -= len(self.orphan_slots)
            cs.name_del.extend(self.orphan_names)
            cs.src_del.extend(self.orphan_ranges)
            self.range_count -= len(self.orphan_ranges)
            self.orphan_slots, self.orphan_names, self.orphan_ranges = [], [], []
            self._unused.update(b for b in self.backends if self.refs.get(b, 0) == 0)
        # Backends are dropped once every owner is done, so one that moves
        # from one service to another in the same sync keeps its id; and
        # only after draining.
        for bid in sorted(self._unused):
            if self.refs.get(bid, 0) <= 0 and bid in self.backends and bid not in self.draining:
                until = now + self.drain_period
                self._start_drain(bid, until)
                if self.drain_period > 0:
                    cs.be_mark.append((bid, self.backends[bid], BE_F_DRAINING, until))
        # Deadlines go in in time order (one drain period; `now` never goes
        # back), so the due ones are at the front: a sync costs O(due), not
        # O(draining), which during a rolling update of a big cluster is
        # every endpoint it replaced in the last drain period.
        draining = self.draining
        while draining:
            bid, until = next(iter(draining.items()))
            if self.refs.get(bid, 0) > 0:
                self._undrain(bid, cs)  # normally done when it was used again
            elif now >= until:
                del draining[bid]
                self._drop_backend(bid, cs)
            else:
                break
        return cs

    def index_pending(self) -> int:
        """Build the slot index (backend -> slot) of the frontends set in
        full since the last call, which their next delta needs. Called
        after a sync's write; returns how many were built."""
        n = 0
        for key in self._unindexed:
            st = self.frontends.get(key)
            if st is not None and st.slot_of is None and st.version >= 0:
                st.slot_of = dict(zip(st.slots, range(len(st.slots)), strict=True))
                n += 1
        self._unindexed.clear()
        return n

    def _evict_draining(self, n: int, keep: list[Frontend], cs: ChangeSet) -> None:
        """Make room for n backends by ending the drain of the oldest
        draining ones early: the drain is a grace period for flows already
        on them, a new Service's backends are not to be refused for it.
        Their flows then count as new (the datapath finds no backend).
        Backends the frontends in `keep` use are spared (they are about to
        serve again); when that cannot make enough room, nothing is evicted."""
        evicted: list[int] = []
        wanted: set[Backend] | None = None
        for bid in list(self.draining):
            if len(evicted) >= n:
                break
            if self.refs.get(bid, 0) > 0:
                continue  # in service again: undrained by this sync
            if wanted is None:
                wanted = {b for f in keep for b in (f.added if self._delta_applies(f) else f.backends) or ()}
            if self.backends[bid] not in wanted:
                evicted.append(bid)
        if len(evicted) < n:
            return  # would not be enough: the change is refused, the drains go on
        for bid in evicted:
            del self.draining[bid]
            del self.backend_ids[self.backends.pop(bid)]
            self.refs.pop(bid, None)
        cs.be_evict.extend(evicted)
        if evicted:
            log.warning(
                "backend map full: %d draining backends removed before their drain period ended "
                "(raise --max-backends to keep draining through updates this large)",
                len(evicted),
            )

    def _start_drain(self, bid: int, until: float) -> None:
        """Add a deadline, keeping `draining` in time order. Deadlines read
        back from the kernel may lie later than a new one (the previous
        agent ran with a longer --drain-period): then re-sort, once."""
        d = self.draining
        last = next(reversed(d.values())) if d else None
        d[bid] = until
        if last is not None and until < last:
            self.draining = dict(sorted(d.items(), key=lambda kv: kv[1]))

    def _undrain(self, bid: int, cs: ChangeSet) -> None:
        """A draining backend used again: back in service, same id."""
        if self.draining.pop(bid, None) is not None:
            cs.be_mark.append((bid, self.backends[bid], 0, 0.0))

    def next_drain_end(self) -> float | None:
        """When the next draining backend is due to go, if any."""
        return next(iter(self.draining.values())) if self.draining else None

    def _delta_applies(self, f: Frontend) -> bool:
        """f's added/removed are relative to what this frontend holds."""
        cur = self.frontends.get(f.key)
        return f.added is not None and cur is not None and cur.version >= 0 and cur.version == f.base

    def _growth(self, owner: str, fronts: list[Frontend]) -> tuple[int, int, int, int]:
        """Entries this owner's change adds (services, slots, backends,
        source ranges) at its peak."""
        new_fronts = sum(1 for f in fronts if f.key not in self.frontends)
        new_be: set[Backend] = set()
        slot_growth = 0
        range_growth = 0
        for f in fronts:
            cur = self.frontends.get(f.key)
            if f.source_ranges:
                range_growth += len(set(f.source_ranges).difference(cur.ranges if cur else ()))
            if self._delta_applies(f):
                new_be.update(b for b in f.added if b not in self.backend_ids)  # type: ignore[union-attr]
                slot_growth += max(0, len(f.added) - len(f.removed))  # type: ignore[arg-type]
            else:
                new_be.update(filterfalse(self.backend_ids.__contains__, f.backends))
                slot_growth += max(0, len(f.backends) - (len(cur.slots) if cur else 0))
        return new_fronts, slot_growth, len(new_be), range_growth

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
        g_svc, g_slots, g_be, g_src = self._growth(owner, fronts)
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
        if g_slots and self.slot_count + len(cs.slot_del) + g_slots > cap.slots:
            full.append(f"the slot map holds at most {cap.slots} entries, {g_slots} more needed (raise --max-slots)")
        if g_be and len(self.backends) + g_be > cap.backends:
            self._evict_draining(len(self.backends) + g_be - cap.backends, fronts, cs)
        if g_be and len(self.backends) + g_be > cap.backends:
            full.append(
                f"the backend map holds at most {cap.backends} backends, {g_be} more needed (raise --max-backends)"
            )
        if full:
            cs.rejected[owner] = "; ".join(full)
            return
        wanted_keys = {f.key for f in fronts}
        for key in sorted(self.by_owner.get(owner, set()) - wanted_keys):
            self._remove_frontend(key, cs)
        for f in fronts:
            self._sync_frontend(owner, f, cs)
        if not self.by_owner.get(owner):
            self.by_owner.pop(owner, None)

    def _backend_ids(self, bs: Collection[Backend], cs: ChangeSet) -> list[int]:
        """Ids of these backends, allocating (and writing) new ones."""
        ids = self.backend_ids
        get = ids.get
        out = [get(b) for b in bs]
        if out and out.count(None) == len(out) and len(set(bs)) == len(bs):
            # All new (a new Service, a first sync): allocate in bulk.
            first = self.next_be_id
            new = range(first, first + len(bs))
            self.next_be_id += len(bs)
            ids.update(zip(bs, new, strict=False))
            self.backends.update(zip(new, bs, strict=False))
            cs.be_upd.extend(zip(new, bs, strict=False))
            return list(new)
        if None in out:
            for i, b in enumerate(bs):
                bid = out[i]
                if bid is None:
                    bid = ids.get(b)  # listed twice in bs: allocated above
                    if bid is None:
                        bid = self.next_be_id
                        self.next_be_id += 1
                        ids[b] = bid
                        self.backends[bid] = b
                        cs.be_upd.append((bid, b))
                    out[i] = bid
        return out  # type: ignore[return-value]

    def _drop_backend(self, bid: int, cs: ChangeSet) -> None:
        b = self.backends.pop(bid)
        del self.backend_ids[b]
        self.refs.pop(bid, None)
        cs.be_del.append(bid)

    def _sync_frontend(self, owner: str, f: Frontend, cs: ChangeSet) -> None:
        cur = self.frontends.get(f.key)
        if self._delta_applies(f) and cur is not None and cur.owner == owner:
            self._sync_frontend_delta(owner, f, cur, cs)
            return
        wanted = self._backend_ids(f.backends, cs)
        if cur is None:
            cur = FrontendState(self.next_svc_id, owner, "", [], -1, -1)
            self.next_svc_id += 1
            self.frontends[f.key] = cur
        elif cur.owner != owner:
            # Adopted without a name (_claims lets no other owner here):
            # this Service takes it over, id and slots included.
            log.info("frontend %s of no known owner is %s's", frontend_str(f.key), owner)
            self.by_owner[cur.owner].discard(f.key)
        self.by_owner[owner].add(f.key)
        cur.owner = owner
        old = cur.slots
        new = assign_slots(old, wanted)  # type: ignore[arg-type]
        sid = cur.svc_id
        n_old = len(old)
        if n_old:
            upd = [(sid, i, b) for i, b in enumerate(new) if i >= n_old or old[i] != b]
        else:
            upd = list(zip(repeat(sid), range(len(new)), new))
        cs.slot_upd.extend(upd)
        changed = bool(upd) or len(new) < n_old
        cs.slot_del.extend((sid, i) for i in range(len(new), n_old))
        self.slot_count += len(new) - len(old)
        refs = self.refs
        if n_old:
            old_set, new_set = set(old), set(new)
            old_set.discard(None)  # type: ignore[arg-type]
            added: Collection[int] = new_set - old_set
        else:  # a new frontend: assign_slots gave each backend once
            old_set = new_set = set()
            added = new
        for b in added:
            refs[b] += 1
        if self.draining:
            for b in added:
                self._undrain(b, cs)
        for b in old_set - new_set:
            cs.removed.append((f.key, self.backends[b]))
            refs[b] -= 1
            self._unused.add(b)
        cur.slots = new
        cur.version = f.version
        cur.slot_of = None  # built by index_pending or the first delta
        if f.version >= 0:
            self._unindexed.add(f.key)
        self._finish_frontend(owner, f, cur, n_old, changed, cs)

    def _finish_frontend(
        self, owner: str, f: Frontend, cur: FrontendState, n_old: int, changed: bool, cs: ChangeSet
    ) -> None:
        n = len(cur.slots)
        if n != n_old or cur.flags != f.flags or cur.affinity_timeout != f.affinity_timeout:
            cur.flags, cur.affinity_timeout = f.flags, f.affinity_timeout
            cs.svc_upd.append((f.key, (cur.svc_id, n, f.flags, f.affinity_timeout)))
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

    def _sync_frontend_delta(self, owner: str, f: Frontend, cur: FrontendState, cs: ChangeSet) -> None:
        """assign_slots' result, from the added and removed backends only:
        removed ones leave holes, added ones fill them (lowest first) or
        are appended, and holes left over take the last slot."""
        sid = cur.svc_id
        slots: list[int | None] = cur.slots  # type: ignore[assignment]
        slot_of = cur.slot_of
        if slot_of is None:
            slot_of = cur.slot_of = dict(zip(slots, range(len(slots)), strict=True))  # type: ignore[arg-type]
        n_old = len(slots)
        ids = self.backend_ids
        rem = [ids[b] for b in f.removed]  # type: ignore[union-attr]
        add = self._backend_ids(f.added, cs)  # type: ignore[arg-type]
        holes = sorted(slot_of.pop(b) for b in rem)
        upd: list[tuple[int, int, int]] = []
        hi = 0
        for b in add:
            if hi < len(holes):
                i = holes[hi]
                hi += 1
                slots[i] = b
            else:
                i = len(slots)
                slots.append(b)
            slot_of[b] = i
            upd.append((sid, i, b))
        left = holes[hi:]
        for h in left:
            slots[h] = None
        for h in left:
            while slots and slots[-1] is None:
                slots.pop()
            if h >= len(slots):
                break
            moved = slots.pop()
            slots[h] = moved
            slot_of[moved] = h  # type: ignore[index]
            upd.append((sid, h, moved))  # type: ignore[arg-type]
        while slots and slots[-1] is None:
            slots.pop()
        cs.slot_upd.extend(upd)
        cs.slot_del.extend((sid, i) for i in range(len(slots), n_old))
        self.slot_count += len(slots) - n_old
        for b in add:
            self.refs[b] += 1
            self._undrain(b, cs)
        for b in rem:
            cs.removed.append((f.key, self.backends[b]))
            self.refs[b] -= 1
            self._unused.add(b)
        cur.version = f.version
        self._finish_frontend(owner, f, cur, n_old, bool(upd) or len(slots) < n_old, cs)

    def _remove_frontend(self, key: FKey, cs: ChangeSet) -> None:
        st = self.frontends.pop(key)
        if key in self.waiting:
            self._freed.append(key)
        self.by_owner[st.owner].discard(key)
        cs.svc_del.append(key)
        cs.name_del.append(st.svc_id)
        cs.src_del.extend((st.svc_id, a, n) for a, n in st.ranges)
        self.range_count -= len(st.ranges)
        cs.services.add(st.owner)
        for i in range(len(st.slots)):
            cs.slot_del.append((st.svc_id, i))
        self.slot_count -= len(st.slots)
        for b in set(st.slots):
            if b is None:
                continue
            cs.removed.append((key, self.backends[b]))
            self.refs[b] -= 1
            self._unused.add(b)
