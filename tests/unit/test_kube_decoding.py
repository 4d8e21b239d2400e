"""The API source's list and watch decoding with malformed objects: each bad
object costs one log line naming it and the field, the rest of the page or
stream is used as it would be without it, and nothing raises out of a page
or stream because of one object."""

import json
import logging

import pytest

from ctrl.k8s.kube import APIError, GoneError, KubeSource
from ctrl.k8s.objects import parse

from .helpers import service

LOG = "sliceproxy.source.kube"


class Pages:
    """Serves list pages by continue token, and watch lines, as recorded."""

    def __init__(self, pages: list[bytes], lines: list[bytes] = ()):
        self.pages = pages
        self.lines = list(lines)

    def get_bytes(self, path, timeout=60, **params):
        return self.pages[int(params.get("continue") or 0)]

    def stream(self, path, read_timeout, **params):
        yield from self.lines


def page(items: list, rv: str = "50") -> bytes:
    return json.dumps({"kind": "ServiceList", "metadata": {"resourceVersion": rv}, "items": items}).encode()


def item(raw: dict) -> dict:
    """As the API server lists it: no kind in the items."""
    return {k: v for k, v in raw.items() if k != "kind"}


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def good(name: str, ip: str) -> dict:
    return item(service(name=name, ip=ip))


BAD_ITEMS = [
    pytest.param(5, "Service list items[1]: 5 is not a mapping", id="not-a-mapping"),
    pytest.param(
        {**good("bad", "198.19.0.20"), "kind": "Node"},
        "Node bad: kind: 'Node' among Service objects",
        id="other-kind",
    ),
    pytest.param(
        {**good("bad", "198.19.0.20"), "metadata": ["bad"]},
        "metadata: ['bad'] is not a mapping",
        id="metadata-not-a-mapping",
    ),
    pytest.param(
        {**good("bad", "198.19.0.20"), "status": 5}, "default/bad Service: status: 5 is not a mapping", id="status"
    ),
    pytest.param(
        item(service(name="bad", externalIPs=5)),
        "default/bad Service: spec.externalIPs: 5 is not a list",
        id="externalIPs",
    ),
    pytest.param(
        item(service(name="b" * 64)),
        "metadata.name: " + repr("b" * 32) + "... (64 characters) is longer than 63 characters",
        id="name-too-long",
    ),
]


@pytest.mark.parametrize("bad,message", BAD_ITEMS)
def test_a_bad_list_item_is_one_line_and_the_rest_is_listed(caplog, bad, message):
    items = [good("a", "198.19.0.11"), bad, good("c", "198.19.0.13")]
    src = KubeSource(Pages([page(items)]), "node-a")  # type: ignore[arg-type]
    known = src.held("Service")
    with caplog.at_level(logging.ERROR, logger=LOG):
        rv = src.list_all("Service")
    assert rv == "50"
    assert known == {
        "default/a": parse({**items[0], "kind": "Service"}),
        "default/c": parse({**items[2], "kind": "Service"}),
    }
    lines = errors(caplog)
    assert len(lines) == 1 and message in lines[0], lines


def test_a_bad_item_keeps_the_last_good_version_on_relist(caplog):
    src = KubeSource(Pages([page([good("a", "198.19.0.11")])]), "node-a")  # type: ignore[arg-type]
    known = src.held("Service")
    src.list_all("Service")
    before = known["default/a"]
    src.client = Pages([page([item(service(name="a", externalIPs=5))], rv="60")])
    with caplog.at_level(logging.ERROR, logger=LOG):
        assert src.list_all("Service") == "60"
    assert known == {"default/a": before}


def event(typ: str, obj) -> bytes:
    return json.dumps({"type": typ, "object": obj}).encode()


def with_rv(raw: dict, rv: str) -> dict:
    return {**raw, "metadata": {**raw["metadata"], "resourceVersion": rv}}


def test_a_null_kind_is_the_kind_of_the_list(caplog):
    # JSON null is an absent field to the API machinery: the object is a
    # Service, as the fast path of EndpointSlices takes it too.
    lines = [event("ADDED", {**with_rv(service(name="a"), "11"), "kind": None})]
    src = KubeSource(Pages([], lines), "node-a")  # type: ignore[arg-type]
    known = src.held("Service")
    with caplog.at_level(logging.ERROR, logger=LOG):
        assert src.watch("Service", since="10") == "11"
    assert list(known) == ["default/a"] and errors(caplog) == []


