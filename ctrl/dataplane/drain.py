"""Draining: a backend no frontend uses any more stays in the backend map
for the drain period, flagged SP_BE_F_DRAINING with its deadline: flows
already on it keep going (a terminating Pod finishes its requests), while
no new flow can pick it (no slot names it). The deadline is in the kernel
too (sp_backend.drain_end), so a restarted or re-adopting agent keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator


class Drains:
    """Backend id -> when its drain ends (seconds on the caller's clock),
    kept in time order: the due ones are at the front, so finding them
    costs O(due), not O(draining), which during a rolling update of a big
    cluster is every endpoint it replaced in the last drain period."""

    def __init__(self, deadlines: dict[int, float] | None = None):
        self.until: dict[int, float] = dict(sorted((deadlines or {}).items(), key=lambda kv: (kv[1], kv[0])))

    def __bool__(self) -> bool:
        return bool(self.until)

    def __contains__(self, bid: int) -> bool:
        return bid in self.until

    def __len__(self) -> int:
        return len(self.until)

    def __iter__(self) -> Iterator[int]:
        return iter(self.until)

    def start(self, bid: int, until: float) -> None:
        """Add a deadline, keeping time order. Deadlines read back from the
        kernel may lie later than a new one (the previous agent ran with a
        longer --drain-period): then re-sort, once."""
        d = self.until
        last = next(reversed(d.values())) if d else None
        d[bid] = until
        if last is not None and until < last:
            self.until = dict(sorted(d.items(), key=lambda kv: kv[1]))

    def stop(self, bid: int) -> bool:
        """End a drain early (the backend serves again, or goes now)."""
        return self.until.pop(bid, None) is not None

    def next_end(self) -> float | None:
        """When the next drain ends, if any."""
        return next(iter(self.until.values())) if self.until else None

    def due(self, now: float, in_use: Callable[[int], bool]) -> Iterator[tuple[int, bool]]:
        """The drains to end at `now`, in time order, and whether each
        backend is in use again (to serve: normally undrained when it was
        used again) or its deadline passed (to delete). Each is taken out
        of the drains as it is yielded."""
        d = self.until
        while d:
            bid, until = next(iter(d.items()))
            if in_use(bid):
                del d[bid]
                yield bid, True
            elif now >= until:
                del d[bid]
                yield bid, False
            else:
                return

    def oldest(self, n: int, skip: Callable[[int], bool]) -> list[int]:
        """Up to n draining backends, oldest first, leaving out those `skip`
        says to spare."""
        out: list[int] = []
        for bid in self.until:
            if len(out) >= n:
                break
            if not skip(bid):
                out.append(bid)
        return out
