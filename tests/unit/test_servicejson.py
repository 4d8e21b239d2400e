"""ctrl.k8s.slicejson.decode_service_page gives exactly
ctrl.k8s.objects.parse_service's Services, or declines.

Generated Service list pages: every clean one must decode to the same
objects as the exact parser, field by field and type by type; every page
with one unclean item (one the exact parser refuses, or reports a problem
in) must be declined (None), so that the caller's exact path names the
object and the field."""

import copy
import dataclasses
import json
import logging
import random

import pytest

from ctrl.k8s.kube import KubeSource
from ctrl.k8s.objects import SOURCE_RANGES_ANNOTATION, ObjectError, Service, ServicePort, parse
from ctrl.k8s.slicejson import decode_service_page, decode_trimmed_list

from .test_slicejson import PagedBytes

ABSENT = object()  # a key left out


def pick(rnd: random.Random, *choices):
    return rnd.choice(choices)


def put(d: dict, key: str, value) -> None:
    if value is not ABSENT:
        d[key] = copy.deepcopy(value)  # no two items share a part


def rand_ports(rnd: random.Random) -> list[dict]:
    ports = []
    used: set[tuple[int, str]] = set()
    for i in range(rnd.randrange(0, 4)):
        port = rnd.choice([80, 443, 53, 8080, rnd.randrange(1, 65536), 65535, 1])
        proto = pick(rnd, "TCP", "UDP", "SCTP", None, "", ABSENT)
        key = (port, proto if isinstance(proto, str) and proto else "TCP")
        if key in used:
            continue
        used.add(key)
        p: dict = {"port": port}
        put(p, "protocol", proto)
        put(p, "name", pick(rnd, f"p{i}", "http", "a" * 63, "", None, ABSENT))
        put(p, "targetPort", pick(rnd, 8080, 65535, 1, 0, "", None, "http", "h-t-t-p", "p" * 15, ABSENT))
        put(p, "nodePort", pick(rnd, 30080, 1, 65535, None, ABSENT, ABSENT))
        if rnd.random() < 0.3:
            p["appProtocol"] = "http"  # not read
        ports.append(p)
    return ports


