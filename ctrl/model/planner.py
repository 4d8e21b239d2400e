"""Incremental planning: plan_service with memory.

plan_service re-merges every slice of a Service: on a Service of 100,000
endpoints a one-slice change costs as much as a full plan (about 100 ms),
and so does the dataplane comparing 100,000 backends. ServicePlanner keeps,
per Service port, the merged endpoints and which of them are selected,
applies only the slices that changed (by object identity: a parsed slice is
immutable and replaced on every change), and hands the dataplane the added
and removed backends.

Selection stays categorize()'s: its decisions depend only on a few facts
about each endpoint (its class below) and on which classes exist at all.
Running categorize on one representative endpoint per class present says
which classes are selected; while that answer does not change, a changed
endpoint is selected exactly when its class is. When it changes (the last
ready endpoint went, topology hints appeared...), the port is re-selected
in full. tests/unit/test_planner.py checks the result against plan_service
on random sequences of changes.
"""

from __future__ import annotations

import itertools
import operator
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, replace
from itertools import compress, repeat
from operator import add, not_

from ..k8s.objects import Endpoint, EndpointSlice, Service, ServicePort
from .plan import (
    NO_FLAGS,
    PROTO_NUMBERS,
    Backend,
    Frontend,
    FrontendFlag,
    NodeAddresses,
    count_no_local,
    ignored_reason,
    plan_full,
    plan_service,
    port_policy,
    selected,
)
from .topology import PortEndpoint, PortPolicy, addr_of, categorize, ep_of, merge_endpoints_keyed

_OTHER = "\0other"  # equals no node or zone name


# An endpoint's class is what the selection rules read of it, as bits of
# an int: a class is hashed several times per endpoint of a change (its
# count, whether it is selected), and an int hashes for free where a tuple
# of eight is hashed element by element.
READY, SERVING, TERMINATING, LOCAL, HINT_NODES, HINT_NODES_ME, HINT_ZONES, HINT_ZONES_ME = (1 << i for i in range(8))


def _endpoint_class(ep: Endpoint, node_name: str | None, zone: str | None) -> int:
    hn, hz = ep.hint_nodes, ep.hint_zones
    return (
        (READY if ep.ready else 0)
        | (SERVING if ep.serving else 0)
        | (TERMINATING if ep.terminating else 0)
        | (LOCAL if ep.node_name == node_name else 0)
        | (HINT_NODES if hn else 0)
        | (HINT_NODES_ME if node_name in (hn or ()) else 0)
        | (HINT_ZONES if hz else 0)
        | (HINT_ZONES_ME if zone in (hz or ()) else 0)
    )


def _may_serve(c: int) -> bool:
    """categorize()'s test of an endpoint that may serve: ready, or
    serving and terminating."""
    return bool(c & READY) or (c & (SERVING | TERMINATING)) == SERVING | TERMINATING


_pair = tuple.__new__  # PortEndpoint((ep, port)) without its Python __new__


# The fields of an endpoint that _endpoint_class reads.
_CLASS_FIELDS = operator.itemgetter(
    *(Endpoint._fields.index(f) for f in ("ready", "serving", "terminating", "node_name", "hint_zones", "hint_nodes"))
)


def _classes_of(eps, node_name: str | None, zone: str | None, memo: dict[tuple, int] | None = None) -> list[int]:
    """_endpoint_class of each endpoint, computed once per distinct set of
    the fields it reads: a cluster's endpoints share a handful of classes,
    and node names and hint tuples are shared objects (ctrl.k8s.slicejson
    interns them), so the lookup key is cheap to hash. A third of the cost
    of calling _endpoint_class per endpoint. `memo` (those fields -> class,
    for this node_name and zone) is filled and used."""
    if memo is None:
        memo = {}
    get, fields, cls = memo.get, _CLASS_FIELDS, _endpoint_class
    out: list[int] = []
    append = out.append
    for ep in eps:
        k = fields(ep)
        c = get(k)
        if c is None:
            c = memo[k] = cls(ep, node_name, zone)
        append(c)
    return out


