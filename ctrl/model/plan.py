"""Desired dataplane frontends of one Service. Pure: no kernel, no ids.

A Frontend is one entry of the frontend map (address, port, protocol,
scope) with the backends it should spread over. Ids and slot positions are
decided later by the dataplane (ctrl.dataplane.programmed) against what is
programmed, so that the same input always plans the same frontends and an
unchanged service diffs empty.

Scopes and frontend flags are symbols here (Scope, FrontendFlag): the
dataplane turns them into the values ebpf/sliceproxy.h defines
(ctrl.dataplane.abi), so this layer needs neither the header nor cffi.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from enum import Flag, StrEnum, auto
from itertools import chain, repeat
from operator import attrgetter
from typing import NamedTuple

from ..k8s.objects import EndpointSlice, Service, ServicePort
from ..util.addrs import addr16, addr_str, is_v4
from .topology import (
    Categorized,
    PortEndpoint,
    PortPolicy,
    addr_of,
    categorize,
    ep_of,
    merge_endpoints,
    merge_endpoints_for_plan,
    port_of,
    ready_alone,
)

PROTO_NUMBERS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}


class Scope(StrEnum):
    """Where a frontend's traffic comes from: part of its key, so a Service
    can answer pods and outside clients differently in one lookup (traffic
    policies). SP_SCOPE_* in ebpf/sliceproxy.h."""

    INTERNAL = "internal"  # pods of this node (pod interfaces' ingress)
    EXTERNAL = "external"  # outside the cluster (external interfaces' ingress)


class FrontendFlag(Flag):
    """How the datapath treats a frontend's flows. SP_SVC_F_<name> in
    ebpf/sliceproxy.h: the dataplane translates by name."""

    AFFINITY = auto()  # sessionAffinity ClientIP
    SRC_RANGES = auto()  # loadBalancerSourceRanges filter the sources
    MASQ = auto()  # external scope, externalTrafficPolicy Cluster: masquerade flows leaving the node
    # The Service port has no endpoint anywhere (categorize()'s has_any is
    # false): with no backend, a new flow is answered with an ICMP port
    # unreachable, kube-proxy's REJECT; without this flag (a Local policy
    # and no local endpoint) it is dropped, kube-proxy's DROP.
    REJECT = auto()
    # External scope under --external-lb=maglev: a new flow takes the entry
    # of the frontend's Maglev table (ctrl.model.maglev) its hash picks, the
    # same on every node. Set by the dataplane, which knows the mode.
    MAGLEV = auto()


NO_FLAGS = FrontendFlag(0)

# Which endpoints a frontend spreads over (see select_for_rule):
RULE_CLUSTER_IP = "itp"  # a cluster IP: internalTrafficPolicy decides
RULE_EXTERNAL_FROM_PODS = "cluster"  # an external address reached from pods
RULE_EXTERNAL = "etp"  # an external address reached from outside
# ... and the set of endpoints that rule comes to (selects()).
SELECT_LOCAL = "local"
SELECT_CLUSTER = "cluster"

# A port whose one selection is the ready endpoints of its slices, no
# address twice and no topology, takes them straight from the slices
# (topology.ready_alone); off, every port is merged and categorized
# (tests compare the two).
ONE_SLICE_DIRECT = True

# Protocols the datapath rewrites today.
SERVED_PROTOCOLS = ("TCP", "UDP")

Backend = tuple[bytes, int, int]  # (addr16, port, protocol number)
SourceRange = tuple[bytes, int]  # (addr16 of the network, prefix length over 128 bits)
FKey = tuple[bytes, int, int, Scope]  # a frontend: (addr16, port, protocol number, scope)


@dataclass(frozen=True)
class NodeAddresses:
    """What the external frontends need to know of this node."""

    nodeport: tuple[str, ...] = ()  # addresses NodePorts are served on (--nodeport-addresses applied)
    ips: tuple[str, ...] = ()  # every InternalIP and ExternalIP of the Node


def nodeport_addresses(ips: tuple[str, ...], cidrs: tuple[str, ...]) -> tuple[str, ...]:
    """kube-proxy's --nodeport-addresses: the node's addresses inside one of
    the CIDRs; no CIDR: all of them; "primary": the first address of each
    family."""
    if not cidrs:
        return ips
    if "primary" in cidrs:
        firsts: dict[bool, str] = {}
        for ip in ips:
            firsts.setdefault(":" in ip, ip)
        return tuple(firsts.values())
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    return tuple(ip for ip in ips if any(ipaddress.ip_address(ip) in n for n in nets))


def selects(rule: str, policy: PortPolicy) -> str:
    """Which of categorize()'s sets a frontend of this rule spreads over
    (SELECT_LOCAL or SELECT_CLUSTER), kube-proxy's chains: a cluster IP
    goes to KUBE-SVL (local) under internalTrafficPolicy Local, else
    KUBE-SVC (cluster); an external address reached from outside goes to
    the local set under externalTrafficPolicy Local, else the cluster set;
    reached from a pod (kube-proxy's short circuit of traffic from the
    cluster) it always goes to the cluster set. Frontends of one port and
    family that select the same set share one selection: a NodePort and
    LoadBalancer Service under Cluster policies is planned once per port,
    not once per kind of frontend."""
    if rule == RULE_CLUSTER_IP:
        return SELECT_LOCAL if policy.internal_local else SELECT_CLUSTER
    if rule == RULE_EXTERNAL:
        return SELECT_LOCAL if policy.external_local else SELECT_CLUSTER
    return SELECT_CLUSTER


def selected(cat: Categorized, which: str) -> list[PortEndpoint]:
    """categorize()'s set `which` (SELECT_LOCAL or SELECT_CLUSTER) names."""
    return cat.local if which == SELECT_LOCAL else cat.cluster


