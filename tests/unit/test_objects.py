import pytest

from ctrl.k8s.objects import ObjectError, parse
from ctrl.util.addrs import addr16, addr_str

from .helpers import endpoint, endpoint_slice, service


@pytest.mark.parametrize(
    "raw,message",
    [
        pytest.param(
            service(ip="198.19.0.300"),
            "default/web Service: spec.clusterIP: '198.19.0.300' is not an IP address",
            id="bad-cluster-ip",
        ),
        pytest.param(
            {"kind": "Service", "metadata": {"namespace": "x"}, "spec": {}}, "metadata.name: missing", id="no-name"
        ),
        pytest.param(
            {"kind": "Pod", "metadata": {"name": "p", "namespace": "default"}},
            "default/p Pod: kind: unknown kind 'Pod'",
            id="unknown-kind",
        ),
        pytest.param({**service(), "spec": None}, "default/web Service: spec: missing", id="no-spec"),
        pytest.param(service(type="Weird"), "spec.type: unknown type 'Weird'", id="bad-type"),
        pytest.param(
            endpoint_slice("web-1", address_type="IPX"),
            "default/web EndpointSlice web-1: addressType",
            id="bad-address-type",
        ),
        pytest.param("just a string", "object: 'just a string' is not a mapping", id="not-a-mapping"),
    ],
)
def test_unusable_objects_name_object_and_field(raw, message):
    with pytest.raises(ObjectError) as e:
        parse(raw)
    assert message in str(e.value)


def test_bad_port_is_dropped_and_named_rest_kept():
    svc = parse(service(ports=[{"name": "a", "port": 80}, {"name": "b"}, {"name": "c", "port": 70000}]))
    assert [p.name for p in svc.ports] == ["a"]
    assert any("spec.ports[1].port: None is not a port number" in p for p in svc.problems)
    assert any("spec.ports[2].port: 70000" in p for p in svc.problems)


def test_bad_endpoint_address_is_dropped_and_named():
    sl = parse(endpoint_slice("web-abc12", endpoints=[endpoint("198.18.1.1"), endpoint("198.18.1.300")]))
    assert [e.address for e in sl.endpoints] == ["198.18.1.1"]
    assert sl.problems == (
        "default/web EndpointSlice web-abc12: endpoints[1].addresses[0]: '198.18.1.300' is not an IPv4 address",
    )


@pytest.mark.parametrize(
    "cond,expect",
    [
        pytest.param({}, (True, True, False), id="missing-means-ready-serving-not-terminating"),
        pytest.param({"ready": False}, (False, True, False), id="not-ready"),
        pytest.param({"ready": False, "serving": True, "terminating": True}, (False, True, True), id="terminating"),
    ],
)
def test_endpoint_condition_defaults(cond, expect):
    raw = endpoint_slice("s", endpoints=[{"addresses": ["198.18.1.1"], "conditions": cond}])
    ep = parse(raw).endpoints[0]
    assert (ep.ready, ep.serving, ep.terminating) == expect


def test_only_first_address_counts():
    raw = endpoint_slice("s", endpoints=[{"addresses": ["198.18.1.1", "198.18.1.2"]}])
    assert [e.address for e in parse(raw).endpoints] == ["198.18.1.1"]


def test_headless_service_has_no_cluster_ips():
    assert parse(service(ip="None")).cluster_ips == ()


@pytest.mark.parametrize("ip", ["198.18.0.1", "2001:db8::1"], ids=["v4", "v6"])
def test_addr16_roundtrip(ip):
    a = addr16(ip)
    assert len(a) == 16 and addr_str(a) == ip


# -- every field the parsers read, with values of the wrong type -------------
#
# Each row: a field of a fully populated object, the wrong-typed values put
# there, what the message must start with, and whether the object is refused
# (ObjectError; a source keeps its last good version) or only the entry of a
# list that holds the field is dropped and reported in `problems`.

TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"


