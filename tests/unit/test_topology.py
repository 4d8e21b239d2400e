import pytest

from ctrl.objects import ServicePort, parse
from ctrl.topology import merge_endpoints, select_endpoints

from .helpers import endpoint, endpoint_slice

HTTP = ServicePort("http", 80, "TCP", 8080)


def slices(*raws):
    return [parse(r) for r in raws]


def addrs(pes):
    return sorted((pe.ep.address, pe.port) for pe in pes)


@pytest.mark.parametrize(
    "raws,expect",
    [
        pytest.param(
            [endpoint_slice("a", endpoints=[endpoint("198.18.1.1")]), endpoint_slice("b", endpoints=[endpoint("198.18.1.2")])],
            [("198.18.1.1", 8080), ("198.18.1.2", 8080)],
            id="slices-merged",
        ),
        pytest.param(
            [
                endpoint_slice("a", endpoints=[endpoint("198.18.1.1")]),
                endpoint_slice("b", endpoints=[endpoint("198.18.1.2")], ports=[{"name": "http", "port": 9090, "protocol": "TCP"}]),
            ],
            [("198.18.1.1", 8080), ("198.18.1.2", 9090)],
            id="each-slice-keeps-its-port-number",
        ),
        pytest.param(
            [endpoint_slice("a", endpoints=[endpoint("198.18.1.1")], ports=[{"name": "other", "port": 8080, "protocol": "TCP"}])],
            [],
            id="port-name-must-match",
        ),
        pytest.param(
            [endpoint_slice("a", endpoints=[endpoint("198.18.1.1")], ports=[{"name": "http", "port": 8080, "protocol": "UDP"}])],
            [],
            id="port-protocol-must-match",
        ),
        pytest.param(
            [endpoint_slice("a", endpoints=[endpoint("2001:db8::1")], address_type="IPv6")],
            [],
            id="other-family-ignored",
        ),
    ],
)
def test_merge(raws, expect):
    assert addrs(merge_endpoints(HTTP, slices(*raws), "IPv4")) == expect


def test_endpoint_in_two_slices_appears_once_non_terminating_wins():
    raws = [
        endpoint_slice("a", endpoints=[endpoint("198.18.1.1", ready=False, serving=True, terminating=True)]),
        endpoint_slice("b", endpoints=[endpoint("198.18.1.1", ready=True)]),
    ]
    merged = merge_endpoints(HTTP, slices(*raws), "IPv4")
    assert len(merged) == 1 and merged[0].ep.ready and not merged[0].ep.terminating


@pytest.mark.parametrize(
    "eps,expect",
    [
        pytest.param([endpoint("198.18.1.1"), endpoint("198.18.1.2", ready=False)], ["198.18.1.1"], id="ready-only"),
        pytest.param(
            [
                endpoint("198.18.1.1", ready=False, serving=True, terminating=True),
                endpoint("198.18.1.2", ready=False, serving=False, terminating=True),
            ],
            ["198.18.1.1"],
            id="fallback-to-serving-terminating",
        ),
        pytest.param(
            [endpoint("198.18.1.1"), endpoint("198.18.1.2", ready=False, serving=True, terminating=True)],
            ["198.18.1.1"],
            id="no-terminating-while-any-ready",
        ),
        pytest.param([endpoint("198.18.1.1", ready=False, serving=False)], [], id="none-usable"),
    ],
)
def test_select(eps, expect):
    got = select_endpoints(merge_endpoints(HTTP, slices(endpoint_slice("a", endpoints=eps)), "IPv4"))
    assert [pe.ep.address for pe in got] == expect
