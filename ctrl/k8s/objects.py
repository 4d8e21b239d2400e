"""Services, EndpointSlices and Nodes, parsed from the raw JSON/YAML dicts.

Both sources (a directory of YAML, the Kubernetes API) hand raw dicts to
`parse`, which returns small immutable records. We never build the
kubernetes client's model classes: on 100,000 endpoints they cost seconds.

Bad input never stops the rest. Every field a parser reads is checked for
its type (a YAML file can hold anything where the API server would only
send a string), and names follow Kubernetes' rules. A field that makes a
whole object unusable raises ObjectError naming the object and the field; a
bad entry inside a list (one endpoint, one port) is dropped and reported in
`problems`, and the rest of the object is used. Messages quote values cut
short (`short`), and `problem_line` makes one line of an object's problems.
"""

from __future__ import annotations

import ipaddress
import re
import reprlib
import socket
from dataclasses import dataclass, field
from typing import NamedTuple

from ..util.addrs import V4_PREFIX, addr16, addr_str

PROTOCOLS = ("TCP", "UDP", "SCTP")


class ObjectError(ValueError):
    """An object that cannot be used at all; the message names it and the field."""


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    protocol: str
    target_port: int | str | None
    node_port: int | None = None


# Service and EndpointSlice are not frozen: a frozen dataclass sets each
# field through object.__setattr__, which tripled the cost of building one
# (10,000 of each per full list at S2). Treated as immutable all the same:
# nothing assigns to one once parsed, and the model tells a changed object
# from the one it holds by identity or equality, never by hash.
@dataclass(slots=True)
class Service:
    namespace: str
    name: str
    type: str
    cluster_ips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    labels: dict = field(default_factory=dict, hash=False)
    problems: tuple[str, ...] = ()
    internal_traffic_policy: str = "Cluster"  # spec.internalTrafficPolicy
    external_traffic_policy: str = "Cluster"  # spec.externalTrafficPolicy
    external_ips: tuple[str, ...] = ()  # spec.externalIPs
    lb_ips: tuple[str, ...] = ()  # status.loadBalancer.ingress[].ip
    # sessionAffinity ClientIP: seconds of stickiness (timeoutSeconds); 0: None.
    affinity_timeout: int = 0
    health_check_node_port: int | None = None  # spec.healthCheckNodePort
    # spec.loadBalancerSourceRanges (else the annotation
    # service.beta.kubernetes.io/load-balancer-source-ranges): valid CIDRs,
    # normalized ("198.18.0.0/16").
    lb_source_ranges: tuple[str, ...] = ()
    # metadata.uid: subset slices name their Service by it (an
    # ownerReference), so a Service deleted and made again under the same
    # name never takes the old one's subsets (docs/subsetting.md).
    uid: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def externally_accessible(self, port: ServicePort) -> bool:
        """kube-proxy: a port reachable from outside the cluster (NodePort,
        LoadBalancer ingress IPs, externalIPs)."""
        return bool(port.node_port) or bool(self.lb_ips) or bool(self.external_ips)


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    port: int | None
    protocol: str


class Endpoint(NamedTuple):
    # A NamedTuple, not a frozen dataclass: 100,000 of them are built per
    # full list and tuple construction is several times cheaper. The
    # address is kept packed only: its text, a string of its own per
    # endpoint (15 MiB at 250,000), is made again when someone reads it.
    addr: bytes  # addr16 of the endpoint's first address
    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None
    zone: str | None
    hint_zones: tuple[str, ...] | None
    hint_nodes: tuple[str, ...] | None

    @property
    def address(self) -> str:
        """The address as text (an IPv4-mapped one as IPv4)."""
        return addr_str(self.addr)


