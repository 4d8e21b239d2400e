"""The subset slices of one Service, pure (docs/subsetting.md).

A node in zone Z that plans from the subsets {Z, all} must program exactly
what it would program from the original slices. Planning reads a port's
merged endpoints through ctrl.model.topology.categorize, whose answer for a
node depends on:

- which hints apply (topology_mode): forNodes hints when every ready
  endpoint has some and one names the node, else forZones hints when every
  ready endpoint has some and one names the zone, else none;
- the ready endpoints those hints select (all ready ones without hints);
- with no ready endpoint anywhere, the serving-terminating ones;
- for a Local policy, the node's own ready (else serving-terminating)
  endpoints, and whether any endpoint anywhere may serve.

So a zone's subset holds, per original endpoint group: the ready endpoints
hinted for each of its nodes (node hints) or for the zone, or all ready
ones when a node of the zone would use no hints; the endpoints on its nodes
when a port uses a Local policy; and one witness endpoint wherever leaving
the rest out would change one of the facts above (a ready endpoint without
forNodes hints keeps node hints off where they are off; a ready endpoint
keeps "some endpoint may serve" true). When hints cannot apply at all (some
ready endpoint without hints, or none ready), the group goes to one `all`
subset that every zone reads, instead of a copy per zone. Endpoints that
are neither ready nor serving-terminating never count and are left out.

tests/unit/test_subset.py checks the claim on random Services: for every
node of three zones, planning from the originals and from its subsets give
the same frontends.

Packing is stable (pack): an endpoint stays in the subset slice it is in,
new ones fill slices with room, so a change to one endpoint rewrites one
subset slice. Names are deterministic: the Service's name, a hash of
(Service, family, ports, subset), an index.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..k8s.objects import (
    MANAGED_BY_LABEL,
    SUBSET_ALL,
    SUBSET_LABEL,
    SUBSET_MANAGER,
    SUBSET_SERVICE_LABEL,
    Endpoint,
    EndpointSlice,
    Node,
    Service,
    SlicePort,
)
from ..model.plan import ignored_reason, port_policy

MAX_ENDPOINTS = 100  # per subset slice, as the EndpointSlice controller's default


@dataclass(frozen=True)
class Group:
    """Which subset slices an endpoint goes into: its Service's originals of
    one address family and one set of ports (a named targetPort may give
    slices of one Service different port numbers), and one subset."""

    family: str  # "IPv4", "IPv6"
    ports: tuple[SlicePort, ...]  # sorted
    subset: str  # a zone, or SUBSET_ALL

    def base_name(self, svc_name: str) -> str:
        sig = "|".join(f"{p.name}/{p.port}/{p.protocol}" for p in self.ports)
        h = hashlib.sha256(f"{svc_name}\0{self.family}\0{sig}\0{self.subset}".encode()).hexdigest()[:10]
        # A Service name is a DNS label (at most 63 characters): the slice
        # name stays far below the 253 of a DNS subdomain.
        return f"{svc_name}-{h}"


def _sig(ports: tuple[SlicePort, ...]) -> tuple:
    return tuple((p.name, p.protocol, p.port or 0) for p in ports)


def _ports_key(sl: EndpointSlice) -> tuple[SlicePort, ...]:
    return tuple(sorted(sl.ports, key=lambda p: (p.name, p.protocol, p.port or 0)))


def zones_of(nodes: Iterable[Node]) -> dict[str, frozenset[str]]:
    """zone -> the names of its nodes (nodes without a zone label left out:
    their agents read the originals)."""
    out: dict[str, set[str]] = {}
    for n in nodes:
        z = n.zone
        if z:
            out.setdefault(z, set()).add(n.name)
    return {z: frozenset(ns) for z, ns in out.items()}


def desired(
    svc: Service, originals: Iterable[EndpointSlice], zones: Mapping[str, frozenset[str]]
) -> dict[Group, dict[bytes, Endpoint]]:
    """Per group, the endpoints (by address) its subset slices must hold.
    `originals` are the Service's original slices, `zones` zones_of(Nodes)."""
    if ignored_reason(svc):
        return {}
    # Within a group every service port sees the same endpoints: merge by
    # address as ctrl.model.topology.merge_endpoints does (slices by name,
    # a non-terminating copy winning over a terminating one), so each
    # address is written once, with the copy the originals' merge picks.
    groups: dict[tuple[str, tuple[SlicePort, ...]], dict[bytes, Endpoint]] = {}
    for sl in sorted(originals, key=lambda s: s.name):
        if sl.address_type not in ("IPv4", "IPv6"):
            continue  # FQDN: nothing a proxy reads
        merged = groups.setdefault((sl.address_type, _ports_key(sl)), {})
        for ep in sl.endpoints:
            prev = merged.get(ep.addr)
            if prev is None or (prev.terminating and not ep.terminating):
                merged[ep.addr] = ep
    node_zone = {n: z for z, ns in zones.items() for n in ns}
    # categorize runs per service port over what every group serving that
    # port gives it: decide per service port (with its own policy), keep an
    # endpoint of a group when any port needs it.
    keep: dict[tuple[str, tuple[SlicePort, ...], str], set[bytes]] = {}
    for sp in svc.ports:
        pol = port_policy(svc, sp)
        for family in ("IPv4", "IPv6"):
            items = [
                ((family, ports), e)
                for (fam, ports), merged in groups.items()
                if fam == family and any(p.name == sp.name and p.protocol == sp.protocol for p in ports)
                for e in merged.values()
            ]
            if not items:
                continue
            items.sort(key=lambda it: (it[1].addr, _sig(it[0][1])))
            for subset, chosen in _subsets(items, pol.uses_cluster, pol.uses_local, zones, node_zone).items():
                for (fam, ports), e in chosen:
                    keep.setdefault((fam, ports, subset), set()).add(e.addr)
    out: dict[Group, dict[bytes, Endpoint]] = {}
    for (family, ports, subset), addrs in sorted(keep.items(), key=lambda kv: (kv[0][0], _sig(kv[0][1]), kv[0][2])):
        merged = groups[family, ports]
        out[Group(family, ports, subset)] = {a: merged[a] for a in sorted(addrs)}
    return out


