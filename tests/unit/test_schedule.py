"""ctrl.runtime.schedule alone, on an injected clock: when a sync is due,
and what it covers (kube-proxy's bounded-frequency runner's rules)."""

from __future__ import annotations

import time

import pytest

from ctrl.runtime.health import Health, StatusBoard, SyncStatus
from ctrl.runtime.schedule import Retries, Schedule


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def synced(s: Schedule, clock: Clock, owners=(), rejected=(), failed=(), resync=()) -> None:
    s.synced(clock(), set(owners), set(rejected), set(failed), set(resync))


def started(**kw) -> tuple[Schedule, Clock]:
    """A schedule whose first (full) sync is done at t=1000."""
    clock = Clock()
    s = Schedule(clock, **kw)
    assert not s.reconcile_due(clock())  # as the agent's first step asks
    assert s.due(clock()) and s.need_full  # the first sync is a full one, at once
    synced(s, clock)
    assert not s.due(clock()) and not s.pending()
    return s, clock


def test_retries_double_up_to_the_cap_and_a_success_forgets():
    r = Retries(first=5.0, most=60.0)
    delays = [r.failed("default/a", 0.0, "failed") for _ in range(6)]
    assert delays == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    r.failed("default/b", 0.0, "rejected")
    assert r.due(4.9) == set() and r.due(5.0) == {"default/b"} and r.due(60.0) == {"default/a", "default/b"}
    assert r.owners("failed") == {"default/a"} and r.owners("rejected") == {"default/b"}
    r.succeeded(["default/a"])
    assert "default/a" not in r and r.failed("default/a", 100.0, "failed") == 5.0


def test_a_change_is_due_at_once_and_a_burst_waits_out_the_min_sync_period():
    s, clock = started(min_sync_period=0.5)
    clock.t += 10  # a quiet spell
    assert s.burst_left(clock()) <= 0  # nothing to wait for: sync at once
    s.changed({"default/web"})
    assert s.due(clock()) and s.pending()
    synced(s, clock, owners={"default/web"})
    clock.t += 0.2  # within min_sync_period of that sync: take the burst for 0.3 s more
    assert s.burst_left(clock()) == pytest.approx(0.3)
    clock.t += 0.3
    assert s.burst_left(clock()) == pytest.approx(0.0)


def test_a_service_that_failed_is_retried_alone_with_backoff():
    s, clock = started(retry_period=5.0, retry_max=60.0)
    s.changed({"default/a", "default/b"})
    assert s.due(clock())
    assert s.service_failed("default/a", clock()) == 5.0
    synced(s, clock, owners={"default/a", "default/b"}, failed={"default/a"})
    assert s.failing() == {"default/a"}
    clock.t += 4.9
    assert not s.due(clock())
    clock.t += 0.1
    assert s.due(clock()) and s.dirty == {"default/a"} and not s.need_full
    assert s.service_failed("default/a", clock()) == 10.0  # failed again: twice as long
    synced(s, clock, owners={"default/a"}, failed={"default/a"})
    clock.t += 9.9
    assert not s.due(clock())
    clock.t += 0.1
    assert s.due(clock())
    synced(s, clock, owners={"default/a"})  # written at last: forgotten
    assert not s.failing() and not s.due(clock() + 1000)


def test_a_service_that_does_not_fit_is_retried_until_it_does():
    s, clock = started(retry_period=5.0)
    s.changed({"default/big"})
    assert s.due(clock())
    synced(s, clock, owners={"default/big"}, rejected={"default/big"})
    assert s.rejected() == {"default/big"} and not s.pending()
    clock.t += 5.0
    assert s.due(clock()) and s.dirty == {"default/big"}


def test_a_failed_sync_is_retried_in_full_after_the_retry_period():
    s, clock = started(retry_period=5.0)
    clock.t += 60.0
    s.full_needed()  # the periodic check found a difference
    assert s.due(clock())
    s.sync_failed(clock())  # the full sync could not write the node config
    assert s.pending() and s.need_full
    clock.t += 4.9
    assert not s.due(clock())
    clock.t += 0.1
    assert s.due(clock()) and s.need_full


