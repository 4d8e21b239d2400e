"""The C fill of Maglev tables (ctrl/dataplane/native.c, build/libsliceproxy.so)
against the Python reference (ctrl.model.maglev): the same table for the
same turns, at every size, and a clear error instead of a hang on bad
input. `make` builds the library; the tier fails without it."""

from __future__ import annotations

import random
from array import array

import pytest

from ctrl.dataplane import native
from ctrl.model import maglev

M = maglev.DEFAULT_SIZE


def test_the_library_is_built_and_loads():
    assert native.missing() is None, native.missing()


def reference(idents: list[bytes], ids: list[int], m: int) -> list[int]:
    return [ids[i] for i in maglev.build(idents, m)]


def packed(idents: list[bytes], m: int) -> list[int]:
    return [native.pack(*maglev.hashed(i, m)) for i in idents[:m]]


@pytest.mark.parametrize(
    "n,m",
    [
        (1, M),
        (2, M),
        (3, maglev.MIN_SIZE),
        (100, M),
        (1000, maglev.MIN_SIZE),
        (M, M),
        (M + 500, M),
        (3000, 1021),
        # Tables shorter than the four entries a walk's first read takes
        # (it wraps around), and a few entries more.
        (2, 2),
        (3, 3),
        (2, 5),
        (5, 7),
        (9, 7),
    ],
)
def test_the_same_table_as_the_reference(n, m):
    rnd = random.Random(n * 7 + m)
    idents = [rnd.randbytes(18) for _ in range(n)]
    ids = rnd.sample(range(1, 10 * n + 10), min(n, m))
    got = native.fill(packed(idents, m), ids, m).tolist()
    assert got == reference(idents, ids, m)
    assert len(got) == m and set(got) == set(ids)  # every backend in its first turn has an entry


@pytest.mark.parametrize("lib", [True, False], ids=["C", "Python"])
def test_permutations_hashed_as_the_reference(monkeypatch, lib):
    """native.perms, in C (its own BLAKE2b) and without the library:
    maglev.hashed's (offset, skip) of each record's first 18 bytes, for
    tables of every size down to 2 (skip then always 1), whatever follows
    the identity in a record; a table of fewer than 2 entries is refused
    (a skip is modulo m - 1), none hashed."""
    if not lib:
        monkeypatch.setattr(native, "library", lambda: None)
    rnd = random.Random(11)
    idents = [rnd.randbytes(18) for _ in range(300)] + [bytes(18), b"\xff" * 18]
    for m in (2, 3, maglev.MIN_SIZE, 1021, M, 65537):
        recs = b"".join(i + rnd.randbytes(5) for i in idents)
        assert native.perms(recs, 23, m).tolist() == [native.pack(*maglev.hashed(i, m)) for i in idents]
    assert native.perms(b"", 23, M).tolist() == []
    with pytest.raises(ValueError):
        native.perms(b"".join(idents), 18, 1)


def test_the_python_fill_serves_without_the_library(monkeypatch):
    rnd = random.Random(5)
    idents = [rnd.randbytes(18) for _ in range(50)]
    ids = list(range(1, 51))
    want = native.fill(packed(idents, M), ids, M)
    monkeypatch.setattr(native, "library", lambda: None)
    assert native.missing() is not None
    assert native.fill(packed(idents, M), ids, M) == want


def test_no_backends_no_table():
    assert len(native.fill([], [], M)) == 0


@pytest.mark.parametrize(
    "perm,m",
    [
        (native.pack(M, 1), M),  # offset past the table
        (native.pack(0, 0), M),  # a skip of 0 never moves
        (native.pack(0, M), M),  # a skip of M neither
    ],
)
def test_a_permutation_out_of_range_is_an_error(perm, m):
    with pytest.raises(ValueError, match="out of range"):
        native.fill([native.pack(0, 1), perm], [1, 2], m)


def test_a_walk_that_cannot_reach_a_free_entry_is_an_error_not_a_hang():
    # m not prime: a skip of m / 2 visits two entries only. The second
    # backend's walk meets the first's two entries taken and would loop.
    m = 1024
    with pytest.raises(ValueError, match="M prime"):
        native.fill([native.pack(0, 512), native.pack(0, 512)], [1, 2], m)


def turns(rnd: random.Random, n: int) -> list[bytes]:
    """n distinct turns (native.TURN bytes), sorted; few distinct first
    bytes, so they share long prefixes as backends' addresses do."""
    got: set[bytes] = set()
    while len(got) < n:
        got.add(bytes([rnd.randrange(3)]) * 15 + rnd.randbytes(native.TURN - 15))
    return sorted(got)


