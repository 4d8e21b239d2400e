"""ctrl.k8s.slicejson gives exactly ctrl.k8s.objects.parse's slices, or declines.

Generated list pages: every clean one must decode to the same objects as
the exact parser; every page with one unclean item must be declined (None),
so the caller's exact path names the object and field. Each test runs
twice: with the endpoints read by the C scan as the agent reads them
(ctrl.dataplane.native.scan_endpoints), and by msgspec alone."""

import copy
import json
import logging
import random
import socket

import msgspec
import pytest

from ctrl.dataplane import native
from ctrl.k8s import slicejson
from ctrl.k8s.kube import KubeSource
from ctrl.k8s.objects import Endpoint, ObjectError, parse
from ctrl.k8s.slicejson import decode_change, decode_page
from ctrl.util.addrs import addr16


@pytest.fixture(autouse=True, params=["scan", "msgspec"])
def endpoints_read_by(request):
    """The scan (the library must be built: `make native`), or none."""
    if request.param == "scan":
        assert native.library() is not None, native.missing()
        slicejson.use_endpoint_scan(native.scan_endpoints)
    yield request.param
    slicejson.use_endpoint_scan(None)


NODES = ["node-a", "node-b", None]
ZONES = ["zone-1", "zone-2", None]


def rand_endpoint(rnd: random.Random, family: str, k: int) -> dict:
    ip = f"198.18.{k // 250}.{k % 250 + 1}" if family == "IPv4" else f"2001:db8::{k:x}"
    ep: dict = {"addresses": [ip] + (["198.19.0.1"] if rnd.random() < 0.1 else [])}
    r = rnd.random()
    if r < 0.6:
        ep["conditions"] = {
            key: rnd.choice([True, False, None])
            for key in ("ready", "serving", "terminating")
            if rnd.random() < 0.7  # a key left out means its default
        }
    elif r < 0.7:
        ep["conditions"] = None
    for key, pool in (("nodeName", NODES), ("zone", ZONES)):
        v = rnd.choice(pool)
        if v is not None or rnd.random() < 0.5:
            ep[key] = v
    if rnd.random() < 0.4:
        hints: dict = {}
        if rnd.random() < 0.7:
            hints["forZones"] = [{"name": rnd.choice(["zone-1", "zone-2", ""])} for _ in range(rnd.randrange(0, 3))]
        if rnd.random() < 0.4:
            hints["forNodes"] = [{"name": rnd.choice(["node-a", "node-b"])} for _ in range(rnd.randrange(0, 2))]
        ep["hints"] = hints if rnd.random() < 0.9 else None
    if rnd.random() < 0.5:  # fields a proxy does not read
        ep["targetRef"] = {"kind": "Pod", "namespace": "default", "name": f"web-{k}", "uid": "u"}
        ep["deprecatedTopology"] = {"kubernetes.io/hostname": "node-a"}
    return ep


def rand_slice(rnd: random.Random, n: int) -> dict:
    family = rnd.choice(["IPv4", "IPv4", "IPv6", "FQDN"])
    meta: dict = {"name": f"web-{n:04d}", "resourceVersion": str(100 + n), "uid": f"uid-{n}"}
    if rnd.random() < 0.9:
        meta["namespace"] = rnd.choice(["default", "shop", ""])
    if rnd.random() < 0.9:
        meta["labels"] = {"kubernetes.io/service-name": "web", "app": "web"} if rnd.random() < 0.9 else {}
    if rnd.random() < 0.5:
        meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": "2026-01-01T00:00:00Z"}
    meta["managedFields"] = [{"manager": "kube-controller-manager", "fieldsV1": {"f:endpoints": {}}}]
    ports = []
    for i in range(rnd.randrange(0, 3)):
        p: dict = {"port": rnd.randrange(1, 65536)}
        if rnd.random() < 0.8:
            p["name"] = f"p{i}"
        if rnd.random() < 0.8:
            p["protocol"] = rnd.choice(["TCP", "UDP", "SCTP"])
        ports.append(p)
    raw: dict = {"metadata": meta, "addressType": family}
    if ports or rnd.random() < 0.5:
        raw["ports"] = ports if ports or rnd.random() < 0.5 else None
    eps = [rand_endpoint(rnd, "IPv4" if family == "FQDN" else family, k) for k in range(rnd.randrange(0, 12))]
    if family == "FQDN":
        for e in eps:
            e["addresses"] = ["web.example.test"]
    if eps or rnd.random() < 0.5:
        raw["endpoints"] = eps if eps or rnd.random() < 0.5 else None
    return raw


