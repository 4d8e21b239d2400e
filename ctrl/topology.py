"""Which endpoints a node uses for one service port. Pure functions.

`merge_endpoints` follows kube-proxy's endpointslicecache: a slice port
counts for a service port when name and protocol match, each slice keeps its
own port number (a named targetPort may resolve differently per slice), only
an endpoint's first address counts (done in objects.parse_slice), and an
ip:port present in two slices (an endpoint moving between them) appears
once, the non-terminating copy winning.

`select_endpoints` is the node's choice. Today: the ready endpoints, or, when
none is ready, the serving-and-terminating ones (kube-proxy's fallback so
that connections drain instead of failing during a rollout). Traffic
policies and topology-aware routing extend this function; see
docs/semantics.md.
"""

from __future__ import annotations

from typing import NamedTuple

from .objects import Endpoint, EndpointSlice, ServicePort


class PortEndpoint(NamedTuple):
    """An endpoint with the port number its slice gives the service port."""

    ep: Endpoint
    port: int


def merge_endpoints(sp: ServicePort, slices: list[EndpointSlice], address_type: str) -> list[PortEndpoint]:
    """Endpoints of every slice of one address family for one service port."""
    merged: dict[tuple[bytes, int], PortEndpoint] = {}
    for sl in sorted(slices, key=lambda s: s.name):
        if sl.address_type != address_type:
            continue
        port = None
        for p in sl.ports:
            if p.name == sp.name and p.protocol == sp.protocol:
                port = p.port
                break
        if port is None:
            continue
        get = merged.get
        for ep in sl.endpoints:
            k = (ep.addr, port)
            prev = get(k)
            if prev is None or (prev.ep.terminating and not ep.terminating):
                merged[k] = PortEndpoint(ep, port)
    return list(merged.values())


def select_endpoints(eps: list[PortEndpoint]) -> list[PortEndpoint]:
    """The endpoints this node sends the service port's traffic to."""
    ready = [e for e in eps if e.ep.ready]
    if ready:
        return ready
    return [e for e in eps if e.ep.serving and e.ep.terminating]
