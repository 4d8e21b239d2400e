"""Frontends for traffic from outside the node: NodePort, LoadBalancer
ingress IPs, externalIPs, each in two scopes (external: arriving on an
external interface; internal: pods reaching the same address), with
kube-proxy's endpoint selection per scope, loadBalancerSourceRanges and
--nodeport-addresses. One row per rule."""

from __future__ import annotations

import pytest

from ctrl.dataplane.abi import MapSizes, NodeConfig, map_name
from ctrl.dataplane.programmed import Programmed
from ctrl.k8s.events import Event
from ctrl.k8s.objects import parse
from ctrl.model.plan import (
    NO_FLAGS,
    FrontendFlag,
    NodeAddresses,
    Scope,
    nodeport_addresses,
    plan_service,
)
from ctrl.model.planner import ServicePlanner
from ctrl.model.state import ClusterState
from ctrl.runtime.agent import Agent
from ctrl.runtime.settings import Settings
from ctrl.util.addrs import addr16, addr_str

from .helpers import endpoint, endpoint_slice, service

NODE = "node-a"
NODE_IP, NODE_IP2, NODE_IP6 = "198.18.250.1", "198.18.251.1", "2001:db8:250::1"
ADDRS = NodeAddresses((NODE_IP, NODE_IP2), (NODE_IP, NODE_IP2))
LOCAL_EP, REMOTE_EP = "198.18.1.1", "198.18.2.1"
LB_IP, EXT_IP = "198.19.5.5", "198.19.6.6"
PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080}]


def svc(etp="Cluster", itp="Cluster", lb=(), ext_ips=(), ranges=None, stype="NodePort", ports=None, **kw):
    raw = service(type=stype, ports=ports or PORTS, externalTrafficPolicy=etp, internalTrafficPolicy=itp, **kw)
    if ext_ips:
        raw["spec"]["externalIPs"] = list(ext_ips)
    if ranges is not None:
        raw["spec"]["loadBalancerSourceRanges"] = list(ranges)
    if lb:
        raw["status"] = {"loadBalancer": {"ingress": [dict(i) if isinstance(i, dict) else {"ip": i} for i in lb]}}
    return parse(raw)


SLICE = parse(endpoint_slice("web-a", endpoints=[endpoint(LOCAL_EP, node=NODE), endpoint(REMOTE_EP, node="node-b")]))


def fronts(s, node=ADDRS, slices=(SLICE,)):
    out, _ = plan_service(s, list(slices), NODE, None, node)
    return {(addr_str(f.addr), f.port, f.scope): f for f in out}


def ips(f):
    return sorted(addr_str(b[0]) for b in f.backends)


BOTH = [LOCAL_EP, REMOTE_EP]
INT, EXT = Scope.INTERNAL, Scope.EXTERNAL
MASQ, RANGES, NONE = FrontendFlag.MASQ, FrontendFlag.SRC_RANGES, NO_FLAGS


@pytest.mark.parametrize(
    "service_,key,backends,flags",
    [
        pytest.param(svc(), (NODE_IP, 30080, EXT), BOTH, MASQ, id="nodeport-etp-cluster-external-all-masq"),
        pytest.param(svc(), (NODE_IP2, 30080, EXT), BOTH, MASQ, id="nodeport-on-every-node-address"),
        pytest.param(svc(), (NODE_IP, 30080, INT), BOTH, NONE, id="nodeport-from-pods-cluster-set"),
        pytest.param(
            svc("Local"), (NODE_IP, 30080, EXT), [LOCAL_EP], NONE, id="nodeport-etp-local-external-local-only"
        ),
        pytest.param(svc("Local"), (NODE_IP, 30080, INT), BOTH, NONE, id="nodeport-etp-local-from-pods-cluster-set"),
        pytest.param(
            svc(itp="Local"), (NODE_IP, 30080, INT), BOTH, NONE, id="nodeport-itp-local-from-pods-cluster-set"
        ),
        pytest.param(svc(itp="Local"), ("198.19.0.10", 80, INT), [LOCAL_EP], NONE, id="clusterip-itp-local-local-only"),
        pytest.param(svc(ext_ips=[EXT_IP]), (EXT_IP, 80, EXT), BOTH, MASQ, id="externalip-external-scope"),
        pytest.param(svc(ext_ips=[EXT_IP]), (EXT_IP, 80, INT), BOTH, NONE, id="externalip-internal-scope"),
        pytest.param(svc(stype="LoadBalancer", lb=[LB_IP]), (LB_IP, 80, EXT), BOTH, MASQ, id="lb-ip-external"),
        pytest.param(
            svc("Local", stype="LoadBalancer", lb=[LB_IP]), (LB_IP, 80, EXT), [LOCAL_EP], NONE, id="lb-etp-local"
        ),
        pytest.param(
            svc(stype="LoadBalancer", lb=[LB_IP], ranges=["198.18.100.0/24"]),
            (LB_IP, 80, EXT),
            BOTH,
            MASQ | RANGES,
            id="lb-source-ranges-flagged-external",
        ),
        pytest.param(
            svc(stype="LoadBalancer", lb=[LB_IP], ranges=["198.18.100.0/24"]),
            (LB_IP, 80, INT),
            BOTH,
            RANGES,
            id="lb-source-ranges-flagged-from-pods-too",
        ),
        pytest.param(
            svc(stype="LoadBalancer", lb=[LB_IP], ranges=["198.18.100.0/24"]),
            (NODE_IP, 30080, EXT),
            BOTH,
            MASQ,
            id="source-ranges-not-on-nodeport",
        ),
        pytest.param(
            svc(stype="LoadBalancer", lb=[LB_IP], ranges=["2001:db8::/32"]),
            (LB_IP, 80, EXT),
            BOTH,
            MASQ,
            id="source-ranges-of-other-family-only-no-filter",
        ),
    ],
)
def test_frontend_rules(service_, key, backends, flags):
    fr = fronts(service_)
    assert key in fr, sorted(fr)
    assert ips(fr[key]) == backends
    assert fr[key].flags == flags