def page(items: list[dict], cont: str | None = None, rv: str = "999") -> bytes:
    meta: dict = {"resourceVersion": rv}
    if cont:
        meta["continue"] = cont
    return json.dumps(
        {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1", "metadata": meta, "items": items}
    ).encode()


def exact(raw: dict):
    return parse(dict(copy.deepcopy(raw), kind="EndpointSlice"))


@pytest.mark.parametrize("seed", range(30))
def test_clean_pages_decode_to_what_parse_gives(seed):
    rnd = random.Random(seed)
    items = [rand_slice(rnd, n) for n in range(rnd.randrange(1, 25))]
    want = [exact(raw) for raw in items]
    assert all(not s.problems for s in want)  # the generator makes clean slices only
    got = decode_page(page(items, cont="next-page", rv="4242"))
    assert got is not None
    assert got.items == want
    # Compared field by field too: EndpointSlice's equality skips trigger_time.
    assert [s.trigger_time for s in got.items] == [s.trigger_time for s in want]
    assert (got.continue_, got.resource_version) == ("next-page", "4242")


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


# Each leaves a slice parse() rejects or reports a problem for: the page is
# declined, so that the exact path names the object and the field.
REPORTED = {
    "ready is not a boolean": _set(["endpoints", 0, "conditions", "ready"], "yes"),
    "terminating is a number": _set(["endpoints", 0, "conditions", "terminating"], 1),
    "conditions not a mapping": _set(["endpoints", 0, "conditions"], [True]),
    "addresses empty": _set(["endpoints", 0, "addresses"], []),
    "addresses missing": _del(["endpoints", 0, "addresses"]),
    "address not an IPv4 address": _set(["endpoints", 0, "addresses"], ["198.18.0.300"]),
    "IPv6 address in an IPv4 slice": _set(["endpoints", 0, "addresses"], ["2001:db8::1"]),
    "address with a NUL": _set(["endpoints", 0, "addresses"], ["198.18.0.1\x00"]),
    "hint entry null": _set(["endpoints", 0, "hints"], {"forZones": [None]}),
    "endpoint not a mapping": _set(["endpoints", 0], "198.18.0.1"),
    "endpoints not a list": _set(["endpoints"], {"addresses": ["198.18.0.1"]}),
    "hints not a mapping": _set(["endpoints", 0, "hints"], ["zone-1"]),
    "port 0": _set(["ports", 0, "port"], 0),
    "port 65536": _set(["ports", 0, "port"], 65536),
    "port is a boolean": _set(["ports", 0, "port"], True),
    "port missing": _del(["ports", 0, "port"]),
    "protocol unknown": _set(["ports", 0, "protocol"], "ICMP"),
    "addressType unknown": _set(["addressType"], "IPX"),
    "addressType missing": _del(["addressType"]),
    "name missing": _del(["metadata", "name"]),
    "name empty": _set(["metadata", "name"], ""),
    "namespace not a string": _set(["metadata", "namespace"], 5),
    "metadata not a mapping": _set(["metadata"], "web"),
    "hint name not a string": _set(["endpoints", 0, "hints"], {"forZones": [{"name": 7}]}),
    "hints.forZones not a list": _set(["endpoints", 0, "hints"], {"forZones": "zone-1"}),
    "nodeName not a string": _set(["endpoints", 0, "nodeName"], 3),
    "zone not a string": _set(["endpoints", 0, "zone"], ["zone-1"]),
    "label value not a string": _set(["metadata", "labels", "app"], 5),
    "labels not a mapping": _set(["metadata", "labels"], ["app"]),
    "annotation value not a string": _set(["metadata", "annotations"], {"a": 1}),
    "port name not a string": _set(["ports", 0, "name"], 80),
    # Kubernetes' name rules
    "name longer than 253": _set(["metadata", "name"], "a" * 254),
    "name not a DNS subdomain": _set(["metadata", "name"], "Web_B"),
    "namespace longer than 63": _set(["metadata", "namespace"], "n" * 64),
    "namespace not a DNS label": _set(["metadata", "namespace"], "Shop_1"),
    "service-name label longer than 63": _set(["metadata", "labels", "kubernetes.io/service-name"], "s" * 64),
    "port name longer than 63": _set(["ports", 0, "name"], "p" * 64),
    "port name not a DNS label": _set(["ports", 0, "name"], "HTTP"),
}
# parse() takes these as they are; the typed decoder does not (its types
# are the API's), and declining is always safe.
TYPED_ONLY = {
    "a second address not a string": _set(["endpoints", 0, "addresses"], ["198.18.0.1", 5]),
}

GOOD = {
    "metadata": {"name": "web-a", "namespace": "default", "labels": {"kubernetes.io/service-name": "web", "app": "x"}},
    "addressType": "IPv4",
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    "endpoints": [{"addresses": ["198.18.0.1"], "conditions": {"ready": True}, "nodeName": "node-a"}],
}


def unclean(mutate) -> dict:
    bad = copy.deepcopy(GOOD)
    bad["metadata"]["name"] = "web-b"
    mutate(bad)
    return bad


@pytest.mark.parametrize("case", sorted(REPORTED) + sorted(TYPED_ONLY))
def test_a_page_with_one_unclean_item_is_declined(case):
    bad = unclean({**REPORTED, **TYPED_ONLY}[case])
    assert decode_page(page([GOOD, GOOD])) is not None  # clean without it
    assert decode_page(page([GOOD, bad])) is None


@pytest.mark.parametrize("case", sorted(REPORTED))
def test_what_is_declined_the_exact_path_reports(case):
    bad = unclean(REPORTED[case])
    try:
        obj = exact(bad)
    except ObjectError:
        return
    assert obj.problems


def test_namespaces_found_clean_are_remembered_within_a_bound(monkeypatch):
    """A namespace is checked once and remembered while there is room;
    past the bound, each is checked every time, and one that breaks the
    rule is declined whatever came before."""
    monkeypatch.setattr(slicejson, "_CLEAN_NAMESPACES", set())
    monkeypatch.setattr(slicejson, "_CLEAN_NAMESPACES_MAX", 1)

    def in_ns(ns):
        return _set(["metadata", "namespace"], ns)

    for ns in ("shop", "cart", "shop", "cart"):
        got = decode_page(page([unclean(in_ns(ns))]))
        assert got is not None and got.items[0].namespace == ns
    assert slicejson._CLEAN_NAMESPACES == {"shop"}
    assert decode_page(page([GOOD, unclean(in_ns("Cart"))])) is None


def test_not_a_list_is_declined():
    assert decode_page(b'{"items": {"a": 1}}') is None
    assert decode_page(b"[1, 2]") is None
    assert decode_page(b"{not json") is None


class PagedBytes:
    """Serves recorded list pages by their continue token, as the API server
    would (the paging and fallback logic is ours; the server is not in play)."""

    def __init__(self, pages: list[bytes]):
        self.pages = pages
        self.asked: list[str | None] = []

    def get_bytes(self, path, timeout=60, **params):
        cont = params.get("continue")
        self.asked.append(cont)
        return self.pages[int(cont or 0)]


def test_list_takes_the_exact_path_for_an_unclean_page_only(caplog):
    def sl(name, ip, **cond):
        return {
            "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip], "conditions": cond}],
        }

    bad = sl("web-c", "198.18.0.3", ready="maybe")
    client = PagedBytes(
        [
            page([sl("web-a", "198.18.0.1")], cont="1"),
            page([sl("web-b", "198.18.0.2"), bad], cont="2"),
            page([sl("web-d", "198.18.0.4", ready=False)], rv="77"),
        ]
    )
    src = KubeSource(client, "node-a")  # type: ignore[arg-type]
    known = src.held("EndpointSlice")
    with caplog.at_level(logging.ERROR, logger="sliceproxy.source.kube"):
        rv = src.list_all("EndpointSlice")
    assert rv == "77" and client.asked == [None, "1", "2"]
    assert sorted(known) == ["default/web-a", "default/web-b", "default/web-c", "default/web-d"]
    # The unclean slice keeps its good endpoints' siblings out and is named.
    assert known["default/web-c"].endpoints == ()
    assert "default/web EndpointSlice web-c: endpoints[0].conditions.ready" in caplog.text
    assert known["default/web-d"].endpoints[0].ready is False
    assert known == {
        k: exact(raw)
        for k, raw in [
            ("default/web-a", sl("web-a", "198.18.0.1")),
            ("default/web-b", sl("web-b", "198.18.0.2")),
            ("default/web-c", bad),
            ("default/web-d", sl("web-d", "198.18.0.4", ready=False)),
        ]
    }


def watch_line(typ: str, obj: dict) -> bytes:
    return json.dumps({"type": typ, "object": obj}).encode()


def test_clean_added_and_modified_lines_decode_to_what_parse_gives():
    rnd = random.Random(7)
    for n in range(40):
        raw = rand_slice(rnd, n)
        typ = "ADDED" if n % 2 else "MODIFIED"
        ch = decode_change(watch_line(typ, raw))
        assert ch is not None and ch.type == typ
        assert ch.slice == exact(raw) and ch.slice.trigger_time == exact(raw).trigger_time
        assert ch.resource_version == raw["metadata"]["resourceVersion"]


@pytest.mark.parametrize(
    "line",
    [
        watch_line("DELETED", GOOD),
        watch_line("BOOKMARK", {"kind": "EndpointSlice", "metadata": {"resourceVersion": "12"}}),
        watch_line("ERROR", {"kind": "Status", "code": 410, "message": "too old resource version"}),
        watch_line("ADDED", unclean(REPORTED["ready is not a boolean"])),
        watch_line("ADDED", unclean(TYPED_ONLY["a second address not a string"])),
        watch_line("ADDED", {**GOOD, "kind": "Service"}),
        b'{"type": "ADDED"}',
        b"[]",
    ],
    ids=["deleted", "bookmark", "error", "unclean", "typed-only", "other-kind", "no-object", "not-an-event"],
)
def test_other_lines_are_left_to_the_exact_path(line):
    assert decode_change(line) is None


class WatchLines(PagedBytes):
    def __init__(self, lines: list[bytes]):
        super().__init__([])
        self.lines = lines

    def stream(self, path, read_timeout, **params):
        yield from self.lines


def test_watch_mixes_both_paths_in_order(caplog):
    def sl(name, ip, rv, **cond):
        return {
            "metadata": {
                "name": name,
                "namespace": "default",
                "resourceVersion": rv,
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip], "conditions": cond}],
        }

    client = WatchLines(
        [
            watch_line("ADDED", sl("web-a", "198.18.0.1", "11")),
            watch_line("ADDED", sl("web-b", "198.18.0.2", "12", ready="maybe")),
            watch_line("BOOKMARK", {"kind": "EndpointSlice", "metadata": {"resourceVersion": "13"}}),
            watch_line("MODIFIED", sl("web-a", "198.18.0.3", "14", ready=False)),
            watch_line("DELETED", sl("web-b", "198.18.0.2", "15")),
        ]
    )
    src = KubeSource(client, "node-a")  # type: ignore[arg-type]
    known = src.held("EndpointSlice")
    with caplog.at_level(logging.ERROR, logger="sliceproxy.source.kube"):
        rv = src.watch("EndpointSlice", since="10")
    assert rv == "15"
    events = []
    while not src.events.empty():
        events += [(e.op, e.key) for e in src.events.get_nowait()]
    assert events == [
        ("upsert", "default/web-a"),
        ("upsert", "default/web-b"),
        ("upsert", "default/web-a"),
        ("delete", "default/web-b"),
    ]
    assert known == {"default/web-a": exact(sl("web-a", "198.18.0.3", "14", ready=False))}
    assert "web-b: endpoints[0].conditions.ready" in caplog.text


