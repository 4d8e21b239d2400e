"""The run loop without a kernel (writer None): coalescing and gating."""

import queue
import threading
import time

from ctrl.dataplane.programmed import Programmed
from ctrl.k8s.events import Event
from ctrl.k8s.objects import parse
from ctrl.model.state import ClusterState
from ctrl.runtime.agent import Agent
from ctrl.runtime.settings import Settings

from .helpers import endpoint_slice, eps, service


class QueueSource:
    """The source interface the agent reads: a queue of event lists."""

    def __init__(self, synced=True):
        self.events = queue.Queue()
        self.synced = synced


def run(agent):
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    return t


def wait(pred, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def slice_event(i):
    sl = parse(endpoint_slice(f"web-{i}", endpoints=eps(f"198.18.1.{i + 1}")))
    return [Event("upsert", "EndpointSlice", f"default/web-{i}", sl)]


def test_a_burst_within_min_sync_period_becomes_one_sync():
    src = QueueSource()
    agent = Agent(src, ClusterState(), Programmed(), writer=None, settings=Settings(min_sync_period=0.5))
    t = run(agent)
    try:
        src.events.put([Event("upsert", "Service", "default/web", parse(service()))])
        wait(lambda: agent.syncs == 1, "first sync")
        for i in range(20):
            src.events.put(slice_event(i))
        wait(lambda: not agent.schedule.dirty and src.events.empty() and agent.syncs >= 2, "burst synced")
        time.sleep(0.6)  # anything left would sync within one more period
        assert agent.syncs <= 3, agent.syncs
        assert len(agent.programmed.frontends[next(iter(agent.programmed.frontends))].slots) == 20
    finally:
        agent.stop()
        t.join(5)


def test_nothing_is_synced_before_the_source_has_listed_everything():
    src = QueueSource(synced=False)
    agent = Agent(src, ClusterState(), Programmed(), writer=None, settings=Settings(min_sync_period=0.0))
    t = run(agent)
    try:
        src.events.put([Event("upsert", "Service", "default/web", parse(service()))])
        wait(lambda: src.events.empty(), "event taken")
        time.sleep(0.3)
        assert agent.syncs == 0
        src.events.put(slice_event(0))
        src.synced = True
        wait(lambda: agent.syncs == 1, "first sync after the full list")
        # The first sync saw the slice queued before synced turned true.
        assert agent.programmed.owners() == {"default/web"}
        assert sum(len(f.slots) for f in agent.programmed.frontends.values()) == 1
    finally:
        agent.stop()
        t.join(5)


class Cyclic:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self):
        self.me = self


def test_events_are_taken_with_the_collector_paused():
    """A list's events reach the model with the collector paused, as
    their decoding was: otherwise the first allocation starts a collection
    walking every object just decoded, on the way to the first sync."""
    import gc

    state = ClusterState()
    enabled = []
    apply = state.apply

    def recording(ev):
        enabled.append(gc.isenabled())
        return apply(ev)

    state.apply = recording  # type: ignore[method-assign]
    agent = Agent(QueueSource(), state, Programmed(), writer=None)
    assert gc.isenabled()
    agent.take([Event("upsert", "Service", "default/web", parse(service()))] + slice_event(0))
    assert enabled == [False, False] and gc.isenabled()
    assert state.slices_of("default/web")  # and taken