def rand_service(rnd: random.Random, n: int) -> dict:
    """A Service parse_service takes without a problem, in many shapes."""
    meta: dict = {"name": f"svc-{n:05d}", "resourceVersion": str(1000 + n)}
    put(meta, "namespace", pick(rnd, "default", "shop", "n" * 63, "", None, ABSENT))
    put(meta, "uid", pick(rnd, f"uid-{n}", "", None, ABSENT))
    put(meta, "labels", pick(rnd, {"app": f"svc-{n}"}, {}, None, ABSENT))
    annotations = pick(
        rnd,
        {SOURCE_RANGES_ANNOTATION: " 198.18.7.1/16 , 2001:db8::1/32,,198.18.0.0/16"},
        {SOURCE_RANGES_ANNOTATION: "   "},
        {"other": "x"},
        {},
        None,
        ABSENT,
    )
    put(meta, "annotations", annotations)
    if rnd.random() < 0.5:
        meta["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:ports": {}}}}]
    spec: dict = {"selector": {"app": f"svc-{n}"}, "ipFamilies": ["IPv4"]}
    put(spec, "type", pick(rnd, "ClusterIP", "NodePort", "LoadBalancer", "ExternalName", "", None, ABSENT))
    v4, v6 = f"198.19.{n // 250 % 250}.{n % 250 + 1}", f"2001:db8:19::{n:x}"
    single, many = pick(
        rnd,
        (v4, [v4]),
        (v4, [v4, v6]),
        (v6, [v6, v4]),
        (v4, ABSENT),
        (v4, None),
        (v4, []),
        ("None", ["None"]),
        ("None", ABSENT),
        ("", ABSENT),
        (None, None),
        (ABSENT, ABSENT),
        (ABSENT, [v4, "None"]),  # headless once "None" is reached
        (v4, ["None", v4]),
    )
    put(spec, "clusterIP", single)
    put(spec, "clusterIPs", many)
    put(spec, "ports", pick(rnd, rand_ports(rnd), rand_ports(rnd), [], None, ABSENT))
    affinity = pick(rnd, "None", "ClientIP", "ClientIP", "", None, ABSENT)
    put(spec, "sessionAffinity", affinity)
    timeout = pick(rnd, 1, 10800, 86400, 60, None, ABSENT)
    cfg = pick(rnd, {"clientIP": {}}, {"clientIP": None}, {}, None, ABSENT, "full")
    if cfg == "full":
        cfg = {"clientIP": {}}
        put(cfg["clientIP"], "timeoutSeconds", timeout)
    put(spec, "sessionAffinityConfig", cfg)
    for key in ("internalTrafficPolicy", "externalTrafficPolicy"):
        put(spec, key, pick(rnd, "Cluster", "Local", "", None, ABSENT))
    put(spec, "externalIPs", pick(rnd, ["198.18.5.5"], ["198.18.5.5", "2001:db8::5"], [], None, ABSENT))
    put(
        spec,
        "loadBalancerSourceRanges",
        pick(
            rnd,
            ["198.18.0.0/15"],
            [" 198.18.3.4/16", "198.18.0.0/16", "2001:db8::/32", "198.18.9.9"],
            [],
            None,
            ABSENT,
        ),
    )
    put(spec, "healthCheckNodePort", pick(rnd, 30999, 1, 65535, None, ABSENT, ABSENT))
    raw: dict = {"metadata": meta, "spec": spec}
    put(raw, "kind", pick(rnd, "Service", None, ABSENT, ABSENT))
    ingress = [
        pick(
            rnd,
            {"ip": "198.18.9.9"},
            {"ip": "2001:db8::9", "ipMode": "VIP"},
            {"ip": "198.18.9.10", "ipMode": "Proxy"},
            {"ip": "198.18.9.11", "ipMode": None},
            {"hostname": "lb.example.test"},
            {"ip": "", "hostname": "lb.example.test"},
            {"ip": None},
            {"ipMode": "Proxy"},
            {},
        )
        for _ in range(rnd.randrange(0, 3))
    ]
    put(
        raw,
        "status",
        pick(
            rnd, {"loadBalancer": {"ingress": ingress}}, {"loadBalancer": {}}, {"loadBalancer": None}, {}, None, ABSENT
        ),
    )
    return raw


def page(items: list[dict], cont: str | None = None, rv: str = "999") -> bytes:
    meta: dict = {"resourceVersion": rv}
    if cont:
        meta["continue"] = cont
    return json.dumps({"kind": "ServiceList", "apiVersion": "v1", "metadata": meta, "items": items}).encode()


def exact(raw: dict) -> Service:
    raw = copy.deepcopy(raw)
    if raw.get("kind") is None:
        raw["kind"] = "Service"  # as the list path does
    obj = parse(raw)
    assert isinstance(obj, Service)
    return obj