def test_the_longest_names_kubernetes_allows_take_the_fast_path():
    raw = copy.deepcopy(GOOD)
    raw["metadata"]["name"] = ".".join(["a" * 63] * 4)[:253]
    raw["metadata"]["namespace"] = "n" * 63
    raw["metadata"]["labels"]["kubernetes.io/service-name"] = "s" * 63
    raw["ports"][0]["name"] = "p" * 63
    got = decode_page(page([raw]))
    assert got is not None and got.items == [exact(raw)] and not got.items[0].problems


def scan_of(endpoints, family: str = "IPv4"):
    """native.scan_endpoints of endpoints (a JSON text, or what dumps it)."""
    text = endpoints if isinstance(endpoints, bytes) else json.dumps(endpoints).encode()
    fam = {"IPv4": socket.AF_INET, "IPv6": socket.AF_INET6, "FQDN": 0}[family]
    (got,) = native.scan_endpoints([msgspec.Raw(text)], [fam])
    return got


def with_endpoints(endpoints: bytes, family: str = "IPv4") -> bytes:
    """A page of one slice whose endpoints are this JSON text, as it is."""
    raw = copy.deepcopy(GOOD)
    raw["addressType"] = family
    raw["endpoints"] = "@ENDPOINTS@"
    return page([raw]).replace(b'"@ENDPOINTS@"', endpoints)


