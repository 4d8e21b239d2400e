"""A change set: the map writes that take the kernel from what is
programmed to what is wanted, in the order that keeps every packet
consistent. ctrl.dataplane.programmed computes one per sync; the writer
(ctrl.dataplane.apply) writes it, whole or Service by Service."""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from typing import Any

from ..model.plan import Backend, FKey


class Rows:
    """A list of rows of one shape kept as one column per field: a list
    of objects, or an array of unsigned 32-bit ints (typecode "I"). A full
    sync writes a row per backend and per slot; as tuples, S3's 250,000 of
    each cost ~35 MiB at the sync's peak, as columns a tenth of it, and the
    writer packs the columns without walking rows. Reads as the list of
    tuples it stands for (iteration, len, slices, +, ==)."""

    __slots__ = ("cols",)

    def __init__(self, codes: str, rows: Iterable[tuple] = ()):
        """codes: per field, "I" (an array of __u32) or "O" (a list)."""
        self.cols: tuple[Any, ...] = tuple(array("I") if c == "I" else [] for c in codes)
        if rows:
            self.extend(rows)

    def _like(self, cols) -> Rows:
        r = Rows.__new__(Rows)
        r.cols = tuple(cols)
        return r

    def __len__(self) -> int:
        return len(self.cols[0])

    def __bool__(self) -> bool:
        return bool(self.cols[0])

    def __iter__(self) -> Iterator[tuple]:
        return zip(*self.cols, strict=True)

    def __getitem__(self, i: slice) -> Rows:
        return self._like(c[i] for c in self.cols)

    def __add__(self, other: Rows) -> Rows:
        return self._like(a + b for a, b in zip(self.cols, other.cols, strict=True))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Rows | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Rows({list(self)!r})"

    def append(self, row: tuple) -> None:
        for c, v in zip(self.cols, row, strict=True):
            c.append(v)

    def extend(self, rows: Iterable[tuple]) -> None:
        if isinstance(rows, Rows):
            self.extend_columns(*rows.cols)
            return
        rows = list(rows)
        if rows:
            self.extend_columns(*zip(*rows, strict=True))

    def extend_columns(self, *cols: Iterable) -> None:
        """One iterable per field, of one length."""
        for c, v in zip(self.cols, cols, strict=True):
            c.extend(v)

    def fill_first(self, first: Any) -> None:
        """Give the rows added to the other columns since the first one was
        last extended `first` as their first field."""
        head = self.cols[0]
        head.extend(repeat(first, len(self.cols[1]) - len(head)))


def slot_rows(rows: Iterable[tuple[int, int, int]] = ()) -> Rows:
    """(svc_id, slot, backend id) rows."""
    return Rows("III", rows)


def backend_rows(rows: Iterable[tuple[int, Backend]] = ()) -> Rows:
    """(backend id, backend) rows."""
    return Rows("OO", rows)


# The ChangeSet lists, each an ordered list of map writes or removed pairs.
_LISTS = (
    "be_evict",
    "be_upd",
    "be_mark",
    "slot_upd",
    "mgl_upd",
    "mgl_ptr_upd",
    "svc_upd",
    "name_upd",
    "src_upd",
    "src_del",
    "svc_del",
    "slot_del",
    "mgl_ptr_del",
    "mgl_del",
    "be_del",
    "name_del",
    "removed",
)


_lists_of = attrgetter(*_LISTS)