def full_service() -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}, "annotations": {"a": "b"}},
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "198.19.0.10",
            "clusterIPs": ["198.19.0.10"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}],
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
            "internalTrafficPolicy": "Cluster",
            "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 30999,
            "externalIPs": ["198.18.5.5"],
            "loadBalancerSourceRanges": ["198.18.0.0/16"],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "198.18.6.6", "ipMode": "VIP"}]}},
    }


def full_slice() -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-a",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "web"},
            "annotations": {TRIGGER: "2026-01-01T00:00:00Z"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": ["198.18.1.1"],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": "node-a",
                "zone": "zone-1",
                "hints": {"forZones": [{"name": "zone-1"}], "forNodes": [{"name": "node-a"}]},
            }
        ],
    }


def full_node() -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-1"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.5"}]},
    }


NOT_MAP = [5, "x", [1], True]
NOT_ENTRY = [*NOT_MAP, None]  # null in a list of objects is no object
NOT_LIST = [5, "x", {"a": 1}, True]
NOT_STR = [5, 1.5, [], {"a": 1}, True]
NOT_INT = ["80", 1.5, [], {"a": 1}, True]
NOT_BOOL = ["yes", 1, [], {"a": 1}]
REFUSED, DROPPED = "refused", "dropped"

SVC = "default/web Service"
SL = "default/web EndpointSlice web-a"
NODE = "Node node-a"