@pytest.mark.parametrize("seed", range(10))
def test_the_scan_takes_clean_endpoints_without_hints(seed, endpoints_read_by):
    """Endpoints without hints, in any order of fields, with fields the
    scan does not read (nested), whitespace, IPv4 and IPv6: taken, and
    the page's slices are the exact parser's."""
    rnd = random.Random(seed)
    family = rnd.choice(["IPv4", "IPv6"])
    eps = []
    for k in range(rnd.randrange(1, 40)):
        ep = rand_endpoint(rnd, family, k)
        ep.pop("hints", None)
        if rnd.random() < 0.3:
            ep["hints"] = None
        if rnd.random() < 0.3:
            ep["targetRef"] = {"kind": "Pod", "x": [1, -2.5e3, [], {}, [{"y": [True, False, None]}]]}
        eps.append(dict(rnd.sample(sorted(ep.items()), len(ep))))
    text = json.dumps(eps, indent=rnd.choice([None, 1, "\t"])).encode()
    got = scan_of(text, family)
    assert got is not None and len(got) == len(eps)
    raw = copy.deepcopy(GOOD)
    raw["addressType"], raw["endpoints"] = family, eps
    decoded = decode_page(with_endpoints(text, family))
    assert decoded is not None and decoded.items == [exact(raw)]