@pytest.mark.parametrize(
    "service_,absent",
    [
        pytest.param(svc(stype="ClusterIP", ports=[{"name": "http", "port": 80}]), (NODE_IP, 30080), id="no-nodeport"),
        pytest.param(
            svc(stype="LoadBalancer", lb=[{"ip": LB_IP, "ipMode": "Proxy"}]), (LB_IP, 80), id="lb-ipmode-proxy-skipped"
        ),
        pytest.param(
            svc(ext_ips=["2001:db8::66"]), ("2001:db8::66", 80), id="externalip-of-a-family-without-cluster-ip"
        ),
    ],
)
def test_frontends_not_planned(service_, absent):
    fr = fronts(service_)
    assert (*absent, INT) not in fr and (*absent, EXT) not in fr


def test_lb_ipmode_vip_is_served():
    fr = fronts(svc(stype="LoadBalancer", lb=[{"ip": LB_IP, "ipMode": "VIP"}]))
    assert (LB_IP, 80, EXT) in fr


def test_no_node_addresses_no_nodeport_frontends():
    assert not [k for k in fronts(svc(), node=NodeAddresses()) if k[1] == 30080]


def test_etp_local_without_local_endpoint_drops_external_keeps_internal():
    remote_only = parse(endpoint_slice("web-a", endpoints=[endpoint(REMOTE_EP, node="node-b")]))
    fr = fronts(svc("Local"), slices=(remote_only,))
    assert fr[(NODE_IP, 30080, EXT)].backends == ()  # count 0: dropped, as kube-proxy does
    assert ips(fr[(NODE_IP, 30080, INT)]) == [REMOTE_EP]


@pytest.mark.parametrize(
    "cidrs,expect",
    [
        pytest.param((), (NODE_IP, NODE_IP2, NODE_IP6), id="default-all"),
        pytest.param(("198.18.250.0/24",), (NODE_IP,), id="one-cidr"),
        pytest.param(("198.18.0.0/15", "2001:db8::/32"), (NODE_IP, NODE_IP2, NODE_IP6), id="both-families"),
        pytest.param(("2001:db8::/32",), (NODE_IP6,), id="ipv6-only"),
        pytest.param(("198.18.252.0/24",), (), id="nothing-matches"),
        pytest.param(("primary",), (NODE_IP, NODE_IP6), id="primary-first-per-family"),
    ],
)
def test_nodeport_addresses_flag(cidrs, expect):
    assert nodeport_addresses((NODE_IP, NODE_IP2, NODE_IP6), cidrs) == expect


@pytest.mark.parametrize(
    "ranges,expect",
    [
        pytest.param(["198.18.100.0/24"], {("198.18.100.0", 24)}, id="one-range"),
        pytest.param(["198.18.100.7/24"], {("198.18.100.0", 24)}, id="host-bits-cleared"),
        pytest.param(
            ["198.18.100.0/24", "198.18.250.0/24"],
            {("198.18.100.0", 24), ("198.18.250.0", 24), (LB_IP, 32)},
            id="range-with-node-ip-admits-lb-ip",
        ),
    ],
)
def test_source_ranges_entries(ranges, expect):
    f = fronts(svc(stype="LoadBalancer", lb=[LB_IP], ranges=ranges))[(LB_IP, 80, EXT)]
    got = {(addr_str(a), n - 96) for a, n in f.source_ranges}
    assert got == expect


