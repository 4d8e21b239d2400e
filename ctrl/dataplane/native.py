"""The control plane's C helper (ctrl/dataplane/native.c, compiled by
`make` into build/libsliceproxy.so) through cffi in ABI mode, found like
the BPF object: SLICEPROXY_NATIVE_LIB, build/ next to the package, or
/usr/share/sliceproxy/ (the image).

It populates Maglev tables (fill: ctrl.model.maglev.build in C, the same
table for the same turns), edits the first M turns of a turn order
(merge_turns) and keeps the rest as a heap (heap_push, heap_take);
tests/unit/test_native.py compares each with its Python reference.
Without the library the Python ones serve, about 20 ms a table instead
of well under one; the agent says so once at start (ctrl.cli.run) when
Maglev is on.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Sequence
from functools import cache
from heapq import heapify, heappop
from pathlib import Path

from cffi import FFI

from ..model import maglev

ffi = FFI()
ffi.cdef(
    """
int sp_maglev_fill(const uint64_t *perm, const uint32_t *ids, uint32_t n, uint32_t m, uint32_t *out);
int64_t sp_turns_merge(const uint8_t *turns, const uint32_t *ids, const uint64_t *perms, uint32_t n,
                       const uint8_t *gone, uint32_t ng, const uint8_t *added, const uint64_t *aperms, uint32_t na,
                       uint8_t *okeys, uint32_t *oids, uint64_t *operms, uint32_t cap);
void sp_heap_grow(uint8_t *h, uint32_t n0, uint32_t n);
uint32_t sp_heap_take(uint8_t *h, uint32_t n, uint32_t k, uint8_t *out);
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
    i = array("I", ids)
    out = array("I", bytes(4 * m))
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


def merge_turns(
    turns: bytes | bytearray, ids: array[int], perms: array[int], gone: bytes, added: bytes, aperms: array[int]
) -> tuple[bytearray, array[int], array[int]] | None:
    """Sorted turns (TURN bytes each, one after the other) with their ids
    and permutations (array "I", array U64), without the turns gone and
    with the turns added (each sorted, joined the same way; aperms: the
    added ones' permutations): the new turns, ids and permutations, or
    None when a gone turn is not there or an added one is (a turn both
    gone and added is taken out, then in). In C when the library is
    there (one bisection per change, copies between)."""
    n, ng, na = len(ids), len(gone) // TURN, len(added) // TURN
    lib = library()
    if lib is None:
        return _merge_turns_py(turns, ids, perms, gone, added, aperms)
    out = n - ng + na
    if out < 0:
        return None  # more gone than there
    okeys, oids, operms = bytearray(out * TURN), array("I", bytes(4 * out)), array(U64, bytes(8 * out))
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
