"""Maglev tables in the map (sp_mgl_v4): which table each external
frontend reads, tables shared, and the smallest writes that keep them
(docs/semantics.md, "Maglev").

A table is M entries (backend ids) and its size, under a table id; a
frontend reads the table its pointer entry (svc_id, SP_MGL_TABLE) names.
The external frontends of one Service with the same backends (its NodePort
on each node address, its LoadBalancer IPs and externalIPs, ports with the
same target) share one table: M entries per backend set, not per frontend.

A table follows its backends in place: only the entries that differ are
written (one backend of N removed: its own entries and about 1/N of the
others). Write order, as everywhere in ctrl.dataplane: a table's entries,
then its size, then the pointers that name it; deletes the other way
round (pointers, size, entries), so a flow never reads past what exists.
The tables are ctrl.model.maglev's, populated in C (ctrl.dataplane.native).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from ..model import maglev
from ..model.plan import Backend, FKey
from . import abi, native
from .changeset import ChangeSet


@dataclass
class Table:
    tid: int
    owner: str
    backends: frozenset[int] | None  # None: adopted, not checked yet
    entries: list[int]  # backend id per entry, as the map holds them (0: missing)
    users: set[FKey] = field(default_factory=set)
    # The turn order of `backends` (see MaglevTables.build), kept so the
    # next table of mostly the same backends is not sorted from scratch;
    # None when not built here (adopted, distrusted).
    turns: list[tuple[Backend, int]] | None = None


def _edited(
    old: list[tuple[Backend, int]], gone: frozenset[int], added: list[tuple[Backend, int]], backends: dict[int, Backend]
) -> list[tuple[Backend, int]]:
    """Turn order old without the ids gone and with added (sorted) in
    their places: each found in old by bisection, and old copied once, in
    the slices between them (a sort's pass over 100,000 turns compares
    each pair of neighbours: about 10 ms; every copy of them costs about
    0.5 ms). A gone id whose backend is not where backends says it is
    (not expected: an id keeps its backend while a table names it) costs
    a linear pass instead."""
    # (index in old, 0: the turn added before old[index] / 1: old[index]
    # dropped, the turn added): inserts before the drop at one index.
    edits: list[tuple[int, int, tuple[Backend, int] | None]] = []
    for g in gone:
        b = backends.get(g)
        i = -1 if b is None else bisect_left(old, (b, g))
        if i < 0 or i == len(old) or old[i][1] != g:
            old = [t for t in old if t[1] not in gone]
            edits = []
            break
        edits.append((i, 1, None))
    lo = 0
    for t in added:
        lo = bisect_left(old, t, lo)
        edits.append((lo, 0, t))
    if not edits:
        return old
    edits.sort(key=lambda e: (e[0], e[1]))
    out: list[tuple[Backend, int]] = []
    prev = 0
    for i, _, turn in edits:
        out += old[prev:i]
        if turn is None:
            prev = i + 1
        else:
            out.append(turn)
            prev = i
    out += old[prev:]
    return out


class MaglevTables:
    def __init__(self, size: int = 0):
        """size: M; 0: no tables (random mode; adopted ones go)."""
        self.size = size
        self.tables: dict[int, Table] = {}
        self.of: dict[FKey, int] = {}  # frontend -> the table it reads
        self.count = 0  # entries in the map
        self.orphans: list[tuple[int, int]] = []
        self._by_set: dict[tuple[str, frozenset[int]], int] = {}
        self._next = 1
        # Turn orders and tables built in this sync, by backend set.
        self._built: dict[frozenset[int], tuple[list[tuple[Backend, int]], list[int]]] = {}
        self._perms: dict[int, int] = {}  # backend id -> its permutation (native.pack)
        # Backend sets made in this sync (id_set, derive): equal ones are
        # one object, and a derived one knows what it was derived from.
        self._sets: dict[frozenset[int], frozenset[int]] = {}
        self._derived: dict[tuple[frozenset[int], frozenset[int], frozenset[int]], frozenset[int]] = {}
        self._origin: dict[frozenset[int], tuple[frozenset[int], frozenset[int], frozenset[int]]] = {}

    # -- reading back ---------------------------------------------------------
    def adopt(
        self, raw: dict[int, dict[int, int]], frontends: Iterable[tuple[FKey, int, str]], known: Collection[int]
    ) -> None:
        """The tables and pointers of the map (id -> {index: value}), for
        frontends (key, svc_id, owner), with the backend ids the backend
        map holds (known). A table no frontend names, a pointer of no
        frontend or to no table, and entries past a table's size are
        orphans: deleted at the first full sync. A whole table (every
        entry there, each naming a known backend) is taken for the table of
        the backends it names: the periodic reconcile, which adopts the
        maps again, builds no table whose backends did not change. One
        with an entry missing is built and compared entry by entry at its
        first sync."""
        table_idx, size_idx = abi.MGL_TABLE, abi.MGL_SIZE
        pointers: dict[int, int] = {}
        for i, raw_entries in raw.items():
            self.count += len(raw_entries)
            rest = dict(raw_entries)
            if table_idx in rest:
                pointers[i] = rest.pop(table_idx)
            if not rest:
                continue
            m = rest.get(size_idx, 0)
            entries = [rest.get(j, 0) for j in range(m)]
            ids = frozenset(entries)
            whole = m == self.size and all(b in known for b in ids)  # 0 is never a backend id
            self.tables[i] = Table(i, "", ids if whole else None, entries)
            self.orphans.extend((i, j) for j in rest if j != size_idx and j >= m)
            if not m:  # entries with no size: never read
                self.orphans.extend((i, j) for j in rest)
                del self.tables[i]
        self._next = max(list(self.tables) + [0]) + 1
        for key, sid, owner in frontends:
            tid = pointers.pop(sid, None)
            if tid is None:
                continue
            t = self.tables.get(tid)
            if t is None:
                self.orphans.append((sid, table_idx))
                continue
            t.owner = owner
            t.users.add(key)
            self.of[key] = tid
            if t.backends is not None:
                self._by_set.setdefault((owner, t.backends), tid)
        self.orphans.extend((sid, table_idx) for sid in pointers)
        for tid, t in list(self.tables.items()):
            if not t.users:
                self.orphans.append((tid, size_idx))
                self.orphans.extend((tid, j) for j in range(len(t.entries)))
                del self.tables[tid]

    def distrust(self) -> None:
        """Build and compare every table at the next sync, whole ones too:
        after the periodic check found the maps differ from what was
        written, an adopted table may be whole and still wrong."""
        for t in self.tables.values():
            t.backends, t.turns = None, None
        self._by_set.clear()

    def prune(self, cs: ChangeSet) -> None:
        """Delete the orphans (a full sync), but for entries past an adopted
        table's size that the table has grown into again since (written in
        this change set or an earlier one): deletes go after writes, and
        would take them. Every orphan was counted at adoption and again
        when written."""
        tables = self.tables
        cs.mgl_del.extend(
            (i, j) for i, j in self.orphans if not ((t := tables.get(i)) is not None and 0 <= j < len(t.entries))
        )
        self.count -= len(self.orphans)
        self.orphans = []

    # -- the diff ---------------------------------------------------------------
    def begin(self) -> None:
        """A new sync: tables and sets made in the last one are forgotten."""
        self._built, self._sets, self._derived, self._origin = {}, {}, {}, {}

    # A Service's external frontends mostly take the same backends (its
    # NodePort and its LoadBalancer IP): their backend sets are one object,
    # so a change of 100,000 backends builds, hashes and compares one set
    # of 100,000, not one per frontend.
    def id_set(self, ids: Iterable[int | None]) -> frozenset[int]:
        """These backend ids (a frontend's slots, None for a hole) as a set."""
        s = frozenset(ids)
        if None in s:
            s = s.difference((None,))
        return self._sets.setdefault(s, s)  # type: ignore[arg-type]

    def derive(self, prev: frozenset[int], removed: Iterable[int], added: Iterable[int]) -> frozenset[int]:
        """The set prev without removed and with added, for a frontend
        whose set was prev before a delta; its table's turn order then
        takes the delta as it is (build), not the difference of two sets."""
        key = (prev, frozenset(removed), frozenset(added))
        s = self._derived.get(key)
        if s is None:
            s = prev.difference(key[1]).union(key[2])
            s = self._derived[key] = self._sets.setdefault(s, s)
            self._origin.setdefault(s, key)
        return s

    def growth(self, keys: Iterable[FKey]) -> int:
        """Entries at most needed for these external frontends (with
        backends) to get a table: M + 1 and a pointer each that has none."""
        if not self.size:
            return 0
        return sum(self.size + 2 for k in keys if k not in self.of)

    def sync_owner(
        self, owner: str, wanted: list[tuple[FKey, int, frozenset[int]]], backends: dict[int, Backend], cs: ChangeSet
    ) -> bool:
        """The external frontends of one Service (key, svc_id, the backend
        ids its table should hold: empty for none) to their tables, once
        all of them are planned: a table its users all still share
        follows their new backends in place (the changed entries only),
        whatever order they were planned in. Whether anything changed."""
        changed = False
        groups: dict[int, list[tuple[FKey, int, frozenset[int]]]] = {}
        homeless = []
        for key, sid, ids in wanted:
            tid = self.of.get(key)
            if not ids or not self.size:
                if tid is not None:
                    self.remove(key, sid, cs)
                    changed = True
            elif tid is None:
                homeless.append((key, sid, ids))
            else:
                groups.setdefault(tid, []).append((key, sid, ids))
        for tid, group in groups.items():
            t = self.tables[tid]
            # The backends most of its users want stay in this table (the
            # first in plan order on a tie); the others move.
            wants = Counter(ids for _, _, ids in group)
            keep = t.backends if t.backends is not None and t.backends in wants else max(wants, key=wants.__getitem__)
            # `is` first: `!=` of two sets compares them whole, the same
            # object too.
            if (t.backends is not keep and t.backends != keep) or len(t.entries) != self.size:
                self._fill(t, owner, keep, backends, cs)
                changed = True
            homeless.extend(m for m in group if m[2] is not keep and m[2] != keep)
        for key, sid, ids in homeless:
            tid = self.of.get(key)
            same = self._by_set.get((owner, ids))
            if same is None:
                nt = Table(self._next, owner, None, [])
                self._next += 1
                self.tables[nt.tid] = nt
                # The table this frontend leaves lends its turn order.
                self._fill(nt, owner, ids, backends, cs, self.tables[tid] if tid is not None else None)
                same = nt.tid
            if tid is not None:
                self._leave(key, self.tables[tid], cs)
            self._point(key, sid, self.tables[same], cs, new=tid is None)
            changed = True
        return changed

    def remove(self, key: FKey, sid: int, cs: ChangeSet) -> None:
        """Frontend key gone (or without a table now): its pointer, first,
        and its table when no other frontend reads it."""
        tid = self.of.get(key)
        if tid is None:
            return
        cs.mgl_del.append((sid, abi.MGL_TABLE))
        self.count -= 1
        self._leave(key, self.tables[tid], cs)

    def _leave(self, key: FKey, t: Table, cs: ChangeSet) -> None:
        t.users.discard(key)
        self.of.pop(key, None)
        if t.users:
            return
        del self.tables[t.tid]
        if t.backends is not None and self._by_set.get((t.owner, t.backends)) == t.tid:
            del self._by_set[t.owner, t.backends]
        cs.mgl_del.append((t.tid, abi.MGL_SIZE))
        cs.mgl_del.extend((t.tid, i) for i in range(len(t.entries)))
        self.count -= 1 + len(t.entries)

    def _point(self, key: FKey, sid: int, t: Table, cs: ChangeSet, new: bool) -> None:
        t.users.add(key)
        self.of[key] = t.tid
        cs.mgl_upd.append((sid, abi.MGL_TABLE, t.tid))  # after the table's entries
        self.count += new

    def _fill(
        self,
        t: Table,
        owner: str,
        ids: frozenset[int],
        backends: dict[int, Backend],
        cs: ChangeSet,
        base: Table | None = None,
    ) -> None:
        """Table t to hold the table of ids: the entries that differ. base:
        the table whose turn order to start from (see build), t's own by
        default."""
        turns, new = self.build(ids, backends, base or t)
        old = t.entries
        tid = t.tid
        if new is not old:  # else the same first M turns: the same table
            cs.mgl_upd.extend((tid, i, new[i]) for i in maglev.changed(old, new))
        if len(old) != len(new):
            cs.mgl_upd.append((tid, abi.MGL_SIZE, len(new)))  # after its entries
        cs.mgl_del.extend((tid, i) for i in range(len(new), len(old)))
        self.count += len(new) - len(old) + (not old)
        if t.backends is not None and self._by_set.get((t.owner, t.backends)) == tid:
            del self._by_set[t.owner, t.backends]
        t.owner, t.backends, t.entries, t.turns = owner, ids, new, turns
        self._by_set.setdefault((owner, ids), tid)

    def build(
        self, ids: frozenset[int], backends: dict[int, Backend], base: Table | None = None
    ) -> tuple[list[tuple[Backend, int]], list[int]]:
        """The turn order ((backend, id) by address, port and protocol: the
        same on every node, unlike the ids) and the table (backend id per
        entry) of these backends. base: a table built here before (most
        often the one these backends replace), whose turn order is taken
        over: the backends it lacks are merged in and the ones gone are
        dropped, not all of them sorted again; and when the first M turns
        are the same, so is the table (only the first M take a turn), and
        it is not built again."""
        got = self._built.get(ids)
        if got is not None:
            return got
        m = self.size
        old = was = None
        if base is not None and base.backends is not None and base.turns is not None:
            old, was = base.turns, base.backends
        turns = None
        if old is not None and was is not None:
            origin = self._origin.get(ids)
            if origin is not None and origin[0] is was:
                gone, new = origin[1] & was, origin[2] - was
            else:
                gone, new = was - ids, ids - was
            if len(gone) + len(new) <= len(old) // 4:
                turns = _edited(old, gone, sorted(zip(map(backends.__getitem__, new), new, strict=True)), backends)
        if turns is None:
            # Compared in C, no key function per backend.
            turns = sorted(zip(map(backends.__getitem__, ids), ids, strict=True))
        if old is not None and base is not None and len(base.entries) == m and old[:m] == turns[:m]:
            table = base.entries
        else:
            table = self._table(turns[:m])
        got = self._built[ids] = (turns, table)
        return got

    def _table(self, head: list[tuple[Backend, int]]) -> list[int]:
        """The table (backend id per entry) of these first M turns, filled
        in C (ctrl.dataplane.native). Each backend's permutation is hashed
        once per id and kept: an id names one backend for as long as this
        object lives (ctrl.dataplane.ids never reuses one)."""
        m = self.size
        ids = [i for _, i in head]
        perms = self._perms
        got = list(map(perms.get, ids))
        if None in got:
            if len(perms) > 2 * m * (len(self.tables) + 1):
                # Mostly backends gone: keep those of the tables there are.
                live = {i for t in self.tables.values() if t.turns for _, i in t.turns[:m]}
                live.update(ids)
                self._perms = perms = {i: p for i, p in perms.items() if i in live}
            hashed, identity, pack = maglev.hashed, maglev.identity, native.pack
            for k, p in enumerate(got):
                if p is None:
                    b = head[k][0]
                    got[k] = perms[ids[k]] = pack(*hashed(identity(b[0], b[1]), m))
        return native.fill(got, ids, m)  # type: ignore[arg-type]

    def entries_of(self, key: FKey) -> list[int] | None:
        """The table frontend key reads, or None (tests, the bench)."""
        tid = self.of.get(key)
        return None if tid is None else self.tables[tid].entries
