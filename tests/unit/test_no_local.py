"""kubeproxy_sync_proxy_rules_no_local_endpoints_total as the agent keeps
it: per change, from what the planner found, equal at every step to
counting from scratch (ctrl.model.plan.no_local_endpoints over every Service and
all its slices), and without merging a Service's slices again on a
one-slice change."""

import random

import pytest

import ctrl.model.plan
import ctrl.model.planner
from ctrl.dataplane.programmed import Programmed
from ctrl.k8s.events import Event
from ctrl.k8s.objects import parse
from ctrl.model.plan import no_local_endpoints
from ctrl.model.state import ClusterState
from ctrl.runtime.agent import Agent
from ctrl.runtime.metrics import Metrics

from .helpers import endpoint_slice, service
from .test_agent import QueueSource

NODE = "node-a"
NODES = [NODE, "node-b", "node-c"]
GAUGE = "kubeproxy_sync_proxy_rules_no_local_endpoints_total"
PORTS = [
    {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080},
    {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": 30053},
    # Not served by this dataplane: never counted, whatever its endpoints.
    {"name": "sctp", "port": 9, "targetPort": 9, "protocol": "SCTP", "nodePort": 30009},
]
SLICE_PORTS = [
    {"name": "http", "port": 8080, "protocol": "TCP"},
    {"name": "dns", "port": 5353, "protocol": "UDP"},
    {"name": "sctp", "port": 9, "protocol": "SCTP"},
]


@pytest.fixture(autouse=True)
def unfreeze():
    """Agent.sync freezes what it built (ctrl/runtime/agent.py); give it back."""
    import gc

    yield
    gc.unfreeze()


def gauges(m: Metrics) -> tuple[float, float]:
    r = m.registry
    return (
        r.get_sample_value(GAUGE, {"traffic_policy": "internal"}) or 0.0,
        r.get_sample_value(GAUGE, {"traffic_policy": "external"}) or 0.0,
    )


def from_scratch(state: ClusterState) -> tuple[int, int]:
    zone = state.node.zone if state.node is not None else None
    counts = [no_local_endpoints(svc, state.slices_of(k), state.node_name, zone) for k, svc in state.services.items()]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def rand_service(rnd: random.Random, name: str, k: int) -> dict:
    ports = rnd.sample(PORTS, rnd.randrange(1, 4))
    spec: dict = {
        "type": rnd.choice(["ClusterIP", "NodePort", "LoadBalancer"]),
        "internalTrafficPolicy": rnd.choice(["Cluster", "Local", "Local"]),
        "externalTrafficPolicy": rnd.choice(["Cluster", "Local"]),
    }
    if spec["type"] == "ClusterIP":
        ports = [{x: v for x, v in p.items() if x != "nodePort"} for p in ports]
        del spec["externalTrafficPolicy"]
    raw = service(name, ip=f"198.19.0.{k + 1}", ports=ports, **spec)
    if rnd.random() < 0.3:  # dual-stack: local endpoints may be in either family
        raw["spec"]["clusterIPs"] = [f"198.19.0.{k + 1}", f"2001:db8:ffff::{k + 1:x}"]
    if rnd.random() < 0.1:  # headless: not programmed, never counted
        raw["spec"]["clusterIP"] = "None"
        raw["spec"].pop("clusterIPs", None)
    if spec["type"] == "LoadBalancer":
        raw["status"] = {"loadBalancer": {"ingress": [{"ip": f"198.19.5.{k + 1}"}]}}
    return raw


def rand_slice(rnd: random.Random, svc: str, name: str, v6: bool) -> dict:
    # A small pool per family: an endpoint is often in two slices at once
    # (moving between them), which the planner plans in full.
    pool = [f"2001:db8:1::{i:x}" if v6 else f"198.18.1.{i}" for i in range(1, 13)]
    eps = []
    for ip in rnd.sample(pool, rnd.randrange(0, 5)):
        ready = rnd.random() < 0.6
        term = not ready and rnd.random() < 0.5
        eps.append(
            {
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready or rnd.random() < 0.5, "terminating": term},
                "nodeName": rnd.choice(NODES),
            }
        )
    ports = rnd.sample(SLICE_PORTS, rnd.randrange(1, 4))
    return endpoint_slice(name, service=svc, endpoints=eps, ports=ports, address_type="IPv6" if v6 else "IPv4")


