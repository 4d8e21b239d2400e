"""EndpointSlice and Service lists decoded straight into ctrl.k8s.objects, fast.

A list of 100,000 endpoints is about 27 MB of JSON. Decoding it into dicts
and walking them with ctrl.k8s.objects.parse_slice costs ~0.45 s; decoding it
with msgspec into typed structs that declare only the fields a proxy reads
(the rest, targetRef and managedFields among them, is skipped without being
built) and converting those costs ~0.12 s.

The decoding structs are declared gc=False: decoded JSON holds no reference
cycles, and untracked structs are allocated and freed without the cyclic
collector's bookkeeping (a third of a 100,000-endpoint page's decoding time
went to freeing them).

Each slice's endpoints are kept as their raw JSON (msgspec.Raw) and read
by the scan the agent's builder gives this module (use_endpoint_scan:
ctrl/dataplane/endpoints.c, which reads the columns a proxy needs without
a Python object per field, about 1 GB/s, a page's slices a megabyte of
JSON at a time: one call for a hundred small slices), or, for whatever
the scan does not take and without it, decoded by msgspec one slice at a
time and converted in Python as before.

parse_slice stays the definition: this module gives exactly its result for
every slice it accepts, and accepts a page only when every item of it is
clean (types as declared, every value parse_slice would accept, nothing
parse_slice would report as a problem). Otherwise decode_page returns None
and the caller parses the page the exact way, which names the object and
field of whatever is wrong. tests/unit/test_slicejson.py compares the two
on generated slices, valid and not.

Service list pages get the same (decode_service_page): 10,000 Services
(about 9.5 MB, most of it managedFields) cost ~0.2 s decoded trimmed and
walked by parse_service, ~0.1 s decoded typed and converted. parse_service
stays the definition; the checks that are more than a line are its own
helpers, called by both; tests/unit/test_servicejson.py compares the two.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec

from ..util.addrs import V4_PREFIX, addr16
from .objects import (
    SERVICE_NAME_LABEL,
    SERVICE_TYPES,
    SOURCE_RANGES_ANNOTATION,
    TRIGGER_ANNOTATION,
    Endpoint,
    EndpointSlice,
    ObjectError,
    Service,
    ServicePort,
    SlicePort,
    client_ip_timeout,
    ingress_ip,
    is_label,
    is_subdomain,
    normal_cidr,
    service_cluster_ips,
    source_ranges,
    target_port,
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


class _Port(msgspec.Struct, frozen=True, gc=False):
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


_NULL = msgspec.Raw(b"null")


class _Slice(msgspec.Struct, rename="camel", gc=False):
    kind: str | None = None  # absent in list items
    metadata: _Meta | None = None
    address_type: str | None = None
    # Kept as its JSON (list[_Endpoint] | None), read by _endpoints.
    endpoints: msgspec.Raw = _NULL
    ports: list[_Port] | None = None


class _ListMeta(msgspec.Struct, rename="camel", gc=False):
    resource_version: str | None = None
    continue_: str | None = msgspec.field(name="continue", default=None)


class _List(msgspec.Struct, gc=False):
    metadata: _ListMeta | None = None
    items: list[_Slice] | None = None


T = TypeVar("T", EndpointSlice, Service)


class Page(msgspec.Struct, Generic[T]):
    """One list response: its parsed objects (slices or Services) and list metadata."""

    items: list[T]
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
_endpoints_decoder = msgspec.json.Decoder(list[_Endpoint] | None)
_NO_CONDITIONS = _Conditions()

# Slices' endpoints read from their JSON (the raw values, and each one's
# address family: socket.AF_INET, AF_INET6, 0 for FQDN) into what
# _endpoints makes, many slices a call, with None for each one it does
# not take: given by whoever builds the agent (ctrl.cli.run:
# ctrl.dataplane.native.scan_endpoints, in C; this layer knows no native
# code). None: every slice's endpoints are decoded with msgspec, as the
# scan leaves any it does not take.
EndpointScan = Callable[[list[msgspec.Raw], list[int]], "list[tuple[Endpoint, ...] | None]"]
_scan: EndpointScan | None = None
_FAMILIES = {"IPv4": socket.AF_INET, "IPv6": socket.AF_INET6, "FQDN": 0}


def use_endpoint_scan(scan: EndpointScan | None) -> None:
    """Read the endpoints of every slice decoded from now on with `scan`
    first (None: with msgspec only)."""
    global _scan
    _scan = scan


def _scanned(items: list[_Slice]) -> list[tuple[Endpoint, ...] | None]:
    """Each slice's endpoints as the scan reads them (None: not taken, or
    no scan); an address type of none of the three is not read."""
    scan = _scan
    if scan is None or not items:
        return [None] * len(items)
    get = _FAMILIES.get
    return scan([s.endpoints for s in items], [get(s.address_type, -1) for s in items])  # type: ignore[arg-type]


class _Unclean(Exception):
    """Something parse_slice would reject or report: take the exact path."""


def decode_page(body: bytes) -> Page[EndpointSlice] | None:
    """An EndpointSliceList response body as parsed slices, or None when
    some item needs ctrl.k8s.objects.parse_slice's exact handling (or the body
    is not a list of the declared shape)."""
    try:
        lst = _decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    meta = lst.metadata or _ListMeta()
    slices = lst.items or []
    try:
        items = list(map(_convert, slices, _scanned(slices)))
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
        (scanned,) = _scanned([ev.object])
        sl = _convert(ev.object, scanned)
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


def _endpoints(raw: msgspec.Raw, family: int, prefix: bytes) -> tuple[Endpoint, ...]:
    """A slice's endpoints (the JSON of its "endpoints") of this address
    family (0: FQDN, none kept), decoded and converted one by one (those
    the scan did not take); _Unclean as parse_slice would decline them."""
    try:
        decoded = _endpoints_decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        raise _Unclean from None
    pton = socket.inet_pton
    no_cond = _NO_CONDITIONS
    new = tuple.__new__
    endpoints: list[Endpoint] = []
    append = endpoints.append
    # The hot loop: one tuple per endpoint, no message strings.
    for ep in decoded or ():
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
    return tuple(endpoints)


# Namespaces found clean: a list repeats a few of them over its objects,
# each checked once here, not once an object (a set lookup where the
# rule's match took about ten times as long). Bounded: past it, a new one
# is checked every time.
_CLEAN_NAMESPACES: set[str] = set()
_CLEAN_NAMESPACES_MAX = 4096


def _namespace_ok(ns: str) -> bool:
    """is_label(ns), remembered when true (ns not in _CLEAN_NAMESPACES)."""
    if is_label(ns) is None:
        return False
    if len(_CLEAN_NAMESPACES) < _CLEAN_NAMESPACES_MAX:
        _CLEAN_NAMESPACES.add(ns)
    return True


def _convert(s: _Slice, scanned: tuple[Endpoint, ...] | None = None) -> EndpointSlice:
    """A clean slice, its endpoints as the scan read them (None: read here)."""
    meta = s.metadata
    if s.kind is not None and s.kind != "EndpointSlice":
        raise _Unclean  # the exact path names the object of another kind
    if meta is None or not meta.name or not is_subdomain(meta.name):
        raise _Unclean
    ns = meta.namespace
    if ns and ns not in _CLEAN_NAMESPACES and not _namespace_ok(ns):
        raise _Unclean
    labels = meta.labels or {}
    service_name = labels.get(SERVICE_NAME_LABEL) or None
    if service_name is not None and not is_label(service_name):
        raise _Unclean
    atype = s.address_type
    ports = _ports(_SLICE_PORTS, s.ports, _new_slice_ports)
    family: int
    if atype == "IPv4":
        family, prefix = socket.AF_INET, V4_PREFIX
    elif atype == "IPv6":
        family, prefix = socket.AF_INET6, b""
    elif atype == "FQDN":
        family, prefix = 0, b""
    else:
        raise _Unclean
    endpoints = scanned if scanned is not None else _endpoints(s.endpoints, family, prefix)
    annotations = meta.annotations or {}
    refs = meta.owner_references
    return EndpointSlice(
        meta.namespace or "default",
        meta.name,
        service_name,
        atype,
        ports,
        endpoints,
        labels,
        (),
        annotations.get(TRIGGER_ANNOTATION),
        tuple([r.uid for r in refs if r.kind == "Service" and r.uid]) if refs else (),
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


# -- Service lists, typed -----------------------------------------------------
# The same for Services: structs that declare only what
# ctrl.k8s.objects.parse_service reads, converted with its own checks, and a
# page declined (the caller then decodes it trimmed and parses it the exact
# way) when any item is not clean. Field names the camel rule cannot spell
# (clusterIP, externalIPs...) are given.


class _SvcMeta(msgspec.Struct, gc=False):
    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class _SvcPort(msgspec.Struct, rename="camel", frozen=True, gc=False):
    name: str | None = None
    port: int | None = None
    protocol: str | None = None
    target_port: int | str | None = None
    node_port: int | None = None


class _ClientIP(msgspec.Struct, rename="camel", gc=False):
    timeout_seconds: int | None = None


class _AffinityConfig(msgspec.Struct, gc=False):
    client_ip: _ClientIP | None = msgspec.field(name="clientIP", default=None)


class _SvcSpec(msgspec.Struct, rename="camel", gc=False):
    type: str | None = None
    cluster_ip: str | None = msgspec.field(name="clusterIP", default=None)
    cluster_ips: list[str] | None = msgspec.field(name="clusterIPs", default=None)
    ports: list[_SvcPort] | None = None
    session_affinity: str | None = None
    session_affinity_config: _AffinityConfig | None = None
    internal_traffic_policy: str | None = None
    external_traffic_policy: str | None = None
    external_ips: list[str] | None = msgspec.field(name="externalIPs", default=None)
    load_balancer_source_ranges: list[str] | None = None
    health_check_node_port: int | None = None


class _Ingress(msgspec.Struct, rename="camel", gc=False):
    ip: str | None = None
    ip_mode: str | None = None


class _LoadBalancer(msgspec.Struct, gc=False):
    ingress: list[_Ingress] | None = None


class _SvcStatus(msgspec.Struct, rename="camel", gc=False):
    load_balancer: _LoadBalancer | None = None


class _Svc(msgspec.Struct, gc=False):
    kind: str | None = None  # absent in list items
    metadata: _SvcMeta | None = None
    spec: _SvcSpec | None = None
    status: _SvcStatus | None = None


class _SvcList(msgspec.Struct, gc=False):
    metadata: _ListMeta | None = None
    items: list[_Svc] | None = None


_service_decoder = msgspec.json.Decoder(_SvcList)
_AFFINITIES = frozenset(("None", "ClientIP"))
_POLICIES = frozenset(("Cluster", "Local"))
_SERVICE_TYPES = frozenset(SERVICE_TYPES)


def decode_service_page(body: bytes) -> Page[Service] | None:
    """A ServiceList response body as parsed Services, or None when some
    item needs ctrl.k8s.objects.parse_service's exact handling (or the body
    is not a list of the declared shape)."""
    try:
        lst = _service_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    meta = lst.metadata or _ListMeta()
    try:
        items = [_convert_service(s) for s in lst.items or ()]
    except (_Unclean, ObjectError):
        return None
    return Page(items, meta.resource_version, meta.continue_)


def _convert_service(s: _Svc) -> Service:
    """parse_service's result for a clean Service; _Unclean (or the
    ObjectError of a shared check) for anything it would refuse or report."""
    if s.kind is not None and s.kind != "Service":
        raise _Unclean  # the exact path names the object of another kind
    meta = s.metadata
    if meta is None or not meta.name or not is_label(meta.name):
        raise _Unclean
    ns = meta.namespace
    if not ns:
        ns = "default"
    elif ns not in _CLEAN_NAMESPACES and not _namespace_ok(ns):
        raise _Unclean
    spec = s.spec
    if spec is None:
        raise _Unclean
    stype = spec.type or "ClusterIP"
    if stype not in _SERVICE_TYPES:
        raise _Unclean
    cluster_ips = service_cluster_ips(spec.cluster_ip, spec.cluster_ips or [], "")
    ports = _ports(_SERVICE_PORTS, spec.ports, _new_service_ports)
    affinity = spec.session_affinity or "None"
    if affinity not in _AFFINITIES:
        raise _Unclean
    affinity_timeout = 0
    if affinity == "ClientIP":
        cfg = spec.session_affinity_config
        client_ip = cfg.client_ip if cfg is not None else None
        affinity_timeout = client_ip_timeout(client_ip.timeout_seconds if client_ip is not None else None, "")
    itp = spec.internal_traffic_policy or "Cluster"
    etp = spec.external_traffic_policy or "Cluster"
    if itp not in _POLICIES or etp not in _POLICIES:
        raise _Unclean
    external_ips = spec.external_ips or []
    for ip in external_ips:
        _check_ip(ip)
    lb_ips = []
    lb = s.status.load_balancer if s.status is not None else None
    for ing in (lb.ingress if lb is not None else None) or ():
        addr = ingress_ip(ing.ip, ing.ip_mode, "", "")
        if addr is not None:
            lb_ips.append(addr)
    annotations = meta.annotations or {}
    lb_ranges = []
    if spec.load_balancer_source_ranges or SOURCE_RANGES_ANNOTATION in annotations:
        for cidr in source_ranges(spec.load_balancer_source_ranges or [], annotations)[0]:
            norm = normal_cidr(cidr)
            if norm is None:
                raise _Unclean
            lb_ranges.append(norm)
    hc = spec.health_check_node_port
    if hc is not None and not 1 <= hc <= 65535:
        raise _Unclean
    # Positional (half the cost of keywords; tests/unit/test_servicejson.py
    # pins the order).
    return Service(
        ns,
        meta.name,
        stype,
        tuple(cluster_ips),
        ports,
        meta.labels or {},
        (),
        itp,
        etp,
        tuple(external_ips),
        tuple(lb_ips),
        affinity_timeout,
        hc,
        tuple(dict.fromkeys(lb_ranges)) if lb_ranges else (),
        meta.uid or "",
    )


# Services' ports, and slices', repeat (a cluster has many Services of
# one port 80 or 443 to a named or numbered targetPort): each distinct
# list is checked and made once, and its Services share the one tuple
# (frozen, so each's own is equal). Past _PORTS_MAX distinct lists, the
# cache starts over.
_SERVICE_PORTS: dict[tuple[_SvcPort, ...], tuple[ServicePort, ...]] = {}
_SLICE_PORTS: dict[tuple[_Port, ...], tuple[SlicePort, ...]] = {}
_PORTS_MAX = 4096


R = TypeVar("R")
P = TypeVar("P")


def _ports(
    cache: dict[tuple[R, ...], tuple[P, ...]], raw: list[R] | None, make: Callable[[tuple[R, ...]], tuple[P, ...]]
) -> tuple[P, ...]:
    """The ports `make` makes of the decoded list `raw`, made once per
    distinct list (cache: the lists made so far)."""
    key = tuple(raw) if raw else ()
    ports = cache.get(key)
    if ports is None:
        ports = make(key)  # _Unclean: nothing kept
        if len(cache) >= _PORTS_MAX:
            cache.clear()
        cache[key] = ports
    return ports


def _new_service_ports(raw: tuple[_SvcPort, ...]) -> tuple[ServicePort, ...]:
    ports = []
    seen: set[tuple[int, str]] = set()
    for p in raw:
        port = p.port
        proto = p.protocol or "TCP"
        if port is None or not 1 <= port <= 65535 or proto not in _PROTOCOLS:
            raise _Unclean
        pname = p.name or ""
        if pname and not is_label(pname):
            raise _Unclean
        node_port = p.node_port
        if node_port is not None and not 1 <= node_port <= 65535:
            raise _Unclean
        if (port, proto) in seen:
            raise _Unclean
        seen.add((port, proto))
        ports.append(ServicePort(pname, port, proto, target_port(p.target_port, port, "", ""), node_port))
    return tuple(ports)


def _new_slice_ports(raw: tuple[_Port, ...]) -> tuple[SlicePort, ...]:
    ports = []
    for p in raw:
        proto = p.protocol or "TCP"
        port = p.port
        if proto not in _PROTOCOLS or port is None or not 1 <= port <= 65535:
            raise _Unclean
        if p.name and not is_label(p.name):
            raise _Unclean
        ports.append(SlicePort(p.name or "", port, proto))
    return tuple(ports)


def _check_ip(ip: str) -> None:
    try:
        addr16(ip)
    except (OSError, ValueError):  # ValueError: a NUL in the string
        raise _Unclean from None