# (builder, path, wrong values, message prefix after "<object>: ", outcome)
WRONG_TYPES = [
    (full_service, ("metadata",), NOT_MAP, "metadata", REFUSED),
    (full_service, ("metadata", "name"), NOT_STR, "metadata.name", REFUSED),
    (full_service, ("metadata", "namespace"), NOT_STR, "metadata.namespace", REFUSED),
    (full_service, ("metadata", "labels"), NOT_MAP, "metadata.labels", REFUSED),
    (full_service, ("metadata", "labels", "app"), NOT_STR, "metadata.labels[app]", REFUSED),
    (full_service, ("metadata", "annotations"), NOT_MAP, "metadata.annotations", REFUSED),
    (full_service, ("metadata", "annotations", "a"), NOT_STR, "metadata.annotations[a]", REFUSED),
    (full_service, ("spec",), NOT_MAP, "spec", REFUSED),
    (full_service, ("spec", "type"), NOT_STR, "spec.type", REFUSED),
    (full_service, ("spec", "clusterIP"), NOT_STR, "spec.clusterIP", REFUSED),
    (full_service, ("spec", "clusterIPs"), NOT_LIST, "spec.clusterIPs", REFUSED),
    (full_service, ("spec", "clusterIPs", 0), NOT_STR, "spec.clusterIPs[0]", REFUSED),
    (full_service, ("spec", "ports"), NOT_LIST, "spec.ports", REFUSED),
    (full_service, ("spec", "ports", 0), NOT_ENTRY, "spec.ports[0]", DROPPED),
    (full_service, ("spec", "ports", 0, "name"), NOT_STR, "spec.ports[0].name", DROPPED),
    (full_service, ("spec", "ports", 0, "port"), NOT_INT, "spec.ports[0].port", DROPPED),
    (full_service, ("spec", "ports", 0, "protocol"), NOT_STR, "spec.ports[0].protocol", DROPPED),
    (full_service, ("spec", "ports", 0, "targetPort"), [1.5, [], {"a": 1}, True], "spec.ports[0].targetPort", DROPPED),
    (full_service, ("spec", "ports", 0, "nodePort"), NOT_INT, "spec.ports[0].nodePort", DROPPED),
    (full_service, ("spec", "sessionAffinity"), NOT_STR, "spec.sessionAffinity", REFUSED),
    (full_service, ("spec", "sessionAffinityConfig"), NOT_MAP, "spec.sessionAffinityConfig", REFUSED),
    (
        full_service,
        ("spec", "sessionAffinityConfig", "clientIP"),
        NOT_MAP,
        "spec.sessionAffinityConfig.clientIP",
        REFUSED,
    ),
    (
        full_service,
        ("spec", "sessionAffinityConfig", "clientIP", "timeoutSeconds"),
        NOT_INT,
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        REFUSED,
    ),
    (full_service, ("spec", "internalTrafficPolicy"), NOT_STR, "spec.internalTrafficPolicy", REFUSED),
    (full_service, ("spec", "externalTrafficPolicy"), NOT_STR, "spec.externalTrafficPolicy", REFUSED),
    (full_service, ("spec", "healthCheckNodePort"), NOT_INT, "spec.healthCheckNodePort", REFUSED),
    (full_service, ("spec", "externalIPs"), NOT_LIST, "spec.externalIPs", REFUSED),
    (full_service, ("spec", "externalIPs", 0), NOT_STR, "spec.externalIPs[0]", DROPPED),
    (full_service, ("spec", "loadBalancerSourceRanges"), NOT_LIST, "spec.loadBalancerSourceRanges", REFUSED),
    (full_service, ("spec", "loadBalancerSourceRanges", 0), NOT_STR, "spec.loadBalancerSourceRanges[0]", DROPPED),
    (full_service, ("status",), NOT_MAP, "status", REFUSED),
    (full_service, ("status", "loadBalancer"), NOT_MAP, "status.loadBalancer", REFUSED),
    (full_service, ("status", "loadBalancer", "ingress"), NOT_LIST, "status.loadBalancer.ingress", REFUSED),
    (full_service, ("status", "loadBalancer", "ingress", 0), NOT_ENTRY, "status.loadBalancer.ingress[0]", DROPPED),
    (
        full_service,
        ("status", "loadBalancer", "ingress", 0, "ip"),
        NOT_STR,
        "status.loadBalancer.ingress[0].ip",
        DROPPED,
    ),
    (
        full_service,
        ("status", "loadBalancer", "ingress", 0, "ipMode"),
        NOT_STR,
        "status.loadBalancer.ingress[0].ipMode",
        DROPPED,
    ),
    (full_slice, ("metadata",), NOT_MAP, "metadata", REFUSED),
    (full_slice, ("metadata", "name"), NOT_STR, "metadata.name", REFUSED),
    (full_slice, ("metadata", "namespace"), NOT_STR, "metadata.namespace", REFUSED),
    (full_slice, ("metadata", "labels"), NOT_MAP, "metadata.labels", REFUSED),
    (
        full_slice,
        ("metadata", "labels", "kubernetes.io/service-name"),
        NOT_STR,
        "metadata.labels[kubernetes.io/service-name]",
        REFUSED,
    ),
    (full_slice, ("metadata", "annotations"), NOT_MAP, "metadata.annotations", REFUSED),
    (full_slice, ("metadata", "annotations", TRIGGER), NOT_STR, f"metadata.annotations[{TRIGGER}]", REFUSED),
    (full_slice, ("addressType",), NOT_STR, "addressType", REFUSED),
    (full_slice, ("ports",), NOT_LIST, "ports", REFUSED),
    (full_slice, ("ports", 0), NOT_ENTRY, "ports[0]", DROPPED),
    (full_slice, ("ports", 0, "name"), NOT_STR, "ports[0].name", DROPPED),
    (full_slice, ("ports", 0, "port"), NOT_INT, "ports[0].port", DROPPED),
    (full_slice, ("ports", 0, "protocol"), NOT_STR, "ports[0].protocol", DROPPED),
    (full_slice, ("endpoints",), NOT_LIST, "endpoints", REFUSED),
    (full_slice, ("endpoints", 0), NOT_ENTRY, "endpoints[0]", DROPPED),
    (full_slice, ("endpoints", 0, "addresses"), NOT_LIST, "endpoints[0].addresses", DROPPED),
    (full_slice, ("endpoints", 0, "addresses", 0), NOT_STR, "endpoints[0].addresses[0]", DROPPED),
    (full_slice, ("endpoints", 0, "conditions"), NOT_MAP, "endpoints[0].conditions", DROPPED),
    (full_slice, ("endpoints", 0, "conditions", "ready"), NOT_BOOL, "endpoints[0].conditions.ready", DROPPED),
    (full_slice, ("endpoints", 0, "conditions", "serving"), NOT_BOOL, "endpoints[0].conditions.serving", DROPPED),
    (
        full_slice,
        ("endpoints", 0, "conditions", "terminating"),
        NOT_BOOL,
        "endpoints[0].conditions.terminating",
        DROPPED,
    ),
    (full_slice, ("endpoints", 0, "nodeName"), NOT_STR, "endpoints[0].nodeName", DROPPED),
    (full_slice, ("endpoints", 0, "zone"), NOT_STR, "endpoints[0].zone", DROPPED),
    (full_slice, ("endpoints", 0, "hints"), NOT_MAP, "endpoints[0].hints", DROPPED),
    (full_slice, ("endpoints", 0, "hints", "forZones"), NOT_LIST, "endpoints[0].hints.forZones", DROPPED),
    (full_slice, ("endpoints", 0, "hints", "forZones", 0), NOT_ENTRY, "endpoints[0].hints.forZones[0]", DROPPED),
    (
        full_slice,
        ("endpoints", 0, "hints", "forZones", 0, "name"),
        NOT_STR,
        "endpoints[0].hints.forZones[0].name",
        DROPPED,
    ),
    (full_slice, ("endpoints", 0, "hints", "forNodes"), NOT_LIST, "endpoints[0].hints.forNodes", DROPPED),
    (full_slice, ("endpoints", 0, "hints", "forNodes", 0), NOT_ENTRY, "endpoints[0].hints.forNodes[0]", DROPPED),
    (
        full_slice,
        ("endpoints", 0, "hints", "forNodes", 0, "name"),
        NOT_STR,
        "endpoints[0].hints.forNodes[0].name",
        DROPPED,
    ),
    (full_node, ("metadata",), NOT_MAP, "metadata", REFUSED),
    (full_node, ("metadata", "name"), NOT_STR, "metadata.name", REFUSED),
    (full_node, ("metadata", "labels"), NOT_MAP, "metadata.labels", REFUSED),
    (
        full_node,
        ("metadata", "labels", "topology.kubernetes.io/zone"),
        NOT_STR,
        "metadata.labels[topology.kubernetes.io/zone]",
        REFUSED,
    ),
    (full_node, ("status",), NOT_MAP, "status", REFUSED),
    (full_node, ("status", "addresses"), NOT_LIST, "status.addresses", REFUSED),
    (full_node, ("status", "addresses", 0), NOT_ENTRY, "status.addresses[0]", DROPPED),
    (full_node, ("status", "addresses", 0, "type"), NOT_STR, "status.addresses[0].type", DROPPED),
    (full_node, ("status", "addresses", 0, "address"), NOT_STR, "status.addresses[0].address", DROPPED),
]