def shape(value: object) -> object:
    """A value with the type of every part spelled out: == alone takes
    True for 1 and 80 for 80.0."""
    if isinstance(value, Service | ServicePort):
        return (type(value).__name__, tuple((f.name, shape(getattr(value, f.name))) for f in dataclasses.fields(value)))
    if isinstance(value, tuple | list):
        return (type(value).__name__, tuple(shape(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((shape(k), shape(v)) for k, v in value.items()))
    return (type(value).__name__, value)


@pytest.mark.parametrize("seed", range(40))
def test_clean_pages_decode_to_what_parse_gives(seed):
    rnd = random.Random(seed)
    items = [rand_service(rnd, n) for n in range(rnd.randrange(1, 40))]
    want = [exact(raw) for raw in items]
    assert all(not s.problems for s in want)  # the generator makes clean Services only
    got = decode_service_page(page(items, cont="next-page", rv="4242"))
    assert got is not None
    assert got.items == want
    assert [shape(s) for s in got.items] == [shape(s) for s in want]
    assert (got.continue_, got.resource_version) == ("next-page", "4242")


def test_the_generator_covers_what_the_conversion_decides():
    """The comparison above is worth something only when the generated
    Services take every branch."""
    rnd = random.Random(0)
    got = [exact(rand_service(rnd, n)) for n in range(400)]
    assert {s.type for s in got} == {"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"}
    assert {s.namespace for s in got} >= {"default", "shop"}
    assert any(s.cluster_ips == () for s in got) and any(len(s.cluster_ips) == 2 for s in got)
    assert {s.affinity_timeout for s in got} >= {0, 1, 60, 10800, 86400}
    assert {s.internal_traffic_policy for s in got} == {"Cluster", "Local"}
    assert {s.external_traffic_policy for s in got} == {"Cluster", "Local"}
    assert any(len(s.external_ips) == 2 for s in got)
    assert any(len(s.lb_ips) == 2 for s in got)
    assert any(s.lb_source_ranges == ("198.18.0.0/16", "2001:db8::/32") for s in got)  # the annotation
    assert any(s.lb_source_ranges == ("198.18.0.0/16", "2001:db8::/32", "198.18.9.9/32") for s in got)
    assert {s.health_check_node_port for s in got} == {None, 1, 30999, 65535}
    ports = [p for s in got for p in s.ports]
    assert {p.protocol for p in ports} == {"TCP", "UDP", "SCTP"}
    assert {type(p.target_port) for p in ports} == {int, str}
    assert any(p.target_port == p.port for p in ports) and any(p.node_port for p in ports)
    assert {s.uid for s in got} >= {"", "uid-1"}


def _set(path, value):
    def mutate(raw):
        node = raw
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return mutate


def _del(path):
    def mutate(raw):
        node = raw
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]

    return mutate


GOOD = {
    "metadata": {
        "name": "web-a",
        "namespace": "shop",
        "uid": "uid-a",
        "labels": {"app": "web"},
        "annotations": {"note": "x"},
    },
    "spec": {
        "type": "LoadBalancer",
        "clusterIP": "198.19.0.1",
        "clusterIPs": ["198.19.0.1"],
        "ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http", "nodePort": 30080},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
        ],
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
        "internalTrafficPolicy": "Cluster",
        "externalTrafficPolicy": "Local",
        "externalIPs": ["198.18.5.5"],
        "loadBalancerSourceRanges": ["198.18.0.0/16"],
        "healthCheckNodePort": 30999,
    },
    "status": {"loadBalancer": {"ingress": [{"ip": "198.18.9.9", "ipMode": "VIP"}]}},
}

