"""Draining: a backend no frontend uses any more stays in the backend map
for the drain period, flagged SP_BE_F_DRAINING with its deadline: flows
already on it keep going (a terminating Pod finishes its requests), while
no new flow can pick it (no slot names it). The deadline is in the kernel
too (sp_backend.drain_end), so a restarted or re-adopting agent keeps it.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator


class Drains:
    """Backend id -> when its drain ends (seconds on the caller's clock),
    with a heap of (deadline, id) beside it: the due ones are at the top,
    so finding them costs O(due log n), not O(draining), which during a
    rolling update of a big cluster is every endpoint it replaced in the
    last drain period. A drain stopped early leaves its heap entry behind,
    skipped when it comes up (and compacted away when stale ones are the
    majority). (Time order is not kept by the dict itself: a dict whose
    oldest entries are deleted one by one scans its deleted slots on every
    look at its first entry until it is rebuilt.)"""

    def __init__(self, deadlines: dict[int, float] | None = None):
        self.until: dict[int, float] = dict(sorted((deadlines or {}).items(), key=lambda kv: (kv[1], kv[0])))
        self._heap: list[tuple[float, int]] = [(t, b) for b, t in self.until.items()]  # sorted: a heap

    def __bool__(self) -> bool:
        return bool(self.until)

    def __contains__(self, bid: int) -> bool:
        return bid in self.until

    def __len__(self) -> int:
        return len(self.until)

    def __iter__(self) -> Iterator[int]:
        return iter(self.until)

    def start_many(self, bids: Iterable[int], until: float) -> None:
        """Add one deadline for several backends."""
        d, h, push = self.until, self._heap, heapq.heappush
        for bid in bids:
            d[bid] = until
            push(h, (until, bid))

    def stop(self, bid: int) -> bool:
        """End a drain early (the backend serves again, or goes now)."""
        if self.until.pop(bid, None) is None:
            return False
        if len(self._heap) > 64 and len(self._heap) > 2 * len(self.until):
            self._heap = [(t, b) for t, b in self._heap if self.until.get(b) == t]
            heapq.heapify(self._heap)
        return True

    def _top(self) -> tuple[float, int] | None:
        """The earliest live (deadline, id); stale heap entries above it
        (drains stopped, or started again with another deadline) go."""
        h, d = self._heap, self.until
        while h:
            t, b = h[0]
            if d.get(b) == t:
                return t, b
            heapq.heappop(h)
        return None

    def next_end(self) -> float | None:
        """When the next drain ends, if any."""
        top = self._top()
        return top[0] if top is not None else None

    def due(self, now: float, in_use: Callable[[int], bool]) -> Iterator[tuple[int, bool]]:
        """The drains to end at `now`, in time order, and whether each
        backend is in use again (to serve: normally undrained when it was
        used again) or its deadline passed (to delete). Each is taken out
        of the drains as it is yielded."""
        d, h = self.until, self._heap
        while True:
            top = self._top()
            if top is None:
                return
            until, bid = top
            if in_use(bid):
                serving = True
            elif now >= until:
                serving = False
            else:
                return
            heapq.heappop(h)
            del d[bid]
            yield bid, serving

    def oldest(self, n: int, skip: Callable[[int], bool]) -> list[int]:
        """Up to n draining backends, oldest first, leaving out those `skip`
        says to spare."""
        out: list[int] = []
        d = self.until
        for t, bid in sorted(self._heap):
            if len(out) >= n:
                break
            if d.get(bid) == t and bid not in out and not skip(bid):
                out.append(bid)
        return out