def _what(builder) -> str:
    return {full_service: SVC, full_slice: SL, full_node: NODE}[builder]


# Where the broken field is the object's identity, the message labels the
# object as far as the rest of it tells.
IDENTITY = {
    (full_service, ("metadata",)): "default/<unnamed> Service",
    (full_service, ("metadata", "name")): "default/<unnamed> Service",
    (full_service, ("metadata", "namespace")): "Service web",
    (full_slice, ("metadata",)): "default EndpointSlice <unnamed>",
    (full_slice, ("metadata", "name")): "default/web EndpointSlice <unnamed>",
    (full_slice, ("metadata", "namespace")): "EndpointSlice web-a",
    (full_slice, ("metadata", "labels")): "default EndpointSlice web-a",
    (full_slice, ("metadata", "labels", "kubernetes.io/service-name")): "default EndpointSlice web-a",
    (full_node, ("metadata",)): "Node <unnamed>",
    (full_node, ("metadata", "name")): "Node <unnamed>",
}


def _put(raw: dict, path: tuple, value: object) -> dict:
    node = raw
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return raw


def test_the_full_objects_parse_clean():
    for build in (full_service, full_slice, full_node):
        obj = parse(build())
        assert obj.problems == (), obj.problems


@pytest.mark.parametrize(
    "build,path,value,field_name,outcome",
    [
        pytest.param(b, path, v, f, o, id=f"{b.__name__[5:]}-{f}-{type(v).__name__}")
        for b, path, values, f, o in WRONG_TYPES
        for v in values
    ],
)
def test_a_wrong_type_in_any_field_is_one_error_naming_object_and_field(build, path, value, field_name, outcome):
    raw = _put(build(), path, value)
    label = IDENTITY.get((build, path), _what(build))
    if outcome == REFUSED:
        with pytest.raises(ObjectError) as e:
            parse(raw)
        msg = str(e.value)
    else:
        obj = parse(raw)
        assert len(obj.problems) == 1, obj.problems
        msg = obj.problems[0]
    assert msg.startswith(f"{label}: {field_name}: "), msg
    assert "\n" not in msg and len(msg) < 300, msg


