import random

import pytest

from ctrl.k8s.objects import ServicePort, parse
from ctrl.model.topology import (
    PortEndpoint,
    merge_endpoints,
    merge_endpoints_for_plan,
    merge_endpoints_keyed,
    select_endpoints,
)

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
            [
                endpoint_slice("a", endpoints=[endpoint("198.18.1.1")]),
                endpoint_slice("b", endpoints=[endpoint("198.18.1.2")]),
            ],
            [("198.18.1.1", 8080), ("198.18.1.2", 8080)],
            id="slices-merged",
        ),
        pytest.param(
            [
                endpoint_slice("a", endpoints=[endpoint("198.18.1.1")]),
                endpoint_slice(
                    "b", endpoints=[endpoint("198.18.1.2")], ports=[{"name": "http", "port": 9090, "protocol": "TCP"}]
                ),
            ],
            [("198.18.1.1", 8080), ("198.18.1.2", 9090)],
            id="each-slice-keeps-its-port-number",
        ),
        pytest.param(
            [
                endpoint_slice(
                    "a", endpoints=[endpoint("198.18.1.1")], ports=[{"name": "other", "port": 8080, "protocol": "TCP"}]
                )
            ],
            [],
            id="port-name-must-match",
        ),
        pytest.param(
            [
                endpoint_slice(
                    "a", endpoints=[endpoint("198.18.1.1")], ports=[{"name": "http", "port": 8080, "protocol": "UDP"}]
                )
            ],
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


def _merge_one_by_one(sp, sls, family):
    """The merge rule spelled out: slices by name, endpoints in slice
    order, the first copy of an (address, port) kept unless it is
    terminating and a later copy is not."""
    out = {}
    for sl in sorted(sls, key=lambda s: s.name):
        port = next((p.port for p in sl.ports if (p.name, p.protocol) == (sp.name, sp.protocol)), None)
        if sl.address_type != family or port is None:
            continue
        for ep in sl.endpoints:
            k = (ep.addr, port)
            if k not in out or (out[k].ep.terminating and not ep.terminating):
                out[k] = PortEndpoint(ep, port)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_merge_matches_the_rule_with_and_without_repeats(seed):
    """The merge takes a one-pass path when no (address, port) repeats,
    and the plan's one without a key per endpoint when no address repeats:
    with repeats (within a slice or across slices, some terminating, of
    one port number or two) or without, each gives the rule's endpoints,
    copies and order."""
    rnd = random.Random(seed)
    pool = [f"198.18.{rnd.randrange(4)}.{i}" for i in range(rnd.choice((8, 400)))]
    raws = []
    for n in range(rnd.randrange(1, 6)):
        ips = rnd.sample(pool, min(len(pool), rnd.randrange(1, 60)))
        if seed % 2:  # repeats
            ips += rnd.choices(pool, k=rnd.randrange(3))
        raws.append(
            endpoint_slice(
                f"s{rnd.randrange(100)}-{n}",
                endpoints=[
                    endpoint(ip, ready=(t := rnd.random() < 0.3) is False, serving=True, terminating=t) for ip in ips
                ],
                ports=[
                    {"name": "http", "port": rnd.choice((8080, 9090)) if seed % 4 >= 2 else 8080, "protocol": "TCP"}
                ],
            )
        )
    sls = slices(*raws)
    want = _merge_one_by_one(HTTP, sls, "IPv4")
    got = merge_endpoints_keyed(HTTP, sls, "IPv4")
    assert list(got) == list(want)
    assert all(got[k].ep is want[k].ep for k in want)  # the same copy won
    # The plan's merge, with and without the dict.
    for keyed_from in (None, 0, 10**6):
        eps, keyed = merge_endpoints_for_plan(HTTP, sls, "IPv4", keyed_from)
        assert [(pe.ep.addr, pe.port) for pe in eps] == list(want)
        assert all(a.ep is b.ep for a, b in zip(eps, want.values(), strict=True))
        assert (keyed is not None) == (keyed_from == 0) and (keyed is None or keyed == want)


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


# -- categorize: kube-proxy's CategorizeEndpoints, one rule per case --------

from ctrl.model.topology import PortPolicy, categorize  # noqa: E402

NODE, ZONE = "node-a", "zone-a"


def ep(ip, node=NODE, ready=True, serving=None, terminating=False, zones=None, nodes=None):
    raw = endpoint(ip, ready=ready, serving=serving, terminating=terminating, node=node)
    hints = {}
    if zones is not None:
        hints["forZones"] = [{"name": z} for z in zones]
    if nodes is not None:
        hints["forNodes"] = [{"name": n} for n in nodes]
    if hints:
        raw["hints"] = hints
    return raw


CLUSTER = PortPolicy()


def cat(eps, policy=CLUSTER, node=NODE, zone=ZONE):
    pes = merge_endpoints(HTTP, slices(endpoint_slice("a", endpoints=eps)), "IPv4")
    c = categorize(pes, policy, node, zone)
    names = lambda xs: sorted(x.ep.address for x in xs)  # noqa: E731
    return names(c.cluster), names(c.local), names(c.reachable), c.has_any


ITP_LOCAL = PortPolicy(internal_local=True)
ETP_LOCAL = PortPolicy(external_local=True, externally_accessible=True)
BOTH_LOCAL = PortPolicy(internal_local=True, external_local=True, externally_accessible=True)
T = "198.18.1."


@pytest.mark.parametrize(
    "eps,policy,zone,expect",
    [
        pytest.param(
            [ep(T + "1"), ep(T + "2", node="node-b")],
            PortPolicy(),
            ZONE,
            ([T + "1", T + "2"], [], [T + "1", T + "2"], True),
            id="cluster-policy-all-ready",
        ),
        pytest.param(
            [
                ep(T + "1", ready=False, serving=True, terminating=True),
                ep(T + "2", ready=False, serving=False, terminating=True),
            ],
            PortPolicy(),
            ZONE,
            ([T + "1"], [], [T + "1"], True),
            id="cluster-fallback-serving-terminating",
        ),
        pytest.param(
            [ep(T + "1", ready=False, serving=False)],
            PortPolicy(),
            ZONE,
            ([], [], [], False),
            id="cluster-nothing-usable-has-any-false",
        ),
        pytest.param(
            [ep(T + "1", zones=["zone-a"]), ep(T + "2", zones=["zone-b"])],
            PortPolicy(),
            ZONE,
            ([T + "1"], [], [T + "1"], True),
            id="zone-hints-filter-to-this-zone",
        ),
        pytest.param(
            [ep(T + "1", zones=["zone-a"]), ep(T + "2")],
            PortPolicy(),
            ZONE,
            ([T + "1", T + "2"], [], [T + "1", T + "2"], True),
            id="zone-hints-ignored-unless-all-ready-have-them",
        ),
        pytest.param(
            [ep(T + "1", zones=["zone-b"]), ep(T + "2", zones=["zone-b"])],
            PortPolicy(),
            ZONE,
            ([T + "1", T + "2"], [], [T + "1", T + "2"], True),
            id="zone-hints-ignored-when-none-for-this-zone",
        ),
        pytest.param(
            [ep(T + "1", zones=["zone-a"]), ep(T + "2", zones=["zone-b"])],
            PortPolicy(),
            None,
            ([T + "1", T + "2"], [], [T + "1", T + "2"], True),
            id="zone-hints-ignored-when-node-has-no-zone",
        ),
        pytest.param(
            [
                ep(T + "1", zones=["zone-a"]),
                ep(T + "2", zones=["zone-b"]),
                ep(T + "3", ready=False, serving=True, terminating=True),
            ],
            PortPolicy(),
            ZONE,
            ([T + "1"], [], [T + "1"], True),
            id="zone-hints-only-ready-endpoints-count",
        ),
        pytest.param(
            [ep(T + "1", nodes=[NODE], zones=["zone-b"]), ep(T + "2", nodes=["node-b"], zones=["zone-a"])],
            PortPolicy(),
            ZONE,
            ([T + "1"], [], [T + "1"], True),
            id="node-hints-win-over-zone-hints",
        ),
        pytest.param(
            [ep(T + "1", nodes=["node-b"], zones=["zone-a"]), ep(T + "2", nodes=["node-c"], zones=["zone-b"])],
            PortPolicy(),
            ZONE,
            ([T + "1"], [], [T + "1"], True),
            id="node-hints-for-other-nodes-fall-back-to-zone",
        ),
        pytest.param(
            [ep(T + "1"), ep(T + "2", node="node-b")],
            ITP_LOCAL,
            ZONE,
            ([], [T + "1"], [T + "1"], True),
            id="itp-local-only-local-ready",
        ),
        pytest.param(
            [ep(T + "2", node="node-b")],
            ITP_LOCAL,
            ZONE,
            ([], [], [], True),
            id="itp-local-no-local-endpoints-has-any-elsewhere",
        ),
        pytest.param(
            [ep(T + "1", ready=False, serving=True, terminating=True), ep(T + "2", node="node-b")],
            ITP_LOCAL,
            ZONE,
            ([], [T + "1"], [T + "1"], True),
            id="itp-local-falls-back-to-local-terminating",
        ),
        pytest.param(
            [ep(T + "1", ready=False, serving=True, terminating=True), ep(T + "3")],
            ITP_LOCAL,
            ZONE,
            ([], [T + "3"], [T + "3"], True),
            id="itp-local-ready-local-beats-terminating-local",
        ),
        pytest.param(
            [ep(T + "1"), ep(T + "2", node="node-b")],
            ETP_LOCAL,
            ZONE,
            ([T + "1", T + "2"], [T + "1"], [T + "1", T + "2"], True),
            id="etp-local-uses-both",
        ),
        pytest.param(
            [ep(T + "1"), ep(T + "2", node="node-b")],
            PortPolicy(external_local=True),
            ZONE,
            ([T + "1", T + "2"], [], [T + "1", T + "2"], True),
            id="etp-local-ignored-when-not-externally-accessible",
        ),
        pytest.param(
            [ep(T + "1"), ep(T + "2", node="node-b")],
            BOTH_LOCAL,
            ZONE,
            ([T + "1", T + "2"], [T + "1"], [T + "1", T + "2"], True),
            id="both-local-externally-accessible-still-needs-cluster",
        ),
        pytest.param(
            [ep(T + "1", zones=["zone-b"]), ep(T + "2", zones=["zone-a"], node="node-b")],
            ETP_LOCAL,
            ZONE,
            ([T + "2"], [T + "1"], [T + "1", T + "2"], True),
            id="local-endpoints-ignore-topology",
        ),
    ],
)
def test_categorize(eps, policy, zone, expect):
    assert cat(eps, policy, zone=zone) == expect


def test_zone_change_refilters():
    eps = [ep(T + "1", zones=["zone-a"]), ep(T + "2", zones=["zone-b"])]
    assert cat(eps, zone="zone-a")[0] == [T + "1"]
    assert cat(eps, zone="zone-b")[0] == [T + "2"]
