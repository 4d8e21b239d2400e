"""Maglev tables in the maps (sp_mgl_v5, sp_mglptr_v5): which table each
external frontend reads, tables shared, and the smallest writes that keep
them (docs/semantics.md, "Maglev").

A table is M entries (backend ids) under a table id, held in chunks of
abi.MGL_CHUNK entries; a frontend's pointer (its svc_id -> table id and M)
names the table it reads. The external frontends of one Service with the
same backends (its NodePort on each node address, its LoadBalancer IPs and
externalIPs, ports with the same target) share one table: M entries per
backend set, not per frontend.

A table follows its backends in place: only the chunks whose entries
differ are written (one backend of N removed: its own entries and about
1/N of the others, spread over the chunks). Write order, as everywhere in
ctrl.dataplane: a table's chunks, then the pointers that name it; deletes
the other way round (pointers, then chunks), so a flow never reads past
what exists. The tables are ctrl.model.maglev's, populated in C
(ctrl.dataplane.native).
"""

from __future__ import annotations

import itertools
import struct
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from heapq import heapify, heappop, heappush
from operator import itemgetter
from typing import Any

from ..model import maglev
from ..model.plan import Backend, FKey
from . import abi, native
from .changeset import ChangeSet


@dataclass
class Table:
    tid: int
    owner: str
    backends: IdSet | None  # None: adopted, not checked yet
    entries: array[int]  # backend id per entry, as the map holds them (0: missing)
    users: set[FKey] = field(default_factory=set)
    # The turn order of `backends` (see MaglevTables.build), kept so the
    # next table of mostly the same backends is not sorted from scratch;
    # None when not built here (adopted, distrusted).
    turns: Turns | None = None
    head: Head | None = None  # the first M turns' ids and permutations, with turns


# Salt of an id's hash in a set's fingerprint (IdSet): a tuple's hash
# mixes its members (an int hashes to itself), so sums of them do not
# collide as sums of ids would.
_SALT = 0x5BD1E995


def _fingerprint(ids: Iterable[int]) -> int:
    return sum(map(hash, zip(ids, itertools.repeat(_SALT))))


class IdSet:
    """The backend ids a table holds, with a fingerprint (their number and
    a sum of their hashes) kept as the set changes, so a set is hashed and
    told apart from another without a pass over it. A set of 100,000 ids
    taken through a change's delta (derived) costs the delta, not a copy
    of 100,000 ids (about 1 ms per copy): the new set takes over the
    old one's ids, and the old one keeps its fingerprint only (moved).
    Equal fingerprints of two sets whose ids are both there are checked
    id by id; against a moved set the fingerprint stands for its ids."""

    __slots__ = ("_ids", "_n", "_fp")

    def __init__(self, ids: set[int], fp: int | None = None):
        self._ids: set[int] | None = ids
        self._n = len(ids)
        self._fp = _fingerprint(ids) if fp is None else fp

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[int]:
        if self._ids is None:
            raise RuntimeError("a moved IdSet has no ids")
        return iter(self._ids)

    def __hash__(self) -> int:
        return hash((self._n, self._fp))

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, IdSet):
            return NotImplemented
        if self._n != other._n or self._fp != other._fp:
            return False
        return self._ids is None or other._ids is None or self._ids == other._ids

    def __repr__(self) -> str:
        return f"IdSet({sorted(self._ids) if self._ids is not None else '<moved>'})"

    @property
    def ids(self) -> set[int] | None:
        """Its ids, None once moved into a derived set."""
        return self._ids

    def derived(self, removed: Iterable[int], added: Iterable[int]) -> tuple[IdSet, frozenset[int], frozenset[int]]:
        """The set without removed and with added, made of this one's ids
        (which it no longer has); with the ids it really lost and gained."""
        s = self._ids
        if s is None:
            raise RuntimeError("a moved IdSet has no ids")
        plus = frozenset(added)  # an id both removed and added stays
        gone = frozenset(r for r in removed if r in s and r not in plus)
        new = frozenset(a for a in plus if a not in s)
        s.difference_update(gone)
        s.update(new)
        self._ids = None
        return IdSet(s, self._fp - _fingerprint(gone) + _fingerprint(new)), gone, new


