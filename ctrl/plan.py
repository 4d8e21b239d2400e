"""Desired dataplane frontends of one Service. Pure: no kernel, no ids.

A Frontend is one entry of the frontend map (address, port, protocol,
scope) with the backends it should spread over. Ids and slot positions are
decided later by ctrl.diff against what is programmed, so that the same
input always plans the same frontends and an unchanged service diffs empty.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

from . import layout
from .objects import Endpoint, EndpointSlice, Service, ServicePort, addr16
from .topology import PortEndpoint, PortPolicy, categorize, merge_endpoints

PROTO_NUMBERS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}

# Scopes and frontend flags as ebpf/sliceproxy.h defines them: read from
# the header, never copied (tests/unit/test_layout.py refuses a copy).
SCOPE_INTERNAL = layout.const("SP_SCOPE_INTERNAL")
SCOPE_EXTERNAL = layout.const("SP_SCOPE_EXTERNAL")

SVC_F_AFFINITY = layout.const("SP_SVC_F_AFFINITY")
SVC_F_SRC_RANGES = layout.const("SP_SVC_F_SRC_RANGES")
SVC_F_MASQ = layout.const("SP_SVC_F_MASQ")

# Which endpoints a frontend spreads over (see _select):
RULE_CLUSTER_IP = "itp"  # a cluster IP: internalTrafficPolicy decides
RULE_EXTERNAL_FROM_PODS = "cluster"  # an external address reached from pods
RULE_EXTERNAL = "etp"  # an external address reached from outside

# Protocols the datapath rewrites today.
SERVED_PROTOCOLS = ("TCP", "UDP")

Backend = tuple[bytes, int, int]  # (addr16, port, protocol number)
SourceRange = tuple[bytes, int]  # (addr16 of the network, prefix length over 128 bits)


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


def _select(cat, policy: PortPolicy, rule: str) -> list[PortEndpoint]:
    """The endpoints of a frontend from categorize()'s sets, kube-proxy's
    chains: a cluster IP goes to KUBE-SVL (local) under
    internalTrafficPolicy Local, else KUBE-SVC (cluster); an external
    address reached from outside goes to the local set under
    externalTrafficPolicy Local, else the cluster set; reached from a pod
    (kube-proxy's short circuit of traffic from the cluster) it always goes
    to the cluster set."""
    if rule == RULE_CLUSTER_IP:
        return cat.local if policy.internal_local else cat.cluster
    if rule == RULE_EXTERNAL:
        return cat.local if policy.external_local else cat.cluster
    return cat.cluster


@dataclass(frozen=True, slots=True)
class Frontend:
    addr: bytes  # addr16
    port: int
    proto: int
    scope: int
    name: str  # "namespace/name:portname/PROTO", stored in sp_names_v3
    # No duplicates, in merge order. From plan_service a tuple; from
    # ServicePlanner's delta path a live view of its selection, valid until
    # the next plan of the same Service (copying 100,000 backends per
    # one-slice change would cost more than the change).
    backends: Collection[Backend]
    flags: int = 0
    affinity_timeout: int = 0
    source_ranges: tuple[SourceRange, ...] = ()  # with SVC_F_SRC_RANGES: the allowed sources
    # Set by ServicePlanner: what changed since this frontend's plan number
    # `base` (`backends` holds the whole set either way), so ctrl.diff can
    # apply a one-slice change in time proportional to the slice, not to
    # the Service. None: no earlier plan to be relative to.
    added: tuple[Backend, ...] | None = field(default=None, compare=False)
    removed: tuple[Backend, ...] | None = field(default=None, compare=False)
    base: int = field(default=-1, compare=False)
    version: int = field(default=-1, compare=False)

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
    sync_proxy_rules_no_local_endpoints_total. Ports of a protocol this
    dataplane does not serve are not counted: nothing is programmed for
    them. From scratch (every slice merged again): the agent reads the
    same count from ServicePlanner.no_local, which keeps it per change;
    tests/unit/test_no_local.py checks that both agree."""
    if svc is None or ignored_reason(svc):
        return 0, 0
    families = {_family(ip) for ip in svc.cluster_ips}

    def has_local(sp: ServicePort) -> bool:
        policy = port_policy(svc, sp)
        return any(categorize(merge_endpoints(sp, slices, f), policy, node_name, zone).local for f in families)

    return _count_no_local(svc, has_local)


def _count_no_local(svc: Service, has_local: Callable[[ServicePort], bool]) -> tuple[int, int]:
    """(internal, external) of no_local_endpoints, given whether a served
    port has a local endpoint (in any family of the Service's cluster IPs:
    categorize()'s local set, which exists only for a port using it)."""
    internal = external = 0
    for sp in svc.ports:
        if sp.protocol not in SERVED_PROTOCOLS:
            continue
        policy = port_policy(svc, sp)
        if policy.uses_local and not has_local(sp):
            internal += policy.internal_local
            external += policy.external_local
    return internal, external


@dataclass(frozen=True)
class _Spec:
    """One frontend to plan: where, and which endpoints it takes."""

    addr: str
    port: int
    scope: int
    sp: ServicePort
    family: str
    rule: str
    flags: int
    ranges: tuple[SourceRange, ...]


def _family(ip: str) -> str:
    return "IPv6" if ":" in ip else "IPv4"


def _source_ranges(svc: Service, family: str, node: NodeAddresses) -> tuple[SourceRange, ...]:
    """loadBalancerSourceRanges of one family, as kube-proxy's firewall
    chain allows them; () means no filtering. A range of the other family
    only is no filter for this one (kube-proxy filters the ranges per
    family first). A range holding one of the node's addresses also admits
    the LB IPs as sources (a node reaching an LB IP that is routed back to
    it with the LB IP as source)."""
    out: list[SourceRange] = []
    nets = [ipaddress.ip_network(c) for c in svc.lb_source_ranges]
    nets = [n for n in nets if (n.version == 6) == (family == "IPv6")]
    for n in nets:
        out.append((addr16(str(n.network_address)), n.prefixlen + (96 if n.version == 4 else 0)))
    if nets and any(ipaddress.ip_address(ip) in n for ip in node.ips for n in nets):
        for ip in svc.lb_ips:
            if _family(ip) == family:
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
    affinity = SVC_F_AFFINITY if svc.affinity_timeout else 0
    families = list(dict.fromkeys(_family(ip) for ip in svc.cluster_ips))
    for ip in svc.cluster_ips:
        for sp in svc.ports:
            out.append(_Spec(ip, sp.port, SCOPE_INTERNAL, sp, _family(ip), RULE_CLUSTER_IP, affinity, ()))
    external_local = svc.external_traffic_policy == "Local"
    for family in families:
        ext: list[tuple[str, int, ServicePort, tuple[SourceRange, ...]]] = []
        for sp in svc.ports:
            if sp.node_port:
                ext.extend((a, sp.node_port, sp, ()) for a in node.nodeport if _family(a) == family)
        ranges = _source_ranges(svc, family, node)
        for sp in svc.ports:
            ext.extend((a, sp.port, sp, ()) for a in svc.external_ips if _family(a) == family)
            ext.extend((a, sp.port, sp, ranges) for a in svc.lb_ips if _family(a) == family)
        for a, port, sp, rng in ext:
            f = affinity | (SVC_F_SRC_RANGES if rng else 0)
            out.append(_Spec(a, port, SCOPE_INTERNAL, sp, family, RULE_EXTERNAL_FROM_PODS, f, rng))
            f_ext = f | (0 if external_local else SVC_F_MASQ)
            out.append(_Spec(a, port, SCOPE_EXTERNAL, sp, family, RULE_EXTERNAL, f_ext, rng))
    return out


def _state_key(spec: _Spec) -> tuple:
    return (spec.sp.port, spec.sp.protocol, spec.family, spec.rule)


def plan_service(
    svc: Service | None,
    slices: list[EndpointSlice],
    node_name: str | None = None,
    zone: str | None = None,
    node: NodeAddresses | None = None,
) -> tuple[list[Frontend], list[str]]:
    """Frontends for one service as this node (name, zone label, addresses)
    serves it, and notes on what was skipped and why."""
    fronts, notes, _, _ = _plan(svc, slices, node_name, zone, node)
    return fronts, notes


def _plan(svc, slices, node_name, zone, node) -> tuple[list[Frontend], list[str], dict, dict]:
    """plan_service, and what ServicePlanner keeps of it: the _state_key
    of each frontend, and per (port, protocol) whether categorize() found a
    local endpoint (for no_local; known for the ports using one)."""
    if svc is None or ignored_reason(svc):
        return [], [], {}, {}
    notes: list[str] = []
    out: list[Frontend] = []
    meta: dict[tuple, tuple] = {}  # frontend key -> _state_key
    skipped: set[str] = set()
    chosen: dict[tuple, tuple[Backend, ...]] = {}
    local: dict[tuple[int, str], bool] = {}
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
        sk = _state_key(spec)
        backends = chosen.get(sk)
        if backends is None:
            policy = port_policy(svc, sp)
            cat = categorize(merge_endpoints(sp, slices, spec.family), policy, node_name, zone)
            local[sp.port, sp.protocol] = local.get((sp.port, sp.protocol), False) or bool(cat.local)
            # Merge order (slices by name, endpoints in slice order) is
            # deterministic; no sort needed on 100,000 backends. merge keeps
            # one endpoint per (address, port): no duplicates.
            eps = _select(cat, policy, spec.rule)
            backends = chosen[sk] = tuple([(e.ep.addr, e.port, proto) for e in eps])
        f = Frontend(
            addr=addr16(spec.addr),
            port=spec.port,
            proto=proto,
            scope=spec.scope,
            name=frontend_name(svc, sp.name, sp.port, sp.protocol),
            backends=backends,
            flags=spec.flags,
            affinity_timeout=svc.affinity_timeout,
            source_ranges=spec.ranges,
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


# -- incremental planning ---------------------------------------------------------
#
# plan_service re-merges every slice of a Service: on a Service of 100,000
# endpoints a one-slice change costs as much as a full plan (about 100 ms),
# and so does ctrl.diff comparing 100,000 backends. ServicePlanner keeps, per
# Service port, the merged endpoints and which of them are selected, applies
# only the slices that changed (by object identity: a parsed slice is
# immutable and replaced on every change), and hands ctrl.diff the added and
# removed backends.
#
# Selection stays categorize()'s: its decisions depend only on a few facts
# about each endpoint (its class below) and on which classes exist at all.
# Running categorize on one representative endpoint per class present says
# which classes are selected; while that answer does not change, a changed
# endpoint is selected exactly when its class is. When it changes (the last
# ready endpoint went, topology hints appeared...), the port is re-selected
# in full. tests/unit/test_planner.py checks the result against plan_service
# on random sequences of changes.

_OTHER = "\0other"  # equals no node or zone name


def _endpoint_class(ep: Endpoint, node_name: str | None, zone: str | None) -> tuple:
    hn, hz = ep.hint_nodes, ep.hint_zones
    return (
        ep.ready,
        ep.serving,
        ep.terminating,
        ep.node_name == node_name,
        bool(hn),
        node_name in (hn or ()),
        bool(hz),
        zone in (hz or ()),
    )


def _representative(c: tuple, node_name: str | None, zone: str | None) -> PortEndpoint:
    ready, serving, terminating, local, hn, hn_me, hz, hz_me = c
    ep = Endpoint(
        address="",
        addr=b"",
        ready=ready,
        serving=serving,
        terminating=terminating,
        node_name=node_name if local else _OTHER,
        zone=None,
        hint_zones=((zone or _OTHER,) if hz_me else (_OTHER,)) if hz else None,
        hint_nodes=((node_name or _OTHER,) if hn_me else (_OTHER,)) if hn else None,
    )
    return PortEndpoint(ep, 0)


def _slice_port(sl: EndpointSlice, sp: ServicePort, family: str) -> int | None:
    if sl.address_type != family:
        return None
    for p in sl.ports:
        if p.name == sp.name and p.protocol == sp.protocol:
            return p.port
    return None


def _port_endpoints(slices: dict[str, EndpointSlice | None], sp: ServicePort, family: str):
    """((address, port), endpoint) of each endpoint the slices give this
    service port (None: a slice that is gone)."""
    for sl in slices.values():
        if sl is None:
            continue
        port = _slice_port(sl, sp, family)
        if port is None:
            continue
        for ep in sl.endpoints:
            yield (ep.addr, port), ep


class _PortState:
    """One served port of one cluster IP: merged endpoints and selection."""

    def __init__(
        self, sp: ServicePort, family: str, proto: int, policy: PortPolicy, node_name, zone, slices, rule: str
    ):
        self.sp, self.family, self.proto, self.policy, self.rule = sp, family, proto, policy, rule
        self.node_name, self.zone = node_name, zone
        self.winner: dict[tuple[bytes, int], PortEndpoint] = {}
        self.classes: Counter = Counter()
        total = 0
        for pe in merge_endpoints(sp, list(slices.values()), family):
            self.winner[(pe.ep.addr, pe.port)] = pe
        for sl in slices.values():
            port = _slice_port(sl, sp, family)
            if port is not None:
                total += len(sl.endpoints)
        # An ip:port in two slices (moving between them): merge_endpoints'
        # tie rules need all copies; keep it simple and re-plan in full.
        self.duplicates = total != len(self.winner)
        cls = _endpoint_class
        of = [cls(pe.ep, node_name, zone) for pe in self.winner.values()]
        self.classes = Counter(of)
        self.selected_classes = sel = self._selected_classes()
        self.selected: dict[tuple[bytes, int], Backend] = {
            k: (k[0], k[1], proto) for k, c in zip(self.winner, of, strict=True) if c in sel
        }

    def has_local(self) -> bool:
        """categorize()'s local set is not empty: an endpoint on this node,
        ready, or serving and terminating (the class says both)."""
        return any(
            n > 0 and local and (ready or (serving and terminating))
            for (ready, serving, terminating, local, *_), n in self.classes.items()
        )

    def _selected_classes(self) -> frozenset:
        reps = {c: _representative(c, self.node_name, self.zone) for c, n in self.classes.items() if n > 0}
        cat = categorize(list(reps.values()), self.policy, self.node_name, self.zone)
        chosen = _select(cat, self.policy, self.rule)
        ids = {id(pe) for pe in chosen}
        return frozenset(c for c, pe in reps.items() if id(pe) in ids)

    def update(self, old: dict, new: dict) -> tuple[tuple[Backend, ...], tuple[Backend, ...]] | None:
        """Apply changed slices (name -> slice, None when gone) given the
        old objects; (added, removed) backends, or None when only a full
        re-plan is right (duplicates across slices)."""
        if self.duplicates:
            return None
        sp, family, node_name, zone = self.sp, self.family, self.node_name, self.zone
        cls = _endpoint_class
        touched: dict[tuple[bytes, int], None] = {}
        winner, classes = self.winner, self.classes
        for k, _ in _port_endpoints(old, sp, family):
            pe = winner.pop(k, None)
            if pe is not None:
                classes[cls(pe.ep, node_name, zone)] -= 1
                touched[k] = None
        for k, ep in _port_endpoints(new, sp, family):
            if k in winner:
                self.duplicates = True
                return None
            winner[k] = PortEndpoint(ep, k[1])
            classes[cls(ep, node_name, zone)] += 1
            touched[k] = None
        sel = self._selected_classes()
        selected = self.selected
        added: list[Backend] = []
        removed: list[Backend] = []
        if sel != self.selected_classes:
            self.selected_classes = sel
            now = {k: (k[0], k[1], self.proto) for k, pe in winner.items() if cls(pe.ep, node_name, zone) in sel}
            removed = [b for k, b in selected.items() if k not in now]
            added = [b for k, b in now.items() if k not in selected]
            self.selected = now
            return tuple(added), tuple(removed)
        for k in touched:
            pe = winner.get(k)
            want = pe is not None and cls(pe.ep, node_name, zone) in sel
            if want and k not in selected:
                b = selected[k] = (k[0], k[1], self.proto)
                added.append(b)
            elif not want and k in selected:
                removed.append(selected.pop(k))
        return tuple(added), tuple(removed)


@dataclass
class _Cached:
    svc: Service
    where: tuple
    slices: dict[str, EndpointSlice]
    fronts: list[Frontend]
    notes: list[str]
    meta: dict[tuple, tuple]  # frontend key -> key of its _PortState
    local: dict[tuple[int, str], bool]  # of the full plan: (port, protocol) -> has a local endpoint
    ports: dict[tuple, _PortState] | None = None  # built by index() or the first change


class ServicePlanner:
    """plan_service with memory: per Service, what it planned last; a
    change to some of its slices is planned in time proportional to them.
    Frontends that select alike (same port, family and rule: a NodePort on
    two node addresses, an LB IP and an externalIP) share one _PortState."""

    def __init__(self) -> None:
        self._cache: dict[str, _Cached] = {}
        self._versions = itertools.count(1)
        self._unindexed: set[str] = set()

    def no_local(self, owner: str) -> tuple[int, int]:
        """no_local_endpoints of the Service as last planned, from what
        planning it found: no slice is merged again, so a one-slice change
        of a big Service with a Local policy stays a one-slice cost."""
        c = self._cache.get(owner)
        if c is None:  # gone, ignored, or never planned
            return 0, 0
        if c.ports is None:  # planned in full since the last index
            full = c.local
            return _count_no_local(c.svc, lambda sp: full.get((sp.port, sp.protocol), False))
        ports = c.ports
        return _count_no_local(
            c.svc,
            lambda sp: any(
                st.has_local() for (port, proto, *_), st in ports.items() if (port, proto) == (sp.port, sp.protocol)
            ),
        )

    def forget(self, owner: str) -> None:
        self._cache.pop(owner, None)
        self._unindexed.discard(owner)

    def index_pending(self) -> int:
        """Build the per-port state of the Services planned in full since
        the last call, which their next change needs (about as long as
        planning them). Called after a sync's maps are written, so a full
        sync programs the kernel first. Returns how many were built."""
        n = 0
        for owner in sorted(self._unindexed):
            c = self._cache.get(owner)
            if c is not None and c.ports is None:
                self._index(c)
                n += 1
        self._unindexed.clear()
        return n

    def _index(self, c: _Cached) -> None:
        """One _PortState per selection (port, family, rule) the frontends use."""
        svc = c.svc
        node_name, zone, _ = c.where
        c.ports = {}
        for sk in dict.fromkeys(c.meta.values()):
            port, protocol, family, rule = sk
            sp = next(p for p in svc.ports if p.port == port and p.protocol == protocol)
            c.ports[sk] = _PortState(
                sp, family, PROTO_NUMBERS[protocol], port_policy(svc, sp), node_name, zone, c.slices, rule
            )

    def plan(
        self,
        owner: str,
        svc: Service | None,
        slices: dict[str, EndpointSlice],
        node_name: str | None = None,
        zone: str | None = None,
        node: NodeAddresses | None = None,
    ) -> tuple[list[Frontend], list[str]]:
        c = self._cache.get(owner)
        where = (node_name, zone, node)
        if svc is None or ignored_reason(svc):
            self._cache.pop(owner, None)
            return plan_service(svc, list(slices.values()), node_name, zone, node)
        if c is None or c.svc is not svc or c.where != where:
            return self._full(owner, svc, slices, node_name, zone, node)
        old = {n: s for n, s in c.slices.items() if slices.get(n) is not s}
        new = {n: s for n, s in slices.items() if c.slices.get(n) is not s}
        if c.ports is None:
            self._index(c)
        assert c.ports is not None
        deltas: dict[tuple, tuple] = {}
        for sk, st in c.ports.items():
            delta = st.update(old, new) if (old or new) else ((), ())
            if delta is None:
                return self._full(owner, svc, slices, node_name, zone, node)
            deltas[sk] = delta
        fronts = []
        for f in c.fronts:
            sk = c.meta[f.key]
            st, delta = c.ports[sk], deltas[sk]
            fronts.append(
                replace(
                    f,
                    backends=st.selected.values(),
                    added=delta[0],
                    removed=delta[1],
                    base=f.version,
                    version=next(self._versions),
                )
            )
        c.slices = dict(slices)
        c.fronts = fronts
        return fronts, c.notes

    def _full(self, owner, svc, slices, node_name, zone, node) -> tuple[list[Frontend], list[str]]:
        fronts, notes, meta, local = _plan(svc, list(slices.values()), node_name, zone, node)
        fronts = [replace(f, version=next(self._versions)) for f in fronts]
        self._cache[owner] = _Cached(svc, (node_name, zone, node), dict(slices), fronts, notes, meta, local)
        self._unindexed.add(owner)
        return fronts, notes
