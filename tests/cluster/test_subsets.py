"""Tier 4: EndpointSlice subsetting by zone (docs/subsetting.md) against a
real kube-apiserver and EndpointSlice controller.

Nodes in three zones; Services with zone hints (trafficDistribution
PreferClose: the EndpointSlice controller hints each endpoint to its zone),
without, and with Local traffic policies; `sliceproxy subsetter` running
as a process. Agents of every zone plan (`sliceproxy run --dry-run`: the
agent's source, model and planner, no kernel) from their subsets exactly
what they plan from the originals; and one real agent, with real traffic,
lives through the subsetter being killed, a forged subset slice, its
Node's zone label changing and the subsetter coming back. A dual-stack
Service gets subsets of both families.
"""

from __future__ import annotations

import itertools
import os
import uuid

import pytest

from ctrl.k8s.objects import SUBSET_ALL
from scripts.harness.controlplane import ControlPlane, wait_until
from tests.netns.agent import AgentProc, TrafficLoop, has_backends, wait_dump

from .subsets import (
    SLICES,
    ZONES,
    Subsetter,
    make_nodes,
    make_pod,
    make_service,
    node_names,
    original_view,
    planned,
    set_ready,
    set_zone,
    slices,
    subset_view,
    wait_hinted,
)
from .test_agent import CLIENT_IP, PODS, forward, pin_dir, topo  # noqa: F401  (fixtures)

_vips = itertools.count(100)
_leases = itertools.count(1)


@pytest.fixture(scope="module")
def nodes(controlplane: ControlPlane) -> dict[str, str]:
    names = node_names(f"sub{os.getpid()}")
    make_nodes(controlplane, names)
    return names


@pytest.fixture
def lease(namespace: str) -> tuple[str, str]:
    """A Lease of the test's own (namespace, name)."""
    return namespace, f"subsetter-{next(_leases)}"


@pytest.fixture
def subsetters(controlplane, lease):
    """Start subsetters for the test's Lease; all stopped at its end."""
    started: list[Subsetter] = []

    def start(identity: str, *extra: str) -> Subsetter:
        s = Subsetter(controlplane, lease[0], lease[1], identity, extra=extra)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def vip() -> str:
    return f"198.19.1.{next(_vips)}"


def test_every_zone_plans_from_its_subsets_what_it_plans_from_the_originals(
    controlplane, namespace, nodes, lease, subsetters
):
    cp, ns = controlplane, namespace
    node_list = list(nodes)
    # hinted: three Pods a node, hinted to their zone; plain: no hints;
    # local: hinted, internalTrafficPolicy Local; nodeport: hinted, NodePort
    # with externalTrafficPolicy Local.
    specs = {
        "hinted": dict(hinted=True),
        "plain": dict(hinted=False),
        "local": dict(hinted=True, internalTrafficPolicy="Local"),
        "nodeport": dict(hinted=True, type="NodePort", externalTrafficPolicy="Local"),
    }
    ip = itertools.count(1)
    for si, (name, spec) in enumerate(specs.items()):
        make_service(cp, ns, name, vip(), **spec)
        per_node = 3 if name == "hinted" else 1
        for node in node_list:
            for k in range(per_node):
                make_pod(cp, ns, f"{name}-{node[-2:]}-{k}", name, node, f"198.18.{10 + si}.{next(ip)}")
    wait_hinted(cp, ns, "hinted", 18)
    wait_hinted(cp, ns, "nodeport", 6)
    for name in ("plain", "local"):
        wait_until(lambda name=name: len(original_view(cp, ns, name)) == 6, 60, what=f"{name}'s endpoints")

    sub = subsetters("replica-a")
    sub.wait_log(r"marking the Lease synced")
    # The hinted Service: one subset a zone with that zone's third, no
    # `all`. (A zone of other tests' Nodes, with no endpoint hinted to it,
    # gets every endpoint: its nodes use them all.)
    view = wait_until(lambda: (v := subset_view(cp, ns, "hinted")) and set(ZONES) <= set(v) and v, 30, what="3 subsets")
    eps = original_view(cp, ns, "hinted")
    for zone in ZONES:
        assert view[zone] == {a for a, e in eps.items() if e["zone"] == zone}
    assert "all" not in view
    for zone in set(view) - set(ZONES):
        assert view[zone] == set(eps)
    # No hints: one `all` subset, every endpoint.
    assert subset_view(cp, ns, "plain") == {"all": set(original_view(cp, ns, "plain"))}
    for sl in slices(cp, ns, "sliceproxy.io/service-name%3Dhinted"):
        meta = sl["metadata"]
        assert "kubernetes.io/service-name" not in meta["labels"]
        assert meta["labels"]["endpointslice.kubernetes.io/managed-by"] == "subsetter.sliceproxy.io"
        svc_uid = cp.ok("GET", f"/api/v1/namespaces/{ns}/services/hinted")["metadata"]["uid"]
        assert [r["uid"] for r in meta["ownerReferences"]] == [svc_uid]

    lease_ref = f"{lease[0]}/{lease[1]}"
    for node in node_list:
        got, log = planned(cp, node, "auto", lease_ref, ns)
        assert f"watching the subset slices of zone {nodes[node]}" in log, log[-2000:]
        want, log_off = planned(cp, node, "off", lease_ref, ns)
        assert "watching the subset slices" not in log_off
        assert got == want, node
        # The zone's own endpoints, not everyone's: the hints did apply.
        assert len(got[next(k for k in got if k.startswith(f"{ns}/hinted:"))]) == 6

    # Service deleted: its subsets go with it.
    cp.ok("DELETE", f"/api/v1/namespaces/{ns}/services/hinted")
    wait_until(lambda: not subset_view(cp, ns, "hinted"), 30, what="the deleted Service's subsets gone")


