"""Write a ChangeSet into the maps.

Phases run in ChangeSet order, each one batch syscall per map (chunked):
draining backends evicted to make room, backends, slots, Maglev entries, frontends
(counts), names; then frontend deletes, slot deletes, Maglev entry deletes, backend deletes, name
deletes. A packet never sees a count that
points at an unwritten slot, nor a slot that points at a deleted backend.

When a batch fails (a map full behind our back, an entry the kernel
refuses), Writer.apply_each writes the same change set again Service by
Service, so one Service that cannot be written does not hold back the
others (docs/semantics.md, "When a Service cannot be programmed").
"""

from __future__ import annotations

import logging
import queue
import socket
import sys
import threading
import time
from collections.abc import Iterator
from operator import add as add_tuple
from operator import itemgetter

from ..model.plan import Backend, FKey
from . import abi, sockdiag
from .abi import U32, Codecs, NodeConfig
from .abi import map_name as mn
from .changeset import ChangeSet, Rows
from .libbpf import BPFError
from .maps import Map

log = logging.getLogger("sliceproxy.apply")


def _pack_all(codec: abi.Codec, rows, n: int = 0) -> bytes | bytearray:
    return codec.pack_rows(rows, n)


def _svc_keys(keys) -> list[tuple]:
    """Frontend keys with the header's scope values (SP_SCOPE_*); a scope
    read back as a number (no symbol for it) stays that number."""
    scope = abi.SCOPE_VALUE
    return [(a, p, pr, scope.get(s, s)) for a, p, pr, s in keys]


def encode(cs: ChangeSet, c: Codecs) -> list[tuple[str, str, bytes, bytes]]:
    """(map, op, keys, values) in the order they must reach the kernel."""
    return list(encoded(cs, c))


def _entry(mapname: str, op: str, n: int, keys: bytes, vals: bytes = b"") -> tuple[tuple[str, str, bytes, bytes], ...]:
    return ((mapname, op, keys, vals),) if n else ()


_first, _second, _third, _fourth = map(itemgetter, range(4))


def _ids(seq) -> bytes:
    return U32.pack_columns(list(seq))


def _backend_batch(
    c: Codecs,
    rows: Rows,
    marks: list[tuple[int, Backend, int, float]] = (),  # type: ignore[assignment]
) -> tuple[tuple[str, str, bytes, bytes], ...]:
    """New backends (id, backend) and draining marks set or cleared
    (SP_BE_F_DRAINING, with the drain's end in ns), as one batch: built
    with map/zip so 100,000 rows stay in C, and iterators, which the
    codecs pack a chunk at a time (a new backend's flags and drain end
    are zeros the codec leaves: its row is the backend itself)."""
    new_ids, new_backends = rows.cols
    be_ids = list(new_ids)
    vals = _pack_all(c.backend_new, new_backends, len(new_backends))
    if marks:
        be_ids += map(_first, marks)
        # A mark's (flags, drain end): the marks of one sync share a few
        # (the drains it starts end together), each converted once.
        ends = list(zip(map(_third, marks), map(_fourth, marks), strict=True))
        tails = {e: (e[0], abi.to_ns(e[1]) if e[0] else 0) for e in set(ends)}
        marked = map(add_tuple, map(_second, marks), map(tails.__getitem__, ends))
        vals = vals + _pack_all(c.backend, marked, len(marks))
    return _entry(mn("sp_be"), "update", len(be_ids), _ids(be_ids), vals)


def _slot_batch(c: Codecs, rows: Rows) -> tuple[tuple[str, str, bytes, bytes], ...]:
    """(table, slot, backend id) rows as one batch."""
    if not rows:
        return ()
    return _entry(
        mn("sp_slot"),
        "update",
        len(rows),
        c.slot_key.pack_columns(*rows.cols[:2]),
        c.slot_val.pack_columns(rows.cols[2]),
    )


