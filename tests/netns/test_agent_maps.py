"""Tier 3: the agent's loop on real kernel maps, in this process.

No namespaces or traffic here: the agent (ctrl.agent.Agent) is driven one
turn at a time (Agent.step) from a queue of source events, with a clock the
test moves, and writes real BPF maps: private ones (loader.load with no pin
directory), or pinned ones in a directory of this test's own when a restart
is what is tested. Nothing ages by sleeping: every deadline is reached by
moving the clock.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctrl import loader
from ctrl.agent import Agent
from ctrl.apply import Writer, read_contents
from ctrl.diff import Programmed
from ctrl.objects import parse
from ctrl.sizes import MapSizes
from ctrl.state import ClusterState, Event

from .agent import endpoint_slice, service

pytestmark = pytest.mark.root

PORTS = [("http", 80, "TCP", 8080)]
SLICE_PORTS = [("http", 8080, "TCP")]


class Clock:
    """CLOCK_MONOTONIC as the agent reads it, moved by the test."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class QueueSource:
    """What the agent reads of a source: a queue of event lists, listed."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.synced = True

    def put(self, *events: Event) -> None:
        self.events.put(list(events))


def svc_event(name: str, ip: str, ports=PORTS, **spec) -> Event:
    raw = service(name, ip, ports)
    raw["spec"].update(spec)
    return Event("upsert", "Service", f"default/{name}", parse(raw))


def slice_event(name: str, svc: str, *ips: str) -> Event:
    return Event("upsert", "EndpointSlice", f"default/{name}", parse(endpoint_slice(name, svc, SLICE_PORTS, ips)))


def delete_event(kind: str, name: str) -> Event:
    return Event("delete", kind, f"default/{name}")


def kernel_backends(maps) -> set[str]:
    """Backend addresses in the backend map (IPv4)."""
    return {".".join(str(b) for b in be[0][12:]) for be in read_contents(maps).backends.values()}


@pytest.fixture
def private_maps() -> Iterator[dict]:
    dp = loader.load(pin_dir=None)
    try:
        yield dp.maps
    finally:
        dp.close()


def make_agent(maps, clock: Clock, sizes: MapSizes | None = None, **kw) -> tuple[Agent, QueueSource]:
    src = QueueSource()
    programmed = Programmed(sizes or MapSizes(), drain_period=kw.pop("drain_period", 0.0))
    agent = Agent(src, ClusterState("node-a"), programmed, Writer(maps), min_sync_period=0.0, clock=clock, **kw)
    return agent, src


# -- drains -------------------------------------------------------------------


def test_a_drained_backend_goes_although_every_reconcile_rereads_the_maps(private_maps) -> None:
    """--sync-period 2 / --drain-period 2: each periodic reconcile re-reads
    the kernel maps; the drain deadline must come back with them, so the
    backend goes at the end of its drain instead of never."""
    clock = Clock()
    agent, src = make_agent(private_maps, clock, drain_period=2.0, resync_period=2.0)
    src.put(svc_event("web", "198.19.0.10"), slice_event("web-a", "web", "198.18.1.11", "198.18.1.12"))
    agent.step(timeout=0)
    assert kernel_backends(private_maps) == {"198.18.1.11", "198.18.1.12"}

    clock.t += 0.5
    src.put(slice_event("web-a", "web", "198.18.1.11"))
    agent.step(timeout=0)
    (drain_end,) = read_contents(private_maps).draining.values()
    assert drain_end == pytest.approx(1002.5)

    gone_at = None
    while clock.t < 1012.0:
        clock.t += 0.5
        agent.step(timeout=0)
        if gone_at is None and "198.18.1.12" not in kernel_backends(private_maps):
            gone_at = clock.t
    assert gone_at == 1002.5, f"the drained backend went at {gone_at} (due at 1002.5)"
    assert kernel_backends(private_maps) == {"198.18.1.11"}
    assert agent.syncs >= 7  # two changes, a drain's end, the reconcile every 2 s


def test_a_draining_backend_keeps_its_deadline_across_a_restart(pin_dir: Path) -> None:
    """A new agent adopting pinned maps reads each drain's end from the
    backend map: it neither restarts the drain nor forgets it."""
    dp = loader.load(pin_dir=str(pin_dir))
    try:
        clock = Clock(500.0)
        agent, src = make_agent(dp.maps, clock, drain_period=30.0)
        src.put(svc_event("web", "198.19.0.10"), slice_event("web-a", "web", "198.18.1.11", "198.18.1.12"))
        agent.step(timeout=0)
        clock.t = 501.0
        src.put(slice_event("web-a", "web", "198.18.1.11"))
        agent.step(timeout=0)
        (gone_id,) = read_contents(dp.maps).draining
    finally:
        dp.close()

    # The restart: the same pins, a new mirror, a clock that moved on.
    dp = loader.load(pin_dir=str(pin_dir))
    try:
        clock = Clock(520.0)
        agent, src = make_agent(dp.maps, clock, drain_period=30.0)
        read_contents(dp.maps).adopt_into(agent.programmed)
        assert agent.programmed.draining == {gone_id: pytest.approx(531.0)}
        src.put(svc_event("web", "198.19.0.10"), slice_event("web-a", "web", "198.18.1.11"))
        agent.step(timeout=0)  # the first, full sync: the drain goes on
        assert agent.programmed.next_drain_end() == pytest.approx(531.0)
        assert "198.18.1.12" in kernel_backends(dp.maps)
        clock.t = 530.5
        agent.step(timeout=0)
        assert "198.18.1.12" in kernel_backends(dp.maps)
        clock.t = 531.0
        agent.step(timeout=0)
        assert kernel_backends(dp.maps) == {"198.18.1.11"}
    finally:
        dp.close()
