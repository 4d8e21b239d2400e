"""What the sources told us: Services, their EndpointSlices, this Node.

Every change returns the set of service keys ("namespace/name") whose map
contents may have changed, so a sync plans only those. A change that
compares equal to what we hold is dropped here (kube-proxy's change
trackers do the same): a watch resync or a touched file costs nothing.
"""

from __future__ import annotations

from ..k8s.events import Event
from ..k8s.objects import EndpointSlice, Node, Service


class ClusterState:
    def __init__(self, node_name: str | None = None):
        self.node_name = node_name
        self.node: Node | None = None
        self.services: dict[str, Service] = {}
        # service key -> slice name -> slice
        self.slices: dict[str, dict[str, EndpointSlice]] = {}
        # "namespace/slice-name" -> service key it was filed under
        self._slice_owner: dict[str, str] = {}

    def apply(self, ev: Event) -> set[str]:
        """Record one event; return the service keys it touches."""
        if ev.kind == "Service":
            old = self.services.get(ev.key)
            if ev.op == "delete":
                if old is None:
                    return set()
                del self.services[ev.key]
                return {ev.key}
            assert isinstance(ev.obj, Service)
            if old == ev.obj:
                return set()
            self.services[ev.key] = ev.obj
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
        if ev.op == "delete":
            if prev_owner is None:
                return set()
            self.slices[prev_owner].pop(name, None)
            if not self.slices[prev_owner]:
                del self.slices[prev_owner]
            del self._slice_owner[ev.key]
            return {prev_owner}
        sl = ev.obj
        assert isinstance(sl, EndpointSlice)
        owner = sl.service_key
        if prev_owner is not None and prev_owner != owner:
            # The slice was relabelled to another service (or unlabelled).
            self.slices[prev_owner].pop(name, None)
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
        self._slice_owner[ev.key] = owner
        dirty.add(owner)
        return dirty

    def slices_of(self, service_key: str) -> list[EndpointSlice]:
        return list(self.slices.get(service_key, {}).values())