def test_a_dual_stack_service_gets_subsets_of_both_families(controlplane, namespace, nodes, lease, subsetters):
    """The EndpointSlice controller writes one slice family each; the
    subsetter splits both by zone, and every zone plans both families from
    its subsets as it does from the originals."""
    cp, ns = controlplane, namespace
    n = next(_vips)
    make_service(
        cp, ns, "dual", f"198.19.1.{n}", ipFamilyPolicy="RequireDualStack",
        clusterIPs=[f"198.19.1.{n}", f"2001:db8:19::{n:x}"],
    )  # fmt: skip
    for i, node in enumerate(nodes):
        make_pod(cp, ns, f"dual-{i}", "dual", node, (f"198.18.20.{i + 1}", f"2001:db8:20::{i + 1:x}"))

    def hinted_both() -> bool:
        fams: dict[str, int] = {}
        for sl in slices(cp, ns, "kubernetes.io/service-name%3Ddual"):
            for e in sl.get("endpoints") or []:
                if (e.get("hints") or {}).get("forZones"):
                    fams[sl["addressType"]] = fams.get(sl["addressType"], 0) + 1
        return fams == {"IPv4": len(nodes), "IPv6": len(nodes)}

    wait_until(hinted_both, 60, what="hinted endpoints of both families")
    sub = subsetters("replica-a")
    sub.wait_log(r"marking the Lease synced")

    def per_family_zone() -> dict[tuple[str, str], set[str]]:
        out: dict[tuple[str, str], set[str]] = {}
        for sl in slices(cp, ns, "sliceproxy.io/service-name%3Ddual"):
            key = (sl["addressType"], sl["metadata"]["labels"]["sliceproxy.io/subset"])
            out.setdefault(key, set()).update(e["addresses"][0] for e in sl.get("endpoints") or [])
        return out

    view = wait_until(
        lambda: (v := per_family_zone()) and all((f, z) in v for f in ("IPv4", "IPv6") for z in ZONES) and v,
        30,
        what="subsets of both families in every zone",
    )
    for i, node in enumerate(nodes):
        assert f"198.18.20.{i + 1}" in view["IPv4", nodes[node]]
        assert f"2001:db8:20::{i + 1:x}" in view["IPv6", nodes[node]]
    lease_ref = f"{lease[0]}/{lease[1]}"
    for node in nodes:
        got, log = planned(cp, node, "auto", lease_ref, ns)
        assert f"watching the subset slices of zone {nodes[node]}" in log, log[-2000:]
        want, _ = planned(cp, node, "off", lease_ref, ns)
        assert got == want, node
        v6 = [k for k in got if k.startswith(f"{ns}/dual:") and ":19::" in k]
        assert v6 and all(len(got[k]) == 2 for k in v6), got  # the zone's two, of two nodes