def _changed_chunks(tid: int, old: array[int], new: array[int]) -> list[tuple[int, int, bytes]]:
    """The chunks of table tid that differ between its entries old and
    new, or that old had not, as (table id, chunk, the chunk's backend ids
    packed, zeros past the table's end)."""
    size = 4 * abi.MGL_CHUNK
    n, had = abi.mgl_chunks(len(new)), abi.mgl_chunks(len(old))
    nb = new.tobytes()
    nb += bytes(n * size - len(nb))
    ob = old.tobytes()
    ob += bytes(had * size - len(ob))
    return [
        (tid, k, nb[k * size : (k + 1) * size])
        for k in range(n)
        if k >= had or nb[k * size : (k + 1) * size] != ob[k * size : (k + 1) * size]
    ]


# A backend's turn: (its place in the turn order, its id). The place is
# the backend's address (16 bytes), port (2, big-endian) and protocol (1):
# ordered as the backends (address, port, protocol), and compared as one
# bytes object, not as nested tuples (sorts, bisections and the heap of
# Turns compare turns about 20 times each). Its first 18 bytes are the
# backend's Maglev identity (ctrl.model.maglev.identity).
Turn = tuple[bytes, int]
_PORT_PROTO = struct.Struct(">HB")


def turn_place(b: Backend) -> bytes:
    return b[0] + _PORT_PROTO.pack(b[1], b[2])


def turns_of(ids: Iterable[int], backends: dict[int, Backend]) -> list[Turn]:
    """The turns of these backend ids, in no order."""
    return [(turn_place(backends[i]), i) for i in ids]


_ID = itemgetter(1)  # a turn's backend id
_ID4 = struct.Struct(">I")


def _key(t: Turn) -> bytes:
    """A turn as one bytes object ordered as the turns: its place, then
    its id."""
    return t[0] + _ID4.pack(t[1])


def _turn(k: bytes) -> Turn:
    return k[:-4], _ID4.unpack_from(k, len(k) - 4)[0]


Splice = tuple[int, int, Turn]  # (position, 1: delete the turn there / 0: insert this turn there, turn)


# Up to this many runs of splices an array is edited in place (a move of
# its tail per run); past it, copied once. A list is always edited in
# place: a copy touches every item (its reference count), which at 16,381
# turns scattered in memory costs more than 100 moves of its pointers.
SPLICE_IN_PLACE_RUNS = 8


def _spliced(seq: Any, splices: list[Splice], value: Callable[[Turn], Any] | None = None) -> Any:
    """seq (a list or an array) with splices made, in order: each position
    is one of seq as it is, inserts at a position go before the delete of
    what is there. value: what an inserted turn becomes in seq (the turn
    itself by default). Splices next to each other are one run, made as
    one slice assignment, made in place from the last, each moving the
    tail once. An array with many runs (scattered turns) is copied once,
    in slices, instead. The result may be seq itself."""
    runs: list[list[Any]] = []  # [start, end, inserted values]: seq[start:end] becomes the values
    for pos, delete, t in splices:
        if runs and pos <= runs[-1][1]:
            run = runs[-1]
        else:
            run = [pos, pos, []]
            runs.append(run)
        if delete:
            run[1] = pos + 1
        else:
            run[2].append(t if value is None else value(t))
    if isinstance(seq, list) or len(runs) <= SPLICE_IN_PLACE_RUNS:
        for start, end, vals in reversed(runs):
            seq[start:end] = vals if isinstance(seq, list) else array(seq.typecode, vals)
        return seq
    out = seq[:0]
    at = 0
    for start, end, vals in runs:
        out += seq[at:start]
        out.extend(vals)
        at = end
    out += seq[at:]
    return out