Item = tuple[tuple[str, tuple[SlicePort, ...]], Endpoint]


def _subsets(
    items: list[Item],
    uses_cluster: bool,
    uses_local: bool,
    zones: Mapping[str, frozenset[str]],
    node_zone: Mapping[str, str],
) -> dict[str, list[Item]]:
    """subset -> the (group, endpoint) items it needs, for the endpoints
    one service port merges (each address once per group)."""
    ready = [it for it in items if it[1].ready]
    fallback = [it for it in items if it[1].serving and it[1].terminating]
    if not ready:
        # categorize falls back to the serving-terminating endpoints, with
        # no topology, for cluster and local traffic alike.
        return {SUBSET_ALL: fallback}
    zone_hints = all(it[1].hint_zones for it in ready)
    node_hints = all(it[1].hint_nodes for it in ready)
    if not (zone_hints or node_hints):
        # No hints apply on any node: every node uses every ready endpoint
        # (and, for Local policies, its own serving-terminating ones).
        return {SUBSET_ALL: ready + fallback if uses_local else ready}
    no_node_hint = next((it for it in ready if not it[1].hint_nodes), None)
    out: dict[str, list[Item]] = {}
    for zone, nodes in sorted(zones.items()):
        chosen: dict[int, Item] = {}

        def add(its: Iterable[Item], chosen=chosen) -> None:
            for it in its:
                chosen.setdefault(id(it), it)

        if uses_cluster:
            in_zone = [it for it in ready if zone in (it[1].hint_zones or ())] if zone_hints else []
            every = False
            for node in sorted(nodes):
                for_node = [it for it in ready if node in (it[1].hint_nodes or ())] if node_hints else []
                if for_node:
                    add(for_node)
                elif in_zone:
                    add(in_zone)
                else:
                    every = True  # a node here uses no hints
            if every:
                add(ready)
        if uses_local:
            for it in ready + fallback:
                e = it[1]
                where = node_zone.get(e.node_name) if e.node_name is not None else None
                if (where or e.zone) == zone:
                    add([it])
            if not any(it[1].ready for it in chosen.values()):
                # "Some endpoint may serve" (drop, not reject, without a
                # local one) stays true: one ready endpoint, used by none.
                add(ready[:1])
        if uses_cluster and no_node_hint is not None and all(it[1].hint_nodes for it in chosen.values() if it[1].ready):
            # Node hints do not apply (a ready endpoint has none), but every
            # ready one kept here has some: keep one without, or the subset
            # would turn node hints on. The zone filter leaves it out.
            add([no_node_hint])
        out[zone] = list(chosen.values())
    return out


def pack(
    base: str, want: Mapping[bytes, Endpoint], existing: Mapping[str, Iterable[bytes]]
) -> dict[str, list[Endpoint]]:
    """The slices (name -> endpoints) of one group: each endpoint of `want`
    stays in the slice of `existing` (name -> addresses, the slices written
    so far) it is in, the others fill slices with room (lowest index first),
    then new slices named base-<index>. A slice left empty is absent."""
    placed: set[bytes] = set()
    out: dict[str, list[Endpoint]] = {}
    for name in sorted(existing, key=_index_key):
        keep: list[Endpoint] = []
        for a in existing[name]:
            if a in want and a not in placed and len(keep) < MAX_ENDPOINTS:
                keep.append(want[a])
                placed.add(a)
        if keep:
            out[name] = keep
    rest = [e for a, e in sorted(want.items()) if a not in placed]
    if not rest:
        return out
    for name in sorted(out, key=_index_key):
        room = MAX_ENDPOINTS - len(out[name])
        if room > 0 and rest:
            out[name].extend(rest[:room])
            rest = rest[room:]
    used = {_index_key(n)[1] for n in out}
    i = 0
    while rest:
        while i in used:
            i += 1
        out[f"{base}-{i}"] = rest[:MAX_ENDPOINTS]
        rest = rest[MAX_ENDPOINTS:]
        used.add(i)
    return out


