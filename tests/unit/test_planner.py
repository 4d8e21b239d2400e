"""ServicePlanner and the diff's delta path give exactly what planning and
diffing from scratch give, on random sequences of slice changes: endpoints
appearing, leaving, turning not ready or terminating, moving between slices,
topology hints coming and going, under every traffic policy."""

import random

import pytest

import ctrl.dataplane.programmed
import ctrl.model.plan
import ctrl.model.planner
from ctrl.dataplane.programmed import Programmed
from ctrl.k8s.objects import parse
from ctrl.model.plan import Frontend, NodeAddresses, plan_service
from ctrl.model.planner import ServicePlanner

from .helpers import endpoint_slice, service

NODES = ["node-a", "node-b", "node-c"]
ZONES = ["zone-1", "zone-2"]


def rand_endpoint(rnd, ip):
    ready = rnd.random() < 0.8
    term = rnd.random() < 0.2
    ep = {
        "addresses": [ip],
        "conditions": {"ready": ready and not term, "serving": ready or rnd.random() < 0.5, "terminating": term},
        "nodeName": rnd.choice(NODES),
        "zone": rnd.choice(ZONES),
    }
    if rnd.random() < 0.3:
        ep["hints"] = {"forZones": [{"name": rnd.choice(ZONES)}]}
    if rnd.random() < 0.1:
        ep.setdefault("hints", {})["forNodes"] = [{"name": rnd.choice(NODES)}]
    return ep


def rand_slice(rnd, name, pool):
    n = rnd.randrange(0, 8)
    ips = rnd.sample(pool, n)
    return parse(endpoint_slice(name, endpoints=[rand_endpoint(rnd, ip) for ip in ips]))


def strip(fronts):
    """The same frontends without their delta (their groups kept): the
    diff's full path."""
    return [
        Frontend(
            f.addr,
            f.port,
            f.proto,
            f.scope,
            f.name,
            f.backends,
            f.flags,
            f.affinity_timeout,
            f.source_ranges,
            version=f.version,
            group=f.group,
        )
        for f in fronts
    ]


def cs_view(cs):
    return (
        sorted(cs.be_upd),
        sorted(cs.slot_upd),
        sorted(cs.svc_upd),
        sorted(cs.slot_del),
        sorted(cs.be_del),
        sorted(cs.removed),
        sorted(cs.src_upd),
        sorted(cs.src_del),
    )


NODE_ADDRS = NodeAddresses(("198.18.250.1", "198.18.250.2"), ("198.18.250.1", "198.18.250.2"))
NODEPORT = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080}]
LB_STATUS = {"loadBalancer": {"ingress": [{"ip": "198.19.5.5"}]}}