@pytest.mark.parametrize(
    "text",
    [
        b'[{"addresses": ["198.18.0.1"], "nodeName": "n\\u0041"}]',  # an escape
        '[{"addresses": ["198.18.0.1"], "nodeName": "n\u00e9"}]'.encode(),  # not ASCII
        b'[{"addresses": ["198.18.0.1"], "hints": {"forZones": [{"name": "zone-1"}]}}]',
        b'[{"addresses": ["198.18.0.1"], "hints": {}}]',
        b'[{"addresses": ["198.18.0.1"], "zone": "a", "zone": "b"}]',  # a field twice
        b'[{"addresses": ["198.18.0.1"], "conditions": {"ready": 1}}]',
        b'[{"addresses": ["198.18.0.1"], "conditions": {"ready": true, "ready": false}}]',
        b'[{"addresses": ["198.18.0.1"], "nodeName": 5}]',
        b'[{"addresses": []}]',
        b'[{"addresses": null}]',
        b'[{"conditions": {}}]',  # no addresses
        b'[{"addresses": ["198.18.0.256"]}]',
        b'[{"addresses": ["2001:db8::1"]}]',  # another family
        b'[{"addresses": ["198.18.0.1", 7]}]',
        b"[null]",
        b'[{"addresses": ["198.18.0.1"]}, 3]',
        b'{"addresses": ["198.18.0.1"]}',
        b'[{"addresses": ["198.18.0.1"], "x": ' + b"[" * 70 + b"]" * 70 + b"}]",  # too deep to skip
    ],
)
def test_the_scan_leaves_what_it_does_not_take_to_msgspec(text, endpoints_read_by):
    """Escapes, bytes past ASCII, hints, a field twice, values of another
    type, addresses missing or not of the family, elements not objects,
    nesting past the scan's depth: not taken (None), and the page decodes
    as msgspec alone decodes it: the same slices, or declined alike."""
    assert scan_of(text) is None
    got = decode_page(with_endpoints(text))
    slicejson.use_endpoint_scan(None)
    assert got == decode_page(with_endpoints(text))


