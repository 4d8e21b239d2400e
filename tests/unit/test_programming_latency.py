"""Network programming latency as the agent observes it: as kube-proxy,
only changes triggered after the agent started count (a restart's initial
list is not hours of "latency"), and a deleted slice's trigger time (its
last update's) never counts."""

import time
from datetime import UTC, datetime

from ctrl.dataplane.programmed import Programmed
from ctrl.k8s.events import Event
from ctrl.k8s.objects import TRIGGER_ANNOTATION, parse
from ctrl.model.state import ClusterState
from ctrl.runtime.agent import Agent
from ctrl.runtime.metrics import Metrics

from .helpers import endpoint_slice, service
from .test_agent import QueueSource

COUNT = "kubeproxy_network_programming_duration_seconds_count"


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def slice_at(name: str, ip: str, trigger: float):
    raw = endpoint_slice(name, endpoints=[{"addresses": [ip], "conditions": {"ready": True}}])
    raw["metadata"].setdefault("annotations", {})[TRIGGER_ANNOTATION] = rfc3339(trigger)
    return parse(raw)


def count(m: Metrics) -> float:
    return m.registry.get_sample_value(COUNT) or 0.0


def test_only_changes_after_the_start_count_and_deletions_never():
    m = Metrics()
    agent = Agent(QueueSource(), ClusterState("node-a"), Programmed(), writer=None, metrics=m)
    start = m.started_at
    agent.take([Event("upsert", "Service", "default/web", parse(service()))])
    # The initial list: slices last changed a day and a second before start.
    agent.take([Event("upsert", "EndpointSlice", "default/web-a", slice_at("web-a", "198.18.0.1", start - 86400))])
    agent.take([Event("upsert", "EndpointSlice", "default/web-b", slice_at("web-b", "198.18.0.2", start - 1))])
    agent.sync()
    assert count(m) == 0
    # A change triggered after the start counts, once.
    # (Between the start and now, so the sync after it is not before it.)
    fresh = start + (time.time() - start) / 2
    assert fresh - start > 1e-5, "the clock did not move since the agent started"
    agent.take([Event("upsert", "EndpointSlice", "default/web-a", slice_at("web-a", "198.18.0.3", fresh))])
    agent.sync()
    assert count(m) == 1
    # A deletion carries its slice's last trigger time: not counted.
    gone = slice_at("web-b", "198.18.0.2", fresh)
    agent.take([Event("delete", "EndpointSlice", "default/web-b", gone)])
    agent.sync()
    assert count(m) == 1
