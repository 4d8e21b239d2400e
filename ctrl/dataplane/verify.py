"""The periodic reconcile's check: the kernel maps against the mirror
(ctrl.dataplane.programmed), a chunk at a time, so that the agent takes
and writes changes between two chunks (docs/architecture.md, "The
periodic reconcile").

Re-reading every map into a new mirror and diffing every Service holds
the agent's loop for more than a second at 100,000 endpoints, and every
change arriving meanwhile waits that long. The check instead reads the
maps with resumable batch lookups and compares each entry with what the
mirror says it holds. An entry that a sync writes or deletes while the
check runs is left out of it (the sync has just written what the mirror
holds; the next check covers it), which `touched` records from each
change set. The check finds:

- an entry whose value differs from the mirror's (a slot naming another
  backend, a frontend with another count, flags or id, a backend at
  another address, a name, the draining flag);
- an entry the mirror does not hold (nor keeps as an orphan until the
  next full sync);
- an entry the mirror holds and the map does not, by counting: every
  entry left alone by the syncs is read exactly once (a BPF hash map never
  moves an entry between buckets), so fewer than the mirror holds means
  some are missing.

Its answer is a list of differences: the agent repairs them the old way
(re-read the maps, then a full sync), which is rare, instead of every
period.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..model.plan import FKey, frontend_str
from ..util.addrs import hostport
from . import abi
from .abi import BE_F_DRAINING, SCOPE_OF, U32, Codecs, map_name
from .changeset import ChangeSet
from .maps import Map
from .programmed import FrontendState, Programmed, SlotTable

# Entries read and compared per chunk: about a millisecond of work.
CHUNK = 1024
# Differences described in the log; the rest are counted.
SHOWN = 5


class Verifier:
    def __init__(self, maps: dict[str, Map], programmed: Programmed, config: bytes | None = None):
        self.maps, self.p = maps, programmed
        self.config = config  # the node config last written, if known
        self.touched_ids: set[int] = set()
        self.touched_keys: set = set()
        self.touched_bids: set[int] = set()
        self.touched_mgl: set[int] = set()  # table ids of Maglev chunks written or deleted
        self.touched_ptr: set[int] = set()  # svc_ids of Maglev pointers written or deleted
        self.differences: list[str] = []
        self.found = 0  # differences, also those not described
        self.entries = 0  # entries compared
        self.done = False
        # Frontends by id, as they are now: a frontend a sync changes later
        # has its id touched, so what this holds for the others stays true.
        self.by_id: dict[int, FrontendState] = {st.svc_id: st for st in programmed.frontends.values()}
        # Slot tables by id, the same way: a table a sync changes later has
        # its id touched (its slots written or deleted).
        self.tables: dict[int, SlotTable] = dict(programmed.slot_tables)
        self.key_of: dict[int, FKey] = {st.svc_id: key for key, st in programmed.frontends.items()}
        self._steps = self._run()

    # -- what the syncs meanwhile write ------------------------------------
    def touched(self, cs: ChangeSet) -> None:
        """Leave out what a sync during the check writes or deletes."""
        ids, bids = self.touched_ids, self.touched_bids
        for key, val in cs.svc_upd:
            self.touched_keys.add(key)
            ids.add(val[0])
        self.touched_keys.update(cs.svc_del)
        ids.update(s for s, _, _ in cs.slot_upd)
        ids.update(s for s, _ in cs.slot_del)
        ids.update(s for s, _ in cs.name_upd)
        ids.update(cs.name_del)
        ids.update(s for s, _, _ in cs.src_upd)
        ids.update(s for s, _, _ in cs.src_del)
        bids.update(cs.be_evict)
        bids.update(b for b, _ in cs.be_upd)
        bids.update(b for b, *_ in cs.be_mark)
        bids.update(cs.be_del)
        self.touched_mgl.update(i for i, _, _ in cs.mgl_upd)
        self.touched_mgl.update(i for i, _ in cs.mgl_del)
        self.touched_ptr.update(i for i, _, _ in cs.mgl_ptr_upd)
        self.touched_ptr.update(cs.mgl_ptr_del)

    # -- running ----------------------------------------------------------
    def step(self, entries: int | None = None) -> bool:
        """Compare about `entries` (CHUNK) more; True once the check is complete."""
        entries = CHUNK if entries is None else entries
        while not self.done and entries > 0:
            try:
                entries -= next(self._steps)
            except StopIteration:
                self.done = True
        return self.done

    def _differ(self, what: str) -> None:
        self.found += 1
        if len(self.differences) < SHOWN:
            self.differences.append(what)

    def _run(self) -> Iterator[int]:
        c = Codecs.get()
        yield from self._frontends(c)
        yield from self._slots(c)
        yield from self._backends(c)
        if map_name("sp_names") in self.maps:
            yield from self._names(c)
        if map_name("sp_src") in self.maps:
            yield from self._ranges(c)
        if map_name("sp_mgl") in self.maps and map_name("sp_mglptr") in self.maps:
            yield from self._maglev(c)
        if self.config is not None:
            got = self.maps[map_name("sp_cfg")].lookup(abi.u32(0))
            if got != self.config:
                self._differ("the node config differs from the one written")

    def _untouched(self) -> Iterator[FrontendState]:
        """The frontends the check still answers for."""
        keys, ids = self.touched_keys, self.touched_ids
        for key, st in self.p.frontends.items():
            if key not in keys and st.svc_id not in ids:
                yield st

    def _frontends(self, c: Codecs) -> Iterator[int]:
        fronts, keys, ids = self.p.frontends, self.touched_keys, self.touched_ids
        seen = 0
        for chunk in self.maps[map_name("sp_svc")].chunks(CHUNK):
            for k, v in chunk:
                addr, port, proto, scope = c.svc_key.unpack(k)
                key = (addr, port, proto, SCOPE_OF.get(scope, scope))
                val = c.svc_val.unpack(v)
                if key in keys or val[0] in ids:
                    continue
                st = fronts.get(key)
                if st is None:
                    self._differ(f"frontend {frontend_str(key)}: in the map, not programmed")
                    continue
                seen += 1
                want = (st.svc_id, len(st.slots), st.flags, st.affinity_timeout, st.table.tid)
                if tuple(val) != want:
                    self._differ(f"frontend {frontend_str(key)}: the map holds {tuple(val)}, not {want}")
            self.entries += len(chunk)
            yield len(chunk)
        want_n = sum(1 for _ in self._untouched())
        if seen < want_n:
            self._differ(f"{want_n - seen} frontends programmed are not in the map")

    def _slots(self, c: Codecs) -> Iterator[int]:
        by_id, ids = self.tables, self.touched_ids
        orphans = set(self.p.orphan_slots)
        seen = orphan_seen = 0
        for chunk in self.maps[map_name("sp_slot")].chunks(CHUNK):
            for k, v in chunk:
                sid, slot = c.slot_key.unpack(k)
                if sid in ids:
                    continue
                st = by_id.get(sid)
                if st is None:
                    if (sid, slot) in orphans:
                        orphan_seen += 1
                    else:
                        self._differ(f"slot {slot} of id {sid}: in the map, no slot table has that id")
                    continue
                seen += 1
                (bid,) = c.slot_val.unpack(v)
                what = f"slot {slot} of table {sid} ({self._table_name(st)})"
                if slot >= len(st.slots):
                    self._differ(f"{what}: in the map, past its count {len(st.slots)}")
                elif st.slots[slot] is not None and st.slots[slot] != bid:
                    self._differ(f"{what}: backend {bid} in the map, not {st.slots[slot]}")
            self.entries += len(chunk)
            yield len(chunk)
        want_n = sum(len(t.slots) for t in self.p.slot_tables.values() if t.tid not in ids)
        want_orphans = sum(1 for sid, _ in orphans if sid not in ids)
        if seen < want_n or orphan_seen < want_orphans:
            self._differ(f"{want_n + want_orphans - seen - orphan_seen} slots programmed are not in the map")

    def _table_name(self, t: SlotTable) -> str:
        """A slot table for people: the name of a frontend reading it."""
        for key in sorted(t.users):
            st = self.p.frontends.get(key)
            if st is not None and st.name:
                return st.name
        return "no frontend"

    def _backends(self, c: Codecs) -> Iterator[int]:
        p, bids = self.p, self.touched_bids
        backends = p.bids.backends
        drains = p.drains if p.drain_period > 0 else ()
        seen = 0
        for chunk in self.maps[map_name("sp_be")].chunks(CHUNK):
            for k, v in chunk:
                (bid,) = U32.unpack(k)
                if bid in bids:
                    continue
                row = c.backend.unpack(v)
                want = backends.get(bid)
                if want is None:
                    self._differ(f"backend {bid}: in the map, not programmed")
                    continue
                seen += 1
                if tuple(row[:3]) != tuple(want):
                    self._differ(f"backend {bid}: {_be(row)} in the map, not {_be(want)}")
                elif bool(row[3] & BE_F_DRAINING) != (bid in drains):
                    self._differ(f"backend {bid}: draining flag {bool(row[3] & BE_F_DRAINING)} in the map")
            self.entries += len(chunk)
            yield len(chunk)
        want_n = sum(1 for b in backends if b not in bids)
        if seen < want_n:
            self._differ(f"{want_n - seen} backends programmed are not in the map")

    def _names(self, c: Codecs) -> Iterator[int]:
        by_id, ids = self.by_id, self.touched_ids
        orphans = set(self.p.orphan_names)
        seen = 0
        for chunk in self.maps[map_name("sp_names")].chunks(CHUNK):
            for k, v in chunk:
                (sid,) = U32.unpack(k)
                if sid in ids:
                    continue
                st = by_id.get(sid)
                if st is None:
                    if sid not in orphans:
                        self._differ(f"name of id {sid}: in the map, no frontend has that id")
                    continue
                seen += 1
                raw = c.name.unpack(v)[0].split(b"\0", 1)[0].decode(errors="replace")
                if raw != st.name:
                    self._differ(f"name of id {sid}: {raw!r} in the map, not {st.name!r}")
            self.entries += len(chunk)
            yield len(chunk)
        want_n = sum(1 for st in self._untouched() if st.name)
        if seen < want_n:
            self._differ(f"{want_n - seen} frontend names are not in the map")

    def _ranges(self, c: Codecs) -> Iterator[int]:
        by_id, ids = self.by_id, self.touched_ids
        orphans = {(i, a, n) for i, a, n in self.p.orphan_ranges}
        seen = 0
        for chunk in self.maps[map_name("sp_src")].chunks(CHUNK):
            for k, _ in chunk:
                plen, sid, addr = c.src_key.unpack(k)
                if sid in ids:
                    continue
                st = by_id.get(sid)
                rng = (addr, plen - 32)
                if st is None:
                    if (sid, addr, plen - 32) not in orphans:
                        self._differ(f"source range of id {sid}: in the map, no frontend has that id")
                    continue
                if rng not in st.ranges:
                    self._differ(f"source range of {st.name or sid}: in the map, not programmed")
                    continue
                seen += 1
            self.entries += len(chunk)
            yield len(chunk)
        want_n = sum(len(st.ranges) for st in self._untouched())
        if seen < want_n:
            self._differ(f"{want_n - seen} source ranges programmed are not in the map")

    def _maglev(self, c: Codecs) -> Iterator[int]:
        """Maglev tables (ctrl.dataplane.tables): each table's chunks, then
        each frontend's pointer (table and size)."""
        mt = self.p.tables
        tables, of, ids, mgl, ptrs = mt.tables, mt.of, self.touched_ids, self.touched_mgl, self.touched_ptr
        orphans, orphan_ptrs = set(mt.orphans), set(mt.orphan_ptrs)
        size = 4 * abi.MGL_CHUNK
        seen = 0
        packed: dict[int, bytes] = {}  # table id -> its entries as the map holds them
        # A chunk holds 1,000 entries: a step reads fewer of them.
        for chunk in self.maps[map_name("sp_mgl")].chunks(max(1, CHUNK // 16)):
            for k, v in chunk:
                tid, idx = c.mgl_key.unpack(k)
                if tid in mgl or (tid, idx) in orphans:
                    continue
                t = tables.get(tid)
                if t is None:
                    self._differ(f"Maglev table {tid} chunk {idx}: in the map, no such table")
                    continue
                want = packed.get(tid)
                if want is None:
                    want = packed[tid] = t.entries.tobytes() + bytes(-len(t.entries) % abi.MGL_CHUNK * 4)
                if idx >= len(want) // size:
                    self._differ(f"Maglev table {tid} chunk {idx}: in the map, past the table's {len(t.entries)}")
                    continue
                seen += 1
                if v != want[idx * size : (idx + 1) * size]:
                    got, exp = abi.mgl_ids(v), abi.mgl_ids(want[idx * size : (idx + 1) * size])
                    i = next(i for i in range(len(got)) if got[i] != exp[i])
                    self._differ(
                        f"Maglev table {tid} entry {idx * abi.MGL_CHUNK + i}: backend {got[i]} in the map, not {exp[i]}"
                    )
            self.entries += len(chunk)
            yield len(chunk)
        for chunk in self.maps[map_name("sp_mglptr")].chunks(CHUNK):
            for k, v in chunk:
                sid = U32.unpack(k)[0]
                if sid in ids or sid in ptrs or sid in orphan_ptrs:
                    continue
                tid, m = c.mgl_ptr.unpack(v)
                key = self.key_of.get(sid)
                want_tid = None if key is None else of.get(key)
                if want_tid is None:
                    self._differ(f"Maglev pointer of id {sid}: in the map, no frontend of that id has a table")
                    continue
                seen += 1
                if want_tid != tid:
                    self._differ(f"Maglev pointer of id {sid}: table {tid} in the map, not {want_tid}")
                elif m != len(tables[tid].entries):
                    self._differ(f"Maglev pointer of id {sid}: size {m} in the map, not {len(tables[tid].entries)}")
            self.entries += len(chunk)
            yield len(chunk)
        fronts = self.p.frontends
        want_n = sum(
            1 for key in of if (st := fronts.get(key)) is not None and st.svc_id not in ids and st.svc_id not in ptrs
        )
        want_n += sum(abi.mgl_chunks(len(t.entries)) for tid, t in tables.items() if tid not in mgl)
        if seen < want_n:
            self._differ(f"{want_n - seen} Maglev entries programmed are not in the map")


def _be(row) -> str:
    return f"{hostport(row[0], row[1])}/{_PROTO.get(row[2], row[2])}"


_PROTO = {6: "TCP", 17: "UDP", 132: "SCTP"}
