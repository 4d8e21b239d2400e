"""The control plane's C helper (ctrl/dataplane/native.c, compiled by
`make` into build/libsliceproxy.so) through cffi in ABI mode, found like
the BPF object: SLICEPROXY_NATIVE_LIB, build/ next to the package, or
/usr/share/sliceproxy/ (the image).

It populates Maglev tables (fill: ctrl.model.maglev.build in C, the same
table for the same turns) from backends' permutations hashed in C
(perms: ctrl.model.maglev.hashed's BLAKE2b), edits the first M turns of a turn order
(merge_turns) and keeps the rest as a heap (heap_push, heap_take);
tests/unit/test_native.py compares each with its Python reference.
Without the library the Python ones serve, about 20 ms a table instead
of well under one; the agent says so once at start (ctrl.cli.run) when
Maglev is on. It also reads a slice's endpoints from their JSON
(scan_endpoints, ctrl/dataplane/endpoints.c), which the list and watch
decoder (ctrl.k8s.slicejson) is given by the agent's builder; without
the library the decoder reads them with msgspec, as it does any
endpoints the scan does not take.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from array import array
from collections.abc import Callable, Sequence
from functools import cache
from heapq import heapify, heappop
from itertools import repeat
from operator import add
from pathlib import Path
from typing import Any

from cffi import FFI

from ..k8s.objects import Endpoint
from ..model import maglev

ffi = FFI()
ffi.cdef(
    """
int sp_maglev_fill(const uint64_t *perm, const uint32_t *ids, uint32_t n, uint32_t m, uint32_t *out);
void sp_maglev_perms(const uint8_t *recs, uint32_t stride, uint32_t n, uint32_t m, uint64_t *out);
int64_t sp_turns_merge(const uint8_t *turns, const uint32_t *ids, const uint64_t *perms, uint32_t n,
                       const uint8_t *gone, uint32_t ng, const uint8_t *added, const uint64_t *aperms, uint32_t na,
                       uint8_t *okeys, uint32_t *oids, uint64_t *operms, uint32_t cap);
void sp_heap_grow(uint8_t *h, uint32_t n0, uint32_t n);
uint32_t sp_heap_take(uint8_t *h, uint32_t n, uint32_t k, uint8_t *out);
struct sp_scan_rows {
    uint8_t *addrs;
    uint32_t *kind, *fresh;
    uint64_t *fkinds;
    uint32_t cap, nfresh, nfkinds;
};
uint32_t sp_endpoints_scan(const uint8_t *const *segs, const uint32_t *lens, uint32_t nseg, const int32_t *families,
                           struct sp_scan_rows *rows, int32_t *counts);
void sp_names_reset(void);
int sp_scan_start(const uint8_t *const *segs, const uint32_t *lens, uint32_t nseg, const int32_t *families,
                  struct sp_scan_rows *rows, int32_t *counts);