def external_service(etp: str, itp: str = "Cluster") -> dict:
    raw = service(
        type="LoadBalancer",
        ports=NODEPORT,
        externalTrafficPolicy=etp,
        internalTrafficPolicy=itp,
        externalIPs=["198.19.6.6"],
        loadBalancerSourceRanges=["198.18.0.0/16"],
    )
    raw["status"] = LB_STATUS
    return raw


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize(
    "policy",
    [
        {},
        {"internalTrafficPolicy": "Local"},
        {"type": "NodePort", "externalTrafficPolicy": "Local"},
        {"external": ("Cluster", "Cluster")},
        {"external": ("Local", "Cluster")},
        {"external": ("Local", "Local")},
    ],
    ids=[
        "cluster",
        "internal-local",
        "nodeport-external-local",
        "nodeport-lb-etp-cluster",
        "nodeport-lb-etp-local",
        "nodeport-lb-etp-local-itp-local",
    ],
)
def test_incremental_equals_from_scratch(seed, policy, monkeypatch):
    rnd = random.Random(seed)
    # Half the seeds keep every full plan's merged endpoints for the
    # per-port state (built after the sync, or at the next change), half
    # keep none (the state merges the slices itself at the next change).
    eager = 0 if seed % 2 else 10**9
    monkeypatch.setattr(ctrl.model.planner, "EAGER_INDEX_FROM", eager)
    monkeypatch.setattr(ctrl.dataplane.programmed, "EAGER_INDEX_FROM", eager)  # its slot indexes alike
    # A small pool: endpoints often in two slices at once (moving between
    # them), which the planner re-plans in full; a large one: the delta path.
    pool = [f"198.18.{k // 200}.{k % 200 + 1}" for k in range(60 if seed % 4 == 0 else 4000)]
    svc = parse(external_service(*policy["external"]) if "external" in policy else service(**policy))
    names = [f"web-{c}" for c in "abcde"]
    slices = {}
    planner = ServicePlanner()
    delta, full = Programmed(), Programmed()
    node, zone = "node-a", rnd.choice(ZONES)
    for step in range(30):
        # Change one to three slices (or delete one), as watch events do.
        changed = rnd.sample(names, rnd.randrange(1, 4))
        for name in changed:
            if name in slices and rnd.random() < 0.15:
                del slices[name]
            else:
                slices[name] = rand_slice(rnd, name, pool)
        # Every other step the changed names are given, as the agent gives
        # them (ClusterState.take_touched), with a name that did not
        # change now and then; else every slice is compared.
        touched = None if step % 2 else {*changed, *rnd.sample(names, rnd.randrange(0, 2))}
        got, _ = planner.plan("default/web", svc, dict(slices), node, zone, NODE_ADDRS, touched)
        if step % 3 == 1:
            planner.index_pending()  # as the agent does after its write
        want, _ = plan_service(svc, list(slices.values()), node, zone, NODE_ADDRS)
        assert [(f.key, set(f.backends), f.flags, f.source_ranges) for f in got] == [
            (f.key, set(f.backends), f.flags, f.source_ranges) for f in want
        ], step
        if "external" in policy:
            assert len(got) == 1 + 2 * 4  # cluster IP; 2 NodePorts, LB IP, externalIP in 2 scopes
        cs_d = delta.sync({"default/web": got})
        if step % 2:  # the agent builds slot indexes after a write; or the delta does
            delta.index_pending()
        cs_f = full.sync({"default/web": strip(got)})
        assert cs_view(cs_d) == cs_view(cs_f), step
        for key, st in full.frontends.items():
            assert delta.frontends[key].slots == st.slots, step
            # The index is built lazily (by the first delta); when it exists it is exact.
            slot_of = delta.frontends[key].table.slot_of
            assert slot_of is None or slot_of == dict(zip(st.slots, range(len(st.slots)), strict=True))
        assert delta.backends == full.backends and delta.slot_count == full.slot_count
        # Frontends the planner groups read one slot table, theirs alone.
        tables: dict[object, set[int]] = {}
        for f in got:
            tables.setdefault(f.group, set()).add(delta.frontends[f.key].table.tid)
        assert all(len(ids) == 1 for ids in tables.values()), step
        assert len(set().union(*tables.values())) == len(tables) == len(delta.slot_tables), step


def test_one_slice_change_is_a_delta_of_that_slice():
    planner = ServicePlanner()
    svc = parse(service())
    slices = {
        f"web-{s:03d}": parse(
            endpoint_slice(f"web-{s:03d}", endpoints=[{"addresses": [f"198.18.{s}.{k + 1}"]} for k in range(100)])
        )
        for s in range(20)
    }
    prog = Programmed()
    fronts, _ = planner.plan("default/web", svc, dict(slices), "node-a")
    prog.sync({"default/web": fronts})
    slices["web-007"] = parse(
        endpoint_slice("web-007", endpoints=[{"addresses": [f"198.18.100.{k + 1}"]} for k in range(100)])
    )
    fronts, _ = planner.plan("default/web", svc, dict(slices), "node-a")
    (f,) = fronts
    assert len(f.added) == len(f.removed) == 100 and len(f.backends) == 2000
    cs = prog.sync({"default/web": fronts})
    s = cs.summary()
    assert s["slots_set"] == 100 and s["slots_deleted"] == 0 and s["backends_added"] == 100