def test_bad_watch_events_are_one_line_each_and_the_stream_goes_on(caplog):
    a = service(name="a", ip="198.19.0.11")
    lines = [
        event("ADDED", with_rv(a, "11")),
        event("ADDED", 5),
        event("MODIFIED", {**with_rv(service(name="n"), "13"), "kind": "Node"}),
        event("MODIFIED", with_rv(service(name="b", externalIPs=5), "14")),
        event("DELETED", {"kind": "Service", "metadata": "broken"}),
        event("BOOKMARK", {"kind": "Service", "metadata": ["not", "a", "mapping"]}),
        event("MODIFIED", with_rv(service(name="a", ip="198.19.0.21"), "17")),
    ]
    src = KubeSource(Pages([], lines), "node-a")  # type: ignore[arg-type]
    known = src.held("Service")
    with caplog.at_level(logging.ERROR, logger=LOG):
        rv = src.watch("Service", since="10")
    assert rv == "17"
    events = []
    while not src.events.empty():
        events += [(e.op, e.kind, e.key) for e in src.events.get_nowait()]
    assert events == [("upsert", "Service", "default/a"), ("upsert", "Service", "default/a")]
    assert known["default/a"].cluster_ips == ("198.19.0.21",)
    msgs = errors(caplog)
    assert len(msgs) == 3, msgs
    assert "object: 5 is not a mapping" in msgs[0]
    assert "Node n: kind: 'Node' among Service objects" in msgs[1]
    assert "default/b Service: spec.externalIPs: 5 is not a list" in msgs[2]


@pytest.mark.parametrize(
    "line,error",
    [
        pytest.param(b"[1, 2]", ValueError, id="not-an-object"),
        pytest.param(b"[" * 5000 + b"]" * 5000, ValueError, id="nested-too-deep"),
        pytest.param(event("ERROR", "gone"), APIError, id="error-without-status"),
        pytest.param(event("ERROR", {"code": "410", "message": ["x"]}), APIError, id="error-of-wrong-types"),
    ],
)
def test_a_broken_stream_is_an_error_that_resumes_the_watch(line, error):
    # _run catches these, backs off, and watches again from the last rv.
    src = KubeSource(Pages([], [line]), "node-a")  # type: ignore[arg-type]
    with pytest.raises(error):
        src.watch("Service", since="10")


@pytest.mark.parametrize(
    "body",
    [b'{"items": 5, "metadata": {"resourceVersion": "1"}}', b"[]", b"[" * 5000 + b"]" * 5000],
    ids=["items-not-a-list", "not-an-object", "nested-too-deep"],
)
def test_a_broken_list_response_is_an_error_that_lists_again(body):
    src = KubeSource(Pages([body]), "node-a")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        src.list_all("Service")


def test_list_all_then_watch_resumes_from_the_lists_version():
    """The public entry points the bench times (KubeSource.list_all and
    watch): a watch goes on from the resourceVersion of the last list or
    watch, and a later list compares with what the watch added."""

    class Recording(Pages):
        def stream(self, path, read_timeout, **params):
            self.asked.append(params["resourceVersion"])
            yield from self.lines
            self.lines = []  # the stream ends; the next one has nothing new

    client = Recording([page([good("a", "198.19.0.11")], rv="50")])
    client.asked = []
    client.lines = [event("ADDED", with_rv(item(service(name="b", ip="198.19.0.12")), "51"))]
    src = KubeSource(client, "node-a")  # type: ignore[arg-type]
    with pytest.raises(GoneError):
        src.watch("Service")  # nothing listed yet: nothing to resume from
    assert src.list_all("Service") == "50"
    assert src.watch("Service") == "51" and client.asked == ["50"]
    assert src.watch("Service") == "51" and client.asked == ["50", "51"]
    queued = []
    while not src.events.empty():
        queued.extend(src.events.get_nowait())
    assert [(e.op, e.key) for e in queued] == [("upsert", "default/a"), ("upsert", "default/b")]
    src.client = Pages([page([good("a", "198.19.0.11")], rv="60")])
    assert src.list_all("Service") == "60"
    assert [(e.op, e.key) for e in src.events.get_nowait()] == [("upsert", "default/a"), ("delete", "default/b")]
