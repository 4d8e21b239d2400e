"""Desired dataplane frontends of one Service. Pure: no kernel, no ids.

A Frontend is one entry of the frontend map (address, port, protocol,
scope) with the backends it should spread over. Ids and slot positions are
decided later by ctrl.diff against what is programmed, so that the same
input always plans the same frontends and an unchanged service diffs empty.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from .objects import EndpointSlice, Service, ServicePort, addr16
from .topology import PortPolicy, categorize, merge_endpoints

PROTO_NUMBERS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}

SCOPE_INTERNAL = 0
SCOPE_EXTERNAL = 1

SVC_F_AFFINITY = 1  # ebpf/sliceproxy.h SP_SVC_F_AFFINITY; checked by tests/unit/test_layout.py

# Protocols the datapath rewrites today.
SERVED_PROTOCOLS = ("TCP", "UDP")

Backend = tuple[bytes, int, int]  # (addr16, port, protocol number)


@dataclass(frozen=True, slots=True)
class Frontend:
    addr: bytes  # addr16
    port: int
    proto: int
    scope: int
    name: str  # "namespace/name:portname/PROTO", stored in sp_names_v1
    backends: tuple[Backend, ...]  # no duplicates, in merge order
    flags: int = 0
    affinity_timeout: int = 0

    @property
    def key(self) -> tuple[bytes, int, int, int]:
        return (self.addr, self.port, self.proto, self.scope)


def frontend_name(svc: Service, port_name: str, port: int, proto: str) -> str:
    return f"{svc.namespace}/{svc.name}:{port_name or port}/{proto}"


def ignored_reason(svc: Service) -> str | None:
    """Why kube-proxy would not program this Service at all, or None."""
    if svc.type == "ExternalName":
        return "type ExternalName"
    if not svc.cluster_ips:
        return "headless (clusterIP None or empty)"
    if "service.kubernetes.io/service-proxy-name" in svc.labels:
        return "label service.kubernetes.io/service-proxy-name hands it to another proxy"
    return None


def port_policy(svc: Service, sp: ServicePort) -> PortPolicy:
    accessible = svc.externally_accessible(sp)
    return PortPolicy(
        internal_local=svc.internal_traffic_policy == "Local",
        external_local=accessible and svc.external_traffic_policy == "Local",
        externally_accessible=accessible,
    )


def no_local_endpoints(
    svc: Service | None, slices: list[EndpointSlice], node_name: str | None, zone: str | None
) -> tuple[int, int]:
    """Service ports with a Local traffic policy and no local endpoint on
    this node, as (internal, external): kube-proxy's
    sync_proxy_rules_no_local_endpoints_total."""
    if svc is None or ignored_reason(svc):
        return 0, 0
    internal = external = 0
    for sp in svc.ports:
        policy = port_policy(svc, sp)
        if not policy.uses_local:
            continue
        families = {"IPv6" if ":" in ip else "IPv4" for ip in svc.cluster_ips}
        local = False
        for family in families:
            cat = categorize(merge_endpoints(sp, slices, family), policy, node_name, zone)
            local = local or bool(cat.local)
        if not local:
            internal += policy.internal_local
            external += policy.external_local
    return internal, external


def plan_service(
    svc: Service | None,
    slices: list[EndpointSlice],
    node_name: str | None = None,
    zone: str | None = None,
) -> tuple[list[Frontend], list[str]]:
    """Frontends for one service as this node (name, zone label) serves it,
    and notes on what was skipped and why."""
    if svc is None or ignored_reason(svc):
        return [], []
    notes: list[str] = []
    out: list[Frontend] = []
    for ip in svc.cluster_ips:
        a = addr16(ip)
        # Each cluster IP is served by the slices of its own family
        # (dual-stack: one frontend per family, no translation between them).
        family = "IPv6" if ":" in ip else "IPv4"
        for sp in svc.ports:
            if sp.protocol not in SERVED_PROTOCOLS:
                notes.append(
                    f"{svc.key} Service: port {sp.name or sp.port}: protocol {sp.protocol} is not "
                    f"served by this dataplane; skipped"
                )
                continue
            proto = PROTO_NUMBERS[sp.protocol]
            policy = port_policy(svc, sp)
            cat = categorize(merge_endpoints(sp, slices, family), policy, node_name, zone)
            # In-cluster traffic: internalTrafficPolicy Local keeps it on this
            # node's endpoints, and with none it is dropped (count 0).
            eps = cat.local if policy.internal_local else cat.cluster
            # Merge order (slices by name, endpoints in slice order) is
            # deterministic; no sort needed on 100,000 backends.
            backends = tuple(dict.fromkeys([(e.ep.addr, e.port, proto) for e in eps]))
            out.append(
                Frontend(
                    addr=a,
                    port=sp.port,
                    proto=proto,
                    scope=SCOPE_INTERNAL,
                    name=frontend_name(svc, sp.name, sp.port, sp.protocol),
                    backends=backends,
                    flags=SVC_F_AFFINITY if svc.affinity_timeout else 0,
                    affinity_timeout=svc.affinity_timeout,
                )
            )
    return out, notes