# Not frozen: a frozen dataclass sets each field through object.__setattr__,
# which made a Frontend three times as costly to build (10,000 per full
# sync at S2). Treated as immutable all the same: the planner derives a
# changed one (moved), and nothing assigns to one.
@dataclass(slots=True)
class Frontend:
    addr: bytes  # addr16
    port: int
    proto: int
    scope: Scope
    name: str  # "namespace/name:portname/PROTO", stored in the names map
    # No duplicates, in merge order. From plan_service a tuple; from
    # ServicePlanner's delta path a live view of its selection, valid until
    # the next plan of the same Service (copying 100,000 backends per
    # one-slice change would cost more than the change).
    backends: Collection[Backend]
    flags: FrontendFlag = NO_FLAGS
    affinity_timeout: int = 0
    source_ranges: tuple[SourceRange, ...] = ()  # with FrontendFlag.SRC_RANGES: the allowed sources
    # Set by ServicePlanner: what changed since this frontend's plan number
    # `base` (`backends` holds the whole set either way), so the dataplane (ctrl.dataplane.programmed) can
    # apply a one-slice change in time proportional to the slice, not to
    # the Service. None: no earlier plan to be relative to.
    added: tuple[Backend, ...] | None = field(default=None, compare=False)
    removed: tuple[Backend, ...] | None = field(default=None, compare=False)
    base: int = field(default=-1, compare=False)
    version: int = field(default=-1, compare=False)
    # Frontends of one Service with the same group select the same backends
    # (in the same order, with the same added/removed, base and version):
    # the dataplane gives them one slot table. None: a table of its own.
    group: tuple | None = field(default=None, compare=False)
    # (addr, port, proto, scope): what the dataplane knows it by, made
    # once (the diff reads it about six times per frontend).
    key: FKey = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.key = (self.addr, self.port, self.proto, self.scope)

    def moved(
        self,
        backends: Collection[Backend],
        flags: FrontendFlag,
        added: tuple[Backend, ...] | None,
        removed: tuple[Backend, ...] | None,
        base: int,
        version: int,
    ) -> Frontend:
        """This frontend with these backends, flags and delta: what
        dataclasses.replace makes, built by position (a sixth of its cost,
        five times per change of a LoadBalancer Service)."""
        return Frontend(
            self.addr,
            self.port,
            self.proto,
            self.scope,
            self.name,
            backends,
            flags,
            self.affinity_timeout,
            self.source_ranges,
            added,
            removed,
            base,
            version,
            self.group,
        )