def _representative(c: int, node_name: str | None, zone: str | None) -> PortEndpoint:
    ep = Endpoint(
        addr=b"",
        ready=bool(c & READY),
        serving=bool(c & SERVING),
        terminating=bool(c & TERMINATING),
        node_name=node_name if c & LOCAL else _OTHER,
        zone=None,
        hint_zones=((zone or _OTHER,) if c & HINT_ZONES_ME else (_OTHER,)) if c & HINT_ZONES else None,
        hint_nodes=((node_name or _OTHER,) if c & HINT_NODES_ME else (_OTHER,)) if c & HINT_NODES else None,
    )
    return PortEndpoint(ep, 0)


def _slice_port(sl: EndpointSlice, sp: ServicePort, family: str) -> int | None:
    if sl.address_type != family:
        return None
    for p in sl.ports:
        if p.name == sp.name and p.protocol == sp.protocol:
            return p.port
    return None


# Distinct endpoint field sets a port's class memo keeps; past that it
# starts over.
MEMO_MAX = 4096


class _PortState:
    """One served port of one family of a Service: its merged endpoints,
    and for each set its frontends take (plan.SELECT_LOCAL, SELECT_CLUSTER)
    the endpoints in it. Under externalTrafficPolicy Local a port's
    frontends take both, from the one merge kept here."""

    def __init__(
        self,
        sp: ServicePort,
        family: str,
        proto: int,
        policy: PortPolicy,
        node_name,
        zone,
        slices,
        whiches: tuple[str, ...],
        merged: dict[tuple[bytes, int], PortEndpoint] | None = None,
    ):
        """`whiches`: the sets selected. `merged`: merge_endpoints_keyed of
        these slices, from the full plan, adopted (not copied: this state
        owns it from now on)."""
        self.sp, self.family, self.proto, self.policy, self.whiches = sp, family, proto, policy, whiches
        self.node_name, self.zone = node_name, zone
        if merged is None:
            merged = merge_endpoints_keyed(sp, list(slices.values()), family)
        self.winner: dict[tuple[bytes, int], PortEndpoint] = merged
        self.classes: Counter = Counter()
        total = 0
        for sl in slices.values():
            port = _slice_port(sl, sp, family)
            if port is not None:
                total += len(sl.endpoints)
        # An ip:port in two slices (moving between them): merge_endpoints'
        # tie rules need all copies; keep it simple and re-plan in full.
        self.duplicates = total != len(self.winner)
        # Endpoint fields -> class, kept for the changes to come: a cluster
        # has at most thousands of nodes, and few distinct hints.
        self.memo: dict[tuple, int] = {}
        of = _classes_of([pe[0] for pe in self.winner.values()], node_name, zone, self.memo)
        if len(self.memo) > MEMO_MAX:
            self.memo.clear()
        self.classes = Counter(of)
        self._present: frozenset | None = None
        self.selected_classes: dict[str, frozenset] = self._selected_classes()
        # set -> (ip, port) -> backend, in merge order
        self.selected: dict[str, dict[tuple[bytes, int], Backend]] = {
            w: {k: (k[0], k[1], proto) for k, c in zip(self.winner, of, strict=True) if c in sel}
            for w, sel in self.selected_classes.items()
        }

    def has_local(self) -> bool:
        """categorize()'s local set is not empty: an endpoint on this node,
        ready, or serving and terminating (the class says both)."""
        return any(n > 0 and c & LOCAL and _may_serve(c) for c, n in self.classes.items())

    def has_any(self) -> bool:
        """categorize()'s has_any: an endpoint anywhere that may serve
        (ready, or serving and terminating)."""
        return any(n > 0 and _may_serve(c) for c, n in self.classes.items())

    def _selected_classes(self) -> dict[str, frozenset]:
        """Per set, the classes categorize() puts in it, given the classes
        present. It depends on nothing else: asked again with the same
        classes present (most changes), the last answer (the same object)
        is given."""
        present = frozenset(c for c, n in self.classes.items() if n > 0)
        if present == self._present:
            return self.selected_classes
        self._present = present
        reps = {c: _representative(c, self.node_name, self.zone) for c in present}
        cat = categorize(list(reps.values()), self.policy, self.node_name, self.zone)
        out = {}
        for w in self.whiches:
            ids = {id(pe) for pe in selected(cat, w)}
            out[w] = frozenset(c for c, pe in reps.items() if id(pe) in ids)
        return out

    def _classes(self, eps) -> list[int]:
        """_endpoint_class of each endpoint, looked up in the memo in C
        (map), computed for the field sets it has not seen."""
        memo = self.memo
        fields = _CLASS_FIELDS
        out: list[int | None] = list(map(memo.get, map(fields, eps)))
        if None in out:
            node_name, zone = self.node_name, self.zone
            for j, c in enumerate(out):
                if c is None:
                    ep = eps[j]
                    out[j] = memo[fields(ep)] = _endpoint_class(ep, node_name, zone)
        return out  # type: ignore[return-value]

    def update(self, old: dict, new: dict) -> dict[str, tuple[tuple[Backend, ...], tuple[Backend, ...]]] | None:
        """Apply changed slices (name -> slice, None when gone) given the
        old objects; per set, (added, removed) backends, or None when only
        a full re-plan is right (duplicates across slices). The hot path of
        a one-slice change: each endpoint's class is looked up by the
        fields it reads (as _classes_of does), once per endpoint, whatever
        the number of sets; the lookups, the merged endpoints' and the
        selections' edits run a slice at a time in C (map, compress), not
        an endpoint at a time in Python."""
        if self.duplicates:
            return None
        sp, family = self.sp, self.family
        if len(self.memo) > MEMO_MAX:
            self.memo.clear()
        # ip:port -> class of its endpoint now (None: gone)
        touched: dict[tuple[bytes, int], int | None] = {}
        # ip:port both gone and back (in an old slice and a new one): the
        # only new ones that may be selected already.
        again: set[tuple[bytes, int]] = set()
        winner, classes = self.winner, self.classes
        for sl in old.values():
            port = None if sl is None else _slice_port(sl, sp, family)
            if port is None:
                continue
            keys = list(zip(map(addr_of, sl.endpoints), repeat(port)))
            popped: list = list(map(winner.pop, keys, repeat(None)))
            if None in popped:  # not expected: no duplicates, every key merged once
                keys = [k for k, pe in zip(keys, popped, strict=True) if pe is not None]
                popped = [pe for pe in popped if pe is not None]
            gone: list[Endpoint] = list(map(ep_of, popped))
            for c, n in Counter(self._classes(gone)).items():
                classes[c] -= n
            touched.update(zip(keys, repeat(None)))
        for sl in new.values():
            port = None if sl is None else _slice_port(sl, sp, family)
            if port is None:
                continue
            eps = sl.endpoints
            keys = list(zip(map(addr_of, eps), repeat(port)))
            had = len(winner)
            winner.update(zip(keys, map(_pair, repeat(PortEndpoint), zip(eps, repeat(port))), strict=True))
            if len(winner) != had + len(keys):
                # An ip:port there already, or twice in this slice (the
                # merge's tie rules need every copy): a full re-plan.
                self.duplicates = True
                return None
            now = self._classes(eps)
            classes.update(now)
            if touched:
                again.update(filter(touched.__contains__, keys))
            touched.update(zip(keys, now, strict=True))
        sels = self._selected_classes()
        proto = (self.proto,)
        out = {}
        of = None
        for w, sel in sels.items():
            selected = self.selected[w]
            added: list[Backend]
            removed: list[Backend]
            if sel != self.selected_classes[w]:
                if of is None:
                    of = _classes_of([pe[0] for pe in winner.values()], self.node_name, self.zone, self.memo)
                now_sel = {k: (k[0], k[1], proto[0]) for k, c in zip(winner, of, strict=True) if c in sel}
                removed = [b for k, b in selected.items() if k not in now_sel]
                added = [b for k, b in now_sel.items() if k not in selected]
                self.selected[w] = now_sel
            else:
                inside = list(map(sel.__contains__, touched.values()))  # a gone one's None is in no set
                # Out of the set now: dropped where it was in it.
                removed = list(filter(None, map(selected.pop, compress(touched, map(not_, inside)), repeat(None))))
                # In it now: added where it was not. One that was not
                # merged before this change was in no set: only those
                # back again are looked up.
                keys = list(compress(touched, inside))
                if again:
                    keys = [k for k in keys if k not in again or k not in selected]
                added = list(map(add, keys, repeat(proto)))
                selected.update(zip(keys, added, strict=True))
            out[w] = (tuple(added), tuple(removed))
        self.selected_classes = sels
        return out


