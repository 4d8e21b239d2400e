"""What the sources told us: Services, their EndpointSlices, this Node.

Every change returns the set of service keys ("namespace/name") whose map
contents may have changed, so a sync plans only those. A change that
compares equal to what we hold is dropped here (kube-proxy's change
trackers do the same): a watch resync or a touched file costs nothing.
"""

from __future__ import annotations

import logging

from ..k8s.events import Event
from ..k8s.objects import MANAGED_BY_LABEL, SERVICE_NAME_LABEL, SUBSET_MANAGER, EndpointSlice, Node, Service

log = logging.getLogger("sliceproxy.state")


class ClusterState:
    def __init__(self, node_name: str | None = None):
        self.node_name = node_name
        self.node: Node | None = None
        self.services: dict[str, Service] = {}
        # service key -> slice name -> slice
        self.slices: dict[str, dict[str, EndpointSlice]] = {}
        # "namespace/slice-name" -> service key it was filed under
        self._slice_owner: dict[str, str] = {}
        # Subset slices not taken (yet): service key -> "ns/name" -> slice,
        # and why each one was refused (logged once per reason).
        self._parked: dict[str, dict[str, EndpointSlice]] = {}
        self._refused: dict[str, str] = {}
        # service key -> names of its slices added, replaced or removed
        # since take_touched last gave them (every change to self.slices
        # is recorded here).
        self._touched: dict[str, set[str]] = {}

    def take_touched(self, owner: str) -> set[str]:
        """The names of owner's slices added, replaced or removed since the
        last call for it (a superset of those that differ): the planner
        then compares those, not every slice of a Service of thousands."""
        return self._touched.pop(owner, set())

    def _touch(self, owner: str, name: str) -> None:
        t = self._touched.get(owner)
        if t is None:
            self._touched[owner] = {name}
        else:
            t.add(name)

    def apply(self, ev: Event) -> set[str]:
        """Record one event; return the service keys it touches."""
        if ev.kind == "Service":
            old = self.services.get(ev.key)
            if ev.op == "delete":
                if old is None:
                    return set()
                del self.services[ev.key]
                self._recheck_subsets(ev.key)
                return {ev.key}
            assert isinstance(ev.obj, Service)
            if old == ev.obj:
                return set()
            self.services[ev.key] = ev.obj
            if old is None or old.uid != ev.obj.uid:
                self._recheck_subsets(ev.key)
            return {ev.key}
        if ev.kind == "EndpointSlice":
            return self._apply_slice(ev)
        if ev.kind == "Node":
            if self.node_name is not None and ev.key != self.node_name:
                return set()
            new = ev.obj if ev.op == "upsert" else None
            if new == self.node:
                return set()
            self.node = new  # type: ignore[assignment]
            # Topology depends on this node's labels: every service may move.
            return set(self.services)
        raise ValueError(f"unknown kind {ev.kind}")

    def _apply_slice(self, ev: Event) -> set[str]:
        dirty = set()
        prev_owner = self._slice_owner.get(ev.key)
        name = ev.key.split("/", 1)[1]
        if self._parked:
            self._unpark(ev.key)
        if ev.op == "delete":
            self._refused.pop(ev.key, None)
            if prev_owner is None:
                return set()
            self.slices[prev_owner].pop(name, None)
            self._touch(prev_owner, name)
            if not self.slices[prev_owner]:
                del self.slices[prev_owner]
            del self._slice_owner[ev.key]
            return {prev_owner}
        sl = ev.obj
        assert isinstance(sl, EndpointSlice)
        owner = sl.service_key if sl.subset is None else self._subset_owner(ev.key, sl)
        if prev_owner is not None and prev_owner != owner:
            # The slice was relabelled to another service (or unlabelled).
            self.slices[prev_owner].pop(name, None)
            self._touch(prev_owner, name)
            if not self.slices[prev_owner]:
                del self.slices[prev_owner]
            del self._slice_owner[ev.key]
            dirty.add(prev_owner)
        if owner is None:
            return dirty
        bucket = self.slices.setdefault(owner, {})
        if bucket.get(name) == sl:
            return dirty
        bucket[name] = sl
        self._touch(owner, name)
        self._slice_owner[ev.key] = owner
        dirty.add(owner)
        return dirty

    # -- subset slices (docs/subsetting.md) ------------------------------------
    def _subset_owner(self, key: str, sl: EndpointSlice) -> str | None:
        """The Service a subset slice is taken for, or None: refused (a
        forgery, or left from an older Service of that name: logged once)
        or waiting for its Service to arrive (parked, checked again then)."""
        owner = sl.subset_service_key
        why = None
        if sl.labels.get(MANAGED_BY_LABEL) != SUBSET_MANAGER:
            why = f"its label {MANAGED_BY_LABEL} is not {SUBSET_MANAGER}"
        elif SERVICE_NAME_LABEL in sl.labels:
            why = f"a subset slice must not carry {SERVICE_NAME_LABEL}"
        elif owner is None:
            why = "it names no Service"
        if owner is not None:
            self._parked.setdefault(owner, {})[key] = sl
        if why is None and owner is not None:
            svc = self.services.get(owner)
            if svc is None:
                return None  # its Service has not arrived (yet)
            if not svc.uid or svc.uid not in sl.owner_uids:
                why = f"no ownerReference names the Service's uid {svc.uid or '(none)'}"
        if why is not None:
            if self._refused.get(key) != why:
                self._refused[key] = why
                log.error("%s EndpointSlice %s: subset slice ignored: %s", owner or "?", key, why)
            return None
        self._refused.pop(key, None)
        self._parked[owner].pop(key, None)  # type: ignore[index]
        if not self._parked[owner]:  # type: ignore[index]
            del self._parked[owner]  # type: ignore[arg-type]
        return owner

    def _unpark(self, key: str) -> None:
        for owner, parked in list(self._parked.items()):
            if parked.pop(key, None) is not None and not parked:
                del self._parked[owner]

    def _recheck_subsets(self, owner: str) -> None:
        """Its Service came, went or was made again (another uid): take or
        drop its subset slices accordingly."""
        if owner not in self.slices and owner not in self._parked:
            return  # none (a Service listed before its slices)
        held = [
            (f"{sl.namespace}/{sl.name}", sl) for sl in self.slices.get(owner, {}).values() if sl.subset is not None
        ]
        parked = list(self._parked.get(owner, {}).items())
        for key, sl in held + parked:
            self._apply_slice(Event("upsert", "EndpointSlice", key, sl))

    def slices_of(self, service_key: str) -> list[EndpointSlice]:
        return list(self.slices.get(service_key, {}).values())