BIG = 2**70
# Each leaves a Service parse_service refuses or reports a problem in: the
# page is declined, so that the exact path names the object and the field.
REPORTED = {
    # metadata and kind
    "kind Node": _set(["kind"], "Node"),
    "kind empty": _set(["kind"], ""),
    "kind a number": _set(["kind"], 5),
    "metadata null": _set(["metadata"], None),
    "metadata missing": _del(["metadata"]),
    "metadata a string": _set(["metadata"], "web"),
    "name missing": _del(["metadata", "name"]),
    "name null": _set(["metadata", "name"], None),
    "name empty": _set(["metadata", "name"], ""),
    "name a number": _set(["metadata", "name"], 5),
    "name not a DNS label": _set(["metadata", "name"], "web.a"),
    "name uppercase": _set(["metadata", "name"], "Web"),
    "name longer than 63": _set(["metadata", "name"], "w" * 64),
    "namespace not a DNS label": _set(["metadata", "namespace"], "shop_1"),
    "namespace longer than 63": _set(["metadata", "namespace"], "n" * 64),
    "namespace a number": _set(["metadata", "namespace"], 5),
    "uid a number": _set(["metadata", "uid"], 5),
    "labels a list": _set(["metadata", "labels"], ["app"]),
    "label value a number": _set(["metadata", "labels", "app"], 5),
    "label value null": _set(["metadata", "labels", "app"], None),
    "annotation value a boolean": _set(["metadata", "annotations", "note"], True),
    "annotations a string": _set(["metadata", "annotations"], "note"),
    # spec
    "spec missing": _del(["spec"]),
    "spec null": _set(["spec"], None),
    "spec a list": _set(["spec"], []),
    "type unknown": _set(["spec", "type"], "Balanced"),
    "type a number": _set(["spec", "type"], 1),
    "clusterIP not an address": _set(["spec", "clusterIPs"], ["198.19.0.300"]),
    "clusterIP alone not an address": lambda r: r["spec"].update(clusterIP="x", clusterIPs=None),
    "clusterIP a number": _set(["spec", "clusterIP"], 5),
    "clusterIP with a NUL": lambda r: r["spec"].update(clusterIP="198.19.0.1\x00", clusterIPs=[]),
    "clusterIPs a string": _set(["spec", "clusterIPs"], "198.19.0.1"),
    "clusterIPs second not an address": _set(["spec", "clusterIPs"], ["198.19.0.1", "2001:db8::zz"]),
    "clusterIPs a number before None": _set(["spec", "clusterIPs"], [5, "None"]),
    "ports a mapping": _set(["spec", "ports"], {"port": 80}),
    "port entry null": _set(["spec", "ports", 1], None),
    "port entry a number": _set(["spec", "ports", 1], 80),
    "port missing": _del(["spec", "ports", 1, "port"]),
    "port null": _set(["spec", "ports", 1, "port"], None),
    "port 0": _set(["spec", "ports", 1, "port"], 0),
    "port 65536": _set(["spec", "ports", 1, "port"], 65536),
    "port negative": _set(["spec", "ports", 1, "port"], -53),
    "port beyond 64 bits": _set(["spec", "ports", 1, "port"], BIG),
    "port a boolean": _set(["spec", "ports", 1, "port"], True),
    "port a float": _set(["spec", "ports", 1, "port"], 53.0),
    "port a string": _set(["spec", "ports", 1, "port"], "53"),
    "protocol unknown": _set(["spec", "ports", 1, "protocol"], "ICMP"),
    "protocol lowercase": _set(["spec", "ports", 1, "protocol"], "udp"),
    "protocol a number": _set(["spec", "ports", 1, "protocol"], 17),
    "port name uppercase": _set(["spec", "ports", 1, "name"], "DNS"),
    "port name longer than 63": _set(["spec", "ports", 1, "name"], "d" * 64),
    "port name a number": _set(["spec", "ports", 1, "name"], 5),
    "port listed twice": _set(["spec", "ports", 1], {"name": "again", "port": 80}),
    "targetPort 65536": _set(["spec", "ports", 1, "targetPort"], 65536),
    "targetPort negative": _set(["spec", "ports", 1, "targetPort"], -1),
    "targetPort beyond 64 bits": _set(["spec", "ports", 1, "targetPort"], -BIG),
    "targetPort a boolean": _set(["spec", "ports", 1, "targetPort"], True),
    "targetPort false": _set(["spec", "ports", 1, "targetPort"], False),
    "targetPort a float": _set(["spec", "ports", 1, "targetPort"], 5353.5),
    "targetPort a whole float": _set(["spec", "ports", 1, "targetPort"], 0.0),
    "targetPort a list": _set(["spec", "ports", 1, "targetPort"], [5353]),
    "targetPort name without a letter": _set(["spec", "ports", 1, "targetPort"], "5353"),
    "targetPort name with --": _set(["spec", "ports", 1, "targetPort"], "d--ns"),
    "targetPort name longer than 15": _set(["spec", "ports", 1, "targetPort"], "d" * 16),
    "targetPort name uppercase": _set(["spec", "ports", 1, "targetPort"], "DNS"),
    "nodePort 0": _set(["spec", "ports", 0, "nodePort"], 0),
    "nodePort 65536": _set(["spec", "ports", 0, "nodePort"], 65536),
    "nodePort a boolean": _set(["spec", "ports", 0, "nodePort"], True),
    "nodePort a string": _set(["spec", "ports", 0, "nodePort"], "30080"),
    "sessionAffinity unknown": _set(["spec", "sessionAffinity"], "Sticky"),
    "sessionAffinity a number": _set(["spec", "sessionAffinity"], 1),
    "timeout 0": _set(["spec", "sessionAffinityConfig", "clientIP", "timeoutSeconds"], 0),
    "timeout 86401": _set(["spec", "sessionAffinityConfig", "clientIP", "timeoutSeconds"], 86401),
    "timeout a boolean": _set(["spec", "sessionAffinityConfig", "clientIP", "timeoutSeconds"], True),
    "timeout a float": _set(["spec", "sessionAffinityConfig", "clientIP", "timeoutSeconds"], 600.0),
    "timeout a string": _set(["spec", "sessionAffinityConfig", "clientIP", "timeoutSeconds"], "600"),
    "timeout beyond 64 bits": _set(["spec", "sessionAffinityConfig", "clientIP", "timeoutSeconds"], BIG),
    "sessionAffinityConfig a list": _set(["spec", "sessionAffinityConfig"], []),
    "clientIP a string": _set(["spec", "sessionAffinityConfig", "clientIP"], "600"),
    "internalTrafficPolicy unknown": _set(["spec", "internalTrafficPolicy"], "Topology"),
    "externalTrafficPolicy lowercase": _set(["spec", "externalTrafficPolicy"], "local"),
    "externalTrafficPolicy a boolean": _set(["spec", "externalTrafficPolicy"], False),
    "externalIPs a string": _set(["spec", "externalIPs"], "198.18.5.5"),
    "externalIP not an address": _set(["spec", "externalIPs"], ["198.18.5.5", "198.18.5.256"]),
    "externalIP a number": _set(["spec", "externalIPs"], [5]),
    "externalIP null": _set(["spec", "externalIPs"], [None]),
    "externalIP with a NUL": _set(["spec", "externalIPs"], ["198.18.5.5\x00"]),
    "externalIP a CIDR": _set(["spec", "externalIPs"], ["198.18.5.0/24"]),
    "source ranges a string": _set(["spec", "loadBalancerSourceRanges"], "198.18.0.0/16"),
    "source range not a CIDR": _set(["spec", "loadBalancerSourceRanges"], ["198.18.0.0/16", "nonsense"]),
    "source range prefix 33": _set(["spec", "loadBalancerSourceRanges"], ["198.18.0.0/33"]),
    "source range a number": _set(["spec", "loadBalancerSourceRanges"], [16]),
    "source range null": _set(["spec", "loadBalancerSourceRanges"], [None]),
    "source range annotation not a CIDR": lambda r: (
        r["spec"].pop("loadBalancerSourceRanges"),
        r["metadata"]["annotations"].update({SOURCE_RANGES_ANNOTATION: "198.18.0.0/16, 198.18.0.0/99"}),
    ),
    "healthCheckNodePort 0": _set(["spec", "healthCheckNodePort"], 0),
    "healthCheckNodePort 65536": _set(["spec", "healthCheckNodePort"], 65536),
    "healthCheckNodePort a boolean": _set(["spec", "healthCheckNodePort"], True),
    "healthCheckNodePort a string": _set(["spec", "healthCheckNodePort"], "30999"),
    # status
    "status a string": _set(["status"], "up"),
    "loadBalancer a list": _set(["status", "loadBalancer"], []),
    "ingress a mapping": _set(["status", "loadBalancer", "ingress"], {"ip": "198.18.9.9"}),
    "ingress entry null": _set(["status", "loadBalancer", "ingress"], [None]),
    "ingress entry a string": _set(["status", "loadBalancer", "ingress"], ["198.18.9.9"]),
    "ingress ip not an address": _set(["status", "loadBalancer", "ingress", 0, "ip"], "lb.example.test"),
    "ingress ip a number": _set(["status", "loadBalancer", "ingress", 0, "ip"], 5),
    "ingress ipMode a number": _set(["status", "loadBalancer", "ingress", 0, "ipMode"], 1),
    "ingress ipMode a number, no ip": _set(["status", "loadBalancer", "ingress"], [{"ipMode": 1}]),
}
# parse_service takes these as they are (it does not look at the field, or
# stops before it); the typed decoder does not (its types are the API's),
# and declining is always safe.
TYPED_ONLY = {
    "timeout a string without ClientIP": lambda r: r["spec"].update(
        sessionAffinity="None", sessionAffinityConfig={"clientIP": {"timeoutSeconds": "x"}}
    ),
    "ingress ip a number, mode Proxy": _set(["status", "loadBalancer", "ingress"], [{"ip": 5, "ipMode": "Proxy"}]),
    "clusterIPs a number after None": _set(["spec", "clusterIPs"], ["None", 5]),
}