def changed_slices(before: dict[str, EndpointSlice], now: dict[str, EndpointSlice]) -> tuple[dict, dict]:
    """The slices that differ (by identity: a parsed slice is replaced on
    every change), as (name -> old, name -> new). The usual case, the same
    names in the same order (a slice replaced in place), is compared
    position by position in C: a one-slice change of a Service of 1,200
    slices then costs microseconds, not two lookups per slice."""
    if len(before) == len(now) and list(before) == list(now):
        names = list(itertools.compress(before, map(operator.is_not, before.values(), now.values())))
        return {n: before[n] for n in names}, {n: now[n] for n in names}
    return (
        {n: s for n, s in before.items() if now.get(n) is not s},
        {n: s for n, s in now.items() if before.get(n) is not s},
    )


def follow_slices(
    mine: dict[str, EndpointSlice], now: dict[str, EndpointSlice], touched: Collection[str] | None = None
) -> tuple[dict, dict]:
    """changed_slices(mine, now), and `mine` (a copy the caller keeps)
    brought to `now` in place: the changed names only, not a copy of
    thousands. touched: the names that may have changed since `mine` was
    last brought up to date (ClusterState.take_touched), compared alone;
    when the counts do not agree with them, every slice is compared (a
    name missing from touched would otherwise go unseen)."""
    old: dict[str, EndpointSlice] = {}
    new: dict[str, EndpointSlice] = {}
    if touched is not None:
        grown = 0
        for n in touched:
            a, b = mine.get(n), now.get(n)
            if a is not b:
                if a is not None:
                    old[n] = a
                if b is not None:
                    new[n] = b
                grown += (b is not None) - (a is not None)
        if len(mine) + grown != len(now):
            touched = None
    if touched is None:
        old, new = changed_slices(mine, now)
    for n in old:
        if n not in now:
            del mine[n]
    mine.update(new)
    return old, new


