import pytest

from ctrl.dataplane.programmed import Programmed
from ctrl.k8s.objects import parse
from ctrl.model.plan import plan_service

from .helpers import endpoint, endpoint_slice, eps, service


def plan(svc_raw, *slice_raws):
    return plan_service(parse(svc_raw), [parse(r) for r in slice_raws])


@pytest.mark.parametrize(
    "svc_raw",
    [
        pytest.param(service(ip="None"), id="headless"),
        pytest.param(service(ip=None, type="ExternalName", externalName="example.invalid"), id="external-name"),
        pytest.param(
            {
                **service(),
                "metadata": {
                    "name": "web",
                    "namespace": "default",
                    "labels": {"service.kubernetes.io/service-proxy-name": "other"},
                },
            },
            id="service-proxy-name",
        ),
    ],
)
def test_ignored_services_have_no_frontends(svc_raw):
    fronts, _ = plan(svc_raw, endpoint_slice("a", endpoints=eps("198.18.1.1")))
    assert fronts == []


def test_one_frontend_per_port_with_ready_backends():
    svc = service(ports=[{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}])
    sl = endpoint_slice(
        "a",
        endpoints=[endpoint("198.18.1.1"), endpoint("198.18.1.2", ready=False)],
        ports=[{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
    )
    fronts, notes = plan(svc, sl)
    assert notes == []
    got = {(f.name, f.port, f.proto): [b[1] for b in f.backends] for f in fronts}
    assert got == {("default/web:http/TCP", 80, 6): [8080], ("default/web:dns/UDP", 53, 17): [5353]}


def test_service_without_endpoints_has_frontend_with_no_backends():
    fronts, _ = plan(service())
    assert len(fronts) == 1 and fronts[0].backends == ()


@pytest.mark.parametrize(
    "svc_raw,note",
    [
        pytest.param(
            service(ports=[{"name": "s", "port": 80, "protocol": "SCTP"}]), "protocol SCTP is not served", id="sctp"
        ),
    ],
)
def test_unserved_features_are_skipped_with_a_named_note(svc_raw, note):
    fronts, notes = plan(svc_raw)
    assert fronts == [] and len(notes) == 1 and note in notes[0] and "default/web Service" in notes[0]


def test_same_input_plans_the_same():
    a = plan(service(), endpoint_slice("a", endpoints=eps("198.18.1.2", "198.18.1.1")))
    b = plan(service(), endpoint_slice("a", endpoints=eps("198.18.1.2", "198.18.1.1")))
    assert a == b


def test_reordered_endpoints_diff_empty():
    p = Programmed()
    a, _ = plan(service(), endpoint_slice("a", endpoints=eps("198.18.1.2", "198.18.1.1")))
    b, _ = plan(service(), endpoint_slice("a", endpoints=eps("198.18.1.1", "198.18.1.2")))
    p.sync({"default/web": a})
    assert len(p.sync({"default/web": b})) == 0


def test_internal_traffic_policy_local_keeps_in_cluster_traffic_on_this_node():
    sl = endpoint_slice("a", endpoints=[endpoint("198.18.1.1", node="node-a"), endpoint("198.18.1.2", node="node-b")])
    fronts, _ = plan_service(parse(service(internalTrafficPolicy="Local")), [parse(sl)], "node-a", None)
    assert [b[1] for b in fronts[0].backends] == [8080] and fronts[0].backends[0][0][-1] == 1
    # No local endpoint: the frontend stays, with no backend (dropped).
    fronts, _ = plan_service(parse(service(internalTrafficPolicy="Local")), [parse(sl)], "node-c", None)
    assert len(fronts) == 1 and fronts[0].backends == ()


def test_bad_traffic_policy_names_the_field():
    with pytest.raises(Exception) as e:
        parse(service(internalTrafficPolicy="Nearby"))
    assert "spec.internalTrafficPolicy: 'Nearby' is neither Cluster nor Local" in str(e.value)


def test_dual_stack_service_gets_one_frontend_per_family_from_its_slices():
    svc = service(ip=None)
    svc["spec"]["clusterIPs"] = ["198.19.0.10", "2001:db8:ffff::10"]
    v4 = endpoint_slice("a", endpoints=eps("198.18.1.1"))
    v6 = endpoint_slice("b", endpoints=eps("2001:db8:1::1"), address_type="IPv6")
    fronts, notes = plan(svc, v4, v6)
    assert notes == []
    from ctrl.util.addrs import addr_str

    got = {addr_str(f.addr): [addr_str(b[0]) for b in f.backends] for f in fronts}
    assert got == {"198.19.0.10": ["198.18.1.1"], "2001:db8:ffff::10": ["2001:db8:1::1"]}


@pytest.mark.parametrize(
    "spec,node,expect",
    [
        pytest.param({"internalTrafficPolicy": "Local"}, "node-a", (0, 0), id="itp-local-with-local"),
        pytest.param({"internalTrafficPolicy": "Local"}, "node-c", (1, 0), id="itp-local-without-local"),
        pytest.param(
            {"type": "NodePort", "externalTrafficPolicy": "Local"}, "node-c", (0, 1), id="etp-local-without-local"
        ),
        pytest.param({}, "node-c", (0, 0), id="cluster-policies-never-count"),
    ],
)
def test_no_local_endpoints_counts_ports_with_local_policy_and_none_here(spec, node, expect):
    from ctrl.model.plan import no_local_endpoints

    raw = service(**spec)
    if spec.get("type") == "NodePort":
        raw["spec"]["ports"][0]["nodePort"] = 30080
    sl = endpoint_slice("a", endpoints=[endpoint("198.18.1.1", node="node-a")])
    assert no_local_endpoints(parse(raw), [parse(sl)], node, None) == expect


def test_a_moved_frontend_is_the_one_replace_makes():
    """Frontend.moved (the planner's one-slice change) is replace() by
    position: every other field kept, each given one set."""
    import dataclasses

    from ctrl.model.plan import Frontend, FrontendFlag, Scope

    f = Frontend(
        b"\x01" * 16,
        30080,
        17,
        Scope.EXTERNAL,
        "default/dns:dns/UDP",
        ((b"\x02" * 16, 53, 17),),
        FrontendFlag.AFFINITY | FrontendFlag.SRC_RANGES,
        10800,
        ((b"\x03" * 16, 120),),
        (),
        (),
        3,
        4,
        ("cluster",),
    )
    new = ((b"\x04" * 16, 53, 17),)
    got = f.moved(new, FrontendFlag.REJECT, new, f.backends, 4, 9)
    want = dataclasses.replace(
        f, backends=new, flags=FrontendFlag.REJECT, added=new, removed=f.backends, base=4, version=9
    )
    assert [getattr(got, x.name) for x in dataclasses.fields(Frontend)] == [
        getattr(want, x.name) for x in dataclasses.fields(Frontend)
    ]


def test_frontend_fields_are_in_the_order_plan_full_gives_them():
    """plan_full and Frontend.moved build each Frontend by position, not
    by keyword."""
    import dataclasses

    from ctrl.model.plan import Frontend

    assert [f.name for f in dataclasses.fields(Frontend) if f.init] == [
        "addr",
        "port",
        "proto",
        "scope",
        "name",
        "backends",
        "flags",
        "affinity_timeout",
        "source_ranges",
        "added",
        "removed",
        "base",
        "version",
        "group",
    ]