def frontend_str(key: FKey) -> str:
    """198.19.0.10:80/TCP (external) for people."""
    addr, port, proto, scope = key
    host = addr_str(addr) if is_v4(addr) else f"[{addr_str(addr)}]"
    where = " (external)" if scope == Scope.EXTERNAL else ""
    return f"{host}:{port}/{PROTO_NAMES.get(proto, proto)}{where}"


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
    return _POLICIES[
        svc.internal_traffic_policy == "Local", accessible and svc.external_traffic_policy == "Local", accessible
    ]


# Every PortPolicy there is, by its fields: shared (never assigned to),
# not one made per port of every Service planned.
_POLICIES = {
    (i, e and a, a): PortPolicy(internal_local=i, external_local=e and a, externally_accessible=a)
    for i in (False, True)
    for e in (False, True)
    for a in (False, True)
}


def no_local_endpoints(
    svc: Service | None, slices: list[EndpointSlice], node_name: str | None, zone: str | None
) -> tuple[int, int]:
    """Service ports with a Local traffic policy and no local endpoint on
    this node, as (internal, external): kube-proxy's
    sync_proxy_rules_no_local_endpoints_total. Ports of a protocol this
    dataplane does not serve are not counted: nothing is programmed for
    them. From scratch (every slice merged again): the agent reads the
    same count from ServicePlanner.no_local, which keeps it per change;
    tests/unit/test_no_local.py checks that both agree."""
    if svc is None or ignored_reason(svc):
        return 0, 0
    families = {family_of(ip) for ip in svc.cluster_ips}

    def has_local(sp: ServicePort) -> bool:
        policy = port_policy(svc, sp)
        return any(categorize(merge_endpoints(sp, slices, f), policy, node_name, zone).local for f in families)

    return count_no_local(svc, has_local)


def count_no_local(svc: Service, has_local: Callable[[ServicePort], bool]) -> tuple[int, int]:
    """(internal, external) of no_local_endpoints, given whether a served
    port has a local endpoint (in any family of the Service's cluster IPs:
    categorize()'s local set, which exists only for a port using it)."""
    internal = external = 0
    if svc.internal_traffic_policy != "Local" and svc.external_traffic_policy != "Local":
        return 0, 0  # no port uses a local set (most Services)
    for sp in svc.ports:
        if sp.protocol not in SERVED_PROTOCOLS:
            continue
        policy = port_policy(svc, sp)
        if policy.uses_local and not has_local(sp):
            internal += policy.internal_local
            external += policy.external_local
    return internal, external


class _Spec(NamedTuple):
    """One frontend to plan: where, and which endpoints it takes. (A
    NamedTuple: one or more per Service in every full plan, built for a
    fraction of a frozen dataclass's cost.)"""

    addr: str
    port: int
    scope: Scope
    sp: ServicePort
    family: str
    rule: str
    flags: FrontendFlag
    ranges: tuple[SourceRange, ...]


_new = tuple.__new__
_node_port_of = attrgetter("node_port")


def family_of(ip: str) -> str:
    return "IPv6" if ":" in ip else "IPv4"


def _source_ranges(svc: Service, family: str, node: NodeAddresses) -> tuple[SourceRange, ...]:
    """loadBalancerSourceRanges of one family, as kube-proxy's firewall
    chain allows them; () means no filtering. A range of the other family
    only is no filter for this one (kube-proxy filters the ranges per
    family first). A range holding one of the node's addresses also admits
    the LB IPs as sources (a node reaching an LB IP that is routed back to
    it with the LB IP as source)."""
    if not svc.lb_source_ranges:
        return ()
    out: list[SourceRange] = []
    nets = [ipaddress.ip_network(c) for c in svc.lb_source_ranges]
    nets = [n for n in nets if (n.version == 6) == (family == "IPv6")]
    for n in nets:
        out.append((addr16(str(n.network_address)), n.prefixlen + (96 if n.version == 4 else 0)))
    if nets and any(ipaddress.ip_address(ip) in n for ip in node.ips for n in nets):
        for ip in svc.lb_ips:
            if family_of(ip) == family:
                out.append((addr16(ip), 128))
    return tuple(dict.fromkeys(out))