def _index_key(name: str) -> tuple[str, int]:
    head, _, idx = name.rpartition("-")
    return (head, int(idx)) if idx.isdigit() else (name, -1)


def group_of(sl: EndpointSlice) -> Group | None:
    """The group a subset slice was written for (None: not a subset slice)."""
    subset = sl.subset
    if subset is None:
        return None
    return Group(sl.address_type, _ports_key(sl), subset)


def subset_labels(svc: Service, group: Group) -> dict[str, str]:
    return {SUBSET_LABEL: group.subset, SUBSET_SERVICE_LABEL: svc.name, MANAGED_BY_LABEL: SUBSET_MANAGER}


def render(svc: Service, group: Group, name: str, eps: Iterable[Endpoint]) -> dict:
    """One subset slice as the API takes it."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": svc.namespace,
            "labels": subset_labels(svc, group),
            # Garbage collected with the Service; and how an agent tells a
            # subset slice of this Service from a forged one.
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc.name, "uid": svc.uid}],
        },
        "addressType": group.family,
        "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol} for p in group.ports],
        "endpoints": [endpoint_json(e, group.family) for e in eps],
    }


def endpoint_json(e: Endpoint, family: str) -> dict:
    """An endpoint as an EndpointSlice of this addressType holds it: what
    ctrl.k8s.objects parses back into the same Endpoint (its first address
    only: the only one a proxy uses). An IPv6 slice's address stays IPv6
    text, even one of the IPv4-mapped form (which Endpoint.address would
    give as IPv4, and the API would refuse in an IPv6 slice)."""
    out: dict = {
        "addresses": [socket.inet_ntop(socket.AF_INET6, e.addr) if family == "IPv6" else e.address],
        "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
    }
    if e.node_name is not None:
        out["nodeName"] = e.node_name
    if e.zone is not None:
        out["zone"] = e.zone
    hints: dict = {}
    if e.hint_zones:
        hints["forZones"] = [{"name": z} for z in e.hint_zones]
    if e.hint_nodes:
        hints["forNodes"] = [{"name": n} for n in e.hint_nodes]
    if hints:
        out["hints"] = hints
    return out


def subset_plan(
    svc: Service,
    originals: Iterable[EndpointSlice],
    zones: Mapping[str, frozenset[str]],
    existing: Iterable[EndpointSlice] = (),
) -> dict[str, tuple[Group, list[Endpoint]]]:
    """name -> (group, endpoints) of every subset slice the Service should
    have, packed around `existing` (its subset slices written so far)."""
    held: dict[Group, dict[str, list[bytes]]] = {}
    for sl in existing:
        g = group_of(sl)
        if g is not None:
            held.setdefault(g, {})[sl.name] = [e.addr for e in sl.endpoints]
    out: dict[str, tuple[Group, list[Endpoint]]] = {}
    for group, want in desired(svc, originals, zones).items():
        for name, eps in pack(group.base_name(svc.name), want, held.get(group, {})).items():
            out[name] = (group, eps)
    return out


def subset_slices(
    svc: Service,
    originals: Iterable[EndpointSlice],
    zones: Mapping[str, frozenset[str]],
    existing: Iterable[EndpointSlice] = (),
) -> dict[str, dict]:
    """name -> subset slice (API form) the Service should have, packed
    around `existing` (its subset slices written so far)."""
    return {
        name: render(svc, group, name, eps)
        for name, (group, eps) in subset_plan(svc, originals, zones, existing).items()
    }


def holds(cur: EndpointSlice, svc: Service, group: Group, eps: list[Endpoint]) -> bool:
    """Whether the subset slice `cur`, as read back, already is what
    render(svc, group, cur.name, eps) writes: compared on the parsed form,
    so an unchanged slice costs no rendering (endpoint_json round-trips an
    Endpoint exactly; tests/unit/test_subset.py checks it)."""
    return (
        cur.endpoints == tuple(eps)
        and group_of(cur) == group
        and cur.labels == subset_labels(svc, group)
        and svc.uid in cur.owner_uids
        and len(cur.owner_uids) == 1
        and not cur.problems
    )


def gains(cur: EndpointSlice | None, eps: list[Endpoint]) -> bool:
    """Whether writing `eps` where `cur` is gives a zone's nodes an endpoint
    to use that `cur` does not hold usable: a new address, or one turned
    ready or serving. Such a write is not held back for coalescing (a new
    Pod's capacity reaches the agents one write after the originals); a
    write that only removes or demotes endpoints is."""
    if cur is None:
        return bool(eps)
    have = {e.addr: e for e in cur.endpoints}
    for e in eps:
        old = have.get(e.addr)
        if old is None or (e.ready and not old.ready) or (e.serving and not old.serving):
            return True
    return False
