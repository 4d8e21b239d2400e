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
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

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
        # Set operations in C (the smaller side iterated), no loop here.
        gone = frozenset(removed).intersection(s).difference(plus)
        new = plus.difference(s)
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


# A backend's turn: its place in the turn order, then its id (4 bytes,
# big-endian), as one bytes object (native.TURN bytes). The place is the
# backend's address (16 bytes), port (2, big-endian) and protocol (1):
# turns compare as the backends (address, port, protocol) do, as bytes
# (one memcmp, not nested tuples: sorts, the heap and the merge in C
# compare turns about 20 times each). Its first 18 bytes are the
# backend's Maglev identity (ctrl.model.maglev.identity).
Turn = bytes
_TURN = struct.Struct(">16sHBI")
_ID4 = struct.Struct(">I")
TURN = native.TURN
assert _TURN.size == TURN


def turns_of(ids: Iterable[int], backends: dict[int, Backend]) -> list[Turn]:
    """The turns of these backend ids, in no order: each packed in one
    call, in C (map), from its backend and id."""
    ids = list(ids)
    return list(map(_TURN.pack, *zip(*map(backends.__getitem__, ids), strict=True), ids)) if ids else []


def turn_id(t: Turn) -> int:
    return _ID4.unpack_from(t, TURN - 4)[0]


# The permutations (native.pack) of backends: their ids, their turns.
PermsOf = Callable[[Sequence[int], Sequence[Turn]], "array[int]"]