# -- Kubernetes' name rules --------------------------------------------------


def subdomain(n: int) -> str:
    """A valid DNS subdomain of exactly n characters (labels of at most 63)."""
    labels, left = [], n
    while left > 0:
        size = min(63, left)
        labels.append("a" * size)
        left -= size + 1
    name = ".".join(labels)
    if len(name) < n:  # the last dot ate the room of a one-character label
        name = name[:-1] + "b" + "." + "c" if len(name) + 2 == n else name + "b"
    assert len(name) == n, (n, len(name))
    return name


def _named(build, path, value):
    return _put(build(), path, value)


@pytest.mark.parametrize(
    "build,path,good,bad,field_name",
    [
        pytest.param(full_service, ("metadata", "name"), "a" * 63, "a" * 64, "metadata.name", id="service-name"),
        pytest.param(
            full_service, ("metadata", "namespace"), "n" * 63, "n" * 64, "metadata.namespace", id="service-namespace"
        ),
        pytest.param(
            full_slice, ("metadata", "name"), subdomain(253), subdomain(254), "metadata.name", id="slice-name"
        ),
        pytest.param(
            full_slice, ("metadata", "namespace"), "n" * 63, "n" * 64, "metadata.namespace", id="slice-namespace"
        ),
        pytest.param(
            full_slice,
            ("metadata", "labels", "kubernetes.io/service-name"),
            "s" * 63,
            "s" * 64,
            "metadata.labels[kubernetes.io/service-name]",
            id="slice-service-label",
        ),
        pytest.param(full_node, ("metadata", "name"), subdomain(253), subdomain(254), "metadata.name", id="node-name"),
    ],
)
def test_names_longer_than_kubernetes_allows_are_refused(build, path, good, bad, field_name):
    obj = parse(_named(build, path, good))
    assert obj.problems == ()
    assert good in (obj.name, getattr(obj, "namespace", None), getattr(obj, "service_name", None))
    with pytest.raises(ObjectError) as e:
        parse(_named(build, path, bad))
    msg = str(e.value)
    assert f"{field_name}: " in msg and f"({len(bad)} characters) is longer than" in msg, msg
    assert len(msg) < 300, msg


@pytest.mark.parametrize(
    "build,path,good,bad,field_name",
    [
        pytest.param(
            full_service, ("spec", "ports", 0, "name"), "p" * 63, "p" * 64, "spec.ports[0].name", id="service-port"
        ),
        pytest.param(full_slice, ("ports", 0, "name"), "p" * 63, "p" * 64, "ports[0].name", id="slice-port"),
        pytest.param(
            full_service,
            ("spec", "ports", 0, "targetPort"),
            "t" * 15,
            "t" * 16,
            "spec.ports[0].targetPort",
            id="target-port-name",
        ),
    ],
)
def test_port_names_longer_than_kubernetes_allows_are_dropped(build, path, good, bad, field_name):
    obj = parse(_named(build, path, good))
    assert obj.problems == () and len(obj.ports) == 1
    obj = parse(_named(build, path, bad))
    assert obj.ports == ()
    assert len(obj.problems) == 1 and f"{field_name}: " in obj.problems[0], obj.problems
    assert f"({len(bad)} characters) is longer than" in obj.problems[0]