def test_additions_go_at_once_and_removals_within_the_write_period_are_one_write(
    controlplane, namespace, nodes, lease, subsetters
):
    """With a write period of 20 s: each new endpoint reaches the subset
    well within the period (a write that adds is not held), a write or
    two each; then four removals, each seen in the originals before the
    next is made, within the period of the last write: one or two writes
    (uncoalesced: four), and the last one has the latest content. A
    Service without hints (one `all` subset): with hints the EndpointSlice
    controller may rebalance them on any change, and a rebalance that gives
    another zone an endpoint is a write of its own."""
    cp, ns = controlplane, namespace
    make_service(cp, ns, "burst", vip(), hinted=False)

    def originals(count: int) -> None:
        wait_until(lambda: len(original_view(cp, ns, "burst")) == count, 60, what=f"{count} endpoints of burst")

    for i, node in enumerate(nodes):
        make_pod(cp, ns, f"burst-{i}", "burst", node, f"198.18.21.{i + 1}")
    originals(len(nodes))
    sub = subsetters("replica-a", "--write-period", "20")
    sub.wait_log(r"marking the Lease synced")
    updates = 'sliceproxy_subsetter_writes_total{op="update"}'
    before = sub.metric(updates) or 0.0
    zone1 = next(n for n, z in nodes.items() if z == ZONES[0])
    added = [f"198.18.21.{50 + k}" for k in range(4)]
    for k, ip in enumerate(added):
        make_pod(cp, ns, f"burst-new-{k}", "burst", zone1, ip)
        wait_until(
            lambda ip=ip: ip in subset_view(cp, ns, "burst").get(SUBSET_ALL, set()),
            15,  # a held write would wait for the 20 s period
            what=f"{ip} in the all subset",
        )
    assert len(added) <= (sub.metric(updates) or 0.0) - before <= 2 * len(added)
    before = sub.metric(updates) or 0.0
    for k in range(len(added)):
        cp.ok("DELETE", f"/api/v1/namespaces/{ns}/pods/burst-new-{k}?gracePeriodSeconds=0")
        originals(len(nodes) + len(added) - k - 1)  # the originals carry it
    wait_until(
        lambda: not set(added) & subset_view(cp, ns, "burst").get(SUBSET_ALL, set()), 60, what="every removal written"
    )
    assert 1 <= (sub.metric(updates) or 0.0) - before <= 2


def test_two_replicas_one_leads_the_other_takes_over(controlplane, namespace, nodes, lease, subsetters):
    cp, ns = controlplane, namespace
    node_list = list(nodes)
    make_service(cp, ns, "web", vip())
    for i, node in enumerate(node_list):
        make_pod(cp, ns, f"web-{i}", "web", node, f"198.18.20.{i + 1}")
    wait_hinted(cp, ns, "web", 6)
    a = subsetters("replica-a")
    a.wait_log(r"marking the Lease synced")
    b = subsetters("replica-b")
    path = f"/apis/coordination.k8s.io/v1/namespaces/{lease[0]}/leases/{lease[1]}"
    wait_until(lambda: b.metric("sliceproxy_subsetter_leader") == 0.0, 30, what="replica-b reporting it follows")
    assert a.metric("sliceproxy_subsetter_leader") == 1.0
    assert cp.ok("GET", path)["spec"]["holderIdentity"] == "replica-a"
    assert not any("acquired" in ln for ln in b.lines)

    a.kill()  # no release: b must wait the lease out
    b.wait_log(r"acquired as replica-b \(from replica-a\)", timeout=60)
    b.wait_log(r"marking the Lease synced")
    # b writes: a new endpoint reaches its zone's subset.
    make_pod(cp, ns, "web-new", "web", node_list[0], "198.18.20.50")
    wait_until(lambda: "198.18.20.50" in subset_view(cp, ns, "web").get(ZONES[0], set()), 30, what="b's write")
    assert cp.ok("GET", path)["spec"]["holderIdentity"] == "replica-b"


@pytest.fixture
def agent_node(controlplane, nodes):
    """The agent's Node: zone-1, put back there after the test."""
    name = next(n for n, z in nodes.items() if z == ZONES[0])
    yield name
    set_zone(controlplane, name, ZONES[0])