def test_changes_do_not_bring_a_failed_full_sync_forward():
    # A failed full sync leaves its Services dirty; they, new changes, a
    # Service's retry or a drain's end must not make it due before
    # retry_period (it would fail again on every loop turn).
    s, clock = started(retry_period=5.0)
    s.changed({"default/a"})
    assert s.due(clock())
    assert s.service_failed("default/b", clock()) == 5.0
    s.sync_failed(clock())
    for _ in range(49):
        clock.t += 0.1
        s.changed({"default/c"})
        assert not s.due(clock(), drain_end=clock() - 1.0), clock.t
    clock.t += 0.1
    assert s.due(clock()) and s.need_full and {"default/a", "default/b", "default/c"} <= s.dirty


def test_services_waiting_for_a_freed_frontend_are_synced_next():
    s, clock = started()
    s.changed({"default/a"})
    synced(s, clock, owners={"default/a"}, resync={"default/b"})
    assert s.dirty == {"default/b"} and s.due(clock())


def test_the_periodic_check_is_due_every_period_and_syncs_nothing_by_itself():
    clock = Clock()
    s = Schedule(clock, resync_period=60.0, retry_period=5.0)
    assert not s.reconcile_due(clock())  # the period counts from the first step
    clock.t += 70.0
    assert not s.reconcile_due(clock())  # never before a first sync
    synced(s, clock)
    # The agent checks the maps a chunk at a time; only a difference it
    # finds asks for a full sync (full_needed).
    assert s.reconcile_due(clock()) and not s.need_full and not s.due(clock())
    clock.t += 59.9
    assert not s.reconcile_due(clock())
    clock.t += 0.1
    assert s.reconcile_due(clock())


def test_a_repair_is_a_full_sync_at_once_even_right_after_a_sync():
    s, clock = started(retry_period=5.0)
    clock.t += 60.0
    s.changed({"default/a"})
    synced(s, clock, owners={"default/a"})
    clock.t += 0.1
    s.full_needed()  # a re-read after a failure waits for retry_period...
    assert not s.due(clock())
    s.repair_needed()  # ...one after the periodic check found a difference does not
    assert s.due(clock()) and s.need_full


def test_no_periodic_reconcile_with_a_sync_period_of_zero():
    s, clock = started(resync_period=0.0)
    clock.t += 1e6
    assert not s.reconcile_due(clock())


def test_the_end_of_a_drain_is_due():
    s, clock = started()
    end = clock() + 30.0
    assert not s.due(clock(), drain_end=end)
    clock.t = end
    assert s.due(clock(), drain_end=end) and not s.need_full and not s.dirty


def test_interfaces_are_looked_at_every_interface_period():
    clock = Clock()
    s = Schedule(clock, interface_period=1.0)
    assert s.interfaces_due(clock())
    assert not s.interfaces_due(clock() + 0.9)
    assert s.interfaces_due(clock() + 1.0)


def test_health_reads_the_published_status_only():
    board = StatusBoard()
    health = Health(board, stale_after=60.0)
    assert health.status(count=False)[0] == 503  # before the first sync
    now = time.time()
    board.publish(SyncStatus(last_ok=now, pending=False))
    assert health.status(count=False)[0] == 200
    board.publish(SyncStatus(last_ok=now - 120, pending=False))  # nothing to do: healthy however old
    assert health.status(count=False)[0] == 200
    board.publish(SyncStatus(last_ok=now - 120, pending=True))  # changes wait, no sync for 120 s
    code, body = health.status(count=False)
    assert code == 503 and body["lastUpdated"]


def test_auto_waits_as_long_as_the_last_sync_took_at_most_a_second():
    s, clock = started(min_sync_period=None)
    s.sync_took(clock(), 0.004)  # one slice changed
    assert s.burst_left(clock()) == pytest.approx(0.004)
    clock.t += 0.003
    assert s.burst_left(clock()) == pytest.approx(0.001)
    clock.t += 0.002
    assert s.burst_left(clock()) < 0  # a change now syncs at once
    s.sync_took(clock(), 0.5)  # many Services changed at once
    assert s.burst_left(clock()) == pytest.approx(0.5)
    s.sync_took(clock(), 2.5)
    assert s.burst_left(clock()) == pytest.approx(1.0)
    s.sync_took(clock(), 2.5, full=True)  # the first sync, or a repair
    assert s.burst_left(clock()) == 0.0


def test_a_fixed_min_sync_period_does_not_follow_what_a_sync_took():
    s, clock = started(min_sync_period=0.1)
    s.sync_took(clock(), 0.004)
    assert s.burst_left(clock()) == pytest.approx(0.1)
    s.sync_took(clock(), 2.0)
    assert s.burst_left(clock()) == pytest.approx(0.1)