def unclean(mutate) -> dict:
    bad = copy.deepcopy(GOOD)
    bad["metadata"]["name"] = "web-b"
    mutate(bad)
    return bad


def test_the_good_service_is_clean_and_decoded():
    got = decode_service_page(page([GOOD, unclean(lambda r: None)]))
    assert got is not None
    assert [shape(s) for s in got.items] == [shape(exact(GOOD)), shape(exact(unclean(lambda r: None)))]
    assert got.items[0].affinity_timeout == 600 and got.items[0].lb_ips == ("198.18.9.9",)


def test_services_of_one_port_list_share_its_ports_made_once():
    """Each distinct port list is checked and made once: Services listing
    the same ports share one tuple; one port differing in any field (a
    targetPort numbered, not named) is a list of its own."""
    a, b, c = (copy.deepcopy(GOOD) for _ in range(3))
    b["metadata"]["name"], c["metadata"]["name"] = "web-b", "web-c"
    c["spec"]["ports"][0]["targetPort"] = 8080
    got = decode_service_page(page([a, b, c]))
    assert got is not None
    x, y, z = got.items
    assert x.ports is y.ports and x.ports == exact(a).ports
    assert z.ports != x.ports and z.ports == exact(c).ports
    assert z.ports[0].target_port == 8080 and x.ports[0].target_port == "http"