@pytest.mark.parametrize("seed", range(20))
def test_gauges_equal_counting_from_scratch_after_every_change(seed):
    rnd = random.Random(seed)
    metrics = Metrics()
    state = ClusterState(NODE)
    agent = Agent(QueueSource(), state, Programmed(), writer=None, metrics=metrics)
    names = [f"svc-{k}" for k in range(4)]
    slices = [(s, f"{s}-{c}") for s in names for c in "abc"]
    events = [Event("upsert", "Service", f"default/{s}", parse(rand_service(rnd, s, k))) for k, s in enumerate(names)]
    seen_counts = set()
    for step in range(50):
        for _ in range(rnd.randrange(1, 4)):
            r = rnd.random()
            if r < 0.15:  # a Service changes (policies, type, families) or goes
                k = rnd.randrange(len(names))
                key = f"default/{names[k]}"
                if key in state.services and rnd.random() < 0.3:
                    events.append(Event("delete", "Service", key))
                else:
                    events.append(Event("upsert", "Service", key, parse(rand_service(rnd, names[k], k))))
            else:
                svc, name = rnd.choice(slices)
                key = f"default/{name}"
                if rnd.random() < 0.15:
                    events.append(Event("delete", "EndpointSlice", key))
                else:
                    raw = rand_slice(rnd, svc, name, v6=name.endswith("c"))
                    events.append(Event("upsert", "EndpointSlice", key, parse(raw)))
        agent.take(events)
        events = []
        if rnd.random() < 0.05:
            agent.schedule.full_needed()  # a periodic full sync plans every Service in full
        assert agent.sync() is not None
        want = from_scratch(state)
        assert gauges(metrics) == want, f"seed {seed} step {step}"
        seen_counts.add(want)
    # The sequence went through states with and without local endpoints.
    assert len(seen_counts) > 1, seen_counts


def test_a_one_slice_change_merges_no_slice_again(monkeypatch):
    """The defect: with metrics on, every change to an
    internalTrafficPolicy Local Service merged all its slices once more to
    count local endpoints (200 ms at 100,000 endpoints). The count comes
    from the planner now: a one-slice change of a 5,000-endpoint Service
    merges nothing and categorizes a handful of representatives."""
    metrics = Metrics()
    agent = Agent(QueueSource(), ClusterState(NODE), Programmed(), writer=None, metrics=metrics)
    svc = parse(service(internalTrafficPolicy="Local"))

    def sl(j: int, gen: int):
        eps = [
            {"addresses": [f"198.{18 + gen % 2}.{j}.{i + 1}"], "conditions": {"ready": True}, "nodeName": NODES[i % 3]}
            for i in range(100)
        ]
        return parse(endpoint_slice(f"web-{j:02d}", endpoints=eps))

    agent.take([Event("upsert", "Service", "default/web", svc)])
    agent.take([Event("upsert", "EndpointSlice", f"default/web-{j:02d}", sl(j, 0)) for j in range(50)])
    agent.sync()  # full; the planner's per-port state is built after it
    assert gauges(metrics) == (0, 0)

    merged: list[int] = []
    categorized: list[int] = []
    real_merge, real_categorize = ctrl.model.plan.merge_endpoints, ctrl.model.plan.categorize
    real_for_plan, real_keyed = ctrl.model.plan.merge_endpoints_for_plan, ctrl.model.planner.merge_endpoints_keyed

    def merge(sp, slices, family):
        merged.append(len(slices))
        return real_merge(sp, slices, family)

    def for_plan(sp, slices, family, keyed_from=None):
        merged.append(len(slices))
        return real_for_plan(sp, slices, family, keyed_from)

    def keyed(sp, slices, family):
        merged.append(len(slices))
        return real_keyed(sp, slices, family)

    def categorize(eps, *args):
        categorized.append(len(eps))
        return real_categorize(eps, *args)

    monkeypatch.setattr(ctrl.model.plan, "merge_endpoints", merge)
    monkeypatch.setattr(ctrl.model.plan, "merge_endpoints_for_plan", for_plan)  # full plans
    monkeypatch.setattr(ctrl.model.planner, "merge_endpoints_keyed", keyed)  # the planner's per-port state
    for mod in (ctrl.model.plan, ctrl.model.planner):
        monkeypatch.setattr(mod, "categorize", categorize)
    for step in range(3):
        agent.take([Event("upsert", "EndpointSlice", "default/web-07", sl(7, step + 1))])
        cs = agent.sync()
        assert cs is not None and cs.summary()["slots_set"] == 34  # node-a's endpoints of the new slice
        assert gauges(metrics) == (0, 0)
    assert merged == [], f"slices merged again on a one-slice change: {merged}"
    assert categorized and max(categorized) < 10, categorized

    # The last local endpoints leave: the gauge follows, still without a merge.
    def elsewhere(j: int):
        eps = [
            {"addresses": [f"198.18.{j}.{i + 1}"], "conditions": {"ready": True}, "nodeName": "node-b"}
            for i in range(100)
        ]
        return parse(endpoint_slice(f"web-{j:02d}", endpoints=eps))

    agent.take([Event("upsert", "EndpointSlice", f"default/web-{j:02d}", elsewhere(j)) for j in range(50)])
    agent.sync()
    assert gauges(metrics) == (1, 0)
    assert merged == []