@dataclass(slots=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str | None
    address_type: str
    ports: tuple[SlicePort, ...]
    endpoints: tuple[Endpoint, ...]
    labels: dict = field(default_factory=dict, hash=False)
    problems: tuple[str, ...] = ()
    # endpoints.kubernetes.io/last-change-trigger-time: when the change this
    # slice carries happened (network programming latency starts there).
    trigger_time: str | None = field(default=None, compare=False)
    # The uids of its ownerReferences of kind Service: a subset slice is
    # taken only when one of them is its Service's (docs/subsetting.md).
    owner_uids: tuple[str, ...] = ()

    @property
    def service_key(self) -> str | None:
        return f"{self.namespace}/{self.service_name}" if self.service_name else None

    @property
    def subset(self) -> str | None:
        """The subset a subset slice holds (a zone, or SUBSET_ALL); None
        for an original slice."""
        return self.labels.get(SUBSET_LABEL)

    @property
    def subset_service_key(self) -> str | None:
        """The Service a subset slice says it serves (not yet checked)."""
        name = self.labels.get(SUBSET_SERVICE_LABEL)
        return f"{self.namespace}/{name}" if name else None


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    labels: dict = field(default_factory=dict, hash=False)
    addresses: tuple[str, ...] = ()
    # status.addresses of type InternalIP and ExternalIP that are IPs, in
    # order: where NodePorts are served and masqueraded flows come from.
    internal_ips: tuple[str, ...] = ()
    external_ips: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def ips(self) -> tuple[str, ...]:
        return self.internal_ips + tuple(ip for ip in self.external_ips if ip not in self.internal_ips)

    @property
    def zone(self) -> str | None:
        return self.labels.get("topology.kubernetes.io/zone")


KINDS = ("Service", "EndpointSlice", "Node")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
# Subset slices (docs/subsetting.md): written by `sliceproxy subsetter`,
# labelled with the subset they hold (a zone, or "all") and the Service they
# serve, never with SERVICE_NAME_LABEL (so DNS, other proxies and the
# EndpointSlice controller never take them for the originals).
SUBSET_LABEL = "sliceproxy.io/subset"
SUBSET_SERVICE_LABEL = "sliceproxy.io/service-name"
SUBSET_MANAGER = "subsetter.sliceproxy.io"
SUBSET_ALL = "all"
TRIGGER_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
SOURCE_RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"

# Kubernetes' name rules (apimachinery's validation, which the API server
# applies to every object it stores): Service and namespace names and the
# names of Service and EndpointSlice ports are DNS-1123 labels, EndpointSlice
# and Node names DNS-1123 subdomains, a named targetPort an IANA service
# name. A directory of YAML gets the same rules, so every name a map or a
# log line holds is short, ASCII and free of separators ("/", ":", spaces).
MAX_LABEL = 63
MAX_SUBDOMAIN = 253
MAX_PORT_NAME = 15
_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LABEL_RE = re.compile(_LABEL)
_SUBDOMAIN_RE = re.compile(_SUBDOMAIN)
_HAS_LETTER_RE = re.compile(r"[a-z]")
# A rule and its length limit in one C call, for the list decoders
# (ctrl.k8s.slicejson), which check several names per object and only
# need to know whether each is clean: name_problem(v, LABEL) is None
# exactly when is_label(v) matches, and likewise for subdomains.
is_label = re.compile(rf"(?=.{{1,{MAX_LABEL}}}\Z){_LABEL}").fullmatch
is_subdomain = re.compile(rf"(?=.{{1,{MAX_SUBDOMAIN}}}\Z){_SUBDOMAIN}").fullmatch

LABEL, SUBDOMAIN, PORT_NAME = "a DNS label", "a DNS subdomain", "an IANA port name"


_LIMITS = {LABEL: MAX_LABEL, SUBDOMAIN: MAX_SUBDOMAIN, PORT_NAME: MAX_PORT_NAME}


def name_problem(value: str, rule: str) -> str | None:
    """Why `value` breaks Kubernetes' `rule` for names, or None."""
    limit = _LIMITS[rule]
    if len(value) > limit:
        shown = short(value) if len(value) > 40 else f"{value!r} ({len(value)} characters)"
        return f"{shown} is longer than {limit} characters"
    if rule == LABEL:
        ok = _LABEL_RE.fullmatch(value) is not None
        chars = "lowercase letters, digits and '-', starting and ending with a letter or digit"
    elif rule == SUBDOMAIN:
        ok = _SUBDOMAIN_RE.fullmatch(value) is not None
        chars = "dot-separated DNS labels: lowercase letters, digits and '-'"
    else:
        ok = _LABEL_RE.fullmatch(value) is not None and "--" not in value and bool(_HAS_LETTER_RE.search(value))
        chars = "lowercase letters, digits and single '-', with at least one letter"
    return None if ok else f"{short(value)} is not {rule} ({chars})"


# -- bounded messages ------------------------------------------------------

# A value quoted in an error line is cut short: an error line must stay one
# short line whatever the input (a YAML alias bomb once printed 32 MB).
MAX_REPR = 100
_repr = reprlib.Repr()
_repr.maxlevel = 2
_repr.maxstring = 40
_repr.maxother = 40
_repr.maxlong = 40
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = _repr.maxfrozenset = 4


def short(value: object) -> str:
    """repr(value), cut to at most MAX_REPR characters (long strings keep
    their head and say how long they were)."""
    if isinstance(value, str):
        r = repr(value) if len(value) <= 40 else f"{value[:32]!r}... ({len(value)} characters)"
    elif isinstance(value, bool | int | float | type(None)):
        # Python refuses str() of an integer of more than 4300 digits.
        r = (
            repr(value)
            if not isinstance(value, int) or abs(value) < 10**30
            else f"<an integer of {value.bit_length()} bits>"
        )
    else:
        try:
            r = _repr.repr(value)
        except Exception:  # a repr that fails must not turn a report into a crash
            r = f"<{type(value).__name__}>"
    return r if len(r) <= MAX_REPR else r[: MAX_REPR - 3] + "..."


def _shown(value: object) -> str | None:
    """A name as a message shows it: as is when it is plain, else short()."""
    if not isinstance(value, str) or value == "":
        return None  # not a name at all: the field's own error shows it
    if len(value) <= MAX_SUBDOMAIN and value.isascii() and value.isprintable() and " " not in value:
        return value
    return short(value)


def problem_line(problems: tuple[str, ...] | list[str]) -> str:
    """One log line for all the problems of one object: the first in full,
    the fields of the others (at most five named)."""
    first = problems[0]
    if len(problems) == 1:
        return first
    what = first.split(": ", 1)[0]
    fields = []
    for p in problems[1:6]:
        rest = p[len(what) + 2 :] if p.startswith(what + ": ") else p
        fields.append(rest.split(": ", 1)[0])
    more = len(problems) - 1
    tail = ", ..." if more > len(fields) else ""
    return f"{first} (and {more} more: {', '.join(fields)}{tail})"


def describe(raw: object) -> str:
    """'default/web Service' style label for messages, as far as raw allows."""
    if not isinstance(raw, dict):
        return "object"
    kind = raw.get("kind")
    if not isinstance(kind, str) or _shown(kind) != kind:
        kind = "object"  # no kind to speak of: the kind field's own error shows it
    meta: dict = raw["metadata"] if isinstance(raw.get("metadata"), dict) else {}
    name = _shown(meta.get("name")) or "<unnamed>"
    raw_ns = meta.get("namespace")
    ns = _shown(raw_ns)
    if (raw_ns is None or raw_ns == "") and kind in ("Service", "EndpointSlice"):
        ns = "default"  # as _meta defaults it: one object, one name in every message
    if kind == "Node" or not ns:
        return f"{kind} {name}"
    if kind == "EndpointSlice":
        labels = meta.get("labels")
        svc = _shown(labels.get(SERVICE_NAME_LABEL)) if isinstance(labels, dict) else None
        return f"{ns}/{svc} EndpointSlice {name}" if svc else f"{ns} EndpointSlice {name}"
    return f"{ns}/{name} {kind}"


# -- typed field access ----------------------------------------------------
# Each helper returns the field when it has its declared type (None, and for
# containers an empty one, when it is absent or null, as the API server
# treats null) and raises ObjectError naming the field otherwise.


def _mapping(value: object, what: str, fld: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ObjectError(f"{what}: {fld}: {short(value)} is not a mapping")
    return value


def _entry(value: object, what: str, fld: str) -> dict:
    """An entry of a list of objects: null there is no object at all."""
    if not isinstance(value, dict):
        raise ObjectError(f"{what}: {fld}: {short(value)} is not a mapping")
    return value


def _list(value: object, what: str, fld: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ObjectError(f"{what}: {fld}: {short(value)} is not a list")
    return value


def _str(value: object, what: str, fld: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ObjectError(f"{what}: {fld}: {short(value)} is not a string")


def _string_map(value: object, what: str, fld: str) -> dict[str, str]:
    """labels and annotations: a mapping of strings to strings."""
    m = _mapping(value, what, fld)
    for k, v in m.items():
        if not isinstance(k, str):
            raise ObjectError(f"{what}: {fld}: key {short(k)} is not a string")
        if not isinstance(v, str):
            raise ObjectError(f"{what}: {fld}[{_shown(k) or short(k)}]: {short(v)} is not a string")
    return m


def _name(value: object, what: str, fld: str, rule: str) -> str:
    if value is None or value == "":
        raise ObjectError(f"{what}: {fld}: missing")
    if not isinstance(value, str):
        raise ObjectError(f"{what}: {fld}: {short(value)} is not a string")
    bad = name_problem(value, rule)
    if bad:
        raise ObjectError(f"{what}: {fld}: {bad}")
    return value


def _port(value: object, what: str, field_name: str, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ObjectError(f"{what}: {field_name}: {short(value)} is not a port number (1-65535)")
    return value


def _ip(value: object, what: str, fld: str) -> str:
    """value when it is an IPv4 or IPv6 address, else ObjectError."""
    if isinstance(value, str):
        try:
            addr16(value)
            return value
        except (ValueError, OSError):
            pass
    raise ObjectError(f"{what}: {fld}: {short(value)} is not an IP address")


# -- parsing ---------------------------------------------------------------


def parse(raw: object) -> Service | EndpointSlice | Node:
    """Parse one object of a known kind; ObjectError if it is unusable."""
    if not isinstance(raw, dict):
        raise ObjectError(f"object: {short(raw)} is not a mapping")
    kind = raw.get("kind")
    if kind == "Service":
        return parse_service(raw)
    if kind == "EndpointSlice":
        return parse_slice(raw)
    if kind == "Node":
        return parse_node(raw)
    raise ObjectError(f"{describe(raw)}: kind: unknown kind {short(kind)} (expected one of {', '.join(KINDS)})")


def _meta(raw: dict, namespaced: bool, rule: str) -> tuple[str, str, dict[str, str], dict[str, str]]:
    """namespace ("" when not namespaced), name, labels and annotations."""
    what = describe(raw)
    meta = raw.get("metadata")
    if meta is None:
        raise ObjectError(f"{what}: metadata: missing")
    meta = _mapping(meta, what, "metadata")
    name = _name(meta.get("name"), what, "metadata.name", rule)
    ns = ""
    if namespaced:
        raw_ns = meta.get("namespace")
        ns = "default" if raw_ns is None or raw_ns == "" else _name(raw_ns, what, "metadata.namespace", LABEL)
    labels = _string_map(meta.get("labels"), what, "metadata.labels")
    annotations = _string_map(meta.get("annotations"), what, "metadata.annotations")
    return ns, name, labels, annotations


def parse_service(raw: dict) -> Service:
    ns, name, labels, annotations = _meta(raw, namespaced=True, rule=LABEL)
    what = f"{ns}/{name} Service"
    uid = _str(_mapping(raw.get("metadata"), what, "metadata").get("uid"), what, "metadata.uid") or ""
    spec = raw.get("spec")
    if spec is None:
        raise ObjectError(f"{what}: spec: missing")
    spec = _mapping(spec, what, "spec")
    stype = _str(spec.get("type"), what, "spec.type") or "ClusterIP"
    if stype not in SERVICE_TYPES:
        raise ObjectError(f"{what}: spec.type: unknown type {short(stype)}")
    cluster_ips = service_cluster_ips(
        _str(spec.get("clusterIP"), what, "spec.clusterIP"),
        _list(spec.get("clusterIPs"), what, "spec.clusterIPs"),
        what,
    )
    problems = []
    ports = []
    seen: set[tuple[int, str]] = set()
    for i, p in enumerate(_list(spec.get("ports"), what, "spec.ports")):
        try:
            ports.append(_service_port(p, what, f"spec.ports[{i}]", seen))
        except ObjectError as e:
            problems.append(str(e))
    affinity_timeout = 0
    affinity = _str(spec.get("sessionAffinity"), what, "spec.sessionAffinity") or "None"
    if affinity not in ("None", "ClientIP"):
        raise ObjectError(f"{what}: spec.sessionAffinity: {short(affinity)} is neither None nor ClientIP")
    cfg = _mapping(spec.get("sessionAffinityConfig"), what, "spec.sessionAffinityConfig")
    client_ip = _mapping(cfg.get("clientIP"), what, "spec.sessionAffinityConfig.clientIP")
    if affinity == "ClientIP":
        affinity_timeout = client_ip_timeout(client_ip.get("timeoutSeconds"), what)
    itp = _str(spec.get("internalTrafficPolicy"), what, "spec.internalTrafficPolicy") or "Cluster"
    etp = _str(spec.get("externalTrafficPolicy"), what, "spec.externalTrafficPolicy") or "Cluster"
    for fld, v in (("spec.internalTrafficPolicy", itp), ("spec.externalTrafficPolicy", etp)):
        if v not in ("Cluster", "Local"):
            raise ObjectError(f"{what}: {fld}: {short(v)} is neither Cluster nor Local")
    external_ips = []
    for i, ip in enumerate(_list(spec.get("externalIPs"), what, "spec.externalIPs")):
        try:
            external_ips.append(_ip(ip, what, f"spec.externalIPs[{i}]"))
        except ObjectError as e:
            problems.append(str(e))
    lb_ips = _lb_ips(raw, what, problems)
    raw_ranges, ranges_field = source_ranges(
        _list(spec.get("loadBalancerSourceRanges"), what, "spec.loadBalancerSourceRanges"), annotations
    )
    lb_ranges = []
    for i, cidr in enumerate(raw_ranges):
        norm = normal_cidr(cidr)
        if norm is None:
            problems.append(f"{what}: {ranges_field}[{i}]: {short(cidr)} is not a CIDR; ignored")
        else:
            lb_ranges.append(norm)
    return Service(
        ns,
        name,
        stype,
        tuple(cluster_ips),
        tuple(ports),
        labels,
        tuple(problems),
        internal_traffic_policy=itp,
        external_traffic_policy=etp,
        external_ips=tuple(external_ips),
        lb_ips=tuple(lb_ips),
        affinity_timeout=affinity_timeout,
        health_check_node_port=_port(spec.get("healthCheckNodePort"), what, "spec.healthCheckNodePort", optional=True),
        lb_source_ranges=tuple(dict.fromkeys(lb_ranges)),
        uid=uid,
    )


def _service_port(p: object, what: str, fld: str, seen: set[tuple[int, str]]) -> ServicePort:
    if not isinstance(p, dict):
        raise ObjectError(f"{what}: {fld}: {short(p)} is not a mapping")
    port = _port(p.get("port"), what, f"{fld}.port")
    assert port is not None  # _port raised otherwise
    proto = _str(p.get("protocol"), what, f"{fld}.protocol") or "TCP"
    if proto not in PROTOCOLS:
        raise ObjectError(f"{what}: {fld}.protocol: unknown protocol {short(proto)}")
    pname = _str(p.get("name"), what, f"{fld}.name") or ""
    if pname:
        _name(pname, what, f"{fld}.name", LABEL)
    tp = target_port(p.get("targetPort"), port, what, fld)
    node_port = _port(p.get("nodePort"), what, f"{fld}.nodePort", optional=True)
    if (port, proto) in seen:
        raise ObjectError(f"{what}: {fld}: port {port}/{proto} is listed twice")
    seen.add((port, proto))
    return ServicePort(pname, port, proto, tp, node_port)


# Pieces of parse_service that ctrl.k8s.slicejson's typed decoding calls
# too, so that both paths decide alike. It passes `what` and `fld` empty: an
# ObjectError makes it decline the page, and its message is never shown.


def service_cluster_ips(single: str | None, many: list, what: str) -> list[str]:
    """spec.clusterIPs (else spec.clusterIP) checked; [] for a headless Service."""
    if many:
        ips, fld = many, "spec.clusterIPs[{}]"
    else:
        ips, fld = ([single] if single else []), "spec.clusterIP"
    out: list[str] = []
    for i, ip in enumerate(ips):
        if ip == "None":
            return []  # headless: nothing for a proxy to do
        try:
            addr16(ip)  # an IPv4 or IPv6 address
        except (TypeError, ValueError, OSError):
            _ip(ip, what, fld.format(i))  # names the field (raises)
        out.append(ip)
    return out


def target_port(tp: object, port: int, what: str, fld: str) -> int | str:
    """A port's targetPort checked (fld names the port)."""
    # Kubernetes defaults a missing, 0 or "" targetPort to the port.
    if tp is None or tp == "" or (type(tp) is int and tp == 0):
        return port
    if type(tp) is int:
        _port(tp, what, f"{fld}.targetPort")
        return tp
    if isinstance(tp, str):
        bad = name_problem(tp, PORT_NAME)
        if bad:
            raise ObjectError(f"{what}: {fld}.targetPort: {bad}")
        return tp
    raise ObjectError(f"{what}: {fld}.targetPort: {short(tp)} is neither a port number nor a port name")


def client_ip_timeout(timeout: object, what: str) -> int:
    """sessionAffinityConfig.clientIP.timeoutSeconds of a ClientIP Service, checked."""
    seconds = 10800 if timeout is None else timeout  # Kubernetes' default: 3 hours
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not (1 <= seconds <= 86400):
        raise ObjectError(
            f"{what}: spec.sessionAffinityConfig.clientIP.timeoutSeconds: {short(timeout)} is not 1-86400"
        )
    return seconds


def ingress_ip(ip: object, mode: str | None, what: str, fld: str) -> str | None:
    """The address of one status.loadBalancer.ingress entry a proxy
    matches, checked; None for an entry it does not match."""
    if ip is None or ip == "":
        return None  # hostname-only ingress: nothing for a proxy to match
    if mode == "Proxy":
        # The load balancer proxies: traffic reaches the node addressed
        # to the node, not to this IP. kube-proxy skips it too.
        return None
    return _ip(ip, what, f"{fld}.ip")


def source_ranges(ranges: list, annotations: dict[str, str]) -> tuple[list, str]:
    """The source ranges to read, and the field that holds them:
    spec.loadBalancerSourceRanges, or when it is empty the annotation's."""
    if not ranges:
        ann = annotations.get(SOURCE_RANGES_ANNOTATION)
        if ann and ann.strip():
            return [r.strip() for r in ann.split(",") if r.strip()], f"metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"
    return ranges, "spec.loadBalancerSourceRanges"


def normal_cidr(cidr: object) -> str | None:
    """A source range normalized ("198.18.0.0/16"), None when it is not a CIDR."""
    if not isinstance(cidr, str):
        return None
    try:
        return str(ipaddress.ip_network(cidr.strip(), strict=False))
    except ValueError:
        return None


def _lb_ips(raw: dict, what: str, problems: list[str]) -> list[str]:
    """status.loadBalancer.ingress[].ip that a proxy matches."""
    status = _mapping(raw.get("status"), what, "status")
    lb = _mapping(status.get("loadBalancer"), what, "status.loadBalancer")
    out = []
    for i, ing in enumerate(_list(lb.get("ingress"), what, "status.loadBalancer.ingress")):
        fld = f"status.loadBalancer.ingress[{i}]"
        try:
            ing = _entry(ing, what, fld)
            ip = ing.get("ip")
            mode = _str(ing.get("ipMode"), what, f"{fld}.ipMode")
            addr = ingress_ip(ip, mode, what, fld)
            if addr is not None:
                out.append(addr)
        except ObjectError as e:
            problems.append(str(e))
    return out


def _flag(cond: dict, key: str, default: bool, what: str) -> bool:
    v = cond.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ObjectError(f"{what}.conditions.{key}: {short(v)} is not true or false")
    return v


def parse_slice(raw: dict) -> EndpointSlice:
    ns, name, labels, annotations = _meta(raw, namespaced=True, rule=SUBDOMAIN)
    svc = labels.get(SERVICE_NAME_LABEL) or None
    if svc is not None:
        # The key of the Service it serves: a Service name.
        _name(svc, f"{ns} EndpointSlice {name}", f"metadata.labels[{SERVICE_NAME_LABEL}]", LABEL)
    what = f"{ns}/{svc} EndpointSlice {name}" if svc else f"{ns} EndpointSlice {name}"
    atype = raw.get("addressType")
    if atype not in ("IPv4", "IPv6", "FQDN"):
        raise ObjectError(f"{what}: addressType: {short(atype)} is not IPv4, IPv6 or FQDN")
    problems = []
    ports = []
    for i, p in enumerate(_list(raw.get("ports"), what, "ports")):
        fld = f"ports[{i}]"
        try:
            if not isinstance(p, dict):
                raise ObjectError(f"{what}: {fld}: {short(p)} is not a mapping")
            proto = _str(p.get("protocol"), what, f"{fld}.protocol") or "TCP"
            if proto not in PROTOCOLS:
                raise ObjectError(f"{what}: {fld}.protocol: unknown protocol {short(proto)}")
            port = _port(p.get("port"), what, f"{fld}.port", optional=True)
            if port is None:
                raise ObjectError(f"{what}: {fld}.port: missing")
            pname = _str(p.get("name"), what, f"{fld}.name") or ""
            if pname:
                _name(pname, what, f"{fld}.name", LABEL)
            ports.append(SlicePort(pname, port, proto))
        except ObjectError as e:
            problems.append(str(e))
    raw_eps = _list(raw.get("endpoints"), what, "endpoints")
    family = socket.AF_INET6 if atype == "IPv6" else socket.AF_INET
    # The hot loop of a full list (100,000 endpoints): messages are only
    # built when something is wrong, and the Endpoint tuple positionally.
    v4 = family == socket.AF_INET
    pton = socket.inet_pton
    new = tuple.__new__
    endpoints: list[Endpoint] = []
    append = endpoints.append
    for i, ep in enumerate(raw_eps):
        try:
            if ep.__class__ is not dict:
                raise ObjectError(f"{what}: endpoints[{i}]: {short(ep)} is not a mapping")
            addrs = ep.get("addresses")
            if addrs.__class__ is not list or not addrs:
                if addrs is not None and addrs.__class__ is not list:
                    raise ObjectError(f"{what}: endpoints[{i}].addresses: {short(addrs)} is not a list")
                raise ObjectError(f"{what}: endpoints[{i}].addresses: missing")
            if atype == "FQDN":
                continue  # names, not addresses: a proxy ignores them
            ip = addrs[0]  # kube-proxy uses an endpoint's first address only
            try:
                packed = pton(family, ip)
            except (OSError, TypeError, ValueError):
                raise ObjectError(
                    f"{what}: endpoints[{i}].addresses[0]: {short(ip)} is not an {atype} address"
                ) from None
            cond = ep.get("conditions")
            if cond is None:
                cond = {}
            elif cond.__class__ is not dict:
                raise ObjectError(f"{what}: endpoints[{i}].conditions: {short(cond)} is not a mapping")
            # Kubernetes: a missing ready or serving means true, a missing
            # terminating means false.
            ready = cond.get("ready", True)
            serving = cond.get("serving", True)
            terminating = cond.get("terminating", False)
            if ready.__class__ is not bool or serving.__class__ is not bool or terminating.__class__ is not bool:
                ready = _flag(cond, "ready", True, f"{what}: endpoints[{i}]")
                serving = _flag(cond, "serving", True, f"{what}: endpoints[{i}]")
                terminating = _flag(cond, "terminating", False, f"{what}: endpoints[{i}]")
            node_name = ep.get("nodeName")
            zone = ep.get("zone")
            if (node_name.__class__ is not str and node_name is not None) or (
                zone.__class__ is not str and zone is not None
            ):
                _str(node_name, what, f"endpoints[{i}].nodeName")
                _str(zone, what, f"endpoints[{i}].zone")
            hints = ep.get("hints")
            if hints is not None:
                hints = _mapping(hints, what, f"endpoints[{i}].hints")
            # tuple.__new__: the NamedTuple's own __new__ is a Python call,
            # which this loop makes 100,000 times on a full list.
            append(
                new(
                    Endpoint,
                    (
                        V4_PREFIX + packed if v4 else packed,
                        ready,
                        serving,
                        terminating,
                        node_name,
                        zone,
                        _hint_names(hints.get("forZones"), what, f"endpoints[{i}].hints.forZones") if hints else None,
                        _hint_names(hints.get("forNodes"), what, f"endpoints[{i}].hints.forNodes") if hints else None,
                    ),
                )
            )
        except ObjectError as e:
            problems.append(str(e))
    return EndpointSlice(
        ns,
        name,
        svc,
        atype,
        tuple(ports),
        tuple(endpoints),
        labels,
        tuple(problems),
        annotations.get(TRIGGER_ANNOTATION),
        _service_owners(raw["metadata"], what),
    )


def _service_owners(meta: dict, what: str) -> tuple[str, ...]:
    """The uids of metadata.ownerReferences of kind Service."""
    out = []
    for i, ref in enumerate(_list(meta.get("ownerReferences"), what, "metadata.ownerReferences")):
        fld = f"metadata.ownerReferences[{i}]"
        ref = _entry(ref, what, fld)
        if _str(ref.get("kind"), what, f"{fld}.kind") == "Service":
            uid = _str(ref.get("uid"), what, f"{fld}.uid")
            if uid:
                out.append(uid)
    return tuple(out)


def _hint_names(hints: object, what: str, fld: str) -> tuple[str, ...] | None:
    """Names of forZones / forNodes hints; None when there are none."""
    entries = _list(hints, what, fld)
    if not entries:
        return None
    names = []
    for j, h in enumerate(entries):
        name = _str(_entry(h, what, f"{fld}[{j}]").get("name"), what, f"{fld}[{j}].name")
        if name:
            names.append(name)
    return tuple(names)


def parse_node(raw: dict) -> Node:
    _, name, labels, _ = _meta(raw, namespaced=False, rule=SUBDOMAIN)
    what = f"Node {name}"
    status = _mapping(raw.get("status"), what, "status")
    raw_addrs = _list(status.get("addresses"), what, "status.addresses")
    addrs = []
    ips: dict[str, list[str]] = {"InternalIP": [], "ExternalIP": []}
    problems = []
    for i, a in enumerate(raw_addrs):
        fld = f"status.addresses[{i}]"
        try:
            a = _entry(a, what, fld)
            typ = _str(a.get("type"), what, f"{fld}.type")
            address = _str(a.get("address"), what, f"{fld}.address")
        except ObjectError as e:
            problems.append(f"{e}; ignored")
            continue
        if not address:
            continue
        addrs.append(address)
        if typ not in ips:
            continue  # Hostname, InternalDNS...: names, not where traffic arrives
        try:
            _ip(address, what, f"{fld}.address")
        except ObjectError as e:
            problems.append(f"{e}; ignored")
            continue
        if address not in ips[typ]:
            ips[typ].append(address)
    return Node(name, labels, tuple(addrs), tuple(ips["InternalIP"]), tuple(ips["ExternalIP"]), tuple(problems))