def test_agent_falls_back_when_the_subsetter_dies_and_ignores_forgeries(
    topo,  # noqa: F811
    forward,  # noqa: F811
    pin_dir,  # noqa: F811
    controlplane,
    namespace,
    nodes,
    lease,
    subsetters,
    agent_node,  # noqa: F811
):
    cp, ns = controlplane, namespace
    zone1 = [n for n, z in nodes.items() if z == ZONES[0]]
    zone2 = [n for n, z in nodes.items() if z == ZONES[1]]
    ip = vip()
    make_service(cp, ns, "web", ip)
    # web-1 and web-2 in the agent's zone (on its other node, so that the
    # agent's own move leaves them where they are), web-3 in zone-2:
    # hinted, the agent uses web-1 and web-2 only.
    assert zone1[0] == agent_node
    for name, node in (("web-1", zone1[1]), ("web-2", zone1[1]), ("web-3", zone2[0])):
        make_pod(cp, ns, name, "web", node, PODS[name])
    wait_hinted(cp, ns, "web", 3)
    sub = subsetters("replica-a")
    sub.wait_log(r"marking the Lease synced")

    def want(*pods):
        return has_backends({f"{ip}:80/TCP": {f"{PODS[p]}:8080" for p in pods}})

    agent = AgentProc(
        topo, None, pin_dir,
        extra=[
            "--kubeconfig", cp.kubeconfig, "--node-name", agent_node, "--healthz-bind-address", "127.0.0.1:10256",
            "--subsets", "auto", "--subsets-lease", f"{lease[0]}/{lease[1]}", "--subsets-stale-after", "3",
        ],
    )  # fmt: skip
    loop = None
    try:
        agent.wait_log(rf"watching the subset slices of zone {ZONES[0]}")
        wait_dump(topo, pin_dir, want("web-1", "web-2"), "zone-1's backends", agent=agent, timeout=60)
        loop = TrafficLoop(topo, "client", "http", f"{ip}:80", per_batch=20, max_seconds=300).start()
        loop.wait_batches(1)

        # A forged subset slice of zone-1 pointing at web-3: ignored.
        forged = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-forged",
                "labels": {
                    "sliceproxy.io/subset": ZONES[0],
                    "sliceproxy.io/service-name": "web",
                    "endpointslice.kubernetes.io/managed-by": "subsetter.sliceproxy.io",
                },
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": str(uuid.uuid4())}],
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [PODS["web-3"]], "conditions": {"ready": True}}],
        }
        cp.ok("POST", SLICES.format(ns=ns), forged)
        agent.wait_log(r"web-forged: subset slice ignored: no ownerReference names the Service's uid")
        wait_dump(topo, pin_dir, want("web-1", "web-2"), "still zone-1's backends", agent=agent)
        # (The subsetter deletes it too: it carries the subsetter's
        # managed-by, and no Service of that uid wants it.)
        cp.request("DELETE", SLICES.format(ns=ns) + "/web-forged")

        # The subsetter dies: within the stale time the agent is back on
        # the originals, and follows them.
        sub.kill()
        agent.wait_log(r"watching the original EndpointSlices: the subsetter's Lease was not renewed", timeout=30)
        set_ready(cp, ns, "web-2", PODS["web-2"], False)
        wait_dump(topo, pin_dir, want("web-1"), "web-2 out, from the originals", agent=agent, timeout=60)

        # Back: the agent returns to its subsets once they are all written.
        sub2 = subsetters("replica-b")
        sub2.wait_log(r"marking the Lease synced")
        agent.wait_log(rf"watching the subset slices of zone {ZONES[0]}", count=2, timeout=30)
        set_ready(cp, ns, "web-2", PODS["web-2"], True)
        wait_dump(topo, pin_dir, want("web-1", "web-2"), "web-2 back, from the subsets", agent=agent, timeout=60)

        # The node moves to zone-2: it reads zone-2's subset, whose hinted
        # endpoint is web-3.
        set_zone(cp, agent_node, ZONES[1])
        agent.wait_log(rf"watching the subset slices of zone {ZONES[1]}", timeout=30)
        wait_dump(topo, pin_dir, want("web-3"), "zone-2's backends", agent=agent, timeout=60)
        done = loop.done()
        loop.wait_batches(done + 1)
    finally:
        batches = loop.stop() if loop is not None else []
        if agent.alive():
            agent.terminate()
    errors = [b for b in batches if b["errors"]]
    assert not errors, errors[:2]
    assert len(batches) >= 2
