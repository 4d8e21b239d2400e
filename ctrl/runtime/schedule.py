"""When to sync: the role of kube-proxy's bounded-frequency runner
(pkg/util/async), kept apart from what a sync does.

The agent tells the schedule what happened (Services changed, a sync
succeeded, a Service or a whole sync failed) and asks it what is due now:

- a change after a quiet spell syncs at once; changes within
  `min_sync_period` of the last sync wait for it to pass and become one
  sync (kube-proxy's --min-sync-period); with min_sync_period None
  (`--min-sync-period auto`) the wait is AUTO_FACTOR times what the last
  sync took, at most AUTO_MAX. A sync here costs about what its changes
  cost, not a rewrite of every rule, so coalescing saves little CPU and a
  fixed wait is mostly latency; the wait only keeps the loop from syncing
  more than about half its time in a stream of changes. (A larger factor
  feeds on itself: a longer wait gathers more changes, whose sync takes
  longer, which makes the next wait longer, up to the cap; at 20 slice
  writes a second on a 100,000-endpoint Service a factor of 10 did.)
- a Service that could not be written, or did not fit a map, is tried again
  alone after a delay that doubles with every failure (`Retries`);
- a failure that belongs to no Service makes the next sync a full one, not
  sooner than `retry_period` after it;
- every `resync_period` a check of the kernel maps against what was
  written (the agent runs it a chunk at a time between syncs:
  ctrl.dataplane.verify; only differences make it re-read the maps and
  plan every Service);
- the end of a backend's drain (the dataplane knows the next one);
- the interfaces are looked at again every `interface_period`.

Every time comes from the clock the agent passes in (seconds of
time.monotonic in production), so a test drives it without waiting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

# The longest wait before a Service that failed is tried again: the
# default --sync-period, so backoff never waits longer than a reconcile
# would.
RETRY_MAX = 60.0
# --min-sync-period auto: the wait after a sync, in multiples of what it
# took, and at most.
AUTO_FACTOR = 1.0
AUTO_MAX = 1.0


class Retries:
    """Services not programmed by their last sync, each tried again after
    a delay that starts at `first` seconds and doubles on every failure up
    to `most`: a write the kernel refused ("failed"), or a change that does
    not fit a map ("rejected": room may come). A success forgets it."""

    def __init__(self, first: float = 5.0, most: float = RETRY_MAX):
        self.first = first
        self.most = most
        self._due: dict[str, tuple[int, float, str]] = {}  # owner -> (failures, when, kind)

    def failed(self, owner: str, now: float, kind: str) -> float:
        """Record a failure; the seconds until the next try."""
        n = self._due[owner][0] + 1 if owner in self._due else 1
        delay = min(self.first * 2 ** (n - 1), self.most)
        self._due[owner] = (n, now + delay, kind)
        return delay

    def succeeded(self, owners: Iterable[str]) -> None:
        for owner in owners:
            self._due.pop(owner, None)

    def due(self, now: float) -> set[str]:
        return {o for o, (_, when, _) in self._due.items() if when <= now}

    def owners(self, kind: str) -> set[str]:
        return {o for o, (_, _, k) in self._due.items() if k == kind}

    def __contains__(self, owner: str) -> bool:
        return owner in self._due


class Schedule:
    def __init__(
        self,
        clock: Callable[[], float],
        min_sync_period: float | None = 0.1,
        resync_period: float = 60.0,
        retry_period: float = 5.0,
        retry_max: float = RETRY_MAX,
        interface_period: float = 1.0,
    ):
        self.clock = clock
        self.min_sync_period = min_sync_period  # None: auto
        self.last_sync_cost = 0.0  # seconds the last sync took
        self.resync_period = resync_period
        self.retry_period = retry_period
        self.interface_period = interface_period
        self.retries = Retries(retry_period, retry_max)
        # Services changed since their last sync; a full sync plans every one.
        self.dirty: set[str] = set()
        self.need_full = True  # the first sync after start is a full one
        self.retry_at = 0.0  # no full sync before this (after a failure)
        self.last_sync_at = 0.0
        self.synced_once = False
        self._next_resync: float | None = None
        self._next_interfaces = 0.0

    # -- what happened -----------------------------------------------------
    def changed(self, owners: Iterable[str]) -> None:
        """Services whose objects changed: plan them at the next sync."""
        self.dirty.update(owners)

    def full_needed(self) -> None:
        """The next sync plans every Service (the mirror was re-read)."""
        self.need_full = True

    def repair_needed(self) -> None:
        """The periodic check found the maps differ from what was written
        (the agent re-read them): a full sync at once, not held back by
        retry_period as one after a failure is."""
        self.need_full = True
        self.retry_at = 0.0

    def synced(
        self, now: float, owners: Iterable[str], rejected: Iterable[str], failed: Iterable[str], resync: Iterable[str]
    ) -> None:
        """A sync of `owners` wrote its maps at `now`: those `rejected` (a
        map would overflow) are tried again with backoff (as are those
        whose writes `failed`, told by service_failed), the others are
        done; `resync` waited for a frontend this sync freed and are
        planned next."""
        rejected, failed = set(rejected), set(failed)
        self.dirty.clear()
        self.dirty.update(resync)
        self.need_full = False
        self.retry_at = now + self.retry_period
        for owner in sorted(rejected):
            self.retries.failed(owner, now, "rejected")
        self.retries.succeeded(o for o in owners if o not in rejected and o not in failed)
        self.synced_once = True
        self.last_sync_at = self.clock()

    def service_failed(self, owner: str, now: float) -> float:
        """Writing a Service's entries failed: the seconds until it is tried again."""
        return self.retries.failed(owner, now, "failed")

    def sync_failed(self, now: float) -> None:
        """A failure that belongs to no Service: a full sync, after retry_period."""
        self.need_full = True
        self.retry_at = now + self.retry_period

    # -- what is due -------------------------------------------------------
    def pending(self) -> bool:
        """Changes wait to be synced (for /healthz)."""
        return bool(self.dirty) or self.need_full

    def sync_took(self, now: float, seconds: float, full: bool = False) -> None:
        """The last sync ended at `now` and took `seconds` (its whole work,
        the collection after it included). A full one (the first, a
        repair) says nothing of what the changes after it will cost: no
        wait after it under auto."""
        self.last_sync_at = now
        self.last_sync_cost = 0.0 if full else seconds

    def min_wait(self) -> float:
        """The least time between two syncs now."""
        if self.min_sync_period is not None:
            return self.min_sync_period
        return min(AUTO_MAX, AUTO_FACTOR * self.last_sync_cost)

    def burst_left(self, now: float) -> float:
        """Seconds to go on taking changes into the coming sync: a change
        within min_wait() of the last sync waits for the rest of it."""
        return self.last_sync_at + self.min_wait() - now

    def reconcile_due(self, now: float) -> bool:
        """Time for the periodic check of the maps (every resync_period once
        a sync succeeded)."""
        if self._next_resync is None:
            self._next_resync = now + self.resync_period
        if not (self.resync_period and self.synced_once and now >= self._next_resync):
            return False
        self._next_resync = now + self.resync_period
        return True

    def interfaces_due(self, now: float) -> bool:
        """Time to look for new interfaces (every interface_period)."""
        if now < self._next_interfaces:
            return False
        self._next_interfaces = now + self.interface_period
        return True

    def due(self, now: float, drain_end: float | None = None) -> bool:
        """Whether to sync now: Services changed or due for a retry (they
        join the changed ones), a full sync past its retry time, or the end
        of a drain (drain_end: the next one, if any)."""
        self.dirty |= self.retries.due(now)
        if self.need_full:
            # A full sync plans the changed Services too; after a failure
            # that belongs to no Service it waits for retry_period, and a
            # change meanwhile must not bring it forward (it would fail
            # again, every loop turn), nor must a drain's end.
            return now >= self.retry_at
        return bool(self.dirty or (drain_end is not None and now >= drain_end))

    def failing(self) -> set[str]:
        """Services whose writes fail and are retried (a metric's series)."""
        return self.retries.owners("failed")

    def rejected(self) -> set[str]:
        """Services that did not fit a map and are retried."""
        return self.retries.owners("rejected")
