"""ctrl.subset.compute: a node that plans from the subset slices of its zone
(and `all`) programs exactly what it programs from the originals, on random
Services: slices with and without hints (forZones, forNodes, complete or
not), Local traffic policies, terminating endpoints, dual-stack, a named
targetPort giving slices different ports, an endpoint in two slices, and
nodes in three zones. Also what the subsets save, stable packing, names
and labels."""

from __future__ import annotations

import random

import pytest

from ctrl.k8s.objects import (
    MANAGED_BY_LABEL,
    SERVICE_NAME_LABEL,
    SUBSET_ALL,
    SUBSET_LABEL,
    SUBSET_MANAGER,
    SUBSET_SERVICE_LABEL,
    Node,
    parse,
)
from ctrl.model.plan import NodeAddresses, plan_service, port_policy
from ctrl.model.topology import categorize, merge_endpoints
from ctrl.subset.compute import MAX_ENDPOINTS, desired, gains, pack, subset_slices, zones_of

from .helpers import endpoint_slice, service

ZONES = ("zone-1", "zone-2", "zone-3")
NODES = [Node(f"node-{z[-1]}{i}", {"topology.kubernetes.io/zone": z}) for z in ZONES for i in "ab"]
ZONE_OF = {n.name: n.zone for n in NODES}
NODE_ADDRS = NodeAddresses(("198.18.250.1",), ("198.18.250.1",))
HINTS = ("none", "zones", "zones-partial", "nodes", "nodes-partial")


def rand_endpoint(rnd, ip, hints):
    term = rnd.random() < 0.2
    ready = not term and rnd.random() < 0.85
    node = rnd.choice([n.name for n in NODES] + ["node-unknown"])
    zone = ZONE_OF.get(node, "zone-1")
    ep = {
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": ready or rnd.random() < 0.6, "terminating": term},
        "nodeName": node,
        "zone": zone,
    }
    partial = hints.endswith("partial") and rnd.random() < 0.15
    h = {}
    if hints.startswith("zones") or hints.startswith("nodes"):
        if not partial or hints.startswith("nodes"):
            # Mostly the endpoint's own zone; sometimes another (rebalanced).
            h["forZones"] = [{"name": zone if rnd.random() < 0.8 else rnd.choice(ZONES)}]
    if hints.startswith("nodes") and not partial:
        h["forNodes"] = [{"name": node if rnd.random() < 0.7 else rnd.choice(NODES).name}]
    if h:
        ep["hints"] = h
    return ep


