"""EndpointSlice lists decoded straight into ctrl.k8s.objects, fast.

A list of 100,000 endpoints is about 27 MB of JSON. Decoding it into dicts
and walking them with ctrl.k8s.objects.parse_slice costs ~0.45 s; decoding it
with msgspec into typed structs that declare only the fields a proxy reads
(the rest, targetRef and managedFields among them, is skipped without being
built) and converting those costs ~0.12 s.

The decoding structs are declared gc=False: decoded JSON holds no reference
cycles, and untracked structs are allocated and freed without the cyclic
collector's bookkeeping (a third of a 100,000-endpoint page's decoding time
went to freeing them).

parse_slice stays the definition: this module gives exactly its result for
every slice it accepts, and accepts a page only when every item of it is
clean (types as declared, every value parse_slice would accept, nothing
parse_slice would report as a problem). Otherwise decode_page returns None
and the caller parses the page the exact way, which names the object and
field of whatever is wrong. tests/unit/test_slicejson.py compares the two
on generated slices, valid and not.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import msgspec

from ..util.addrs import V4_PREFIX
from .objects import (
    LABEL,
    SERVICE_NAME_LABEL,
    SUBDOMAIN,
    TRIGGER_ANNOTATION,
    Endpoint,
    EndpointSlice,
    SlicePort,
    name_problem,
)

_PROTOCOLS = frozenset(("TCP", "UDP", "SCTP"))


class _Conditions(msgspec.Struct, gc=False):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class _Hint(msgspec.Struct, gc=False):
    name: str | None = None


class _Hints(msgspec.Struct, rename="camel", gc=False):
    for_zones: list[_Hint] | None = None
    for_nodes: list[_Hint] | None = None


class _Endpoint(msgspec.Struct, rename="camel", gc=False):
    addresses: list[str] | None = None
    conditions: _Conditions | None = None
    node_name: str | None = None
    zone: str | None = None
    hints: _Hints | None = None


class _Port(msgspec.Struct, gc=False):
    name: str | None = None
    port: int | None = None
    protocol: str | None = None


class _OwnerRef(msgspec.Struct, gc=False):
    kind: str | None = None
    uid: str | None = None


class _Meta(msgspec.Struct, rename="camel", gc=False):
    name: str | None = None
    namespace: str | None = None
    resource_version: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    owner_references: list[_OwnerRef] | None = None


class _Slice(msgspec.Struct, rename="camel", gc=False):
    kind: str | None = None  # absent in list items
    metadata: _Meta | None = None
    address_type: str | None = None
    endpoints: list[_Endpoint] | None = None
    ports: list[_Port] | None = None


class _ListMeta(msgspec.Struct, rename="camel", gc=False):
    resource_version: str | None = None
    continue_: str | None = msgspec.field(name="continue", default=None)


class _List(msgspec.Struct, gc=False):
    metadata: _ListMeta | None = None
    items: list[_Slice] | None = None


class Page(msgspec.Struct):
    """One list response: its parsed slices and list metadata."""

    items: list[EndpointSlice]
    resource_version: str | None
    continue_: str | None


class _Event(msgspec.Struct, gc=False):
    type: str | None = None
    object: _Slice | None = None


class Change(msgspec.Struct):
    """One watch event that adds or modifies a slice."""

    type: str
    slice: EndpointSlice
    resource_version: str | None


_decoder = msgspec.json.Decoder(_List)
_event_decoder = msgspec.json.Decoder(_Event)
_NO_CONDITIONS = _Conditions()


class _Unclean(Exception):
    """Something parse_slice would reject or report: take the exact path."""


def decode_page(body: bytes) -> Page | None:
    """An EndpointSliceList response body as parsed slices, or None when
    some item needs ctrl.k8s.objects.parse_slice's exact handling (or the body
    is not a list of the declared shape)."""
    try:
        lst = _decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    meta = lst.metadata or _ListMeta()
    try:
        items = [_convert(s) for s in lst.items or ()]
    except _Unclean:
        return None
    return Page(items, meta.resource_version, meta.continue_)


def decode_change(line: bytes) -> Change | None:
    """A watch line ADDED or MODIFIED with a clean slice, parsed; None for
    anything else (other event types, errors, bookmarks, unclean slices),
    which the caller decodes the exact way."""
    try:
        ev = _event_decoder.decode(line)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    if ev.type not in ("ADDED", "MODIFIED") or ev.object is None:
        return None
    try:
        sl = _convert(ev.object)
    except _Unclean:
        return None
    meta = ev.object.metadata
    return Change(ev.type, sl, meta.resource_version if meta is not None else None)


# Node and zone names, and hint tuples, repeat across endpoints (a cluster
# has a few zones and at most thousands of nodes, 100,000s of endpoints):
# each endpoint keeps the one shared copy, not a string of its own from the
# JSON (at 250,000 endpoints, tens of MiB).
_intern = sys.intern
_HINTS: dict[tuple[str, ...], tuple[str, ...]] = {}
_MAX_HINTS = 65536  # distinct hint tuples remembered; past that, start over


def _hint_names(hints: list[_Hint] | None) -> tuple[str, ...] | None:
    if not hints:
        return None
    t = tuple([_intern(h.name) for h in hints if h.name])
    shared = _HINTS.get(t)
    if shared is None:
        if len(_HINTS) >= _MAX_HINTS:
            _HINTS.clear()
        shared = _HINTS[t] = t
    return shared


def _convert(s: _Slice) -> EndpointSlice:
    meta = s.metadata
    if s.kind is not None and s.kind != "EndpointSlice":
        raise _Unclean  # the exact path names the object of another kind
    if meta is None or not meta.name or name_problem(meta.name, SUBDOMAIN):
        raise _Unclean
    if meta.namespace and name_problem(meta.namespace, LABEL):
        raise _Unclean
    labels = meta.labels or {}
    service_name = labels.get(SERVICE_NAME_LABEL) or None
    if service_name is not None and name_problem(service_name, LABEL):
        raise _Unclean
    atype = s.address_type
    ports = []
    for p in s.ports or ():
        proto = p.protocol or "TCP"
        port = p.port
        if proto not in _PROTOCOLS or port is None or not 1 <= port <= 65535:
            raise _Unclean
        if p.name and name_problem(p.name, LABEL):
            raise _Unclean
        ports.append(SlicePort(p.name or "", port, proto))
    family: int
    if atype == "IPv4":
        family, prefix = socket.AF_INET, V4_PREFIX
    elif atype == "IPv6":
        family, prefix = socket.AF_INET6, b""
    elif atype == "FQDN":
        family, prefix = 0, b""
    else:
        raise _Unclean
    pton = socket.inet_pton
    no_cond = _NO_CONDITIONS
    new = tuple.__new__
    endpoints: list[Endpoint] = []
    append = endpoints.append
    # The hot loop: one tuple per endpoint, no message strings.
    for ep in s.endpoints or ():
        addrs = ep.addresses
        if not addrs:
            raise _Unclean
        if not family:
            continue  # FQDN: names, not addresses
        ip = addrs[0]
        try:
            packed = prefix + pton(family, ip)
        except (OSError, ValueError):  # ValueError: a NUL in the string
            raise _Unclean from None
        c = ep.conditions or no_cond
        h = ep.hints
        # tuple.__new__: the NamedTuple's own __new__ is a Python call.
        append(
            new(
                Endpoint,
                (
                    packed,
                    c.ready is not False,
                    c.serving is not False,
                    c.terminating is True,
                    _intern(ep.node_name) if ep.node_name else ep.node_name,
                    _intern(ep.zone) if ep.zone else ep.zone,
                    _hint_names(h.for_zones) if h else None,
                    _hint_names(h.for_nodes) if h else None,
                ),
            )
        )
    annotations = meta.annotations or {}
    return EndpointSlice(
        meta.namespace or "default",
        meta.name,
        service_name,
        atype,
        tuple(ports),
        tuple(endpoints),
        labels,
        (),
        annotations.get(TRIGGER_ANNOTATION),
        tuple(r.uid for r in meta.owner_references or () if r.kind == "Service" and r.uid),
    )


# -- Service and Node lists, trimmed -----------------------------------------
# ctrl.k8s.objects.parse_service and parse_node read only metadata's name,
# namespace, uid, labels and annotations, and spec and status; decoding the
# rest (managedFields is most of a Service's JSON) into dicts is wasted. A
# list is decoded keeping exactly those fields, each as the JSON holds it
# (whatever its type: parse gives its own error for a wrong one), and an
# absent field stays absent; anything else about an item's shape (an item
# or a metadata that is not an object) sends the whole list the exact way.


class _TrimmedMeta(msgspec.Struct, omit_defaults=True, gc=False):
    name: Any = msgspec.UNSET
    namespace: Any = msgspec.UNSET
    uid: Any = msgspec.UNSET
    labels: Any = msgspec.UNSET
    annotations: Any = msgspec.UNSET


class _Trimmed(msgspec.Struct, omit_defaults=True, gc=False):
    kind: Any = msgspec.UNSET
    metadata: _TrimmedMeta | None | msgspec.UnsetType = msgspec.UNSET
    spec: Any = msgspec.UNSET
    status: Any = msgspec.UNSET


class _TrimmedList(msgspec.Struct, gc=False):
    metadata: Any = None
    items: list[_Trimmed] | None = None


_trimmed_decoder = msgspec.json.Decoder(_TrimmedList)


def decode_trimmed_list(body: bytes) -> dict | None:
    """A Service or Node list response as {"metadata": ..., "items": [...]}
    with each item holding only what parse reads; None when the body needs
    the exact decoding (not a list of objects of that shape)."""
    try:
        lst = _trimmed_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    unset = msgspec.UNSET
    items = []
    for it in lst.items or ():
        raw: dict[str, Any] = {}
        if it.kind is not unset:
            raw["kind"] = it.kind
        m = it.metadata
        if isinstance(m, _TrimmedMeta):
            meta: dict[str, Any] = {}
            for f, v in (
                ("name", m.name),
                ("namespace", m.namespace),
                ("uid", m.uid),
                ("labels", m.labels),
                ("annotations", m.annotations),
            ):
                if v is not unset:
                    meta[f] = v
            raw["metadata"] = meta
        elif m is not unset:
            raw["metadata"] = m  # null
        if it.spec is not unset:
            raw["spec"] = it.spec
        if it.status is not unset:
            raw["status"] = it.status
        items.append(raw)
    return {"metadata": lst.metadata, "items": items}