def test_the_scan_of_null_empty_and_fqdn_endpoints():
    assert scan_of(b" null ") == () and scan_of(b"[ ]") == ()
    assert scan_of([{"addresses": ["web.example.test"]}], "FQDN") == ()
    assert scan_of([{"addresses": []}], "FQDN") is None  # declined by the exact path too
    got = scan_of(
        [
            {"addresses": ["198.18.0.9", "198.18.0.10"], "nodeName": "", "zone": "zone-1"},
            {"addresses": ["198.18.0.7"], "conditions": {"ready": False, "serving": None, "terminating": True}},
            {"addresses": ["198.18.0.8"], "nodeName": "zone-1", "conditions": None},
        ]
    )
    assert got == (
        Endpoint(addr16("198.18.0.9"), True, True, False, "", "zone-1", None, None),
        Endpoint(addr16("198.18.0.7"), False, True, True, None, None, None, None),
        Endpoint(addr16("198.18.0.8"), True, True, False, "zone-1", None, None, None),
    )
    assert all(type(e) is Endpoint for e in got)
    # A name is one string, from call to call.
    again = scan_of([{"addresses": ["198.18.0.1"], "nodeName": "zone-1"}])
    assert again[0].node_name is got[0].zone


@pytest.mark.parametrize("scan_bytes", [1 << 20, 300, 1])
def test_the_scan_reads_many_slices_a_call_as_it_reads_each_alone(scan_bytes, monkeypatch):
    """Slices scanned together (in one call, or cut into calls of
    SCAN_BYTES of JSON): each one's endpoints as scanned alone, those not
    taken (None) leaving their rows to the next one."""
    monkeypatch.setattr(native, "SCAN_BYTES", scan_bytes)
    rnd = random.Random(scan_bytes)
    texts, families = [], []
    for k in range(40):
        family = rnd.choice(["IPv4", "IPv6"])
        eps = [rand_endpoint(rnd, family, j) for j in range(rnd.randrange(0, 7))]
        for ep in eps:
            if rnd.random() < 0.9:
                ep.pop("hints", None)
        text = json.dumps(eps).encode()
        if k % 9 == 4:
            text = b"[{]"  # malformed
        elif k % 11 == 5:
            text = b"null"
        elif k % 13 == 6:
            family = "FQDN"
            text = b'[{"addresses": ["web.example.test"]}]'
        texts.append(text)
        families.append(family)
    fams = [{"IPv4": socket.AF_INET, "IPv6": socket.AF_INET6, "FQDN": 0}[f] for f in families]
    together = native.scan_endpoints([msgspec.Raw(t) for t in texts], fams)
    alone = [scan_of(t, f) for t, f in zip(texts, families, strict=True)]
    assert together == alone
    assert any(got is None for got in alone) and sum(bool(got) for got in alone) >= 12
    assert native.scan_endpoints([msgspec.Raw(texts[0])], [-1]) == [None]  # no family of the three
    assert native.scan_endpoints([], []) == []