uint32_t sp_scan_wait(void);
"""
)

NAME = "libsliceproxy.so"
# An array of 64-bit unsigned integers: "L" (unsigned long) where it is 8
# bytes, as on every 64-bit Linux, converts a list three times faster
# than "Q".
U64 = "L" if array("L").itemsize == 8 else "Q"


def library_path() -> Path:
    env = os.environ.get("SLICEPROXY_NATIVE_LIB")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    for cand in (root / "build" / NAME, Path("/usr/share/sliceproxy") / NAME):
        if cand.exists():
            return cand
    return root / "build" / NAME


@cache
def library():
    """The loaded library, or None when it is not there (or does not load:
    the error is logged by whoever asks, see missing)."""
    try:
        return ffi.dlopen(str(library_path()))
    except OSError:
        return None


def missing() -> str | None:
    """Why the library is not used, or None when it is."""
    if library() is not None:
        return None
    p = library_path()
    return f"{p} not found or not loadable (built by `make`); Maglev tables are built in Python"


def pack(offset: int, skip: int) -> int:
    """A permutation as sp_maglev_fill takes it."""
    return offset | skip << 32


def perms(recs: bytes | bytearray, stride: int, m: int) -> array[int]:
    """The permutations (pack) of the backends whose identities
    (ctrl.model.maglev.identity, 18 bytes) start the records of `stride`
    bytes joined in recs (turns: native.TURN), for a table of m entries:
    ctrl.model.maglev.hashed of each, in C when the library is there (a
    BLAKE2b compression each, no Python call)."""
    if m < 2:
        raise ValueError(f"a Maglev table of {m} entries")
    n = len(recs) // stride
    lib = library()
    if lib is None:
        return array(U64, [pack(*maglev.hashed(bytes(recs[i : i + 18]), m)) for i in range(0, n * stride, stride)])
    out = array(U64, bytes(8 * n))
    if n:
        lib.sp_maglev_perms(ffi.from_buffer("uint8_t[]", recs), stride, n, m, ffi.from_buffer("uint64_t[]", out))
    return out


_ZERO = (0,)


def fill(perms: Sequence[int], ids: Sequence[int], m: int) -> array[int]:
    """The table (ids[i] of the backend claiming each of the m entries) of
    backends with these packed permutations (pack), in turn order, as
    an array of __u32 (the map's form); empty for none.
    ctrl.model.maglev.build's table, in C when the library is there."""
    n = len(perms)
    if n == 0:
        return array("I")
    lib = library()
    if lib is None:
        positions = maglev.fill([(p & 0xFFFFFFFF, p >> 32) for p in perms], m)
        return array("I", [ids[i] for i in positions])
    p = perms if isinstance(perms, array) and perms.typecode == U64 else array(U64, perms)
    i = ids if isinstance(ids, array) and ids.typecode == "I" else array("I", ids)
    out = array("I", _ZERO) * m  # the C writes every entry
    rc = lib.sp_maglev_fill(
        ffi.from_buffer("uint64_t[]", p), ffi.from_buffer("uint32_t[]", i), n, m, ffi.from_buffer("uint32_t[]", out)
    )
    if rc:
        raise ValueError(f"Maglev table of {n} backends over {m} entries: a permutation out of range (M prime?)")
    return out


# A turn as merge_turns takes it: 23 bytes (ctrl.dataplane.tables: place
# 19, id 4 big-endian), compared as bytes.
TURN = 23


def split_turns(b: bytes | bytearray) -> list[bytes]:
    """Turns joined, apart."""
    return [bytes(b[i : i + TURN]) for i in range(0, len(b), TURN)]


def _sized(buf, n: int, item: int):
    """buf (a bytearray or an array) made to hold n items of `item`
    bytes, what it held kept up to n."""
    if isinstance(buf, array):
        if len(buf) > n:
            del buf[n:]
        else:
            buf.frombytes(bytes(item * (n - len(buf))))
    elif len(buf) > n * item:
        del buf[n * item :]
    else:
        buf.extend(bytes(n * item - len(buf)))
    return buf


def merge_turns(
    turns: bytes | bytearray,
    ids: array[int],
    perms: array[int],
    gone: bytes,
    added: bytes,
    aperms: array[int],
    into: tuple[bytearray, array[int], array[int]] | None = None,
) -> tuple[bytearray, array[int], array[int]] | None:
    """Sorted turns (TURN bytes each, one after the other) with their ids
    and permutations (array "I", array U64), without the turns gone and
    with the turns added (each sorted, joined the same way; aperms: the
    added ones' permutations): the new turns, ids and permutations, or
    None when a gone turn is not there or an added one is (a turn both
    gone and added is taken out, then in). In C when the library is
    there (one bisection per change, copies between), into the buffers
    `into` when given (the last merge's, resized: no new buffer of the
    whole head to allocate and fault in each time; none of them may be
    the input's)."""
    n, ng, na = len(ids), len(gone) // TURN, len(added) // TURN
    lib = library()
    if lib is None:
        return _merge_turns_py(turns, ids, perms, gone, added, aperms)
    out = n - ng + na
    if out < 0:
        return None  # more gone than there
    if into is None:
        okeys, oids, operms = bytearray(out * TURN), array("I", bytes(4 * out)), array(U64, bytes(8 * out))
    else:
        okeys, oids, operms = _sized(into[0], out, TURN), _sized(into[1], out, 4), _sized(into[2], out, 8)
    fb = ffi.from_buffer
    got = lib.sp_turns_merge(
        fb("uint8_t[]", turns),
        fb("uint32_t[]", ids),
        fb("uint64_t[]", perms),
        n,
        fb("uint8_t[]", gone),
        ng,
        fb("uint8_t[]", added),
        fb("uint64_t[]", aperms),
        na,
        fb("uint8_t[]", okeys),
        fb("uint32_t[]", oids),
        fb("uint64_t[]", operms),
        out,
    )
    return None if got != out else (okeys, oids, operms)


def _merge_turns_py(
    turns: bytes | bytearray, ids: array[int], perms: array[int], gone: bytes, added: bytes, aperms: array[int]
) -> tuple[bytearray, array[int], array[int]] | None:
    """merge_turns without the library: the turns as a dict, sorted again."""

    have = dict(zip(split_turns(turns), zip(ids, perms, strict=True), strict=True))
    for t in split_turns(gone):
        if have.pop(t, None) is None:
            return None
    for t, p in zip(split_turns(added), aperms, strict=True):
        if t in have:
            return None
        have[t] = (int.from_bytes(t[TURN - 4 :], "big"), p)
    order = sorted(have)
    return (
        bytearray(b"".join(order)),
        array("I", [have[t][0] for t in order]),
        array(U64, [have[t][1] for t in order]),
    )


def heap_push(heap: bytearray, turns: bytes) -> None:
    """The turns (TURN bytes each, joined) added to heap: a min-heap of
    turns, TURN bytes each, one after the other (an empty or sorted
    bytearray is one)."""
    n0 = len(heap) // TURN
    heap += turns
    lib = library()
    if lib is None:
        recs = split_turns(heap)
        heapify(recs)
        heap[:] = b"".join(recs)
        return
    lib.sp_heap_grow(ffi.from_buffer("uint8_t[]", heap), n0, len(heap) // TURN)


def heap_take(heap: bytearray, k: int) -> list[bytes]:
    """The k smallest turns of heap (all, when fewer), taken out, in order."""
    n = len(heap) // TURN
    k = min(k, n)
    if k <= 0:
        return []
    lib = library()
    if lib is None:
        recs = split_turns(heap)
        heapify(recs)
        got = [heappop(recs) for _ in range(k)]
        heap[:] = b"".join(recs)
        return got
    out = bytearray(k * TURN)
    lib.sp_heap_take(ffi.from_buffer("uint8_t[]", heap), n, k, ffi.from_buffer("uint8_t[]", out))
    del heap[(n - k) * TURN :]
    return split_turns(out)


# The fewest bytes of JSON an endpoint takes ({"addresses":["a"]} and a
# comma): the scan's rows are sized from the raw array's length.
_ENDPOINT_MIN = 16
# Node and zone names numbered (the C's table): past this many, it starts
# over (a cluster has thousands of nodes at most).
NAMES_MAX = 1 << 16
# Kinds numbered (a few per node): past this many, names and kinds start over.
KINDS_MAX = 1 << 18


class _Rows:
    """Rows one scan call writes (grown, reused by the calls after it)."""

    def __init__(self) -> None:
        self.rows = ffi.new("struct sp_scan_rows *")
        self.cap = 0

    def grow(self, cap: int) -> None:
        self.addrs, self.kind = bytearray(16 * cap), array("I", bytes(4 * cap))
        self.fresh = array("I", bytes(24 * cap))  # 2 * cap names, 3 numbers each
        self.fkinds = array(U64, bytes(8 * cap))
        fb = ffi.from_buffer
        # The cdata the rows point into, kept alive as long as they are.
        self.held = (
            fb("uint8_t[]", self.addrs),
            fb("uint32_t[]", self.kind),
            fb("uint32_t[]", self.fresh),
            fb("uint64_t[]", self.fkinds),
        )
        r = self.rows
        r.addrs, r.kind, r.fresh, r.fkinds = self.held
        r.cap = self.cap = cap


class _Scan:
    """The scan's state: two sets of rows (a call's Endpoints are made
    from one while the next call writes the other), used under the lock,
    the names the C has numbered, in their order (names[k] is number k;
    names[0] None), and the kinds it has numbered: kinds[k] is kind k's
    fields of an Endpoint after its address."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bufs = (_Rows(), _Rows())
        self.forget()

    def forget(self) -> None:
        """The names and kinds forgotten (the C's after sp_names_reset)."""
        self.names: list[str | None] = [None]
        self.kinds: list[tuple] = []


_scan = _Scan()


# A kind's key (endpoints.c, kind_key): its conditions (bit 0 ready, 1
# serving, 2 terminating), its node's number, its zone's.
_COND_MASK, _NODE_SHIFT, _NODE_MASK, _ZONE_SHIFT = 7, 3, (1 << 30) - 1, 33
# n -> unpack_from of n addresses of 16 bytes, for n up to _SPLIT_MAX
# (more are split _SPLIT_MAX at a time).
_SPLIT: dict[int, Callable] = {}
_SPLIT_MAX = 1000
# The JSON one scan call reads at most (unless one slice's is longer):
# its rows are sized from it, reused by the call after next, and kept.
# A page of slices is many calls, each but the first read on the C's
# thread while the one before is made into Endpoints: small enough that
# little is left over (S2's slice pages: 68 -> 50 ms at a quarter
# megabyte, 63 at a megabyte).
SCAN_BYTES = 1 << 18


def _splitter(n: int) -> Callable:
    split = _SPLIT.get(n)
    if split is None:
        split = _SPLIT[n] = struct.Struct("16s" * n).unpack_from
    return split


def _addresses(buf: bytearray, n: int) -> list[bytes]:
    """The first n addresses of buf (16 bytes each)."""
    step = _SPLIT_MAX
    if n <= step:
        return list(_splitter(n)(buf))
    out: list[bytes] = []
    full = _splitter(step)
    for k in range(n // step):
        out += full(buf, 16 * step * k)
    if n % step:
        out += _splitter(n % step)(buf, 16 * step * (n // step))
    return out


def scan_endpoints(raws: Sequence, families: Sequence[int]) -> list[tuple[Endpoint, ...] | None]:
    """Slices' endpoints (raws[i]: the JSON value of slice i's
    "endpoints", any buffer) of address family families[i]
    (socket.AF_INET, AF_INET6, or 0 for FQDN: checked, none returned), as
    ctrl.k8s.slicejson makes them (no hints: the scan takes none). Read
    as columns in C (ctrl/dataplane/endpoints.c), SCAN_BYTES of JSON a
    call: each endpoint's address and kind (its conditions, node and
    zone; the C numbers kinds, and node and zone names, once each for
    the process), made into an Endpoint by map: its address added to its
    kind's fields. Of two
    calls or more, each after the first reads its JSON on the C's own
    thread while the Endpoints of the one before are made here: the C's
    half of the work costs the caller little. Slice i's is None when the
    library is not there, or its endpoints are not clean: the caller
    reads those with msgspec."""
    lib = library()
    if lib is None:
        return [None] * len(raws)
    lens = list(map(len, raws))
    cuts: list[tuple[int, int, int]] = []  # (first slice, end, bytes) of each call
    first = size = 0
    for i, n in enumerate(lens):
        if size and size + n > SCAN_BYTES:
            cuts.append((first, i, size))
            first = i
            size = 0
        size += n
    if first < len(raws):
        cuts.append((first, len(raws), size))
    out: list[tuple[Endpoint, ...] | None] = []
    st = _scan
    with st.lock:
        if len(st.names) > NAMES_MAX or len(st.kinds) > KINDS_MAX:
            lib.sp_names_reset()
            st.forget()
        if not cuts:
            return out
        call = _Call(raws, lens, families, cuts[0], st.bufs[0])
        if len(cuts) == 1:
            return call.made(st, call.run(lib))
        threaded = pending = call.start(lib)
        try:
            for k in range(len(cuts)):
                used = lib.sp_scan_wait() if threaded else call.run(lib)
                pending = False
                done = call
                if k + 1 < len(cuts):
                    call = _Call(raws, lens, families, cuts[k + 1], st.bufs[(k + 1) % 2])
                    threaded = pending = call.start(lib)
                out += done.made(st, used)
        except BaseException:
            # The call on the C's thread finishes before its buffers go,
            # and the names it numbered, never added here, are forgotten
            # with all the others (numbered again as they come).
            if pending:
                lib.sp_scan_wait()
            lib.sp_names_reset()
            st.forget()
            raise
    return out


class _Call:
    """One call of the scan: the slices it reads, and the rows it writes."""

    def __init__(self, raws: Sequence, lens: list[int], families: Sequence[int], cut: tuple, buf: _Rows):
        first, end, size = cut
        self.raws = raws[first:end]
        self.nseg = nseg = end - first
        self.buf = buf
        self.counts = array("i", bytes(4 * nseg))
        self.args: tuple | None = None
        if size >= 1 << 32:  # not read: each slice left to msgspec
            self.counts = array("i", [-1]) * nseg
            return
        cap = size // _ENDPOINT_MIN + nseg
        if cap > buf.cap:
            buf.grow(max(cap, 2 * buf.cap, 256))
        fb = ffi.from_buffer
        # Each slice's JSON where it is (in the page msgspec read), not
        # copied: the cdata keep the buffers alive until the call is done.
        self.bufs = [fb("uint8_t[]", r) for r in self.raws]
        self.args = (
            ffi.new("const uint8_t *[]", self.bufs),
            fb("uint32_t[]", array("I", lens[first:end])),
            nseg,
            fb("int32_t[]", array("i", families[first:end])),
            buf.rows,
            fb("int32_t[]", self.counts),
        )

    def run(self, lib: Any) -> int:
        """The call, in this thread: the rows it wrote."""
        if self.args is None:
            self.buf.rows.nfresh = 0
            return 0
        return lib.sp_endpoints_scan(*self.args)

    def start(self, lib: Any) -> bool:
        """The call given to the C's thread (sp_scan_wait returns its
        rows); False when it could not be (run it here then)."""
        return self.args is not None and lib.sp_scan_start(*self.args) == 0

    def made(self, st: _Scan, used: int) -> list[tuple[Endpoint, ...] | None]:
        """Each slice's Endpoints (None: not taken), from the rows the call
        wrote; the names and kinds it numbered first added to st's."""
        buf = self.buf
        rows = buf.rows
        names, kinds = st.names, st.kinds
        fresh = rows.nfresh
        if fresh:
            f = buf.fresh
            raws = self.raws
            intern = sys.intern
            for k in range(fresh):
                seg, at, n = f[3 * k : 3 * k + 3]
                names.append(intern(str(memoryview(raws[seg])[at : at + n], "ascii")))
        for key in buf.fkinds[: rows.nfkinds]:
            c = key & _COND_MASK
            kinds.append(
                (
                    bool(c & 1),
                    bool(c & 2),
                    bool(c & 4),
                    names[key >> _NODE_SHIFT & _NODE_MASK],
                    names[key >> _ZONE_SHIFT],
                    None,  # hints: the scan takes none
                    None,
                )
            )
        # An Endpoint is its address and its kind's fields: one tuple
        # added to the other, in C (map); map stops at the used rows.
        eps = (
            list(
                map(
                    tuple.__new__,
                    repeat(Endpoint),
                    map(add, zip(_addresses(buf.addrs, used), strict=True), map(kinds.__getitem__, buf.kind)),
                )
            )
            if used
            else []
        )
        out: list[tuple[Endpoint, ...] | None] = []
        at = 0
        for n in self.counts:
            if n > 0:
                out.append(tuple(eps[at : at + n]))
                at += n
            else:
                out.append(None if n < 0 else ())
        return out