def test_port_state_update_edge_cases():
    """_PortState.update, slice by slice in bulk: an old slice whose
    endpoints are not merged (not expected) removes nothing and its
    replacement is added; an ip:port twice in one new slice asks for a
    full re-plan (None), as one already merged from another slice does;
    an endpoint in the old and the new slice that stays selected is
    neither added nor removed, one that stops being ready is removed."""
    from ctrl.model.plan import SELECT_CLUSTER, port_policy
    from ctrl.model.planner import _PortState

    svc = parse(service())
    sp = svc.ports[0]

    def sl(name, addrs, ready=True):
        eps = [{"addresses": [a], "conditions": {"ready": ready}} for a in addrs]
        return parse(endpoint_slice(name, endpoints=eps))

    a = sl("web-a", ["198.18.0.1", "198.18.0.2"])
    st = _PortState(sp, "IPv4", 6, port_policy(svc, sp), "node-a", None, {"web-a": a}, (SELECT_CLUSTER,))
    ghost = sl("web-b", ["198.18.0.9"])
    b = sl("web-b", ["198.18.0.3"])
    (added, removed) = st.update({"web-b": ghost}, {"web-b": b})[SELECT_CLUSTER]
    assert [x[0][-1] for x in added] == [3] and removed == ()
    assert sorted(k[0][-1] for k in st.selected[SELECT_CLUSTER]) == [1, 2, 3]
    # The same endpoint in the old and new slice: kept; one not ready: removed.
    a2 = parse(
        endpoint_slice(
            "web-a",
            endpoints=[
                {"addresses": ["198.18.0.1"]},
                {"addresses": ["198.18.0.2"], "conditions": {"ready": False}},
            ],
        )
    )
    (added, removed) = st.update({"web-a": a}, {"web-a": a2})[SELECT_CLUSTER]
    assert added == () and [x[0][-1] for x in removed] == [2]
    assert sorted(k[0][-1] for k in st.selected[SELECT_CLUSTER]) == [1, 3]
    # Back to ready: added again.
    (added, removed) = st.update({"web-a": a2}, {"web-a": a})[SELECT_CLUSTER]
    assert [x[0][-1] for x in added] == [2] and removed == ()
    # Twice in one new slice: a full re-plan, and from then on.
    twice = sl("web-c", ["198.18.0.7", "198.18.0.7"])
    assert st.update({}, {"web-c": twice}) is None and st.duplicates
    other = _PortState(sp, "IPv4", 6, port_policy(svc, sp), "node-a", None, {"web-a": a}, (SELECT_CLUSTER,))
    assert other.update({}, {"web-d": sl("web-d", ["198.18.0.1"])}) is None


def test_a_rejected_change_is_retried_in_full():
    from ctrl.dataplane.abi import MapSizes

    planner = ServicePlanner()
    svc = parse(service())
    sl = {"web-a": parse(endpoint_slice("web-a", endpoints=[{"addresses": ["198.18.0.1"]}]))}
    prog = Programmed(MapSizes(services=4, backends=2, slots=4, conntrack=4))
    prog.sync({"default/web": planner.plan("default/web", svc, dict(sl))[0]})
    two = [{"addresses": ["198.18.0.2"]}, {"addresses": ["198.18.0.3"]}]
    sl["web-b"] = parse(endpoint_slice("web-b", endpoints=two))
    cs = prog.sync({"default/web": planner.plan("default/web", svc, dict(sl))[0]})
    assert cs.rejected  # 3 backends do not fit in 2
    del sl["web-b"]
    sl["web-c"] = parse(endpoint_slice("web-c", endpoints=[{"addresses": ["198.18.0.4"]}]))
    fronts, _ = planner.plan("default/web", svc, dict(sl))
    cs = prog.sync({"default/web": fronts})
    assert not cs.rejected
    (st,) = prog.frontends.values()
    assert {prog.backends[b][0][-1] for b in st.slots} == {1, 4}