def test_source_ranges_from_annotation_when_the_field_is_empty():
    raw = service(type="LoadBalancer", ports=PORTS)
    raw["metadata"]["annotations"] = {"service.beta.kubernetes.io/load-balancer-source-ranges": "198.18.7.0/24"}
    raw["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    assert parse(raw).lb_source_ranges == ("198.18.7.0/24",)


def test_bad_source_range_is_reported_and_the_rest_kept():
    s = svc(stype="LoadBalancer", lb=[LB_IP], ranges=["198.18.100.0/24", "not-a-cidr"])
    assert s.lb_source_ranges == ("198.18.100.0/24",)
    assert any("spec.loadBalancerSourceRanges[1]" in p and "not-a-cidr" in p for p in s.problems)


def test_bad_node_address_is_reported_and_the_rest_kept():
    n = parse(
        {
            "kind": "Node",
            "metadata": {"name": NODE},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": "198.18.250.300"},
                    {"type": "InternalIP", "address": NODE_IP},
                    {"type": "Hostname", "address": "node-a"},
                    {"type": "ExternalIP", "address": NODE_IP2},
                ]
            },
        }
    )
    assert n.ips == (NODE_IP, NODE_IP2)
    assert any("status.addresses[0].address" in p and "198.18.250.300" in p for p in n.problems)


# -- the agent: Node changes move NodePorts ------------------------------------


def node_obj(*ips):
    return parse(
        {
            "kind": "Node",
            "metadata": {"name": NODE},
            "status": {"addresses": [{"type": "InternalIP", "address": ip} for ip in ips]},
        }
    )


def agent_with(service_, cidrs=()):
    state = ClusterState(NODE)
    a = Agent(source=None, state=state, programmed=Programmed(), writer=None, settings=Settings(nodeport_cidrs=cidrs))
    a.take(
        [Event("upsert", "Service", "default/web", service_), Event("upsert", "EndpointSlice", "default/web-a", SLICE)]
    )
    return a


def nodeport_keys(a):
    return {(addr_str(k[0]), k[3]) for k in a.programmed.frontends if k[1] == 30080}


def test_node_address_change_moves_nodeport_frontends():
    a = agent_with(svc())
    a.take([Event("upsert", "Node", NODE, node_obj(NODE_IP))])
    a.sync()
    assert nodeport_keys(a) == {(NODE_IP, INT), (NODE_IP, EXT)}
    a.take([Event("upsert", "Node", NODE, node_obj(NODE_IP2))])
    cs = a.sync()
    assert nodeport_keys(a) == {(NODE_IP2, INT), (NODE_IP2, EXT)}
    assert {addr_str(k[0]) for k in cs.svc_del} == {NODE_IP}
    assert a.node_config() == NodeConfig(addr16(NODE_IP2), None)


def test_nodeport_addresses_filter_in_the_agent():
    a = agent_with(svc(), cidrs=("198.18.251.0/24",))
    a.take([Event("upsert", "Node", NODE, node_obj(NODE_IP, NODE_IP2))])
    a.sync()
    assert nodeport_keys(a) == {(NODE_IP2, INT), (NODE_IP2, EXT)}
    # The masquerade address is the first InternalIP, whatever the filter.
    assert a.node_config().addr4 == addr16(NODE_IP)


# -- the diff: source ranges and capacity -------------------------------------


def test_source_ranges_written_before_and_deleted_after_their_frontend():
    from ctrl.dataplane.abi import Codecs
    from ctrl.dataplane.apply import encode

    s1 = svc(stype="LoadBalancer", lb=[LB_IP], ranges=["198.18.100.0/24"])
    p = Programmed()
    cs = p.sync({"default/web": list(fronts(s1).values())})
    order = [(m, op) for m, op, _, _ in encode(cs, Codecs.get())]
    assert order.index((map_name("sp_src"), "update")) < order.index((map_name("sp_svc"), "update"))
    assert len(cs.src_upd) == 2  # the LB IP's frontend in each scope
    cs = p.sync({"default/web": []})
    order = [(m, op) for m, op, _, _ in encode(cs, Codecs.get())]
    assert order.index((map_name("sp_svc"), "delete")) < order.index((map_name("sp_src"), "delete"))
    assert len(cs.src_del) == 2


