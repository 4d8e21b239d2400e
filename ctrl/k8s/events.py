"""What a source says happened: one Kubernetes object added, changed or
deleted. Both sources (the file source, the API source) queue lists of
these; the model (ctrl.model.state) takes them."""

from __future__ import annotations

from dataclasses import dataclass

from .objects import EndpointSlice, Node, Service


@dataclass(frozen=True)
class Event:
    """One change from a source. obj is None for a delete of `key`."""

    op: str  # "upsert" or "delete"
    kind: str  # "Service", "EndpointSlice", "Node"
    key: str  # "namespace/name" (Node: name)
    obj: Service | EndpointSlice | Node | None = None