def test_sync_freezes_what_it_built_and_a_quiet_turn_after_a_full_sync_collects_cycles():
    import gc
    import weakref

    clock = Clock()
    src = QueueSource()
    src.synced = True
    agent = Agent(src, ClusterState(), Programmed(), writer=None, clock=clock)
    agent.take([Event("upsert", "Service", "default/web", parse(service()))])
    try:
        agent.sync()  # the first, full
        assert not agent.schedule.need_full and gc.get_freeze_count() > 0
        agent.step(timeout=0)  # quiet: its collection
        ref = weakref.ref(Cyclic())  # garbage at once, but only a collection frees it
        agent.take(slice_event(0))
        agent.sync()  # partial: frozen, not collected
        gc.collect()
        assert ref() is not None  # frozen objects are out of the collector's reach
        agent.step(timeout=0)
        assert ref() is not None  # a quiet turn collects only when a collection is due
        agent.schedule.full_needed()
        agent.sync()
        assert ref() is not None  # a change arriving now is not kept waiting for the collection...
        src.events.put(slice_event(1))
        clock.t += 1
        agent.step(timeout=0)
        assert agent.programmed.owners() == {"default/web"} and ref() is not None
        agent.step(timeout=0)  # ...which the first quiet turn makes
        assert ref() is None
        ref = weakref.ref(Cyclic())
        agent.take(slice_event(2))
        clock.t += 601  # a long time without a full sync
        agent.sync()
        agent.step(timeout=0)
        assert ref() is None
    finally:
        gc.unfreeze()


def test_an_agent_that_never_pauses_collects_at_the_end_of_a_sync_after_a_while():
    import gc
    import weakref

    from ctrl.runtime.agent import COLLECT_WAIT_MAX

    clock = Clock()
    agent = Agent(QueueSource(), ClusterState(), Programmed(), writer=None, clock=clock)
    agent.take([Event("upsert", "Service", "default/web", parse(service()))])
    try:
        ref = weakref.ref(Cyclic())
        agent.sync()  # full: a collection is due, waiting for a quiet turn
        for i in range(3):  # changes, one sync each, no quiet turn between
            clock.t += COLLECT_WAIT_MAX / 4
            agent.take(slice_event(i))
            agent.sync()
            assert ref() is not None
        clock.t += COLLECT_WAIT_MAX / 4
        agent.take(slice_event(3))
        agent.sync()  # waited COLLECT_WAIT_MAX: collected now
        assert ref() is None
    finally:
        gc.unfreeze()


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_a_service_that_does_not_fit_is_retried_alone_with_backoff_while_others_sync():
    from ctrl.dataplane.abi import MapSizes

    clock = Clock()
    src = QueueSource()
    agent = Agent(src, ClusterState(), Programmed(MapSizes(services=8, backends=2, slots=8)), writer=None,
                  settings=Settings(min_sync_period=0.0, sync_period=0.0), clock=clock)  # fmt: skip
    big = parse(endpoint_slice("web-a", endpoints=eps("198.18.1.1", "198.18.1.2", "198.18.1.3")))
    src.events.put([Event("upsert", "Service", "default/web", parse(service())),
                    Event("upsert", "EndpointSlice", "default/web-a", big)])  # fmt: skip
    agent.step(timeout=0)
    assert agent.syncs == 1 and not agent.programmed.owners()
    planned = []
    real_plan = agent.plan
    agent.plan = lambda owners: planned.append(set(owners)) or real_plan(owners)
    # Another Service goes on meanwhile (a partial sync: web is not in it).
    src.events.put([Event("upsert", "Service", "default/other", parse(service("other", ip="198.19.0.11")))])
    agent.step(timeout=0)
    assert planned == [{"default/other"}] and not agent.schedule.need_full
    clock.t = 1004.9
    agent.step(timeout=0)
    assert len(planned) == 1
    clock.t = 1005.0
    agent.step(timeout=0)
    assert planned[-1] == {"default/web"}  # retried alone, still too big: next in 10 s
    clock.t = 1014.9
    agent.step(timeout=0)
    assert len(planned) == 2
    small = parse(endpoint_slice("web-a", endpoints=eps("198.18.1.1")))
    clock.t = 1015.0
    src.events.put([Event("upsert", "EndpointSlice", "default/web-a", small)])
    agent.step(timeout=0)
    assert "default/web" in agent.programmed.owners()
    clock.t = 2000.0
    agent.step(timeout=0)
    assert len(planned) == 3  # nothing left to retry