@dataclass
class _Cached:
    svc: Service
    where: tuple
    slices: dict[str, EndpointSlice]
    fronts: list[Frontend]
    notes: list[str]
    meta: dict[tuple, tuple]  # frontend key -> its selection_key (port, protocol, family, set)
    local: dict[tuple[int, str], bool]  # of the full plan: (port, protocol) -> has a local endpoint
    # (port, protocol, family) -> its _PortState, built by index() or the first change
    ports: dict[tuple, _PortState] | None = None
    # (port, protocol, family) -> the full plan's merged endpoints, until _index adopts them
    # (None: none made, _index merges that port's slices)
    merged: dict[tuple, dict | None] | None = None


# A Service with a port of at least this many merged endpoints (in one
# family) gets its per-port state built right after the sync that planned
# it in full, so its next change is planned in time proportional to the
# change; a smaller one gets it at its first change (and its full plan
# makes no (address, port) dict to keep: merge_endpoints_for_plan).
EAGER_INDEX_FROM = 1000


class ServicePlanner:
    """plan_service with memory: per Service, what it planned last; a
    change to some of its slices is planned in time proportional to them.
    Frontends that select alike (same port and family, and the same set
    selected: under Cluster policies a cluster IP, its NodePorts, LB IPs
    and externalIPs all do) share one _PortState."""

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
        if c.svc.internal_traffic_policy != "Local" and c.svc.external_traffic_policy != "Local":
            return 0, 0  # no port uses a local set (most Services)
        if c.ports is None:  # planned in full since the last index
            full = c.local
            return count_no_local(c.svc, lambda sp: full.get((sp.port, sp.protocol), False))
        ports = c.ports
        return count_no_local(
            c.svc,
            lambda sp: any(
                st.has_local() for (port, proto, *_), st in ports.items() if (port, proto) == (sp.port, sp.protocol)
            ),
        )

    def forget(self, owner: str) -> None:
        self._cache.pop(owner, None)
        self._unindexed.discard(owner)

    def index_pending(self) -> int:
        """Build the per-port state of the large Services (EAGER_INDEX_FROM)
        planned in full since the last call, which their next change needs
        (the plan's merged endpoints adopted where it made them; a port
        read straight from its slices, topology.ready_alone, is merged
        here, after the write, not in the sync).
        Called after a sync's maps are written, so a full sync programs the
        kernel first. Returns how many were built."""
        n = 0
        for owner in sorted(self._unindexed):
            c = self._cache.get(owner)
            if c is not None and c.ports is None:
                self._index(c)
                n += 1
        self._unindexed.clear()
        return n

    def _index(self, c: _Cached) -> None:
        """One _PortState per port and family the frontends use, for the
        sets they select."""
        svc = c.svc
        node_name, zone, _ = c.where
        sets: dict[tuple, dict[str, None]] = {}
        for port, protocol, family, which in c.meta.values():
            sets.setdefault((port, protocol, family), {})[which] = None
        c.ports = {}
        for pk, whiches in sets.items():
            port, protocol, family = pk
            sp = next(p for p in svc.ports if p.port == port and p.protocol == protocol)
            seed = (c.merged or {}).get(pk)
            c.ports[pk] = _PortState(
                sp,
                family,
                PROTO_NUMBERS[protocol],
                port_policy(svc, sp),
                node_name,
                zone,
                c.slices,
                tuple(whiches),
                seed,
            )
        c.merged = None
        # The full plan's frontends hold their backends as tuples (100,000
        # at S1), which the next change's frontends replace with views of
        # the selections just built: let go of them here, in the quiet
        # turn that indexes, not in that change (a millisecond of freeing).
        ports = c.ports
        c.fronts = [replace(f, backends=ports[(m := c.meta[f.key])[:3]].selected[m[3]].values()) for f in c.fronts]

    def plan(
        self,
        owner: str,
        svc: Service | None,
        slices: dict[str, EndpointSlice],
        node_name: str | None = None,
        zone: str | None = None,
        node: NodeAddresses | None = None,
        touched: Collection[str] | None = None,
    ) -> tuple[list[Frontend], list[str]]:
        """The Service's frontends and notes. touched: the names of the
        slices that may have changed since its last plan (the agent's
        ClusterState.take_touched; every slice that changed must be
        named); None: found by comparing every slice."""
        c = self._cache.get(owner)
        where = (node_name, zone, node)
        if svc is None or ignored_reason(svc):
            self._cache.pop(owner, None)
            return plan_service(svc, list(slices.values()), node_name, zone, node)
        if c is None or c.svc is not svc or c.where != where:
            return self._full(owner, svc, slices, node_name, zone, node)
        if c.ports is None:
            self._index(c)  # of the slices as last planned: before they follow
        assert c.ports is not None
        old, new = follow_slices(c.slices, slices, touched)
        deltas: dict[tuple, dict] = {}
        for pk, st in c.ports.items():
            delta = st.update(old, new) if (old or new) else dict.fromkeys(st.whiches, ((), ()))
            if delta is None:
                return self._full(owner, svc, slices, node_name, zone, node)
            deltas[pk] = delta
        fronts = []
        numbers: dict[tuple, int] = {}  # one plan number per group (selection)
        for f in c.fronts:
            sk = c.meta[f.key]
            port, protocol, family, which = sk
            pk = (port, protocol, family)
            version = numbers.get(sk)
            if version is None:
                version = numbers[sk] = next(self._versions)
            st = c.ports[pk]
            added, removed = deltas[pk][which]
            reject = NO_FLAGS if st.has_any() else FrontendFlag.REJECT
            fronts.append(
                f.moved(
                    st.selected[which].values(),
                    (f.flags & ~FrontendFlag.REJECT) | reject,
                    added,
                    removed,
                    f.version,
                    version,
                )
            )
        c.fronts = fronts
        return fronts, c.notes

    def _full(self, owner, svc, slices, node_name, zone, node) -> tuple[list[Frontend], list[str]]:
        merged: dict[tuple, dict | None] = {}
        fronts, notes, meta, local = plan_full(
            svc, list(slices.values()), node_name, zone, node, merged, self._versions, EAGER_INDEX_FROM, checked=True
        )
        where = (node_name, zone, node)
        if not merged:  # no port of EAGER_INDEX_FROM endpoints: none was kept
            # Small: its first change builds the per-port state (a fraction
            # of a millisecond); until then nothing of it is kept. 10,000
            # small Services then cost no index after a full sync, and no
            # memory for Services that never change.
            self._cache[owner] = _Cached(svc, where, dict(slices), fronts, notes, meta, local)
        else:
            self._cache[owner] = _Cached(svc, where, dict(slices), fronts, notes, meta, local, merged=merged)
            self._unindexed.add(owner)
        return fronts, notes