class Turns:
    """A turn order: turns (place, id) sorted. Only its first m turns
    (`head`, a sorted list) fill a table of M = m; the rest (the tail) is
    only ever asked for its smallest turns, when the head loses some, so
    it is a heap, where a turn added costs one push and a turn gone is
    only marked (dropped when it comes up, or when the marks grow to half
    the heap). A change's 200 turns past the head cost about 0.1 ms, not
    the 0.4 ms of keeping the whole order sorted. The heap holds each turn
    as one bytes key (its place and its id): a pop compares about 34 keys
    scattered in memory, half the cache misses of (place, id) tuples.
    Editing in place is for the order's one owner (a table); copy() for
    another."""

    __slots__ = ("m", "head", "_tail", "_dead")

    def __init__(self, ordered: Iterable[Turn] = (), m: int = 0):
        """ordered: the turns, sorted."""
        s = list(ordered)
        self.m = m
        self.head: list[Turn] = s[:m]
        self._tail = [_key(t) for t in s[m:]]  # a sorted list is a heap
        # Keys of turns gone from the tail, each still once in the heap
        # (and not in the tail again: a turn put back while marked is
        # unmarked).
        self._dead: set[bytes] = set()

    def __len__(self) -> int:
        return len(self.head) + len(self._tail) - len(self._dead)

    def __iter__(self) -> Iterator[Turn]:
        dead = self._dead
        return itertools.chain(self.head, map(_turn, sorted(k for k in self._tail if k not in dead)))

    def copy(self) -> Turns:
        t = Turns.__new__(Turns)
        t.m, t.head, t._tail, t._dead = self.m, self.head[:], self._tail[:], set(self._dead)
        return t

    def _push(self, t: Turn) -> None:
        k = _key(t)
        if k in self._dead:
            self._dead.discard(k)  # its copy in the heap stands again
        else:
            heappush(self._tail, k)

    def tidy(self) -> None:
        """Drop the marked turns from the heap."""
        dead = self._dead
        if dead:
            self._tail = [k for k in self._tail if k not in dead]
            heapify(self._tail)
            dead.clear()

    def edit(self, gone: Iterable[Turn], added: Iterable[Turn]) -> tuple[list[Splice], list[Turn]] | None:
        """Without the turns gone (there), with the turns added (not
        there). Returns how the head changed: its splices (see _spliced),
        in order, positions in the head before the edit; after them the
        head is cut to m, or filled up to m with the turns returned,
        moved up from the tail. None, and nothing changed, when a turn
        gone from the head is not there (not expected)."""
        head = self.head
        splices: list[Splice] = []
        out: list[Turn] = []
        into: list[Turn] = []
        if head:
            end = head[-1]
            for t in gone:
                if t <= end:
                    i = bisect_left(head, t)
                    if head[i] != t:
                        return None
                    splices.append((i, 1, t))
                else:
                    out.append(t)
            for t in added:
                if t < end:
                    splices.append((bisect_left(head, t), 0, t))
                else:
                    into.append(t)
        else:
            out, into = list(gone), list(added)
        self._dead.update(map(_key, out))
        for t in into:
            self._push(t)
        if splices:
            splices.sort()
            self.head = head = _spliced(head, splices)
        m, tail, dead = self.m, self._tail, self._dead
        pulled: list[Turn] = []
        if len(head) > m:
            for t in head[m:]:
                self._push(t)
            del head[m:]
        else:
            while len(head) + len(pulled) < m and len(tail) > len(dead):
                k = heappop(tail)
                if k in dead:
                    dead.discard(k)
                else:
                    pulled.append(_turn(k))
            head += pulled
        if len(dead) > 64 and 2 * len(dead) > len(tail):
            self.tidy()
        return splices, pulled


@dataclass
class Head:
    """The ids and permutations (native.pack) of the first M turns of a
    turn order, in turn order: what the fill in C takes. Kept with a
    table and edited with its turn order, so a table filled again
    gathers nothing (16,381 ids and permutations gathered in Python cost
    about 1.5 ms)."""

    ids: array[int]
    perms: array[int]

    def copy(self) -> Head:
        return Head(array(self.ids.typecode, self.ids), array(self.perms.typecode, self.perms))


