"""Services, EndpointSlices and Nodes, parsed from the raw JSON/YAML dicts.

Both sources (a directory of YAML, the Kubernetes API) hand raw dicts to
`parse`, which returns small immutable records. We never build the
kubernetes client's model classes: on 100,000 endpoints they cost seconds.

Bad input never stops the rest: a field that makes a whole object unusable
raises ObjectError naming the object and the field; a bad entry inside a
list (one endpoint, one port) is dropped and reported in `problems`, and the
rest of the object is used.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import NamedTuple

V4_PREFIX = b"\x00" * 10 + b"\xff\xff"

PROTOCOLS = ("TCP", "UDP", "SCTP")


class ObjectError(ValueError):
    """An object that cannot be used at all; the message names it and the field."""


def addr16(ip: str) -> bytes:
    """16-byte map form of an address: IPv4 as ::ffff:a.b.c.d. Raises ValueError."""
    if ":" in ip:
        return socket.inet_pton(socket.AF_INET6, ip)
    return V4_PREFIX + socket.inet_pton(socket.AF_INET, ip)


def addr_str(a: bytes) -> str:
    """Inverse of addr16, for people."""
    if a[:12] == V4_PREFIX:
        return socket.inet_ntop(socket.AF_INET, a[12:])
    return socket.inet_ntop(socket.AF_INET6, a)


def is_v4(a: bytes) -> bool:
    return a[:12] == V4_PREFIX


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    protocol: str
    target_port: int | str | None
    node_port: int | None = None


@dataclass(frozen=True, slots=True)
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
    # full list and tuple construction is several times cheaper.
    address: str
    addr: bytes  # addr16(address)
    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None
    zone: str | None
    hint_zones: tuple[str, ...] | None
    hint_nodes: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
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

    @property
    def service_key(self) -> str | None:
        return f"{self.namespace}/{self.service_name}" if self.service_name else None


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


def describe(raw: object) -> str:
    """'default/web Service' style label for messages, as far as raw allows."""
    if not isinstance(raw, dict):
        return "object"
    kind = raw.get("kind") or "object"
    meta: dict = raw["metadata"] if isinstance(raw.get("metadata"), dict) else {}
    name = meta.get("name") or "<unnamed>"
    ns = meta.get("namespace")
    if kind == "Node" or not ns:
        return f"{kind} {name}"
    if kind == "EndpointSlice":
        svc = (meta.get("labels") or {}).get("kubernetes.io/service-name")
        return f"{ns}/{svc} EndpointSlice {name}" if svc else f"{ns} EndpointSlice {name}"
    return f"{ns}/{name} {kind}"


def parse(raw: object) -> Service | EndpointSlice | Node:
    """Parse one object of a known kind; ObjectError if it is unusable."""
    if not isinstance(raw, dict):
        raise ObjectError(f"object: expected a mapping, got {type(raw).__name__}")
    kind = raw.get("kind")
    if kind == "Service":
        return parse_service(raw)
    if kind == "EndpointSlice":
        return parse_slice(raw)
    if kind == "Node":
        return parse_node(raw)
    raise ObjectError(f"{describe(raw)}: kind: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")


def _meta(raw: dict, what: str, namespaced: bool) -> tuple[str, str, dict]:
    meta = raw.get("metadata")
    if not isinstance(meta, dict):
        raise ObjectError(f"{what}: metadata: missing")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ObjectError(f"{what}: metadata.name: missing")
    ns = meta.get("namespace") or ("default" if namespaced else "")
    if not isinstance(ns, str):
        raise ObjectError(f"{what}: metadata.namespace: not a string")
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        raise ObjectError(f"{what}: metadata.labels: not a mapping")
    return ns, name, labels


def _port(value: object, what: str, field_name: str, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ObjectError(f"{what}: {field_name}: {value!r} is not a port number (1-65535)")
    return value


def parse_service(raw: dict) -> Service:
    ns, name, labels = _meta(raw, describe(raw), namespaced=True)
    what = f"{ns}/{name} Service"
    spec = raw.get("spec")
    if not isinstance(spec, dict):
        raise ObjectError(f"{what}: spec: missing")
    stype = spec.get("type") or "ClusterIP"
    if stype not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise ObjectError(f"{what}: spec.type: unknown type {stype!r}")
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if not isinstance(ips, list):
        raise ObjectError(f"{what}: spec.clusterIPs: not a list")
    cluster_ips: list[str] = []
    for i, ip in enumerate(ips):
        if ip == "None":
            cluster_ips = []  # headless: nothing for a proxy to do
            break
        try:
            addr16(ip)
        except (ValueError, TypeError, OSError):
            fld = f"spec.clusterIPs[{i}]" if spec.get("clusterIPs") else "spec.clusterIP"
            raise ObjectError(f"{what}: {fld}: {ip!r} is not an IP address") from None
        cluster_ips.append(ip)
    problems = []
    ports = []
    seen = set()
    raw_ports = spec.get("ports") or []
    if not isinstance(raw_ports, list):
        raise ObjectError(f"{what}: spec.ports: not a list")
    for i, p in enumerate(raw_ports):
        fld = f"spec.ports[{i}]"
        try:
            if not isinstance(p, dict):
                raise ObjectError(f"{what}: {fld}: not a mapping")
            port = _port(p.get("port"), what, f"{fld}.port")
            proto = p.get("protocol") or "TCP"
            if proto not in PROTOCOLS:
                raise ObjectError(f"{what}: {fld}.protocol: unknown protocol {proto!r}")
            pname = p.get("name") or ""
            if not isinstance(pname, str):
                raise ObjectError(f"{what}: {fld}.name: not a string")
            tp = p.get("targetPort", port)
            if isinstance(tp, int) and not isinstance(tp, bool):
                _port(tp, what, f"{fld}.targetPort")
            elif not isinstance(tp, str) or not tp:
                raise ObjectError(f"{what}: {fld}.targetPort: {tp!r} is neither a port nor a port name")
            node_port = _port(p.get("nodePort"), what, f"{fld}.nodePort", optional=True)
            if (port, proto) in seen:
                raise ObjectError(f"{what}: {fld}: port {port}/{proto} is listed twice")
            seen.add((port, proto))
            assert port is not None  # _port raised otherwise
            ports.append(ServicePort(pname, port, proto, tp, node_port))
        except ObjectError as e:
            problems.append(str(e))
    affinity_timeout = 0
    affinity = spec.get("sessionAffinity") or "None"
    if affinity not in ("None", "ClientIP"):
        raise ObjectError(f"{what}: spec.sessionAffinity: {affinity!r} is neither None nor ClientIP")
    if affinity == "ClientIP":
        cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get("timeoutSeconds")
        affinity_timeout = 10800 if cfg is None else cfg  # Kubernetes' default: 3 hours
        if (
            isinstance(affinity_timeout, bool)
            or not isinstance(affinity_timeout, int)
            or not (1 <= affinity_timeout <= 86400)
        ):
            raise ObjectError(f"{what}: spec.sessionAffinityConfig.clientIP.timeoutSeconds: {cfg!r} is not 1-86400")
    itp = spec.get("internalTrafficPolicy") or "Cluster"
    etp = spec.get("externalTrafficPolicy") or "Cluster"
    for fld, v in (("spec.internalTrafficPolicy", itp), ("spec.externalTrafficPolicy", etp)):
        if v not in ("Cluster", "Local"):
            raise ObjectError(f"{what}: {fld}: {v!r} is neither Cluster nor Local")
    external_ips = []
    for i, ip in enumerate(spec.get("externalIPs") or []):
        try:
            addr16(ip)
            external_ips.append(ip)
        except (ValueError, TypeError, OSError):
            problems.append(f"{what}: spec.externalIPs[{i}]: {ip!r} is not an IP address")
    lb_ips = []
    ingress = ((raw.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    for i, ing in enumerate(ingress):
        ip = ing.get("ip") if isinstance(ing, dict) else None
        if ip is None:
            continue  # hostname-only ingress: nothing for a proxy to match
        if ing.get("ipMode") == "Proxy":
            # The load balancer proxies: traffic reaches the node addressed
            # to the node, not to this IP. kube-proxy skips it too.
            continue
        try:
            addr16(ip)
            lb_ips.append(ip)
        except (ValueError, TypeError, OSError):
            problems.append(f"{what}: status.loadBalancer.ingress[{i}].ip: {ip!r} is not an IP address")
    ranges_field = "spec.loadBalancerSourceRanges"
    raw_ranges = spec.get("loadBalancerSourceRanges") or []
    if not raw_ranges:
        ann = ((raw.get("metadata") or {}).get("annotations") or {}).get(
            "service.beta.kubernetes.io/load-balancer-source-ranges"
        )
        if isinstance(ann, str) and ann.strip():
            raw_ranges = [r.strip() for r in ann.split(",") if r.strip()]
            ranges_field = "metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges]"
    lb_ranges = []
    if not isinstance(raw_ranges, list):
        problems.append(f"{what}: {ranges_field}: not a list; ignored")
        raw_ranges = []
    for i, cidr in enumerate(raw_ranges):
        try:
            lb_ranges.append(str(ipaddress.ip_network(str(cidr).strip(), strict=False)))
        except ValueError:
            problems.append(f"{what}: {ranges_field}[{i}]: {cidr!r} is not a CIDR; ignored")
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
    )


def _flag(cond: dict, key: str, default: bool, what: str) -> bool:
    v = cond.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ObjectError(f"{what}.conditions.{key}: {v!r} is not true or false")
    return v


def parse_slice(raw: dict) -> EndpointSlice:
    ns, name, labels = _meta(raw, describe(raw), namespaced=True)
    svc = labels.get("kubernetes.io/service-name")
    what = f"{ns}/{svc} EndpointSlice {name}" if svc else f"{ns} EndpointSlice {name}"
    atype = raw.get("addressType")
    if atype not in ("IPv4", "IPv6", "FQDN"):
        raise ObjectError(f"{what}: addressType: {atype!r} is not IPv4, IPv6 or FQDN")
    problems = []
    ports = []
    raw_ports = raw.get("ports") or []
    if not isinstance(raw_ports, list):
        raise ObjectError(f"{what}: ports: not a list")
    for i, p in enumerate(raw_ports):
        try:
            if not isinstance(p, dict):
                raise ObjectError(f"{what}: ports[{i}]: not a mapping")
            proto = p.get("protocol") or "TCP"
            if proto not in PROTOCOLS:
                raise ObjectError(f"{what}: ports[{i}].protocol: unknown protocol {proto!r}")
            port = _port(p.get("port"), what, f"ports[{i}].port", optional=True)
            if port is None:
                raise ObjectError(f"{what}: ports[{i}].port: missing")
            ports.append(SlicePort(p.get("name") or "", port, proto))
        except ObjectError as e:
            problems.append(str(e))
    endpoints = []
    raw_eps = raw.get("endpoints") or []
    if not isinstance(raw_eps, list):
        raise ObjectError(f"{what}: endpoints: not a list")
    family = socket.AF_INET6 if atype == "IPv6" else socket.AF_INET
    # The hot loop of a full list (100,000 endpoints): messages are only
    # built when something is wrong, and the Endpoint tuple positionally.
    v4 = family == socket.AF_INET
    pton = socket.inet_pton
    for i, ep in enumerate(raw_eps):
        try:
            if not isinstance(ep, dict):
                raise ObjectError(f"{what}: endpoints[{i}]: not a mapping")
            addrs = ep.get("addresses")
            if not isinstance(addrs, list) or not addrs:
                raise ObjectError(f"{what}: endpoints[{i}].addresses: missing")
            if atype == "FQDN":
                continue  # names, not addresses: a proxy ignores them
            ip = addrs[0]  # kube-proxy uses an endpoint's first address only
            try:
                packed = pton(family, ip)
            except (OSError, TypeError):
                raise ObjectError(f"{what}: endpoints[{i}].addresses[0]: {ip!r} is not an {atype} address") from None
            cond = ep.get("conditions") or {}
            if not isinstance(cond, dict):
                raise ObjectError(f"{what}: endpoints[{i}].conditions: not a mapping")
            # Kubernetes: a missing ready or serving means true, a missing
            # terminating means false.
            ready = cond.get("ready", True)
            serving = cond.get("serving", True)
            terminating = cond.get("terminating", False)
            if ready.__class__ is not bool or serving.__class__ is not bool or terminating.__class__ is not bool:
                ready = _flag(cond, "ready", True, f"{what}: endpoints[{i}]")
                serving = _flag(cond, "serving", True, f"{what}: endpoints[{i}]")
                terminating = _flag(cond, "terminating", False, f"{what}: endpoints[{i}]")
            hints = ep.get("hints")
            if hints is not None and not isinstance(hints, dict):
                raise ObjectError(f"{what}: endpoints[{i}].hints: not a mapping")
            endpoints.append(
                Endpoint(
                    ip,
                    V4_PREFIX + packed if v4 else packed,
                    ready,
                    serving,
                    terminating,
                    ep.get("nodeName"),
                    ep.get("zone"),
                    _hint_names(hints.get("forZones")) if hints else None,
                    _hint_names(hints.get("forNodes")) if hints else None,
                )
            )
        except ObjectError as e:
            problems.append(str(e))
    annotations = (raw.get("metadata") or {}).get("annotations") or {}
    trigger = annotations.get("endpoints.kubernetes.io/last-change-trigger-time")
    return EndpointSlice(
        ns,
        name,
        svc,
        atype,
        tuple(ports),
        tuple(endpoints),
        labels,
        tuple(problems),
        trigger if isinstance(trigger, str) else None,
    )


def _hint_names(hints: object) -> tuple[str, ...] | None:
    """Names of forZones / forNodes hints; None when there are none."""
    if not isinstance(hints, list) or not hints:
        return None
    return tuple(str(h["name"]) for h in hints if isinstance(h, dict) and h.get("name"))


def parse_node(raw: dict) -> Node:
    _, name, labels = _meta(raw, describe(raw), namespaced=False)
    status = raw.get("status") or {}
    raw_addrs = status.get("addresses") or []
    if not isinstance(raw_addrs, list):
        raise ObjectError(f"Node {name}: status.addresses: not a list")
    addrs = tuple(str(a["address"]) for a in raw_addrs if isinstance(a, dict) and a.get("address"))
    ips: dict[str, list[str]] = {"InternalIP": [], "ExternalIP": []}
    problems = []
    for i, a in enumerate(raw_addrs):
        if not isinstance(a, dict) or a.get("type") not in ips:
            continue
        ip = a.get("address")
        try:
            addr16(ip)  # type: ignore[arg-type]
        except (ValueError, TypeError, OSError):
            problems.append(f"Node {name}: status.addresses[{i}].address: {ip!r} is not an IP address; ignored")
            continue
        if ip not in ips[a["type"]]:
            ips[a["type"]].append(ip)  # type: ignore[arg-type]
    return Node(name, labels, addrs, tuple(ips["InternalIP"]), tuple(ips["ExternalIP"]), tuple(problems))