def rand_case(rnd):
    families = rnd.choice([("IPv4",), ("IPv6",), ("IPv4", "IPv6")])
    vips = {"IPv4": "198.19.0.10", "IPv6": "2001:db8::10"}
    ports = [{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"}]
    if rnd.random() < 0.5:
        ports.append({"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"})
    spec = {"internalTrafficPolicy": rnd.choice(["Cluster", "Local"])}
    if rnd.random() < 0.5:
        spec["type"] = "NodePort"
        spec["externalTrafficPolicy"] = rnd.choice(["Cluster", "Local"])
        for i, p in enumerate(ports):
            p["nodePort"] = 30080 + i
    raw = service(ports=ports, ip=None, clusterIPs=[vips[f] for f in families], **spec)
    raw["metadata"]["uid"] = "0b7c6f1e-0000-4000-8000-000000000001"
    svc = parse(raw)
    hints = rnd.choice(HINTS)
    slices = []
    for fam in families:
        pool = [f"198.18.{1 + i // 200}.{1 + i % 200}" if fam == "IPv4" else f"2001:db8::1:{i:x}" for i in range(60)]
        rnd.shuffle(pool)
        for s in range(rnd.randrange(1, 4)):
            # A named targetPort resolving differently: another port set
            # (another group), on addresses of its own.
            other = rnd.random() < 0.2
            sp = [{"name": "http", "port": 8081 if other else 8080, "protocol": "TCP"}]
            if len(ports) > 1:
                sp.append({"name": "dns", "port": 5353, "protocol": "UDP"})
            ips = pool[40:] if other else pool[: rnd.randrange(0, 40)]
            ips = rnd.sample(ips, min(len(ips), rnd.randrange(0, 12)))
            eps = [rand_endpoint(rnd, ip, hints) for ip in ips]
            slices.append(parse(endpoint_slice(f"web-{fam.lower()}-{s}", endpoints=eps, ports=sp, address_type=fam)))
    return svc, slices


def cat_view(c):
    def keys(pes):
        return sorted((pe.ep.addr, pe.port) for pe in pes)

    return keys(c.cluster), keys(c.local), keys(c.reachable), c.has_any


def norm(fronts):
    return sorted((f.key, f.name, tuple(sorted(f.backends)), f.flags, f.affinity_timeout) for f in fronts)


def subsets_for(svc, originals, existing=()):
    out = subset_slices(svc, originals, zones_of(NODES), existing)
    return {name: parse(raw) for name, raw in out.items()}


@pytest.mark.parametrize("seed", range(400))
def test_every_node_plans_the_same_from_its_subsets(seed):
    rnd = random.Random(seed)
    svc, originals = rand_case(rnd)
    subs = subsets_for(svc, originals)
    for node in NODES:
        mine = [s for s in subs.values() if s.subset in (node.zone, SUBSET_ALL)]
        want, want_notes = plan_service(svc, originals, node.name, node.zone, NODE_ADDRS)
        got, got_notes = plan_service(svc, mine, node.name, node.zone, NODE_ADDRS)
        assert norm(got) == norm(want), (seed, node.name)
        assert got_notes == want_notes
        # categorize() itself, has_any (drop or reject) included.
        for sp in svc.ports:
            for fam in ("IPv4", "IPv6"):
                a = categorize(merge_endpoints(sp, originals, fam), port_policy(svc, sp), node.name, node.zone)
                b = categorize(merge_endpoints(sp, mine, fam), port_policy(svc, sp), node.name, node.zone)
                assert cat_view(a) == cat_view(b), (seed, node.name, sp.name, fam)


def hinted(n_per_zone=30, itp="Cluster"):
    """A Service whose endpoints are hinted to their own zone, as the
    EndpointSlice controller hints them for PreferClose."""
    eps = []
    for zi, zone in enumerate(ZONES):
        for i in range(n_per_zone):
            node = NODES[2 * zi + i % 2].name
            eps.append(
                {
                    "addresses": [f"198.18.{zi + 1}.{i + 1}"],
                    "conditions": {"ready": True},
                    "nodeName": node,
                    "zone": zone,
                    "hints": {"forZones": [{"name": zone}]},
                }
            )
    raw = service(internalTrafficPolicy=itp)
    raw["metadata"]["uid"] = "uid-web"
    return parse(raw), [parse(endpoint_slice("web-abc", endpoints=eps))]


def test_hinted_service_gives_each_zone_its_third_and_no_all_subset():
    svc, originals = hinted()
    d = desired(svc, originals, zones_of(NODES))
    assert {g.subset for g in d} == set(ZONES)
    for g, eps in d.items():
        assert len(eps) == 30 and {e.zone for e in eps.values()} == {g.subset}


def test_unhinted_service_is_one_all_subset():
    svc, originals = hinted()
    raw = endpoint_slice(
        "web-abc", endpoints=[{"addresses": [f"198.18.1.{i}"], "nodeName": "node-1a"} for i in range(1, 11)]
    )
    d = desired(svc, [parse(raw)], zones_of(NODES))
    assert [g.subset for g in d] == [SUBSET_ALL] and len(next(iter(d.values()))) == 10


def test_names_labels_and_owner():
    svc, originals = hinted()
    out = subset_slices(svc, originals, zones_of(NODES))
    again = subset_slices(svc, originals, zones_of(NODES))
    assert out == again  # deterministic
    for name, raw in out.items():
        meta = raw["metadata"]
        assert name.startswith("web-") and name == meta["name"]
        assert meta["labels"][MANAGED_BY_LABEL] == SUBSET_MANAGER
        assert meta["labels"][SUBSET_SERVICE_LABEL] == "web"
        assert meta["labels"][SUBSET_LABEL] in ZONES
        assert SERVICE_NAME_LABEL not in meta["labels"]
        assert meta["ownerReferences"] == [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "uid-web"}]
        sl = parse(raw)
        assert sl.service_key is None and sl.subset_service_key == "default/web" and sl.owner_uids == ("uid-web",)


def test_packing_is_stable_one_endpoint_change_rewrites_one_slice():
    svc, originals = hinted(n_per_zone=250)
    before = subsets_for(svc, originals)
    assert all(len(s.endpoints) <= MAX_ENDPOINTS for s in before.values())
    assert len(before) == 9  # 250 a zone: three slices each
    # One endpoint turns not ready, one leaves, one arrives.
    raw = endpoint_slice("web-abc", endpoints=[])
    eps = []
    for e in originals[0].endpoints:
        d = {
            "addresses": [e.address],
            "nodeName": e.node_name,
            "zone": e.zone,
            "hints": {"forZones": [{"name": e.zone}]},
        }
        if e.address == "198.18.1.7":
            d["conditions"] = {"ready": False}
        if e.address == "198.18.2.9":
            continue
        eps.append(d)
    eps.append(
        {
            "addresses": ["198.18.3.251"],
            "nodeName": "node-3a",
            "zone": "zone-3",
            "hints": {"forZones": [{"name": "zone-3"}]},
        }
    )
    raw["endpoints"] = eps
    after = subsets_for(svc, [parse(raw)], existing=before.values())
    assert set(after) == set(before)
    changed = {n for n in after if after[n] != before[n]}
    # zone-1 lost one (not ready), zone-2 lost one, zone-3 gained one: one slice each.
    assert len(changed) == 3, changed


def test_pack_fills_room_then_new_slices_and_drops_empty():
    from ctrl.k8s.objects import Endpoint
    from ctrl.util.addrs import addr16

    def ep(i):
        return Endpoint(addr16(f"198.18.0.{i}"), True, True, False, None, None, None, None)

    want = {bytes([i]): ep(i) for i in range(1, 6)}
    out = pack("web-x", want, {"web-x-0": [bytes([1]), bytes([2])], "web-x-1": [bytes([200])]})
    assert [e.address for e in out["web-x-0"]] == [f"198.18.0.{i}" for i in range(1, 6)]
    assert set(out) == {"web-x-0"}  # web-x-1 held only a gone endpoint
    many = {bytes([i, j]): ep(1) for i in range(3) for j in range(100)}
    assert sorted(len(v) for v in pack("b", many, {}).values()) == [100, 100, 100]


def test_both_decoders_read_the_owner_and_the_service_uid():
    import json

    from ctrl.k8s.slicejson import decode_page

    svc, originals = hinted()
    assert svc.uid == "uid-web"
    raws = list(subset_slices(svc, originals, zones_of(NODES)).values())
    raws[0]["metadata"]["ownerReferences"].append({"apiVersion": "v1", "kind": "Pod", "name": "x", "uid": "uid-pod"})
    page = decode_page(json.dumps({"metadata": {"resourceVersion": "1"}, "items": raws}).encode())
    assert page is not None
    assert page.items == [parse(r) for r in raws]
    assert page.items[0].owner_uids == ("uid-web",)


@pytest.mark.parametrize("seed", range(0, 400, 7))
def test_a_written_subset_slice_read_back_holds_its_plan_by_either_decoder(seed):
    """The subsetter skips a slice whose read-back form holds its plan
    (compute.holds) without rendering it: that is only sound if rendering
    and reading back (by the watch's typed decoder or parse) gives the
    planned endpoints exactly, and if any difference is seen."""
    import dataclasses
    import json

    from ctrl.k8s.slicejson import decode_page
    from ctrl.subset.compute import holds, render, subset_plan

    rnd = random.Random(seed)
    svc, originals = rand_case(rnd)
    plan = subset_plan(svc, originals, zones_of(NODES))
    raws = [render(svc, g, name, eps) for name, (g, eps) in plan.items()]
    page = decode_page(json.dumps({"metadata": {"resourceVersion": "1"}, "items": raws}).encode())
    assert page is not None
    for raw, typed in zip(raws, page.items, strict=True):
        group, eps = plan[raw["metadata"]["name"]]
        for back in (parse(raw), typed):
            assert holds(back, svc, group, eps)
            if len(eps) > 1:
                assert not holds(back, svc, group, eps[1:])
            flipped = [eps[0]._replace(ready=not eps[0].ready)] + eps[1:]
            assert not holds(back, svc, group, flipped)
            assert not holds(back, dataclasses.replace(svc, uid="another-uid"), group, eps)
            assert not holds(back, svc, dataclasses.replace(group, subset="zone-9"), eps)


@pytest.mark.parametrize(
    "family,text,written",
    [
        ("IPv4", "198.18.0.7", "198.18.0.7"),
        ("IPv6", "2001:DB8::7", "2001:db8::7"),
        ("IPv6", "::ffff:198.18.0.7", "::ffff:198.18.0.7"),
    ],
)
def test_an_endpoint_is_written_as_an_address_of_its_slice_family(family, text, written):
    """An endpoint keeps its address packed only; the subsetter writes it
    back as text of the slice's family. An IPv4-mapped IPv6 address packs
    as an IPv4 one does, and must still be written as IPv6 (the API refuses
    IPv4 text in an IPv6 slice), and read back to the same endpoint."""
    from ctrl.subset.compute import endpoint_json

    raw = endpoint_slice("web-abc", address_type=family, endpoints=[{"addresses": [text]}])
    (ep,) = parse(raw).endpoints
    out = endpoint_json(ep, family)
    assert out["addresses"] == [written]
    again = endpoint_slice("web-abc", address_type=family, endpoints=[out])
    assert parse(again).endpoints == (ep,)


def test_a_write_gains_when_it_adds_an_address_or_makes_one_ready_or_serving():
    """compute.gains: what the subsetter writes at once, not held for the
    write period (a new Pod's capacity), and what waits (removals,
    demotions)."""

    def sl(*eps: dict):
        return parse(endpoint_slice("sub", endpoints=list(eps)))

    def ep(ip: str, **cond: bool) -> dict:
        return {"addresses": [ip], "nodeName": "node-1a", "zone": "zone-1", "conditions": cond}

    draining = ep("198.18.1.2", ready=False, serving=True, terminating=True)
    cur = sl(ep("198.18.1.1"), draining)
    same = list(cur.endpoints)
    assert not gains(cur, same)
    assert not gains(cur, same[:1])  # one removed
    assert not gains(cur, [])
    demoted = sl(ep("198.18.1.1", ready=False, serving=False), draining)
    assert not gains(cur, list(demoted.endpoints))
    assert gains(cur, [*same, *sl(ep("198.18.1.3")).endpoints])  # a new address
    readied = sl(ep("198.18.1.1"), ep("198.18.1.2"))
    assert gains(cur, list(readied.endpoints))  # turned ready
    serving = sl(ep("198.18.1.1", ready=False, serving=False), draining)
    assert gains(serving, list(cur.endpoints))  # turned ready (and serving) again
    assert gains(None, same) and not gains(None, [])  # a new slice, unless empty
