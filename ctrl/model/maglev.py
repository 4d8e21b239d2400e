"""Maglev lookup tables for external frontends (docs/semantics.md, "Maglev").

With `--external-lb=maglev` a new flow to an external frontend takes entry
(flow hash % M) of its frontend's table instead of a random slot. Every node
computes the same table from the same endpoints, so a flow an outside load
balancer moves to another node finds the same backend there with no state
shared between nodes.

The table is the one of the Maglev paper (Eisenbud et al., NSDI 2016,
section 3.4): each backend has a permutation of the M entries, given by an
offset and a skip from two hashes of its identity (address and port: the
same on every node, unlike the node-local backend ids), and the backends
take turns claiming the next free entry of their permutation until the
table is full. Backends take their turns in the order of their identity,
not in the order the EndpointSlices list them, so the order of the slices
does not change the table. Every backend gets M // N or M // N + 1 entries
(balance), and removing one of N backends moves about 1/N of the entries
besides its own (minimal disruption).

Pure Python, the reference: the dataplane (ctrl.dataplane.tables) fills
its tables with the same steps in C when it can (ctrl.dataplane.native),
turns positions into backend ids and writes the entries that changed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from functools import lru_cache
from hashlib import blake2b
from itertools import compress
from operator import ne

DEFAULT_SIZE = 16381
# Smaller tables balance poorly (the paper keeps M above 100 entries per
# backend), and a table size is per frontend, so a tiny one is a mistake
# rather than a saving.
MIN_SIZE = 1021
# Each table is M map entries per frontend: beyond this a table costs more
# than the balance it buys.
MAX_SIZE = 1048573

# The flow hash (FNV-1a 32-bit, then murmur3's finaliser so the low bits
# that `% M` reads depend on every input byte). The datapath computes the
# same one (lb_flow_hash in ebpf/lib/lb.h).
FNV_OFFSET = 0x811C9DC5
FNV_PRIME = 0x01000193


class TableSizeError(ValueError):
    pass


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


def check_size(m: int) -> int:
    """m if it is a usable table size, else TableSizeError saying why.
    Prime: every skip (1..M-1) is then coprime with M, so each backend's
    sequence visits every entry (the paper's condition)."""
    if m < MIN_SIZE or m > MAX_SIZE:
        raise TableSizeError(f"--maglev-table-size {m}: must be a prime between {MIN_SIZE} and {MAX_SIZE}")
    if not is_prime(m):
        raise TableSizeError(f"--maglev-table-size {m}: must be a prime (e.g. {DEFAULT_SIZE})")
    return m


def identity(addr16: bytes, port: int) -> bytes:
    """What a backend is known by on every node: its address (16 bytes,
    IPv4-mapped) and port."""
    return addr16 + port.to_bytes(2, "big")


_HASH = blake2b(digest_size=8, person=b"sp-maglev")  # copied for each identity
_HALVES = struct.Struct(">II").unpack


def hashed(ident: bytes, m: int) -> tuple[int, int]:
    """(offset, skip) of a backend's permutation of the m entries: the two
    big-endian halves of an 8-byte BLAKE2b of its identity (personalized
    "sp-maglev"), modulo m and m - 1. (A copy of one hash object costs
    half as much as a new one made with its parameters.)"""
    h = _HASH.copy()
    h.update(ident)
    offset, skip = _HALVES(h.digest())
    return offset % m, skip % (m - 1) + 1


# A Service's next table is mostly the same backends: their permutations
# are kept (about 200 bytes each), not hashed again.
permutation = lru_cache(maxsize=1 << 17)(hashed)


def order(backends: Iterable[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
    """Backends (address16, port) in the order they take their turns: by
    identity, once each."""
    return sorted(set(backends))


def build(idents: Sequence[bytes], m: int) -> list[int]:
    """The table: for each of the m entries, the position in idents of the
    backend it names. idents in turn order (see order); [] when empty.
    With more backends than entries the last ones get none."""
    if len(idents) > m:
        # The first m fill the table in their first turn: the rest never
        # get one, and need no permutation.
        idents = idents[:m]
    return fill([permutation(i, m) for i in idents], m)


def fill(perms: Sequence[tuple[int, int]], m: int) -> list[int]:
    """The table of backends with these permutations ((offset, skip), in
    turn order): the position in perms of the backend each entry names.
    ctrl/dataplane/native.c does the same in C."""
    n = min(len(perms), m)
    if n == 0:
        return []
    pos = [o for o, _ in perms[:n]]  # the next entry each backend tries
    skips = [s for _, s in perms[:n]]
    table = [-1] * m
    filled = 0
    while True:
        for i in range(n):
            c = pos[i]
            skip = skips[i]
            # Walk this backend's permutation to its next free entry: the
            # first entries go in one probe, the last ones take longer
            # (about M ln M probes for the whole table).
            while table[c] >= 0:
                c += skip
                if c >= m:
                    c -= m
            table[c] = i
            c += skip
            pos[i] = c - m if c >= m else c
            filled += 1
            if filled == m:
                return table


def build_for(backends: Iterable[tuple[bytes, int]], m: int) -> tuple[list[tuple[bytes, int]], list[int]]:
    """The turn order of backends (address16, port) and their table."""
    ordered = order(backends)
    return ordered, build([identity(a, p) for a, p in ordered], m)


def changed(old: Sequence[int], new: Sequence[int]) -> list[int]:
    """Entries whose value differs (an empty side counts as all changed)."""
    if len(old) != len(new):
        return list(range(len(new)))
    # Compared and picked in C (map, compress): 16,381 entries in about
    # 0.2 ms, a Python loop over them 1 ms.
    return list(compress(range(len(new)), map(ne, old, new)))


def flow_hash(saddr16: bytes, sport: int, dport: int, proto: int) -> int:
    """The hash of a flow that picks its entry (modulo M): its source
    address (16 bytes, IPv4-mapped) and port, the frontend's port and the
    protocol. Not the destination address: a NodePort flow moved to
    another node reaches that node's own address, and the same entry must
    answer there (every frontend of one backend set has the same table)."""
    h = FNV_OFFSET
    for b in saddr16 + sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes((proto,)):
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h