def test_the_scan_numbers_names_once_for_the_process(monkeypatch):
    """Names past NAMES_MAX start the numbering over; a scan that fails
    after numbering a name still hands it over (the next one that uses
    it reads it)."""
    monkeypatch.setattr(native, "NAMES_MAX", 3)
    first = scan_of([{"addresses": ["198.18.0.1"], "nodeName": f"node-{k}"} for k in range(5)])
    assert [e.node_name for e in first] == [f"node-{k}" for k in range(5)]
    second = scan_of([{"addresses": ["198.18.0.1"], "nodeName": "node-9", "zone": "zone-1"}])
    assert [(e.node_name, e.zone) for e in second] == [("node-9", "zone-1")]
    assert scan_of([{"addresses": ["198.18.0.1"], "nodeName": "node-10"}, {"addresses": ["bad"]}]) is None
    third = scan_of([{"addresses": ["198.18.0.1"], "nodeName": "node-10", "zone": "zone-1"}])
    assert [(e.node_name, e.zone) for e in third] == [("node-10", "zone-1")]
    again = scan_of([{"addresses": ["198.18.0.1"], "nodeName": "node-0"}, {"addresses": ["198.18.0.2"]}])
    assert [e.node_name for e in again] == ["node-0", None]


def test_endpoints_of_one_kind_share_its_fields_and_kinds_start_over(monkeypatch):
    """An endpoint's conditions, node and zone are its kind (numbered
    once, like the names): endpoints of one kind, in one slice or in
    later scans, read the same; one that differs in any of them is
    another kind; past KINDS_MAX, names and kinds start over; a scan
    that fails after numbering a kind still hands it over."""
    monkeypatch.setattr(native, "KINDS_MAX", 4)
    with native._scan.lock:  # from none, whatever scans came before
        native.library().sp_names_reset()
        native._scan.forget()

    def ep(k, ready=True, terminating=False, node="node-a", zone="zone-1"):
        conditions = {"ready": ready, "serving": ready or terminating, "terminating": terminating}
        return {"addresses": [f"198.18.0.{k}"], "conditions": conditions, "nodeName": node, "zone": zone}

    for r in range(3):
        # Each round's nodes new: seven kinds, each twice.
        variants = [
            {"node": f"node-a{r}"},
            {"node": f"node-a{r}", "ready": False},
            {"node": f"node-a{r}", "ready": False, "terminating": True},
            {"node": f"node-b{r}"},
            {"node": f"node-a{r}", "zone": "zone-2"},
            {"node": None},
            {"node": f"node-a{r}", "zone": None},
        ]
        eps = [ep(k + 1, **variants[(k + r) % len(variants)]) for k in range(2 * len(variants))]
        got = scan_of(eps)
        slicejson.use_endpoint_scan(None)
        (want,) = decode_page(with_endpoints(json.dumps(eps).encode())).items
        slicejson.use_endpoint_scan(native.scan_endpoints)
        assert got == want.endpoints and len(got) == len(eps)
        # Started over after the round before (past KINDS_MAX): its own only.
        assert len(native._scan.kinds) == len(variants)
    assert scan_of([ep(1, node="node-c"), {"addresses": ["bad"]}]) is None
    again = scan_of([ep(2, node="node-c")])
    assert [(e.node_name, e.ready) for e in again] == [("node-c", True)]