def encoded(cs: ChangeSet, c: Codecs) -> Iterator[tuple[str, str, bytes, bytes]]:
    """encode, one map's batch at a time: each is packed when the previous
    one is written, so a full sync holds one map's packed rows at once,
    not every map's. A name too long for the names map raises before the
    first batch."""
    names = [n.encode() for _, n in cs.name_upd]
    if any(len(n) >= c.name.size for n in names):
        # Programmed refuses such a frontend; never cut one (the owner is
        # read back from the name).
        raise abi.LayoutError(f"a frontend name longer than the names map's {c.name.size - 1} bytes")

    # Draining backends evicted to make room: gone before the new ones
    # arrive (no slot names them). Then new backends and draining marks,
    # then slots; the rows Writer.stream has written already are left out.
    be_from, slot_from = cs.written
    yield from _entry(mn("sp_be"), "delete", len(cs.be_evict), _ids(cs.be_evict))
    yield from _backend_batch(c, cs.be_upd[be_from:] if be_from else cs.be_upd, cs.be_mark)
    yield from _slot_batch(c, cs.slot_upd[slot_from:] if slot_from else cs.slot_upd)
    # Maglev chunks, then the pointers that name them, before the
    # frontend whose flag sends flows to them.
    yield from _entry(
        mn("sp_mgl"),
        "update",
        len(cs.mgl_upd),
        c.mgl_key.pack_columns([s for s, _, _ in cs.mgl_upd], [i for _, i, _ in cs.mgl_upd]),
        b"".join(b for _, _, b in cs.mgl_upd),
    )
    yield from _entry(
        mn("sp_mglptr"),
        "update",
        len(cs.mgl_ptr_upd),
        _ids(s for s, _, _ in cs.mgl_ptr_upd),
        c.mgl_ptr.pack_columns([t for _, t, _ in cs.mgl_ptr_upd], [m for _, _, m in cs.mgl_ptr_upd]),
    )
    # Source ranges before the frontends that flag them. The LPM key's
    # prefix length counts the svc_id's 32 bits too.
    yield from _entry(
        mn("sp_src"),
        "update",
        len(cs.src_upd),
        _pack_all(c.src_key, ((32 + n, i, a) for i, a, n in cs.src_upd)),
        _pack_all(c.src_val, ((1,) for _ in cs.src_upd)),
    )
    yield from _entry(
        mn("sp_svc"),
        "update",
        len(cs.svc_upd),
        _pack_all(c.svc_key, _svc_keys(k for k, _ in cs.svc_upd)),
        _pack_all(c.svc_val, (v for _, v in cs.svc_upd)),
    )
    yield from _entry(
        mn("sp_names"),
        "update",
        len(cs.name_upd),
        _ids(i for i, _ in cs.name_upd),
        _pack_all(c.name, ((n,) for n in names)),
    )
    svc_del = cs.svc_del
    if svc_del and cs.svc_upd:
        # A frontend one Service gave up and another took in this change
        # set (Programmed's claims): its new entry must survive the deletes.
        taken = {k for k, _ in cs.svc_upd}
        svc_del = [k for k in svc_del if k not in taken]
    yield from _entry(mn("sp_svc"), "delete", len(svc_del), _pack_all(c.svc_key, _svc_keys(svc_del)))
    yield from _entry(
        mn("sp_slot"),
        "delete",
        len(cs.slot_del),
        c.slot_key.pack_columns([s for s, _ in cs.slot_del], [i for _, i in cs.slot_del]),
    )
    yield from _entry(mn("sp_mglptr"), "delete", len(cs.mgl_ptr_del), _ids(cs.mgl_ptr_del))
    yield from _entry(
        mn("sp_mgl"),
        "delete",
        len(cs.mgl_del),
        c.mgl_key.pack_columns([s for s, _ in cs.mgl_del], [i for _, i in cs.mgl_del]),
    )
    yield from _entry(mn("sp_be"), "delete", len(cs.be_del), _ids(cs.be_del))
    yield from _entry(mn("sp_names"), "delete", len(cs.name_del), _ids(cs.name_del))
    yield from _entry(
        mn("sp_src"), "delete", len(cs.src_del), _pack_all(c.src_key, ((32 + n, i, a) for i, a, n in cs.src_del))
    )


