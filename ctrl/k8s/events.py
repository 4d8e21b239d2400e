"""What a source says happened: one Kubernetes object added, changed or
deleted. Both sources (the file source, the API source) queue lists of
these; the model (ctrl.model.state) takes them."""

from __future__ import annotations

from typing import NamedTuple

from .objects import EndpointSlice, Node, Service


# A NamedTuple, immutable like the frozen dataclass it was and five times
# cheaper to make: a full list makes one per object (20,000 at S2).
class Event(NamedTuple):
    """One change from a source. obj is None for a delete of `key`."""

    op: str  # "upsert" or "delete"
    kind: str  # "Service", "EndpointSlice", "Node"
    key: str  # "namespace/name" (Node: name)
    obj: Service | EndpointSlice | Node | None = None
