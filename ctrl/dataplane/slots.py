"""Slot assignment: which slot of a frontend each of its backends takes.

A new flow picks slot (random % count) in the datapath, so the slots
0..count-1 must all name a backend. Slots move as little as possible: a
backend that stays keeps its slot, a new one fills a hole or is appended,
and holes left at the end are filled by moving the last slot into them.
Removing one backend of 100 rewrites at most one slot and deletes one.

One implementation, `fill`, serves both ways in: a frontend planned in full
(`assign`: the holes and the additions found by comparing what it holds
with what is wanted, O(frontend)) and a planned delta (the caller knows the
removed backends' slots through its slot index and the added backends:
O(change)).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from .changeset import Rows, slot_rows


def fill(
    sid: int,
    slots: list[int | None],
    holes: Sequence[int],
    added: Sequence[int],
    slot_of: dict[int, int] | None = None,
    writes: Rows | None = None,
) -> Rows:
    """Change `slots` (backend id per slot of frontend `sid`) in place:
    the `added` backends fill the `holes` (ascending slot numbers whose
    backend leaves), lowest first, then are appended; holes left over take
    the last slot, so none is left below the count. Returns the slot writes
    ((svc_id, slot, backend id) rows) in ascending slot order: appended to
    `writes` when given (a change set's, after the rows it holds), else in
    rows of their own. slot_of (backend -> slot), when given, is kept up to
    date with the slots that move."""
    if writes is None:
        writes = slot_rows()
    _, at, to = writes.cols
    k = min(len(holes), len(added))
    if k:
        # The holes filled in C: a one-slice change fills 100.
        into, taking = holes[:k], added[:k]
        deque(map(slots.__setitem__, into, taking), maxlen=0)
        at.extend(into)
        to.extend(taking)
        if slot_of is not None:
            slot_of.update(zip(taking, into, strict=True))
    rest = added[k:]
    if rest:
        # Appended in bulk (extend stays in C): a new frontend of 100,000
        # backends takes this path and nothing else.
        start = len(slots)
        slots.extend(rest)
        at.extend(range(start, start + len(rest)))
        to.extend(rest)
        if slot_of is not None:
            slot_of.update(zip(rest, range(start, start + len(rest)), strict=False))
    left = holes[k:]
    for h in left:
        slots[h] = None
    for h in left:
        while slots and slots[-1] is None:
            slots.pop()
        if h >= len(slots):
            break
        moved = slots.pop()
        slots[h] = moved
        at.append(h)
        to.append(moved)
        if slot_of is not None:
            slot_of[moved] = h  # type: ignore[index]
    while slots and slots[-1] is None:
        slots.pop()
    writes.fill_first(sid)
    return writes


def assign(sid: int, slots: list[int | None], wanted: Sequence[int], writes: Rows | None = None) -> Rows:
    """Bring `slots` (as fill) to hold the `wanted` backend ids, each once.
    A slot whose backend is not wanted, is missing (None: a slot an adopted
    frontend lacked) or repeats an earlier slot's is a hole; wanted backends
    not in a slot are added, in `wanted` order."""
    if not slots:  # a new frontend: wanted's order, duplicates once
        return fill(sid, slots, (), list(dict.fromkeys(wanted)), writes=writes)
    want = set(wanted)
    present: set[int] = set()
    holes = []
    for i, b in enumerate(slots):
        if b is not None and b in want and b not in present:
            present.add(b)
        else:
            holes.append(i)
    added = [b for b in dict.fromkeys(wanted) if b not in present]
    return fill(sid, slots, holes, added, writes=writes)


def assign_slots(current: list[int | None], wanted: list[int]) -> list[int]:
    """The slot list `assign` makes of `current` for `wanted` (a copy)."""
    slots = list(current)
    assign(0, slots, wanted)
    return slots  # type: ignore[return-value]