def test_source_range_change_writes_only_the_difference():
    p = Programmed()
    p.sync({"default/web": list(fronts(svc(stype="LoadBalancer", lb=[LB_IP], ranges=["198.18.100.0/24"])).values())})
    cs = p.sync(
        {"default/web": list(fronts(svc(stype="LoadBalancer", lb=[LB_IP], ranges=["198.18.101.0/24"])).values())}
    )
    assert {addr_str(a) for _, a, _ in cs.src_upd} == {"198.18.101.0"}
    assert {addr_str(a) for _, a, _ in cs.src_del} == {"198.18.100.0"}
    assert not cs.svc_upd  # flags unchanged: the frontends are not rewritten
    again = p.sync(
        {"default/web": list(fronts(svc(stype="LoadBalancer", lb=[LB_IP], ranges=["198.18.101.0/24"])).values())}
    )
    assert len(again) == 0


def test_capacity_counts_external_frontends():
    # 1 cluster IP + 2 node addresses x 2 scopes = 5 frontends; 4 fit.
    p = Programmed(MapSizes(services=4))
    cs = p.sync({"default/web": list(fronts(svc()).values())})
    assert "default/web" in cs.rejected and "--max-services" in cs.rejected["default/web"]


def test_planner_follows_node_addresses():
    planner = ServicePlanner()
    s = svc()
    a, _ = planner.plan("default/web", s, {"web-a": SLICE}, NODE, None, NodeAddresses((NODE_IP,), (NODE_IP,)))
    b, _ = planner.plan("default/web", s, {"web-a": SLICE}, NODE, None, NodeAddresses((NODE_IP2,), (NODE_IP2,)))
    assert {addr_str(f.addr) for f in a if f.port == 30080} == {NODE_IP}
    assert {addr_str(f.addr) for f in b if f.port == 30080} == {NODE_IP2}


# -- no endpoint: REJECT or DROP -------------------------------------------------

REJECT = FrontendFlag.REJECT
REMOTE_ONLY = parse(endpoint_slice("web-a", endpoints=[endpoint(REMOTE_EP, node="node-b")]))
EVICTED = parse(endpoint_slice("web-a", endpoints=[endpoint(LOCAL_EP, ready=False, serving=False, node=NODE)]))
TERMINATING = parse(
    endpoint_slice("web-a", endpoints=[endpoint(REMOTE_EP, ready=False, serving=True, terminating=True, node="node-b")])
)


@pytest.mark.parametrize(
    ("s", "slices", "where", "backends", "rejects"),
    [
        # kube-proxy REJECTs when the Service port has no endpoint at all...
        pytest.param(svc(), (), (NODE_IP, 30080, EXT), [], True, id="no-slice-external-rejects"),
        pytest.param(svc(), (), ("198.19.0.10", 80, INT), [], True, id="no-slice-cluster-ip-rejects"),
        pytest.param(svc(), (EVICTED,), ("198.19.0.10", 80, INT), [], True, id="evicted-pod-rejects"),
        pytest.param(svc(itp="Local"), (), ("198.19.0.10", 80, INT), [], True, id="itp-local-no-endpoint-rejects"),
        # ... and DROPs when endpoints exist but the policy allows none here.
        pytest.param(
            svc(itp="Local"), (REMOTE_ONLY,), ("198.19.0.10", 80, INT), [], False, id="itp-local-remote-drops"
        ),
        pytest.param(svc(etp="Local"), (REMOTE_ONLY,), (NODE_IP, 30080, EXT), [], False, id="etp-local-remote-drops"),
        pytest.param(
            svc(etp="Local"), (REMOTE_ONLY,), (NODE_IP, 30080, INT), [REMOTE_EP], False, id="etp-local-pods-use-cluster"
        ),
        # Serving terminating endpoints are endpoints: used, no reject.
        pytest.param(svc(), (TERMINATING,), (NODE_IP, 30080, EXT), [REMOTE_EP], False, id="terminating-serves"),
        pytest.param(svc(), (SLICE,), ("198.19.0.10", 80, INT), BOTH, False, id="ready"),
    ],
)
def test_reject_flag_when_the_service_has_no_endpoint_anywhere(s, slices, where, backends, rejects):
    f = fronts(s, slices=slices)[where]
    assert ips(f) == backends
    assert bool(f.flags & REJECT) == rejects


def test_reject_flag_follows_endpoints_in_the_incremental_planner():
    """The delta path (ServicePlanner on a changed slice) sets and clears
    the flag as the last endpoint goes and comes back."""
    planner = ServicePlanner()
    s = svc()
    steps = [((SLICE,), False), ((EVICTED,), True), ((TERMINATING,), False), ((), True), ((SLICE,), False)]
    for slices, rejects in steps:
        out, _ = planner.plan("default/web", s, {sl.name: sl for sl in slices}, NODE, None, ADDRS)
        assert out and all(bool(f.flags & REJECT) == rejects for f in out), (slices, [f.flags for f in out])
