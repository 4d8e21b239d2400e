"""Desired dataplane frontends of one Service. Pure: no kernel, no ids.

A Frontend is one entry of the frontend map (address, port, protocol,
scope) with the backends it should spread over. Ids and slot positions are
decided later by ctrl.diff against what is programmed, so that the same
input always plans the same frontends and an unchanged service diffs empty.
"""

from __future__ import annotations

import itertools
import socket
from collections import Counter
from dataclasses import dataclass, field

from .objects import Endpoint, EndpointSlice, Service, ServicePort, addr16, is_v4
from .topology import PortEndpoint, PortPolicy, categorize, merge_endpoints

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
    name: str  # "namespace/name:portname/PROTO", stored in sp_names_v2
    backends: tuple[Backend, ...]  # no duplicates, in merge order
    flags: int = 0
    affinity_timeout: int = 0
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
            # deterministic; no sort needed on 100,000 backends. merge keeps
            # one endpoint per (address, port): no duplicates.
            backends = tuple([(e.ep.addr, e.port, proto) for e in eps])
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


class _PortState:
    """One served port of one cluster IP: merged endpoints and selection."""

    def __init__(self, sp: ServicePort, family: str, proto: int, policy: PortPolicy, node_name, zone, slices):
        self.sp, self.family, self.proto, self.policy = sp, family, proto, policy
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

    def _selected_classes(self) -> frozenset:
        reps = {c: _representative(c, self.node_name, self.zone) for c, n in self.classes.items() if n > 0}
        cat = categorize(list(reps.values()), self.policy, self.node_name, self.zone)
        chosen = cat.local if self.policy.internal_local else cat.cluster
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
        for sl in old.values():
            if sl is None:
                continue
            port = _slice_port(sl, sp, family)
            if port is None:
                continue
            for ep in sl.endpoints:
                k = (ep.addr, port)
                pe = winner.pop(k, None)
                if pe is not None:
                    classes[cls(pe.ep, node_name, zone)] -= 1
                    touched[k] = None
        for sl in new.values():
            if sl is None:
                continue
            port = _slice_port(sl, sp, family)
            if port is None:
                continue
            for ep in sl.endpoints:
                k = (ep.addr, port)
                if k in winner:
                    self.duplicates = True
                    return None
                winner[k] = PortEndpoint(ep, port)
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
    ports: dict[tuple, _PortState] | None = None  # built by index() or the first change


class ServicePlanner:
    """plan_service with memory: per Service, what it planned last; a
    change to some of its slices is planned in time proportional to them."""

    def __init__(self) -> None:
        self._cache: dict[str, _Cached] = {}
        self._versions = itertools.count(1)
        self._unindexed: set[str] = set()

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
        svc = c.svc
        node_name, zone = c.where
        c.ports = {}
        for f in c.fronts:
            sp = next(p for p in svc.ports if p.port == f.port and PROTO_NUMBERS[p.protocol] == f.proto)
            family = "IPv4" if is_v4(f.addr) else "IPv6"
            c.ports[f.key] = _PortState(sp, family, f.proto, port_policy(svc, sp), node_name, zone, c.slices)

    def plan(
        self,
        owner: str,
        svc: Service | None,
        slices: dict[str, EndpointSlice],
        node_name: str | None = None,
        zone: str | None = None,
    ) -> tuple[list[Frontend], list[str]]:
        c = self._cache.get(owner)
        where = (node_name, zone)
        if svc is None or ignored_reason(svc):
            self._cache.pop(owner, None)
            return plan_service(svc, list(slices.values()), node_name, zone)
        if c is None or c.svc is not svc or c.where != where:
            return self._full(owner, svc, slices, node_name, zone)
        old = {n: s for n, s in c.slices.items() if slices.get(n) is not s}
        new = {n: s for n, s in slices.items() if c.slices.get(n) is not s}
        if c.ports is None:
            self._index(c)
        assert c.ports is not None
        fronts = []
        for f in c.fronts:
            delta = c.ports[f.key].update(old, new) if (old or new) else ((), ())
            if delta is None:
                return self._full(owner, svc, slices, node_name, zone)
            st = c.ports[f.key]
            fronts.append(
                Frontend(
                    addr=f.addr,
                    port=f.port,
                    proto=f.proto,
                    scope=f.scope,
                    name=f.name,
                    backends=tuple(st.selected.values()),
                    flags=f.flags,
                    affinity_timeout=f.affinity_timeout,
                    added=delta[0],
                    removed=delta[1],
                    base=f.version,
                    version=next(self._versions),
                )
            )
        c.slices = dict(slices)
        c.fronts = fronts
        return fronts, c.notes

    def _full(self, owner, svc, slices, node_name, zone) -> tuple[list[Frontend], list[str]]:
        fronts, notes = plan_service(svc, list(slices.values()), node_name, zone)
        fronts = [
            Frontend(
                addr=f.addr,
                port=f.port,
                proto=f.proto,
                scope=f.scope,
                name=f.name,
                backends=f.backends,
                flags=f.flags,
                affinity_timeout=f.affinity_timeout,
                version=next(self._versions),
            )
            for f in fronts
        ]
        self._cache[owner] = _Cached(svc, (node_name, zone), dict(slices), fronts, notes)
        self._unindexed.add(owner)
        return fronts, notes