@pytest.mark.parametrize("lib", [True, False], ids=["C", "Python"])
def test_turns_merged_as_sorting_them_anew(monkeypatch, lib):
    """native.merge_turns, in C and without the library: the turns without
    those gone and with those added, sorted, each with its id (its last 4
    bytes, big-endian) and permutation; gone and added runs next to each
    other and scattered, at both ends, from and to nothing; a turn both
    gone and added stays. Every third case into buffers given (a last
    merge's, of any size and content), which come back resized."""
    if not lib:
        monkeypatch.setattr(native, "library", lambda: None)
    rnd = random.Random(9)
    for case in range(300):
        k = rnd.randrange(0, 80)
        spare = (
            (bytearray(rnd.randbytes(k * native.TURN)), array("I", range(k)), array(native.U64, range(k)))
            if case % 3 == 0
            else None
        )
        pool = turns(rnd, rnd.randrange(0, 60))
        have = sorted(rnd.sample(pool, rnd.randrange(0, len(pool) + 1)))
        perm = {t: rnd.getrandbits(64) for t in pool}
        if case % 4 == 0 and have:  # one run, as a slice's endpoints make
            start = rnd.randrange(len(have))
            gone = have[start : start + rnd.randrange(1, 8)]
        else:
            gone = sorted(rnd.sample(have, rnd.randrange(0, len(have) + 1)))
        added = sorted(rnd.sample([t for t in pool if t not in have], rnd.randrange(0, len(pool) - len(have) + 1)))
        if gone and case % 5 == 0:
            added = sorted([*added, gone[0]])  # out and in again
        want = sorted((set(have) - set(gone)) | set(added))
        got = native.merge_turns(
            b"".join(have),
            array("I", [int.from_bytes(t[-4:], "big") for t in have]),
            array(native.U64, [perm[t] for t in have]),
            b"".join(gone),
            b"".join(added),
            array(native.U64, [perm[t] for t in added]),
            spare,
        )
        assert got is not None, case
        keys, ids, perms = got
        if spare is not None and lib:
            assert all(a is b for a, b in zip(got, spare, strict=True)), case
        assert bytes(keys) == b"".join(want), case
        assert ids.tolist() == [int.from_bytes(t[-4:], "big") for t in want], case
        assert perms.tolist() == [perm[t] for t in want], case


@pytest.mark.parametrize("lib", [True, False], ids=["C", "Python"])
def test_turns_merge_refuses_a_gone_turn_not_there_or_an_added_one_there(monkeypatch, lib):
    if not lib:
        monkeypatch.setattr(native, "library", lambda: None)
    have = turns(random.Random(3), 10)
    ids = array("I", range(10))
    perms = array(native.U64, range(10))
    none = array(native.U64)
    absent = bytes(native.TURN)  # below every turn of have
    assert native.merge_turns(b"".join(have), ids, perms, absent, b"", none) is None
    assert native.merge_turns(b"".join(have), ids, perms, have[9] + b"\xff" * native.TURN, b"", none) is None
    assert native.merge_turns(b"".join(have), ids, perms, b"", have[4], array(native.U64, [1])) is None
    assert native.merge_turns(b"", array("I"), none, have[0], b"", none) is None


@pytest.mark.parametrize("lib", [True, False], ids=["C", "Python"])
def test_a_heap_of_turns_gives_them_back_smallest_first(monkeypatch, lib):
    """native.heap_push and heap_take, in C and without the library:
    turns pushed in batches (small ones into a big heap, big batches
    into a small one, which is made again whole) and taken out a few at
    a time come out as a sorted multiset model says; asking for more
    than there are gives all."""
    if not lib:
        monkeypatch.setattr(native, "library", lambda: None)
    rnd = random.Random(13)
    heap = bytearray(b"".join(turns(rnd, 50)))  # sorted: a heap
    model = sorted(native.split_turns(heap))
    for step in range(200):
        batch = [
            bytes([rnd.randrange(3)]) * 15 + rnd.randbytes(native.TURN - 15) for _ in range(rnd.choice((0, 1, 5, 80)))
        ]
        native.heap_push(heap, b"".join(batch))
        model = sorted(model + batch)
        k = rnd.randrange(0, 12) if step % 50 else len(model) + 3
        got = native.heap_take(heap, k)
        assert got == model[:k], step
        model = model[k:]
        assert len(heap) == len(model) * native.TURN
    assert sorted(native.split_turns(heap)) == model