class Turns:
    """A turn order: turns sorted. Only its first m turns (the head) fill
    a table of M = m, and the head is kept as the fill in C takes it: its
    turns one after the other in one bytearray (`keys`), their ids
    (array "I") and permutations (array native.U64). A change to the head
    is one merge in C (native.merge_turns: a bisection per turn gone or
    added, the runs between copied whole), about 0.05 ms at 16,381 turns
    where keeping a list of them sorted in Python cost 0.3-0.6 ms. The
    rest (the tail) is only ever asked for its smallest turns, when the
    head loses some, so it is a heap, kept in C like the head (one
    bytearray of turns: native.heap_push, heap_take): turns added past
    the head cost a sift up each, a turn gone is only marked (dropped
    when it comes up, or when the marks grow to half the heap). Editing
    in place is for the order's one owner (a table); copy() for
    another."""

    __slots__ = ("m", "keys", "ids", "perms", "_tail", "_dead", "_perms_of", "_spare")

    def __init__(self, ordered: Sequence[Turn], m: int, perms_of: PermsOf):
        """ordered: the turns, sorted. perms_of: the permutations of
        backends taking the head."""
        head = ordered[:m]
        self.m = m
        self._perms_of = perms_of
        self.keys = bytearray(b"".join(head))
        self.ids = array("I", map(turn_id, head))
        self.perms = perms_of(self.ids, head)
        self._tail = bytearray(b"".join(ordered[m:]))  # sorted turns are a heap
        # Turns gone from the tail, each still once in the heap (and not
        # in the tail again: a turn put back while marked is unmarked).
        self._dead: set[Turn] = set()
        # The head's buffers before the last merge: the next one's output.
        self._spare: tuple[bytearray, array[int], array[int]] | None = None

    @property
    def head(self) -> list[Turn]:
        keys = self.keys
        return [bytes(keys[i : i + TURN]) for i in range(0, len(keys), TURN)]

    def __len__(self) -> int:
        return len(self.ids) + len(self._tail) // TURN - len(self._dead)

    def __iter__(self) -> Iterator[Turn]:
        dead = self._dead
        return itertools.chain(self.head, sorted(k for k in native.split_turns(self._tail) if k not in dead))

    def copy(self) -> Turns:
        t = Turns.__new__(Turns)
        t.m, t._perms_of = self.m, self._perms_of
        t.keys, t.ids, t.perms = bytearray(self.keys), array("I", self.ids), array(self.perms.typecode, self.perms)
        t._tail, t._dead, t._spare = bytearray(self._tail), set(self._dead), None
        return t

    def _push(self, turns: list[Turn]) -> None:
        """Turns into the tail (a turn marked gone is unmarked: its copy in
        the heap stands again)."""
        dead = self._dead
        back = dead.intersection(turns) if dead else None
        if back:
            dead -= back
            turns = [t for t in turns if t not in back]
        if turns:
            native.heap_push(self._tail, b"".join(turns))

    def tidy(self) -> None:
        """Drop the marked turns from the heap."""
        dead = self._dead
        if dead:
            live = b"".join(k for k in native.split_turns(self._tail) if k not in dead)
            self._tail = bytearray()
            native.heap_push(self._tail, live)
            dead.clear()

    def edit(self, gone: list[Turn], added: list[Turn]) -> bool | None:
        """Without the turns gone (there) and with the turns added (not
        there), each list sorted. Whether the head changed (its turns, in
        order); None, and nothing changed, when a turn gone from the head
        is not there or one added to it is (not expected)."""
        changed = False
        if self.ids:
            end = bytes(self.keys[-TURN:])
            ig, ia = bisect_right(gone, end), bisect_left(added, end)
            if ig or ia:
                into = added[:ia]
                into_ids = [turn_id(t) for t in into]
                got = native.merge_turns(
                    self.keys,
                    self.ids,
                    self.perms,
                    b"".join(gone[:ig]),
                    b"".join(into),
                    self._perms_of(into_ids, into),
                    self._spare,
                )
                if got is None:
                    return None
                self._spare = (self.keys, self.ids, self.perms)
                self.keys, self.ids, self.perms = got
                changed = True
            gone, added = gone[ig:], added[ia:]
        self._dead.update(gone)
        self._push(added)
        m, n = self.m, len(self.ids)
        if n > m:
            keys = self.keys
            self._push(native.split_turns(keys[m * TURN :]))
            del keys[m * TURN :], self.ids[m:], self.perms[m:]
        elif n < m:
            tail, dead = self._tail, self._dead
            pulled: list[Turn] = []
            while n + len(pulled) < m and len(tail) // TURN > len(dead):
                for k in native.heap_take(tail, m - n - len(pulled)):
                    if k in dead:
                        dead.discard(k)
                    else:
                        pulled.append(k)
            if pulled:
                ids = [turn_id(t) for t in pulled]
                self.keys += b"".join(pulled)
                self.ids.extend(ids)
                self.perms.extend(self._perms_of(ids, pulled))
                changed = True
        if len(self._dead) > 64 and 2 * len(self._dead) > len(self._tail) // TURN:
            self.tidy()
        return changed


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
        self._built: dict[IdSet, tuple[Turns, array[int]]] = {}
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
            t.backends, t.turns = None, None
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
        turns, new = self.build(ids, backends, base or t, own=base is None)
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
        t.owner, t.backends, t.entries, t.turns = owner, ids, new, turns
        self._by_set.setdefault((owner, ids), tid)

    def build(
        self, ids: IdSet, backends: dict[int, Backend], base: Table | None = None, own: bool = False
    ) -> tuple[Turns, array[int]]:
        """The turn order (turns, by address, port and protocol: the
        same on every node, unlike the ids; with its first M turns' ids
        and permutations) and the table (backend id per entry) of these
        backends. base: a table built here before (most often the one
        these backends replace), whose turn order is taken over: the
        backends it lacks are merged in and the ones gone are dropped,
        not all of them sorted and gathered again; and when the first M
        turns are the same, so is the table (only the first M take a
        turn), and it is not built again. own: base's turn order may be
        edited in place (base is the table being refilled), else it is
        copied."""
        got = self._built.get(ids)
        if got is not None:
            return got[0].copy(), got[1]  # a turn order has one owner
        m = self.size
        turns = None
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
                changed = turns.edit(sorted(turns_of(gone, backends)), sorted(turns_of(new, backends)))
                if changed is None:
                    turns = None  # sorted anew below
                elif not changed and len(held) == (m if len(turns.ids) else 0):
                    # The same first M turns: the same table (only they
                    # take a turn), not filled again.
                    kept, table = True, held
        if turns is None:
            # Compared in C, no key function per backend.
            turns = Turns(sorted(turns_of(ids, backends)), m, self._perms_of)
        if not kept:
            table = native.fill(turns.perms, turns.ids, m)
        self._built[ids] = (turns, table)
        return turns, table

    def _perms_of(self, ids: Sequence[int], turns: Sequence[Turn]) -> array[int]:
        """The permutations (native.pack) of these backends (their ids and
        turns), each hashed once per id (in C, native.perms) and kept: an id names one backend
        for as long as this object lives (ctrl.dataplane.ids never reuses
        one)."""
        perms = self._perms
        got: list[int | None] = list(map(perms.get, ids))
        missed = got.count(None)
        if not missed:
            return array(native.U64, got)  # type: ignore[arg-type]
        if len(perms) > 2 * self.size * (len(self.tables) + 1):
            # Mostly backends gone: keep those the tables' heads hold
            # (the others are hashed again if they come back).
            live = {i for tb in self.tables.values() if tb.turns for i in tb.turns.ids}
            self._perms = perms = {i: q for i, q in perms.items() if i in live}
        if missed == len(got):
            # None known (turns new to a head, most often): hashed and
            # kept in one pass each.
            hashed = native.perms(b"".join(turns), TURN, self.size)
            perms.update(zip(ids, hashed, strict=True))
            return hashed
        missing = [j for j, p in enumerate(got) if p is None]
        hashed = native.perms(b"".join([turns[j] for j in missing]), TURN, self.size)
        for j, q in zip(missing, hashed, strict=True):
            got[j] = perms[ids[j]] = q
        return array(native.U64, got)  # type: ignore[arg-type]

    def entries_of(self, key: FKey) -> list[int] | None:
        """The table frontend key reads, or None (tests, the bench)."""
        tid = self.of.get(key)
        return None if tid is None else self.tables[tid].entries.tolist()