# Rows (backends and slots) a diff gathers before Writer.stream sends
# them to the kernel: a batch of this many takes the kernel a few ms.
STREAM_ROWS = 16384
STREAM_SWITCH_INTERVAL = 0.0005  # seconds


class _Stream:
    """The streamed writes of one change set, by one thread of its own, in
    the order they were sent. The sender does not wait for them."""

    def __init__(self, cs: ChangeSet):
        self.cs = cs
        self.sent = (0, 0)  # rows of cs.be_upd and cs.slot_upd sent
        self.error: Exception | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._switch = 0.0

    def send(self, batches: list[tuple[Map, bytes | bytearray, bytes | bytearray, bool]]) -> bool:
        """Queue batches after those sent before; False (nothing sent)
        when one of those failed."""
        if self.error is not None:
            return False
        self._queue.put(batches)
        if self._thread is None:
            # The thread's every return from the kernel waits for the GIL
            # up to the switch interval (5 ms by default): a shorter one
            # while it writes, or it falls behind the diff.
            self._switch = sys.getswitchinterval()
            sys.setswitchinterval(min(self._switch, STREAM_SWITCH_INTERVAL))
            self._thread = threading.Thread(target=self._run, name="sliceproxy-stream", daemon=True)
            self._thread.start()
        return True

    def _run(self) -> None:
        while (batches := self._queue.get()) is not None:
            if self.error is not None:
                continue  # the rest is written by the full write
            try:
                for m, keys, vals, distinct in batches:
                    # One syscall per batch (or half: ctrl.dataplane.maps):
                    # one wait for the GIL.
                    m.update_batch(keys, vals, chunk=len(keys) // m.key_size, distinct=distinct)
            except Exception as e:  # whatever it is, the write writes everything
                self.error = e

    def wait(self) -> None:
        """Until every batch sent is written (or one failed)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            sys.setswitchinterval(self._switch)


class Writer:
    def __init__(self, maps: dict[str, Map], destroy_host_udp: bool = False):
        """destroy_host_udp: host clients are served, so the node's
        connected UDP sockets to a removed backend are destroyed
        (ctrl.dataplane.sockdiag) after the write that removed it."""
        self.maps = maps
        self.destroy_host_udp = destroy_host_udp
        self.stream_rows = STREAM_ROWS
        self._stream: _Stream | None = None
        self.codecs = Codecs.get()
        for name, (ks, vs) in self.codecs.sizes().items():
            m = maps[name]
            if (m.key_size, m.value_size) != (ks, vs):
                raise abi.LayoutError(
                    f"map {name}: key/value sizes {m.key_size}/{m.value_size} in the kernel, "
                    f"{ks}/{vs} in ebpf/sliceproxy.h"
                )

    # -- streaming the bulk of a large sync while its diff goes on --------
    def stream(self, cs: ChangeSet) -> None:
        """Write the new backends and slots cs has gathered since the last
        call, once there are stream_rows of them, from a thread of their
        own while the caller goes on (ctrl.dataplane.programmed calls it
        between Services, in a sync's diff). The kernel's batch updates
        release the GIL, so at 10,000s of Services they cost the diff
        little instead of adding to the write (docs/architecture.md, "The
        writer's stream").

        Only rows the write would put before every frontend entry anyway
        are sent: new backends (no slot names them yet), and slots, each
        after the backends it names (one thread, in order). Nothing is
        sent once cs holds draining marks or evictions (the write's first
        batches). apply(cs) then waits for these writes and leaves out
        what they wrote; if one failed, it writes everything again, so
        the error comes back from the write as without streaming."""
        st = self._stream
        if st is None or st.cs is not cs:
            self._end_stream()
            st = self._stream = _Stream(cs)
        if st.error is not None or cs.be_mark or cs.be_evict:
            return
        be_from, slot_from = st.sent
        be_to, slot_to = len(cs.be_upd), len(cs.slot_upd)
        if be_to - be_from + slot_to - slot_from < self.stream_rows:
            return
        batches = [
            *_backend_batch(self.codecs, cs.be_upd[be_from:be_to]),
            *_slot_batch(self.codecs, cs.slot_upd[slot_from:slot_to]),
        ]
        # Distinct keys (_write): the backends sent are new ones (no marks
        # here), the slots so far each named once or not known to be.
        distinct = {mn("sp_be"): True, mn("sp_slot"): cs.slot_tables is not None}
        if st.send([(self.maps[name], keys, vals, distinct[name]) for name, _, keys, vals in batches]):
            st.sent = (be_to, slot_to)

    def settle(self) -> None:
        """Wait for the streamed writes of a change set that will not be
        applied (a sync that failed before its write): the maps are then
        read as they stay."""
        self._end_stream()

    def _end_stream(self, cs: ChangeSet | None = None) -> tuple[int, int]:
        """Wait for the streamed writes; the rows of cs they wrote (none
        when they were another change set's, or one of them failed)."""
        st, self._stream = self._stream, None
        if st is None:
            return (0, 0)
        st.wait()
        if st.cs is not cs or st.error is not None:
            if st.error is not None:
                log.debug("a streamed write failed (the full write tries again): %s", st.error)
            return (0, 0)
        return st.sent

    def write_config(self, cfg: NodeConfig) -> None:
        """The node-wide settings the external programs read (sp_cfg)."""
        self.maps[mn("sp_cfg")].update(abi.u32(0), cfg.packed())

    def apply(self, cs: ChangeSet) -> float:
        """Write cs, then drop the UDP flows of backends it removed; returns
        seconds spent in syscalls. Raises BPFError."""
        t0 = time.perf_counter()
        cs.written = self._end_stream(cs)
        self._write(cs)
        self._purge(cs.removed)
        return time.perf_counter() - t0

    def _write(self, cs: ChangeSet) -> None:
        # Batches whose keys are distinct, written in any order (two
        # threads for a large one, ctrl.dataplane.maps): new backends (each
        # a new id) without draining marks (one backend may be marked and
        # cleared in one change set), and slots each named once.
        distinct = {mn("sp_be"): not cs.be_mark, mn("sp_slot"): cs.slot_tables is not None}
        for mapname, op, keys, vals in encoded(cs, self.codecs):
            m = self.maps[mapname]
            if op == "update":
                m.update_batch(keys, vals, distinct=distinct.get(mapname, False))
            else:
                m.delete_batch(keys)
            del keys, vals  # freed before the next map's rows are packed

    def _purge(self, removed: list[tuple[FKey, Backend]]) -> None:
        if removed and mn("sp_ct") in self.maps:
            n = purge_udp_flows(self.maps[mn("sp_ct")], removed)
            if n:
                log.debug("removed %d conntrack entries of UDP flows to removed backends", n)
        gone = {(b[0], b[1]) for _, b in removed}  # UDP frontends' only (ChangeSet.removed)
        if gone and self.destroy_host_udp:
            try:
                n = sockdiag.destroy_udp(gone)
            except OSError as e:
                # Not a failed write: the maps are right; such a socket
                # keeps its dead backend until it connects again.
                log.warning("destroying host sockets connected to removed UDP backends failed: %s", e)
            else:
                if n:
                    log.info("destroyed %d host UDP sockets connected to removed backends", n)

    def apply_each(self, cs: ChangeSet) -> tuple[dict[str, str], BPFError | None]:
        """Write cs again, Service by Service, after its batch write failed
        part way (what it wrote is written again: every write is an
        update, every delete tolerates a missing key). Each Service's
        writes keep their phase order: the backends its slots name (a new
        backend shared by two Services comes with both), its slots, source
        ranges, frontends and names, then its deletes. A Service whose
        write fails is left as the kernel has it and named in the result
        (owner -> error); the others are written. Then the node-wide rest:
        orphans of a restart; drains started and ended only when no
        Service failed (a failed one may still name a backend the rest
        would delete; re-adopted maps tell later). Returns the failed
        Services and the error of the rest, if any."""
        self._end_stream()
        parts, rest = cs.split()
        rows = {bid: (b, 0, 0.0) for bid, b in cs.be_upd}
        rows.update({bid: (b, f, until) for bid, b, f, until in cs.be_mark})
        failed: dict[str, str] = {}
        rest_error: BPFError | None = None
        evict = rest.be_evict + [b for _, part in parts for b in part.be_evict]
        try:
            # Draining backends no slot names: room for the new ones.
            self._write(ChangeSet(be_evict=evict))
        except BPFError as e:
            rest_error = e
        removed: list[tuple[FKey, Backend]] = []
        for owner, part in parts:
            named = {b for _, _, b in part.slot_upd if b in rows}
            own = {bid for bid, _ in part.be_upd} | {m[0] for m in part.be_mark}
            try:
                self._write(
                    ChangeSet(
                        be_mark=[(bid, *rows[bid]) for bid in sorted(named | own)],
                        slot_upd=part.slot_upd,
                        mgl_upd=part.mgl_upd,
                        mgl_ptr_upd=part.mgl_ptr_upd,
                        src_upd=part.src_upd,
                        svc_upd=part.svc_upd,
                        name_upd=part.name_upd,
                    )
                )
                self._write(
                    ChangeSet(
                        svc_del=part.svc_del,
                        slot_del=part.slot_del,
                        mgl_ptr_del=part.mgl_ptr_del,
                        mgl_del=part.mgl_del,
                        name_del=part.name_del,
                        src_del=part.src_del,
                    )
                )
            except BPFError as e:
                failed[owner] = e.strerror or str(e)
                continue
            removed.extend(part.removed)
        if failed:
            rest = ChangeSet(
                slot_del=rest.slot_del,
                mgl_ptr_del=rest.mgl_ptr_del,
                mgl_del=rest.mgl_del,
                name_del=rest.name_del,
                src_del=rest.src_del,
            )
        else:
            rest.be_evict = []
        try:
            self._write(rest)
            self._purge(removed + rest.removed)
        except BPFError as e:
            rest_error = rest_error or e
        return failed, rest_error


def purge_udp_flows(ct: Map, removed: list[tuple[FKey, Backend]]) -> int:
    """Delete the conntrack entries (both directions) of UDP flows from a
    frontend to a backend that no longer serves it, as kube-proxy clears
    netfilter's UDP conntrack: a client that keeps its socket (DNS) would
    otherwise keep sending into the void. TCP flows are left to drain."""
    pairs = {(f[0], f[1], b[0], b[1]) for f, b in removed if f[2] == socket.IPPROTO_UDP}
    if not pairs:
        return 0
    kc, vc = abi.ct_codecs()
    forward = abi.CT_FORWARD
    doomed = []
    for k, v in ct.items():
        saddr, daddr, sport, dport, proto, direction = kc.unpack(k)
        if proto != socket.IPPROTO_UDP:
            continue
        nat_addr, nat_port = vc.unpack(v)[:2]
        if direction == forward:
            hit = (daddr, dport, nat_addr, nat_port) in pairs
        else:
            hit = (nat_addr, nat_port, saddr, sport) in pairs
        if hit:
            doomed.append(k)
    ct.delete_batch(b"".join(doomed))
    return len(doomed)
