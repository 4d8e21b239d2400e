"""Which endpoints a node uses for one service port. Pure functions.

`merge_endpoints` follows kube-proxy's endpointslicecache: a slice port
counts for a service port when name and protocol match, each slice keeps its
own port number (a named targetPort may resolve differently per slice), only
an endpoint's first address counts (done in objects.parse_slice), and an
ip:port present in two slices (an endpoint moving between them) appears
once, the non-terminating copy winning.

`categorize` is kube-proxy's CategorizeEndpoints (pkg/proxy/topology.go):
the node's cluster endpoints (ready ones, filtered by topology hints; when
none is ready, the serving-and-terminating ones), its local endpoints (ready
ones on this node, else serving-and-terminating ones on this node), the
union of both when the port uses both, and whether the service has any
usable endpoint at all. docs/semantics.md states the rules case by case.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, compress, repeat
from operator import attrgetter, itemgetter
from typing import NamedTuple

from ..k8s.objects import Endpoint, EndpointSlice, ServicePort


class PortEndpoint(NamedTuple):
    """An endpoint with the port number its slice gives the service port."""

    ep: Endpoint
    port: int


# Fields read in C (map, compress), for the model's bulk steps: an
# Endpoint's address and readiness, a PortEndpoint's endpoint and port.
addr_of = itemgetter(0)
ready_of = itemgetter(1)
hint_zones_of = itemgetter(6)
hint_nodes_of = itemgetter(7)
ep_of = itemgetter(0)
port_of = itemgetter(1)
_port_endpoint = tuple.__new__  # PortEndpoint((ep, port)) without its Python __new__
_name_of = attrgetter("name")


def _parts(sp: ServicePort, slices: list[EndpointSlice], address_type: str) -> list[tuple[tuple[Endpoint, ...], int]]:
    """(endpoints, port) of each slice that gives the port endpoints of
    this family, slices by name."""
    parts = []
    for sl in sorted(slices, key=_name_of) if len(slices) > 1 else slices:
        if sl.address_type != address_type:
            continue
        for p in sl.ports:
            if p.name == sp.name and p.protocol == sp.protocol:
                if p.port is not None:  # no number: the slice gives this port no endpoint
                    parts.append((sl.endpoints, p.port))
                break
    return parts


def _port_endpoints(parts: list[tuple[tuple[Endpoint, ...], int]]) -> Iterator[PortEndpoint]:
    return chain.from_iterable(map(_port_endpoint, repeat(PortEndpoint), zip(eps, repeat(port))) for eps, port in parts)


def merge_endpoints(sp: ServicePort, slices: list[EndpointSlice], address_type: str) -> list[PortEndpoint]:
    """Endpoints of every slice of one address family for one service port."""
    return merge_endpoints_for_plan(sp, slices, address_type)[0]


def merge_endpoints_for_plan(
    sp: ServicePort, slices: list[EndpointSlice], address_type: str, keyed_from: int | None = None
) -> tuple[list[PortEndpoint], dict[tuple[bytes, int], PortEndpoint] | None]:
    """merge_endpoints, and with `keyed_from`, for that many endpoints or
    more, also merge_endpoints_keyed's dict (None otherwise). Without the
    dict the usual case makes no (address, port) key per endpoint: no
    address twice means no key twice, which a set of the addresses tells
    (bytes keep their hashes); otherwise the keys decide."""
    parts = _parts(sp, slices, address_type)
    if len(parts) == 1:  # one slice (most Services): no sum, no chain
        eps, port = parts[0]
        total = len(eps)
        if (keyed_from is None or total < keyed_from) and len(set(map(addr_of, eps))) == total:
            return list(map(_port_endpoint, repeat(PortEndpoint), zip(eps, repeat(port)))), None
    total = sum(len(eps) for eps, _ in parts)
    if keyed_from is None or total < keyed_from:
        if len(set(chain.from_iterable(map(addr_of, eps) for eps, _ in parts))) == total:
            return list(_port_endpoints(parts)), None
        return list(_merged(parts, total).values()), None
    merged = _merged(parts, total)
    return list(merged.values()), merged


def ready_alone(
    sp: ServicePort, slices: list[EndpointSlice], address_type: str
) -> tuple[list[tuple[list[Endpoint], int]], int] | None:
    """categorize()'s cluster set of one service port and family when it
    is the usual one and no topology applies, as each slice's ready
    endpoints with their port (slices by name), and how many endpoints
    the port has in all: no (address, port) twice, some endpoint ready
    and no ready one hinted. Read in C, without a PortEndpoint each (most
    Services of a cluster, and one of 100,000 endpoints); None otherwise
    (merge and categorize)."""
    parts = _parts(sp, slices, address_type)
    if len(parts) == 1:  # most Services
        alone, port = parts[0]
        ready = list(compress(alone, map(ready_of, alone)))
        if not ready or any(map(hint_zones_of, ready)) or any(map(hint_nodes_of, ready)):
            return None
        return ([(ready, port)], len(alone)) if len(set(map(addr_of, alone))) == len(alone) else None
    if not parts:
        return None
    each = [(list(compress(part, map(ready_of, part))), port) for part, port in parts]
    if not any(ready for ready, _ in each):
        return None
    for ready, _ in each:
        if any(map(hint_zones_of, ready)) or any(map(hint_nodes_of, ready)):
            return None
    # No (address, port) twice: among the slices giving the port one
    # number, no address twice.
    by_port: dict[int, list[tuple[Endpoint, ...]]] = {}
    for part, port in parts:
        by_port.setdefault(port, []).append(part)
    total = 0
    for same in by_port.values():
        n = sum(map(len, same))
        if len(set(chain.from_iterable(map(addr_of, part) for part in same))) != n:
            return None
        total += n
    return each, total


def merge_endpoints_keyed(
    sp: ServicePort, slices: list[EndpointSlice], address_type: str
) -> dict[tuple[bytes, int], PortEndpoint]:
    """merge_endpoints by (address, port): the planner keeps this dict as
    its per-port state instead of building it again."""
    parts = _parts(sp, slices, address_type)
    return _merged(parts, sum(len(eps) for eps, _ in parts))


def _merged(parts: list[tuple[tuple[Endpoint, ...], int]], total: int) -> dict[tuple[bytes, int], PortEndpoint]:
    # The usual case first, in C: no (address, port) twice, so there is
    # nothing to choose between and the dict is built in one pass.
    keys = chain.from_iterable(zip(map(addr_of, eps), repeat(port)) for eps, port in parts)
    merged: dict[tuple[bytes, int], PortEndpoint] = dict(zip(keys, _port_endpoints(parts), strict=True))
    if len(merged) == total:
        return merged
    # Some (address, port) listed twice: the first copy wins unless it is
    # terminating and a later one is not.
    merged = {}
    get = merged.get
    new = tuple.__new__  # PortEndpoint's own __new__ is a Python call
    for eps, port in parts:
        for ep in eps:
            k = (ep.addr, port)
            prev = get(k)
            if prev is None or (prev.ep.terminating and not ep.terminating):
                merged[k] = new(PortEndpoint, (ep, port))
    return merged


# Not frozen (nor Categorized): one of each per port of every Service planned,
# and a frozen dataclass sets each field through object.__setattr__. Never
# assigned to after it is built.
@dataclass(slots=True)
class PortPolicy:
    """The traffic policies of one service port, as kube-proxy reads them."""

    internal_local: bool = False  # internalTrafficPolicy: Local
    external_local: bool = False  # externalTrafficPolicy: Local (if externally accessible)
    externally_accessible: bool = False  # NodePort, LoadBalancer IPs or externalIPs

    @property
    def uses_cluster(self) -> bool:
        # Even with externalTrafficPolicy Local, an externally accessible
        # port needs cluster endpoints for in-cluster traffic to its
        # external addresses (kube-proxy's short circuit).
        return not self.internal_local or self.externally_accessible

    @property
    def uses_local(self) -> bool:
        return self.internal_local or (self.external_local and self.externally_accessible)


@dataclass(slots=True)
class Categorized:
    cluster: list[PortEndpoint]  # for traffic under a Cluster policy
    local: list[PortEndpoint]  # for traffic under a Local policy
    reachable: list[PortEndpoint]  # cluster and local together
    has_any: bool  # some endpoint anywhere may serve (decides drop vs reject)


def topology_mode(eps: list[PortEndpoint], node_name: str | None, zone: str | None) -> str | None:
    """ "node", "zone" or None: which hints filter the cluster endpoints.

    Hints are used only when every ready endpoint carries them and at least
    one is for this node (forNodes, trafficDistribution PreferSameNode) or
    for this node's zone (forZones: topology-aware routing, PreferClose /
    PreferSameZone); otherwise no filtering at all, so a node never ends up
    with no endpoint because of hints."""
    has_node = has_zone = False
    all_node = all_zone = True
    for e in eps:
        if not e.ep.ready:
            continue
        if not e.ep.hint_nodes:
            all_node = False
        elif node_name in e.ep.hint_nodes:
            has_node = True
        if not e.ep.hint_zones:
            if not all_node:
                return None  # a ready endpoint with neither hint: no filtering
            all_zone = False
        elif zone in e.ep.hint_zones:
            has_zone = True
    if all_node and has_node:
        return "node"
    if all_zone and has_zone:
        return "zone"
    return None


def categorize(eps: list[PortEndpoint], policy: PortPolicy, node_name: str | None, zone: str | None) -> Categorized:
    cluster: list[PortEndpoint] = []
    local: list[PortEndpoint] = []
    has_any = False
    if policy.uses_cluster:
        mode = topology_mode(eps, node_name, zone)
        if mode == "node":
            cluster = [e for e in eps if e.ep.ready and node_name in (e.ep.hint_nodes or ())]
        elif mode == "zone":
            cluster = [e for e in eps if e.ep.ready and zone in (e.ep.hint_zones or ())]
        else:
            cluster = list(compress(eps, map(ready_of, map(ep_of, eps))))
        if not cluster:
            # No ready endpoint anywhere (hints never empty a ready set):
            # fall back to the terminating ones still serving, no topology.
            cluster = [e for e in eps if e.ep.serving and e.ep.terminating]
        has_any = bool(cluster)
    if not policy.uses_local:
        return Categorized(cluster, [], cluster, has_any)

    local_ready = [e for e in eps if e.ep.ready and e.ep.node_name == node_name]
    if local_ready:
        local = local_ready
    else:
        local = [e for e in eps if e.ep.serving and e.ep.terminating and e.ep.node_name == node_name]
    has_any = has_any or any(e.ep.ready or (e.ep.serving and e.ep.terminating) for e in eps)
    if not policy.uses_cluster:
        return Categorized([], local, local, has_any)
    reachable = list({(e.ep.addr, e.port): e for e in cluster + local}.values())
    return Categorized(cluster, local, reachable, has_any)


def select_endpoints(eps: list[PortEndpoint]) -> list[PortEndpoint]:
    """The cluster endpoints of a port with no Local policy and no topology
    hints for this node: the ready ones, else the serving-terminating ones."""
    return categorize(eps, PortPolicy(), None, None).cluster
