"""The control plane's C helper (ctrl/dataplane/native.c, compiled by
`make` into build/libsliceproxy.so) through cffi in ABI mode, found like
the BPF object: SLICEPROXY_NATIVE_LIB, build/ next to the package, or
/usr/share/sliceproxy/ (the image).

It populates Maglev tables: ctrl.model.maglev.build in C, the same table
for the same turns (tests/unit/test_native.py compares them). Without the
library the Python build serves, about 20 ms a table instead of well under
one; the agent says so once at start (ctrl.cli.run) when Maglev is on.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from cffi import FFI

from ..model import maglev

ffi = FFI()
ffi.cdef("int sp_maglev_fill(const uint64_t *perm, const uint32_t *ids, uint32_t n, uint32_t m, uint32_t *out);")

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