@dataclass
class ChangeSet:
    """Map writes in the order that keeps every packet consistent:
    backends and slots exist before a count points at them, and a count is
    lowered before the slots above it go."""

    # Draining backends removed early to make room (written first).
    be_evict: list[int] = field(default_factory=list)
    be_upd: Rows = field(default_factory=backend_rows)  # (id, backend)
    # (id, backend, flags, drain end) of backends that start or stop
    # draining; the drain end (seconds on the caller's clock, 0.0 when not
    # draining) goes into the backend's entry, so it outlives this process.
    be_mark: list[tuple[int, Backend, int, float]] = field(default_factory=list)
    slot_upd: Rows = field(default_factory=slot_rows)  # svc_id, slot, be_id
    # Maglev writes (ctrl.dataplane.tables): a table's changed chunks
    # (table id, chunk, its MGL_CHUNK backend ids packed), then the
    # frontends' pointers to it (svc_id, table id, M); deletes go the other
    # way round: pointers (svc_id), then chunks (table id, chunk).
    mgl_upd: list[tuple[int, int, bytes]] = field(default_factory=list)
    mgl_ptr_upd: list[tuple[int, int, int]] = field(default_factory=list)
    svc_upd: list[tuple[FKey, tuple[int, int, int, int, int]]] = field(default_factory=list)
    name_upd: list[tuple[int, str]] = field(default_factory=list)
    # loadBalancerSourceRanges entries (svc_id, addr16, prefix length over
    # 128 bits): written before the frontend that flags them, deleted after
    # it, so no packet meets the flag without its ranges.
    src_upd: list[tuple[int, bytes, int]] = field(default_factory=list)
    src_del: list[tuple[int, bytes, int]] = field(default_factory=list)
    svc_del: list[FKey] = field(default_factory=list)
    slot_del: list[tuple[int, int]] = field(default_factory=list)
    mgl_ptr_del: list[int] = field(default_factory=list)
    mgl_del: list[tuple[int, int]] = field(default_factory=list)
    be_del: list[int] = field(default_factory=list)
    name_del: list[int] = field(default_factory=list)
    # Backends that stopped serving some UDP frontend: (frontend, backend)
    # pairs whose conntrack entries and connected host sockets are purged
    # after the write (a TCP frontend's flows drain: none are listed).
    removed: list[tuple[FKey, Backend]] = field(default_factory=list)
    services: set[str] = field(default_factory=set)  # owners that changed
    # Owners not programmed (their previous entries kept), and why: a map
    # would overflow (retried: room may come), or the Service itself
    # cannot be programmed as it is (refused until it changes).
    rejected: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    # (claimant, holder, frontend key): a Service claiming a frontend
    # another one serves, new in this sync (the holder keeps it).
    conflicts: list[tuple[str, str, FKey]] = field(default_factory=list)
    # Owners waiting for a frontend this sync freed: plan them again.
    resync: set[str] = field(default_factory=set)
    # Owners whose writes failed (set by the agent after a per-Service
    # write, ctrl.dataplane.apply.Writer.apply_each), and why.
    failed: dict[str, str] = field(default_factory=dict)
    # Rows of be_upd and slot_upd already in the kernel, written while the
    # diff went on (ctrl.dataplane.apply.Writer.stream): the write leaves
    # them out.
    written: tuple[int, int] = (0, 0)
    # The slot tables whose slots slot_upd writes, each by one pass that
    # names every slot of it once (ctrl.dataplane.programmed): then no slot
    # is there twice, and the writer may write the rows in any order (two
    # threads, ctrl.dataplane.maps). None: not known (a table written
    # twice, rows given by a test or cut out by split()): two rows may
    # name one slot, the later to win, and the rows keep their order.
    slot_tables: set[int] | None = field(default=None, repr=False)
    # (owner, length of every list before its entries): each owner's
    # entries are one run in each list, so split() can cut them out.
    marks: list[tuple[str | None, tuple[int, ...]]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        # Rows given as a list of tuples (tests, a per-Service rewrite).
        if not isinstance(self.be_upd, Rows):
            self.be_upd = backend_rows(self.be_upd)
        if not isinstance(self.slot_upd, Rows):
            self.slot_upd = slot_rows(self.slot_upd)

    def lengths(self) -> tuple[int, ...]:
        return tuple(map(len, _lists_of(self)))  # in C: a mark per owner of a full sync

    def mark(self, owner: str | None) -> None:
        """The entries from here on are owner's (None: the node's)."""
        self.marks.append((owner, self.lengths()))

    def split(self) -> tuple[list[tuple[str, ChangeSet]], ChangeSet]:
        """This change set as one part per owner, in the order they were
        synced, and the rest: what belongs to no Service (drains started
        and ended, orphans of a restart removed). Writing the parts one
        after another and then the rest writes the same entries; a part
        holds its owner's writes in phase order, so one Service can be
        written (or fail) alone."""
        parts: list[tuple[str, ChangeSet]] = []
        marks = self.marks
        for (owner, start), (_, end) in zip(marks, marks[1:], strict=False):
            if owner is None or start == end:
                continue
            part = ChangeSet(**{f: getattr(self, f)[a:b] for f, a, b in zip(_LISTS, start, end, strict=True)})
            part.services = self.services & {owner}
            parts.append((owner, part))
        first = marks[0][1] if marks else self.lengths()
        last = marks[-1][1] if marks else self.lengths()
        rest = ChangeSet()
        for f, a, b in zip(_LISTS, first, last, strict=True):
            entries = getattr(self, f)
            setattr(rest, f, entries[:a] + entries[b:])
        return parts, rest

    def __len__(self) -> int:
        return (
            len(self.be_evict)
            + len(self.be_upd)
            + len(self.be_mark)
            + len(self.slot_upd)
            + len(self.mgl_upd)
            + len(self.mgl_ptr_upd)
            + len(self.mgl_ptr_del)
            + len(self.mgl_del)
            + len(self.svc_upd)
            + len(self.name_upd)
            + len(self.svc_del)
            + len(self.slot_del)
            + len(self.be_del)
            + len(self.name_del)
            + len(self.src_upd)
            + len(self.src_del)
        )

    def summary(self) -> dict[str, int]:
        return {
            "services": len(self.services),
            "frontends_set": len(self.svc_upd),
            "frontends_deleted": len(self.svc_del),
            "slots_set": len(self.slot_upd),
            "slots_deleted": len(self.slot_del),
            "maglev_set": len(self.mgl_upd) + len(self.mgl_ptr_upd),
            "maglev_deleted": len(self.mgl_del) + len(self.mgl_ptr_del),
            "backends_added": len(self.be_upd),
            "backends_deleted": len(self.be_del) + len(self.be_evict),
        }
