import pytest

from ctrl.objects import ObjectError, addr16, addr_str, parse

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
        pytest.param("just a string", "expected a mapping", id="not-a-mapping"),
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