@pytest.mark.parametrize("seed", range(40))
def test_changed_slices_are_those_not_the_same_object(seed):
    """The planner's slice comparison gives what comparing every name
    does, whether the names keep their order (compared by position) or
    not (slices added, removed, or re-added at the end)."""
    rnd = random.Random(seed)
    objs = [object() for _ in range(30)]
    before = {f"s{i}": objs[i] for i in range(rnd.randrange(0, 12))}
    now = dict(before)
    for _ in range(rnd.randrange(0, 4)):
        op = rnd.random()
        if op < 0.5 and now:
            now[rnd.choice(list(now))] = rnd.choice(objs)  # replaced in place (maybe by itself)
        elif op < 0.75 and now:
            name = rnd.choice(list(now))
            value = now.pop(name)
            if rnd.random() < 0.5:
                now[name] = value  # the same slice, moved to the end
        else:
            now[f"n{rnd.randrange(5)}"] = rnd.choice(objs)
    want_old = {n: s for n, s in before.items() if now.get(n) is not s}
    want_new = {n: s for n, s in now.items() if before.get(n) is not s}
    assert ctrl.model.planner.changed_slices(before, now) == (want_old, want_new)
    # follow_slices gives the same and brings a kept copy up to date in
    # place, with every name compared or only the touched ones (a superset).
    for touched in (None, {*want_old, *want_new, *rnd.sample(list(before) or ["x"], 1)}):
        mine = dict(before)
        assert ctrl.model.planner.follow_slices(mine, now, touched) == (want_old, want_new)
        assert mine == now


def test_index_lets_go_of_the_full_plans_backends(monkeypatch):
    """A full plan's frontends carry their backends as tuples; once the
    per-port state is built (the agent's quiet turn), the planner keeps
    views of its selections instead, so the tuples (100,000 backends at
    S1) are not freed inside the next change. That change still plans
    right."""
    import gc

    monkeypatch.setattr(ctrl.model.planner, "EAGER_INDEX_FROM", 0)
    svc = parse(external_service("Cluster"))
    eps = [{"addresses": [f"198.18.1.{k}"], "nodeName": "node-a"} for k in range(1, 40)]
    slices = {"web-a": parse(endpoint_slice("web-a", endpoints=eps))}
    planner = ServicePlanner()
    fronts, _ = planner.plan("default/web", svc, slices, "node-a", None, NODE_ADDRS)
    tuples = {id(f.backends): f.backends for f in fronts}
    assert all(type(b) is tuple and len(b) == 39 for b in tuples.values())
    del fronts

    def holders() -> list:
        return [r for t in tuples.values() for r in gc.get_referrers(t) if isinstance(r, Frontend)]

    assert holders()  # the planner's memory of the plan
    assert planner.index_pending() == 1
    assert holders() == []
    slices["web-b"] = parse(endpoint_slice("web-b", endpoints=[{"addresses": ["198.18.2.1"]}]))
    got, _ = planner.plan("default/web", svc, slices, "node-a", None, NODE_ADDRS)
    want, _ = plan_service(svc, list(slices.values()), "node-a", None, NODE_ADDRS)
    assert [(f.key, set(f.backends)) for f in got] == [(f.key, set(f.backends)) for f in want]


def test_touched_names_missing_one_added_compares_every_slice():
    """A hint that leaves out a slice added (the counts disagree) is not
    trusted: every slice is compared, and the new one is planned."""
    svc = parse(service())
    planner = ServicePlanner()
    a = parse(endpoint_slice("web-a", endpoints=[{"addresses": ["198.18.1.1"]}]))
    b = parse(endpoint_slice("web-b", endpoints=[{"addresses": ["198.18.1.2"]}]))
    planner.plan("default/web", svc, {"web-a": a}, "node-a", None, NODE_ADDRS)
    got, _ = planner.plan("default/web", svc, {"web-a": a, "web-b": b}, "node-a", None, NODE_ADDRS, set())
    assert {bk[0] for f in got for bk in f.backends} == {a.endpoints[0].addr, b.endpoints[0].addr}
    got, _ = planner.plan("default/web", svc, {"web-b": b}, "node-a", None, NODE_ADDRS, {"web-a"})
    assert {bk[0] for f in got for bk in f.backends} == {b.endpoints[0].addr}