def _specs(svc: Service, node: NodeAddresses | None) -> list[_Spec]:
    """Every frontend of a Service, in a fixed order: per family of its
    cluster IPs (kube-proxy serves a family only where the Service has a
    cluster IP of it) the cluster IPs, then NodePorts on the node's
    addresses, externalIPs and LoadBalancer ingress IPs, the last three
    each in both scopes."""
    node = node or NodeAddresses()
    out: list[_Spec] = []
    affinity = FrontendFlag.AFFINITY if svc.affinity_timeout else NO_FLAGS
    for ip in svc.cluster_ips:
        family = family_of(ip)
        for sp in svc.ports:
            # tuple.__new__: the NamedTuple's own __new__ is a Python call.
            out.append(_new(_Spec, (ip, sp.port, Scope.INTERNAL, sp, family, RULE_CLUSTER_IP, affinity, ())))
    if not (svc.external_ips or svc.lb_ips or any(map(_node_port_of, svc.ports))):
        return out  # cluster IPs only (most Services)
    families = list(dict.fromkeys(map(family_of, svc.cluster_ips)))
    external_local = svc.external_traffic_policy == "Local"
    for family in families:
        ext: list[tuple[str, int, ServicePort, tuple[SourceRange, ...]]] = []
        for sp in svc.ports:
            if sp.node_port:
                ext.extend((a, sp.node_port, sp, ()) for a in node.nodeport if family_of(a) == family)
        ranges = _source_ranges(svc, family, node)
        for sp in svc.ports:
            ext.extend((a, sp.port, sp, ()) for a in svc.external_ips if family_of(a) == family)
            ext.extend((a, sp.port, sp, ranges) for a in svc.lb_ips if family_of(a) == family)
        for a, port, sp, rng in ext:
            f = affinity | (FrontendFlag.SRC_RANGES if rng else NO_FLAGS)
            out.append(_Spec(a, port, Scope.INTERNAL, sp, family, RULE_EXTERNAL_FROM_PODS, f, rng))
            f_ext = f | (NO_FLAGS if external_local else FrontendFlag.MASQ)
            out.append(_Spec(a, port, Scope.EXTERNAL, sp, family, RULE_EXTERNAL, f_ext, rng))
    return out


def selection_key(spec: _Spec, policy: PortPolicy) -> tuple:
    """What a frontend's endpoints depend on: its port, family and the set
    its rule selects under the port's policy."""
    return (spec.sp.port, spec.sp.protocol, spec.family, selects(spec.rule, policy))


def plan_service(
    svc: Service | None,
    slices: list[EndpointSlice],
    node_name: str | None = None,
    zone: str | None = None,
    node: NodeAddresses | None = None,
) -> tuple[list[Frontend], list[str]]:
    """Frontends for one service as this node (name, zone label, addresses)
    serves it, and notes on what was skipped and why."""
    fronts, notes, _, _ = plan_full(svc, slices, node_name, zone, node)
    return fronts, notes