@pytest.mark.parametrize("case", sorted(REPORTED) + sorted(TYPED_ONLY))
def test_a_page_with_one_unclean_item_is_declined(case):
    bad = unclean({**REPORTED, **TYPED_ONLY}[case])
    rnd = random.Random(case)
    items = [rand_service(rnd, n) for n in range(rnd.randrange(0, 20))]
    assert decode_service_page(page(items + [GOOD])) is not None  # clean without it
    items.insert(rnd.randrange(0, len(items) + 1), bad)
    assert decode_service_page(page(items)) is None


@pytest.mark.parametrize("case", sorted(REPORTED))
def test_what_is_declined_the_exact_path_refuses_or_reports(case):
    bad = unclean(REPORTED[case])
    if bad.get("kind") not in (None, "Service"):
        return  # the list path refuses it before parse (see the list test)
    try:
        obj = exact(bad)
    except ObjectError:
        return
    assert obj.problems


@pytest.mark.parametrize("case", sorted(TYPED_ONLY))
def test_what_only_the_typed_decoder_declines_is_clean_to_parse(case):
    assert not exact(unclean(TYPED_ONLY[case])).problems


BAD_VALUES = [None, "", 0, -1, 65536, True, False, 1.5, 80.0, BIG, "x", "Bad_Name", "198.18.0.300", [], {}, [None]]


def _paths(node, prefix=()):
    """Every key and index path into a raw object."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


@pytest.mark.parametrize("seed", range(30))
def test_one_field_set_to_anything(seed):
    """Any one field of a clean Service set to a value of the wrong type or
    range: declined whenever parse_service refuses or reports it, and when
    accepted, exactly parse_service's."""
    rnd = random.Random(seed)
    declined = compared = 0
    for n in range(60):
        raw = rand_service(rnd, n)
        path = rnd.choice(list(_paths(raw)))
        _set(list(path), copy.deepcopy(rnd.choice(BAD_VALUES)))(raw)
        items = [rand_service(rnd, 100 + k) for k in range(3)] + [raw]
        got = decode_service_page(page(items))
        try:
            want = exact(raw)
        except ObjectError:
            want = None
        if want is None or want.problems or raw.get("kind") not in (None, "Service"):
            assert got is None, path
            declined += 1
        elif got is not None:
            assert shape(got.items[-1]) == shape(want), path
            compared += 1
    assert declined > 5 and compared > 5