class MaglevTables:
    def __init__(self, size: int = 0):
        """size: M; 0: no tables (random mode; adopted ones go)."""
        self.size = size
        self.tables: dict[int, Table] = {}
        self.of: dict[FKey, int] = {}  # frontend -> the table it reads
        self.count = 0  # chunks in the map
        self.sid: dict[FKey, int] = {}  # frontend -> its svc_id, the key of its pointer
        self.orphans: list[tuple[int, int]] = []  # (table id, chunk)
        self.orphan_ptrs: list[int] = []  # svc_ids
        self._by_set: dict[tuple[str, IdSet], int] = {}
        self._next = 1
        # Turn orders and tables built in this sync, by backend set.
        self._built: dict[IdSet, tuple[Turns, array[int], Head]] = {}
        self._perms: dict[int, int] = {}  # backend id -> its permutation (native.pack)
        # Backend sets made in this sync (id_set, derive): equal ones are
        # one object, and a derived one knows what it was derived from.
        self._sets: dict[IdSet, IdSet] = {}
        self._derived: dict[tuple[IdSet, frozenset[int], frozenset[int]], IdSet] = {}
        self._origin: dict[IdSet, tuple[IdSet, frozenset[int], frozenset[int]]] = {}

    # -- reading back ---------------------------------------------------------
    def adopt(
        self,
        raw: dict[int, dict[int, array[int]]],
        pointers: dict[int, tuple[int, int]],
        frontends: Iterable[tuple[FKey, int, str]],
        known: Collection[int],
    ) -> None:
        """The tables of the map (table id -> {chunk: its backend ids}) and
        the pointers (svc_id -> (table id, M)), for frontends (key, svc_id,
        owner), with the backend ids the backend map holds (known). A table
        no frontend's pointer names, a pointer of no frontend or to no
        table, and chunks past a table's size are orphans: deleted at the
        first full sync. A whole table (every chunk there, every entry
        naming a known backend) is taken for the table of the backends it
        names: the periodic reconcile, which adopts the maps again, builds
        no table whose backends did not change. One with an entry missing
        is built and compared chunk by chunk at its first sync."""
        chunk = abi.MGL_CHUNK
        pointers = dict(pointers)
        self.count += sum(len(c) for c in raw.values())
        self._next = max([*raw, 0]) + 1
        for key, sid, owner in frontends:
            ptr = pointers.pop(sid, None)
            if ptr is None:
                continue
            tid, m = ptr
            chunks = raw.get(tid)
            if not chunks or not m:
                self.orphan_ptrs.append(sid)
                continue
            t = self.tables.get(tid)
            if t is None:
                entries = array("I")
                for k in range(abi.mgl_chunks(m)):
                    entries.extend(chunks.get(k) or array("I", bytes(4 * chunk)))
                del entries[m:]
                ids = IdSet(set(entries))
                whole = m == self.size and all(b in known for b in ids)  # 0 is never a backend id
                t = self.tables[tid] = Table(tid, owner, ids if whole else None, entries)
            elif len(t.entries) != m:
                # Pointers that disagree on its size: the first one is
                # taken; this one is rewritten at the first sync (the
                # frontend gets its table again) or deleted.
                self.orphan_ptrs.append(sid)
                continue
            t.owner = owner
            t.users.add(key)
            self.of[key] = tid
            self.sid[key] = sid
        for tid, t in self.tables.items():
            if t.backends is not None:
                self._by_set.setdefault((t.owner, t.backends), tid)
        self.orphan_ptrs.extend(pointers)
        for tid, chunks in raw.items():
            t = self.tables.get(tid)
            n = abi.mgl_chunks(len(t.entries)) if t is not None else 0
            self.orphans.extend((tid, k) for k in chunks if k >= n)

    def distrust(self) -> None:
        """Build and compare every table at the next sync, whole ones too:
        after the periodic check found the maps differ from what was
        written, an adopted table may be whole and still wrong."""
        for t in self.tables.values():
            t.backends, t.turns, t.head = None, None, None
        self._by_set.clear()

    def prune(self, cs: ChangeSet) -> None:
        """Delete the orphans (a full sync), but for chunks past an adopted
        table's size that the table has grown into again since, and
        pointers of a frontend that has one again (written in this change
        set or an earlier one): deletes go after writes, and would take
        them. Every orphan chunk was counted at adoption and again when
        written."""
        tables = self.tables
        cs.mgl_del.extend(
            (i, k)
            for i, k in self.orphans
            if not ((t := tables.get(i)) is not None and 0 <= k < abi.mgl_chunks(len(t.entries)))
        )
        live = set(self.sid.values())
        cs.mgl_ptr_del.extend(sid for sid in self.orphan_ptrs if sid not in live)
        self.count -= len(self.orphans)
        self.orphans, self.orphan_ptrs = [], []

    # -- the diff ---------------------------------------------------------------
    def begin(self) -> None:
        """A new sync: tables and sets made in the last one are forgotten."""
        self._built, self._sets, self._derived, self._origin = {}, {}, {}, {}

    # A Service's external frontends mostly take the same backends (its
    # NodePort and its LoadBalancer IP): their backend sets are one object,
    # so a change of 100,000 backends builds, hashes and compares one set
    # of 100,000, not one per frontend.
    def id_set(self, ids: Iterable[int | None]) -> IdSet:
        """These backend ids (a frontend's slots, None for a hole) as a set."""
        s = set(ids)
        s.discard(None)  # type: ignore[arg-type]
        return self._intern(IdSet(s))  # type: ignore[arg-type]

    def _intern(self, s: IdSet) -> IdSet:
        """The one set object of these ids in this sync: s, or an equal one
        made before whose ids are still there."""
        have = self._sets.get(s)
        if have is None or have.ids is None:
            self._sets[s] = have = s
        return have

    def derive(self, prev: IdSet, removed: Iterable[int], added: Iterable[int]) -> IdSet | None:
        """The set prev without removed and with added, for a frontend
        whose set was prev before a delta, made of prev's ids (IdSet); its
        table's turn order then takes the delta as it is (build), not the
        difference of two sets. None when prev's ids went into another
        set already (one interned for two slot tables): the caller makes
        the set from its slots."""
        key = (prev, frozenset(removed), frozenset(added))
        s = self._derived.get(key)
        if s is None:
            if prev.ids is None:
                return None
            s, gone, new = prev.derived(key[1], key[2])
            s = self._derived[key] = self._intern(s)
            self._origin.setdefault(s, (prev, gone, new))
        return s

    def growth(self, keys: Iterable[FKey]) -> int:
        """Chunks at most needed for these external frontends (with
        backends) to get a table: a table each that has none."""
        if not self.size:
            return 0
        return sum(abi.mgl_chunks(self.size) for k in keys if k not in self.of)

    def sync_owner(
        self, owner: str, wanted: list[tuple[FKey, int, IdSet | None]], backends: dict[int, Backend], cs: ChangeSet
    ) -> bool:
        """The external frontends of one Service (key, svc_id, the backend
        ids its table should hold: None or empty for none) to their tables, once
        all of them are planned: a table its users all still share
        follows their new backends in place (the changed entries only),
        whatever order they were planned in. Whether anything changed."""
        changed = False
        groups: dict[int, list[tuple[FKey, int, IdSet]]] = {}
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
                nt = Table(self._next, owner, None, array("I"))
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
        cs.mgl_ptr_del.append(sid)
        self.sid.pop(key, None)
        self._leave(key, self.tables[tid], cs)

    def _leave(self, key: FKey, t: Table, cs: ChangeSet) -> None:
        t.users.discard(key)
        self.of.pop(key, None)
        if t.users:
            return
        del self.tables[t.tid]
        if t.backends is not None and self._by_set.get((t.owner, t.backends)) == t.tid:
            del self._by_set[t.owner, t.backends]
        n = abi.mgl_chunks(len(t.entries))
        cs.mgl_del.extend((t.tid, k) for k in range(n))
        self.count -= n

    def _point(self, key: FKey, sid: int, t: Table, cs: ChangeSet, new: bool) -> None:
        t.users.add(key)
        self.of[key] = t.tid
        self.sid[key] = sid
        cs.mgl_ptr_upd.append((sid, t.tid, len(t.entries)))  # after the table's chunks

    def _fill(
        self,
        t: Table,
        owner: str,
        ids: IdSet,
        backends: dict[int, Backend],
        cs: ChangeSet,
        base: Table | None = None,
    ) -> None:
        """Table t to hold the table of ids: the chunks that differ. base:
        the table whose turn order to start from (see build), t's own by
        default."""
        turns, new, head = self.build(ids, backends, base or t, own=base is None)
        old = t.entries
        tid = t.tid
        if new is not old:  # else the same first M turns: the same table
            cs.mgl_upd.extend(_changed_chunks(tid, old, new))
        was, now = abi.mgl_chunks(len(old)), abi.mgl_chunks(len(new))
        if len(old) != len(new):  # its pointers say its size (after its chunks)
            sid = self.sid
            cs.mgl_ptr_upd.extend((sid[k], tid, len(new)) for k in t.users if k in sid)
        cs.mgl_del.extend((tid, k) for k in range(now, was))
        self.count += now - was
        if t.backends is not None and self._by_set.get((t.owner, t.backends)) == tid:
            del self._by_set[t.owner, t.backends]
        t.owner, t.backends, t.entries, t.turns, t.head = owner, ids, new, turns, head
        self._by_set.setdefault((owner, ids), tid)

    def build(
        self, ids: IdSet, backends: dict[int, Backend], base: Table | None = None, own: bool = False
    ) -> tuple[Turns, array[int], Head]:
        """The turn order (turns, by address, port and protocol: the
        same on every node, unlike the ids), the table (backend id per
        entry) and the first M turns' ids and permutations (Head) of these
        backends. base: a table built here before (most often the one
        these backends replace), whose turn order and head are taken over:
        the backends it lacks are merged in and the ones gone are dropped,
        not all of them sorted and gathered again; and when the first M
        turns are the same, so is the table (only the first M take a
        turn), and it is not built again. own: base's turn order and head
        may be edited in place (base is the table being refilled), else
        they are copied."""
        got = self._built.get(ids)
        if got is not None:
            return got[0].copy(), got[1], got[2].copy()  # a turn order has one owner
        m = self.size
        turns = head = None
        kept = False
        if base is not None and base.backends is not None and base.turns is not None:
            old, was, held = base.turns, base.backends, base.entries
            origin = self._origin.get(ids)
            if origin is not None and origin[0] is was:
                delta = origin[1], origin[2]
            elif was.ids is not None and ids.ids is not None:
                delta = frozenset(was.ids - ids.ids), frozenset(ids.ids - was.ids)
            else:
                delta = None  # was's ids moved on: sorted anew below
            if (
                delta is not None
                and len(delta[0]) + len(delta[1]) <= len(old) // 4
                and all(g in backends for g in delta[0])  # else (not expected) sorted anew below
            ):
                gone, new = delta
                turns = old if own else old.copy()
                edit = turns.edit(turns_of(gone, backends), sorted(turns_of(new, backends)))
                head = base.head if own or base.head is None else base.head.copy()
                if edit is None:
                    turns = head = None  # sorted anew below
                elif head is not None:
                    if edit[0] or edit[1]:
                        self._edit_head(head, *edit)
                    elif len(held) == (m if len(head.ids) else 0):
                        # The same first M turns: the same table (only
                        # they take a turn), not filled again.
                        kept, table = True, held
        if turns is None:
            # Compared in C, no key function per backend.
            turns = Turns(sorted(turns_of(ids, backends)), m)
        if head is None:
            head = self._gather(turns.head)
        if not kept:
            table = native.fill(head.perms, head.ids, m)
        self._built[ids] = (turns, table, head)
        return turns, table, head

    def _edit_head(self, head: Head, splices: list[Splice], pulled: list[Turn]) -> None:
        """head (the ids and permutations of a turn order's head) edited as
        Turns.edit edited that head: the splices made, cut to M, the turns
        pulled up appended."""
        m = self.size
        ids = _spliced(head.ids, splices, _ID) if splices else head.ids
        perms = _spliced(head.perms, splices, self._perm) if splices else head.perms
        del ids[m:], perms[m:]
        ids.extend(map(_ID, pulled))
        perms.extend(map(self._perm, pulled))
        head.ids, head.perms = ids, perms

    def _perm(self, t: Turn) -> int:
        """A backend's permutation (native.pack), hashed once per id and
        kept: an id names one backend for as long as this object lives
        (ctrl.dataplane.ids never reuses one)."""
        p = self._perms.get(t[1])
        if p is None:
            if len(self._perms) > 2 * self.size * (len(self.tables) + 1):
                # Mostly backends gone: keep those the tables' heads hold
                # (the others are hashed again if they come back).
                live = {i for tb in self.tables.values() if tb.head for i in tb.head.ids}
                self._perms = {i: q for i, q in self._perms.items() if i in live}
            p = self._perms[t[1]] = native.pack(*maglev.hashed(t[0][:18], self.size))
        return p

    def _gather(self, head: list[Turn]) -> Head:
        """The ids and permutations of these first M turns."""
        ids = array("I", map(_ID, head))
        perms = self._perms
        got: list[int | None] = list(map(perms.get, ids))
        try:  # no scan for the missing: an array takes no None
            packed: array[int] = array(native.U64, got)  # type: ignore[arg-type]
        except TypeError:
            packed = array(native.U64, [p if p is not None else self._perm(t) for p, t in zip(got, head, strict=True)])
        return Head(ids, packed)

    def entries_of(self, key: FKey) -> list[int] | None:
        """The table frontend key reads, or None (tests, the bench)."""
        tid = self.of.get(key)
        return None if tid is None else self.tables[tid].entries.tolist()