@pytest.mark.parametrize(
    "name",
    ["Web", "web_1", "-web", "web-", "web.a", "web\nERROR forged line", "wéb", ""],
    ids=["upper", "underscore", "leading-dash", "trailing-dash", "dot", "newline", "unicode", "empty"],
)
def test_a_service_name_must_be_a_dns_label(name):
    with pytest.raises(ObjectError) as e:
        parse(_named(full_service, ("metadata", "name"), name))
    msg = str(e.value)
    assert "metadata.name: " in msg and "\n" not in msg, msg


@pytest.mark.parametrize(
    "name,ok",
    [("http", True), ("h2c-8080", True), ("8080", False), ("a--b", False), ("Http", False)],
    ids=["plain", "digits-and-dash", "no-letter", "double-dash", "upper"],
)
def test_a_named_target_port_follows_the_iana_rule(name, ok):
    obj = parse(_named(full_service, ("spec", "ports", 0, "targetPort"), name))
    assert (len(obj.ports) == 1) is ok, obj.problems
    if ok:
        assert obj.ports[0].target_port == name


@pytest.mark.parametrize("tp", [None, 0, ""], ids=["null", "zero", "empty"])
def test_a_missing_target_port_means_the_port(tp):
    # Kubernetes' defaulting (SetDefaults_Service) turns each into the port.
    raw = full_service()
    raw["spec"]["ports"][0]["targetPort"] = tp
    assert parse(raw).ports[0].target_port == 80


def test_a_huge_value_is_cut_short_in_the_message():
    raw = full_service()
    raw["spec"]["clusterIP"] = "1" * 10_000_000
    raw["spec"]["clusterIPs"] = []
    with pytest.raises(ObjectError) as e:
        parse(raw)
    assert len(str(e.value)) < 200 and "(10000000 characters)" in str(e.value)
    nested: list = []
    for _ in range(10):  # an alias bomb as YAML builds it: one list, shared
        nested = [nested] * 10
    raw["spec"]["clusterIP"] = nested
    with pytest.raises(ObjectError) as e:
        parse(raw)
    assert len(str(e.value)) < 200


def test_many_problems_of_one_object_make_one_line():
    from ctrl.k8s.objects import problem_line

    raw = full_slice()
    raw["endpoints"] = [{"addresses": [f"198.18.1.{300 + i}"]} for i in range(50)]
    sl = parse(raw)
    assert len(sl.problems) == 50
    line = problem_line(sl.problems)
    assert line.startswith(f"{SL}: endpoints[0].addresses[0]: '198.18.1.300' is not an IPv4 address (and 49 more: ")
    assert "endpoints[5].addresses[0], ..." in line and "\n" not in line and len(line) < 400


def test_fast_name_checks_agree_with_name_problem():
    """is_label and is_subdomain (the list decoders' one-call checks)
    accept exactly the names name_problem finds nothing wrong with: the
    limits' edges, and random strings over the characters that matter."""
    import random

    from ctrl.k8s.objects import LABEL, MAX_LABEL, MAX_SUBDOMAIN, SUBDOMAIN, is_label, is_subdomain, name_problem

    names = ["", "a", "-", "a-", "-a", "a-b", "a.b", "a..b", ".a", "a.", "A", "a_b", "a\n", "\na", "a b", "٣", "é"]
    names += ["a" * MAX_LABEL, "a" * (MAX_LABEL + 1), "a" + "-" * (MAX_LABEL - 2) + "b"]
    names += [("a" * 63 + ".") * 3 + "a" * n for n in (60, 61, 62)]  # 253 characters and around
    assert [len(n) for n in names[-3:]] == [MAX_SUBDOMAIN - 1, MAX_SUBDOMAIN, MAX_SUBDOMAIN + 1]
    rnd = random.Random(7)
    names += ["".join(rnd.choice("ab9-.A_\n٣") for _ in range(rnd.randrange(1, 9))) for _ in range(3000)]
    for n in names:
        assert (is_label(n) is not None) == (name_problem(n, LABEL) is None), repr(n)
        assert (is_subdomain(n) is not None) == (name_problem(n, SUBDOMAIN) is None), repr(n)
