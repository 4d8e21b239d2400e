"""The C fill of Maglev tables (ctrl/dataplane/native.c, build/libsliceproxy.so)
against the Python reference (ctrl.model.maglev): the same table for the
same turns, at every size, and a clear error instead of a hang on bad
input. `make` builds the library; the tier fails without it."""

from __future__ import annotations

import random

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
    [(1, M), (2, M), (3, maglev.MIN_SIZE), (100, M), (1000, maglev.MIN_SIZE), (M, M), (M + 500, M), (3000, 1021)],
)
def test_the_same_table_as_the_reference(n, m):
    rnd = random.Random(n * 7 + m)
    idents = [rnd.randbytes(18) for _ in range(n)]
    ids = rnd.sample(range(1, 10 * n + 10), min(n, m))
    got = native.fill(packed(idents, m), ids, m).tolist()
    assert got == reference(idents, ids, m)
    assert len(got) == m and set(got) == set(ids)  # every backend in its first turn has an entry


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