@pytest.mark.parametrize("seed", range(100))
def test_ports_read_straight_from_their_slices_plan_as_merged(seed, monkeypatch):
    """plan_full with a port's ready endpoints read straight from its
    slices (plan.ONE_SLICE_DIRECT) gives what merging and categorizing
    give: frontends, backends in order, flags, plan numbers, the planner's
    keys, local sets, and the ports it keeps merged endpoints of (or, read
    straight, marks for the index to merge), under every traffic policy,
    with hints, nothing ready, an address twice, ports a slice lacks, two
    families and one to three slices."""
    rnd = random.Random(seed)
    pool = [f"198.18.0.{k}" for k in range(1, 12)]
    pool6 = [f"2001:db8::{k:x}" for k in range(1, 12)]
    for _ in range(12):
        kind = rnd.choice(["cluster", "itp-local", "nodeport-local", "lb-cluster", "lb-local"])
        ports = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
        if rnd.random() < 0.3:
            ports.append({"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"})
        spec = {"ipFamilies": ["IPv4", "IPv6"], "clusterIPs": ["198.19.0.10", "2001:db8:1::10"]}
        spec = spec if rnd.random() < 0.3 else {}
        if kind == "itp-local":
            raw = service(ports=ports, internalTrafficPolicy="Local", **spec)
        elif kind == "nodeport-local":
            raw = service(
                ports=[dict(p, nodePort=30080 + i) for i, p in enumerate(ports)],
                type="NodePort",
                externalTrafficPolicy="Local",
                **spec,
            )
        elif kind.startswith("lb"):
            raw = external_service("Local" if kind == "lb-local" else "Cluster")
        else:
            raw = service(ports=ports, **spec)
        svc = parse(raw)
        slices = []
        for k in range(rnd.choice([1, 1, 1, 2, 3])):
            family = rnd.choice(["IPv4", "IPv4", "IPv6"]) if spec else "IPv4"
            ips = rnd.sample(pool6 if family == "IPv6" else pool, rnd.randrange(0, 7))
            if rnd.random() < 0.5:  # addresses of this slice alone
                ips = [
                    f"2001:db8:{k + 1}::{i:x}" if family == "IPv6" else f"198.18.{k + 1}.{i}"
                    for i in range(1, len(ips) + 1)
                ]
            if ips and rnd.random() < 0.2:
                ips.append(ips[0])  # an address twice in one slice
            sports = [{"name": "http", "port": rnd.choice([8080, 8080, 8081]), "protocol": "TCP"}]
            if rnd.random() < 0.5:
                sports.append({"name": "dns", "port": 5353, "protocol": "UDP"})
            if rnd.random() < 0.1:
                sports = [{"name": "other", "port": 9, "protocol": "TCP"}]
            raw_eps = [rand_endpoint(rnd, ip) for ip in ips]
            if rnd.random() < 0.6:  # none hinted (rand_endpoint hints some)
                for e in raw_eps:
                    e.pop("hints", None)
            elif rnd.random() < 0.6:  # every endpoint hinted: topology may apply
                hint = rnd.choice(["forZones", "forNodes"])
                for e in raw_eps:
                    e["hints"] = {hint: [{"name": rnd.choice(ZONES if hint == "forZones" else NODES)}]}
            slices.append(parse(endpoint_slice(f"web-{k}", endpoints=raw_eps, ports=sports, address_type=family)))
        node, zone = rnd.choice(NODES), rnd.choice(ZONES)
        keyed_from = rnd.choice([0, 3, 1000])
        got, kept = [], []
        for direct in (True, False):
            monkeypatch.setattr(ctrl.model.plan, "ONE_SLICE_DIRECT", direct)
            merged: dict = {}
            fronts, notes, meta, local = ctrl.model.plan.plan_full(
                svc, slices, node, zone, NODE_ADDRS, merged, iter(range(100)), keyed_from
            )
            got.append(
                ([(f.key, f.name, list(f.backends), f.flags, f.version, f.group) for f in fronts], notes, meta, local)
            )
            kept.append(merged)
        assert got[0] == got[1]
        straight, general = kept
        assert straight.keys() == general.keys()
        assert all(straight[pk] is None or straight[pk] == general[pk] for pk in straight)