def plan_full(
    svc,
    slices,
    node_name,
    zone,
    node,
    merged_out: dict | None = None,
    versions: Iterator[int] | None = None,
    keyed_from: int = 0,
    checked: bool = False,
) -> tuple[list[Frontend], list[str], dict, dict]:
    """plan_service, and what ServicePlanner keeps of it: the selection_key
    of each frontend, and per (port, protocol) whether categorize() found a
    local endpoint (for no_local; known for the ports using one). With
    `merged_out`, also the merged endpoints by (address, port) of each
    (port, protocol, family) a frontend uses that has `keyed_from`
    endpoints or more, which the planner's per-port state adopts instead
    of merging the slices again (None for one read straight from its
    slices: the state merges them when it is built); with `versions`,
    each frontend numbered from it (the planner's plan numbers: set here,
    not copied in afterwards). checked: the caller has found svc there
    and not ignored_reason'd."""
    if not checked and (svc is None or ignored_reason(svc)):
        return [], [], {}, {}
    notes: list[str] = []
    out: list[Frontend] = []
    meta: dict[tuple, tuple] = {}  # frontend key -> selection_key
    skipped: set[str] = set()
    # selection_key -> its backends, the REJECT flag when no endpoint
    # anywhere may serve, and its plan number (one per group).
    chosen: dict[tuple, tuple[tuple[Backend, ...], FrontendFlag, int]] = {}
    local: dict[tuple[int, str], bool] = {}
    policies: dict[int, PortPolicy] = {}
    cats: dict[tuple, Categorized] = {}  # (port, protocol, family) -> categorize() of its merge
    for spec in _specs(svc, node):
        sp = spec.sp
        if sp.protocol not in SERVED_PROTOCOLS:
            if sp.name + str(sp.port) not in skipped:
                skipped.add(sp.name + str(sp.port))
                notes.append(
                    f"{svc.key} Service: port {sp.name or sp.port}: protocol {sp.protocol} is not "
                    f"served by this dataplane; skipped"
                )
            continue
        proto = PROTO_NUMBERS[sp.protocol]
        policy = policies.get(id(sp))  # by identity: a ServicePort's hash is a Python call
        if policy is None:
            policy = policies[id(sp)] = port_policy(svc, sp)
        sk = selection_key(spec, policy)
        selection = chosen.get(sk)
        if selection is None:
            # One merge and categorize per port and family: its two
            # selections (local, cluster) come from the same sets.
            pk = sk[:3]
            cat = cats.get(pk)
            limit = keyed_from if merged_out is not None else None
            # A port using no local set has one selection: in the usual
            # case read straight from its slices (ONE_SLICE_DIRECT).
            direct = (
                ready_alone(sp, slices, spec.family)
                if cat is None and ONE_SLICE_DIRECT and not policy.uses_local
                else None
            )
            if direct is not None:
                ready, total = direct
                if len(ready) == 1:
                    alone, port = ready[0]
                    backends = tuple(zip(map(addr_of, alone), repeat(port), repeat(proto)))
                else:
                    backends = tuple(
                        chain.from_iterable(zip(map(addr_of, e), repeat(p), repeat(proto)) for e, p in ready)
                    )
                local.setdefault((sp.port, sp.protocol), False)
                has_any = True
                if limit is not None and total >= limit:
                    # Large: the planner indexes it after the sync, its
                    # merged endpoints made then (no seed made here).
                    merged_out[pk] = None  # type: ignore[index]
            else:
                if cat is None:
                    eps, keyed = merge_endpoints_for_plan(sp, slices, spec.family, limit)
                    cat = cats[pk] = categorize(eps, policy, node_name, zone)
                    if merged_out is not None and keyed is not None:
                        merged_out[pk] = keyed
                local[sp.port, sp.protocol] = local.get((sp.port, sp.protocol), False) or bool(cat.local)
                # Merge order (slices by name, endpoints in slice order) is
                # deterministic; no sort needed on 100,000 backends. merge
                # keeps one endpoint per (address, port): no duplicates.
                sel = selected(cat, sk[3])
                backends = tuple(zip(map(addr_of, map(ep_of, sel)), map(port_of, sel), repeat(proto)))
                has_any = cat.has_any
            selection = chosen[sk] = (
                backends,
                NO_FLAGS if has_any else FrontendFlag.REJECT,
                -1 if versions is None else next(versions),
            )
        backends, r, number = selection
        # Positional (half the cost of keywords): addr, port, proto, scope,
        # name, backends, flags, affinity_timeout, source_ranges, added,
        # removed, base, version, group.
        f = Frontend(
            addr16(spec.addr),
            spec.port,
            proto,
            spec.scope,
            frontend_name(svc, sp.name, sp.port, sp.protocol),
            backends,
            # An enum's | is a Python call: none when there is nothing to add.
            spec.flags | r if r else spec.flags,
            svc.affinity_timeout,
            spec.ranges,
            None,
            None,
            -1,
            number,
            sk,
        )
        if f.key in meta:
            # Two ports or addresses of one Service landing on one frontend
            # (an externalIP equal to a node address...): the first wins.
            notes.append(
                f"{svc.key} Service: {spec.addr}:{spec.port}/{sp.protocol} is planned twice; the first one is kept"
            )
            continue
        meta[f.key] = sk
        out.append(f)
    return out, notes, meta, local