@pytest.mark.parametrize(
    "body",
    [b'{"items": {"a": 1}}', b'{"items": [1]}', b"[1, 2]", b"{not json", b'{"metadata": {"continue": 5}, "items": []}'],
)
def test_not_a_service_list_is_declined(body):
    assert decode_service_page(body) is None


def test_a_key_given_twice_reads_as_the_exact_path_reads_it():
    """JSON objects with a repeated key: the last one counts, on both paths,
    whole objects included."""
    body = (
        b'{"metadata": {"resourceVersion": "1"}, "items": [{'
        b'"metadata": {"name": "a", "namespace": "x", "uid": "u"}, "metadata": {"name": "b"},'
        b'"spec": {"type": "Bogus", "type": "NodePort", "ports": [{"port": 1, "port": 2, "nodePort": 30001}],'
        b'"clusterIPs": ["bad"], "clusterIPs": ["198.19.0.1"]}}]}'
    )
    got = decode_service_page(body)
    trimmed = decode_trimmed_list(body)
    assert got is not None and trimmed is not None
    want = exact(trimmed["items"][0])
    assert shape(got.items[0]) == shape(want)
    assert (want.key, want.type, want.ports[0].port, want.cluster_ips) == ("default/b", "NodePort", 2, ("198.19.0.1",))


def test_an_empty_list_is_a_page():
    got = decode_service_page(b'{"metadata": {"resourceVersion": "5"}, "items": null}')
    assert got is not None and got.items == [] and (got.resource_version, got.continue_) == ("5", None)


def test_the_list_takes_the_exact_path_for_an_unclean_page_only(caplog):
    rnd = random.Random(3)
    first = [rand_service(rnd, n) for n in range(5)]
    bad_ip = unclean(_set(["spec", "externalIPs"], ["198.18.5.5", "198.18.5.256"]))  # kept, reported
    bad_type = copy.deepcopy(GOOD)
    bad_type["metadata"]["name"] = "web-c"
    bad_type["spec"]["type"] = "Balanced"  # refused
    second = [rand_service(rnd, n) for n in range(5, 8)] + [bad_ip, bad_type]
    third = [rand_service(rnd, n) for n in range(8, 10)]
    pages = [page(first, cont="1"), page(second, cont="2"), page(third, rv="77")]
    assert [decode_service_page(p) is not None for p in pages] == [True, False, True]
    # web-c had a good version: refused now, it is kept as it was.
    old_c = copy.deepcopy(GOOD)
    old_c["metadata"]["name"] = "web-c"
    src = KubeSource(PagedBytes([page([old_c], rv="50")]), "node-a")  # type: ignore[arg-type]
    assert src.list_all("Service") == "50"
    known = src.held("Service")
    assert known == {"shop/web-c": exact(old_c)}
    client = PagedBytes(pages)
    src.client = client  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger="sliceproxy.source.kube"):
        rv = src.list_all("Service")
    assert rv == "77" and client.asked == [None, "1", "2"]
    assert "shop/web-b Service: spec.externalIPs[1]: '198.18.5.256' is not an IP address" in caplog.text
    assert "shop/web-c Service: spec.type: unknown type 'Balanced'" in caplog.text
    assert known["shop/web-b"].external_ips == ("198.18.5.5",) and known["shop/web-b"].problems
    want = {s.key: s for s in map(exact, first + second[:-1] + third)}
    want["shop/web-c"] = exact(old_c)
    assert {k: shape(v) for k, v in known.items()} == {k: shape(v) for k, v in want.items()}


def test_service_fields_are_in_the_order_the_typed_decoding_gives_them():
    """decode_service_page builds each Service by position, not by keyword."""
    assert [f.name for f in dataclasses.fields(Service)] == [
        "namespace",
        "name",
        "type",
        "cluster_ips",
        "ports",
        "labels",
        "problems",
        "internal_traffic_policy",
        "external_traffic_policy",
        "external_ips",
        "lb_ips",
        "affinity_timeout",
        "health_check_node_port",
        "lb_source_ranges",
        "uid",
    ]