def test_thousands_of_names_and_kinds_are_numbered_apart():
    """More names and kinds than the scan's first index holds (it grows,
    each number found again): every endpoint reads its own."""
    with native._scan.lock:  # from none, whatever scans came before
        native.library().sp_names_reset()
        native._scan.forget()
    eps = [
        {"addresses": [f"198.18.{k // 250}.{k % 250 + 1}"], "nodeName": f"node-{k}", "zone": f"zone-{k % 700}"}
        for k in range(1500)
    ]
    got = scan_of(eps)
    assert [(e.node_name, e.zone) for e in got] == [(f"node-{k}", f"zone-{k % 700}") for k in range(1500)]
    assert len(native._scan.kinds) == 1500 and len(native._scan.names) == 1 + 1500 + 700
    assert scan_of(eps) == got  # numbered once: the same again


@pytest.mark.parametrize("seed", range(4))
def test_the_scan_and_msgspec_agree_on_mutated_endpoints(seed):
    """Endpoints' JSON with one byte changed, put in, or taken out (most
    of it then malformed, or clean in a new way): the page decodes with
    the scan exactly as with msgspec alone (the same slices, or declined
    alike), whatever the scan made of it."""
    rnd = random.Random(seed)
    alphabet = (
        b'{}[],:" \\\\nulltruefalse0123456789.-eE198.18.0.1'
        + b"addressesconditionsreadynodeNamezonehints\x00\x7f\xc3\xa9"
    )
    for _ in range(150):
        eps = [rand_endpoint(rnd, "IPv4", k) for k in range(rnd.randrange(1, 6))]
        for ep in eps:
            ep.pop("hints", None)
        text = bytearray(json.dumps(eps).encode())
        for _ in range(rnd.randrange(1, 4)):
            at = rnd.randrange(len(text))
            op = rnd.random()
            if op < 0.4:
                text[at] = rnd.choice(alphabet)
            elif op < 0.7:
                text[at:at] = bytes([rnd.choice(alphabet)])
            else:
                del text[at]
        body = with_endpoints(bytes(text))
        slicejson.use_endpoint_scan(native.scan_endpoints)
        scanned = decode_page(body)
        slicejson.use_endpoint_scan(None)
        assert scanned == decode_page(body), bytes(text)


def test_a_scan_stopped_midway_leaves_the_next_one_right(monkeypatch):
    """An error while one call's Endpoints are made, with the next call on
    the C's thread: that call is waited for, the names forgotten, and the
    next scan (its names new again) reads as a scan alone does."""
    monkeypatch.setattr(native, "SCAN_BYTES", 200)
    texts = [
        json.dumps(
            [{"addresses": [f"198.18.{k}.{j}"], "nodeName": f"node-{k}-{j}", "zone": f"zone-{j}"} for j in range(1, 4)]
        ).encode()
        for k in range(12)
    ]
    fams = [socket.AF_INET] * len(texts)
    made = native._Call.made
    calls = []

    def failing(self, st, used):
        calls.append(used)
        if len(calls) == 3:
            raise MemoryError("made to fail")
        return made(self, st, used)

    monkeypatch.setattr(native._Call, "made", failing)
    with pytest.raises(MemoryError):
        native.scan_endpoints([msgspec.Raw(t) for t in texts], fams)
    monkeypatch.setattr(native._Call, "made", made)
    assert native._scan.names == [None] and native._scan.kinds == []  # forgotten, in C too
    together = native.scan_endpoints([msgspec.Raw(t) for t in texts], fams)
    alone = [scan_of(t, "IPv4") for t in texts]
    assert together == alone and all(alone)
    assert [e.node_name for e in together[5]] == [f"node-5-{j}" for j in range(1, 4)]
