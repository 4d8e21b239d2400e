"""Tier 2: the external interface's programs (sp_ext_ingress/egress)
under BPF_PROG_TEST_RUN.

The path of an external flow to a NodePort whose backend is on another
node, step by step, as the node's uplink sees it:

1. ext ingress:  client:cport -> node:30080   DNAT  -> client:cport -> be:8080
2. ext egress:   client:cport -> be:8080      SNAT  -> node:P -> be:8080
3. ext ingress:  be:8080 -> node:P            UNSNAT -> be:8080 -> client:cport
4. ext egress:   be:8080 -> client:cport      REVNAT -> node:30080 -> client:cport

Every output frame is compared with one scapy built from scratch, and its
checksums recomputed by scapy. Addresses: 198.18.0.0/15, 2001:db8::/32.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from ctrl.dataplane import abi

from .packets import (
    FORWARD,
    REPLY,
    TC_ACT_OK,
    TC_ACT_SHOT,
    TCP_P,
    UDP_P,
    Backend,
    CtKey,
    CtVal,
    Seed,
    Svc,
    changed_offsets,
    ct_dump,
    mapname,
    nat_offsets,
    put_backend,
    put_ct,
    put_service,
    run,
    seed,
    stamp,
    tcp,
    udp,
    verify_checksums,
)

SNAT = abi.CT_SNAT
UNSNAT = abi.CT_UNSNAT

OUTSIDE = "198.18.100.5"  # a client outside the cluster
OUTSIDE2 = "198.18.101.7"  # another one, outside the source ranges
NODE = "198.18.0.101"  # this node's InternalIP
LB_IP = "198.19.1.1"
BE_REMOTE = "198.18.2.2"  # a pod on another node
CPORT = 40000
NODEPORT = 30080
PORT_MIN, PORT_MAX = 61000, 65535

F_SRC_RANGES = abi.const("SP_SVC_F_SRC_RANGES")
F_MASQ = abi.const("SP_SVC_F_MASQ")

BE = Backend(7, BE_REMOTE, 8080, TCP_P)
BE_UDP = Backend(8, BE_REMOTE, 5353, UDP_P)
# External scope (1), policy Cluster: masquerade when the flow leaves.
NP = Svc(NODE, NODEPORT, TCP_P, svc_id=21, slots=(BE.id,), scope=1, flags=F_MASQ)
NP_UDP = Svc(NODE, NODEPORT, UDP_P, svc_id=22, slots=(BE_UDP.id,), scope=1, flags=F_MASQ)
# externalTrafficPolicy Local: no masquerade.
NP_LOCAL = Svc(NODE, NODEPORT, TCP_P, svc_id=23, slots=(BE.id,), scope=1)
# The internal-scope twin (pods reaching node:nodePort): not for outside traffic.
NP_INTERNAL = Svc(NODE, NODEPORT, TCP_P, svc_id=24, slots=(BE.id,), scope=0)
LB = Svc(LB_IP, 80, TCP_P, svc_id=25, slots=(BE.id,), scope=1, flags=F_MASQ | F_SRC_RANGES)


def put_cfg(
    dp,
    addr4: str | None = NODE,
    addr6: str | None = None,
    lo=PORT_MIN,
    hi=PORT_MAX,
    reclaim=300,
    reclaim_closed=10,
) -> None:
    from ctrl.util.addrs import addr16

    z = b"\0" * 16
    val = abi.pack(
        "sp_cfg",
        addr4=addr16(addr4) if addr4 else z,
        addr6=addr16(addr6) if addr6 else z,
        snat_port_min=lo,
        snat_port_max=hi,
        snat_reclaim=reclaim,
        snat_reclaim_closed=reclaim_closed,
    )
    dp.maps[mapname("sp_cfg")].update(abi.u32(0), val)


def put_range(dp, svc_id: int, cidr: str) -> None:
    from ctrl.util.addrs import addr16

    net, bits = cidr.split("/")
    plen = 32 + (96 if ":" not in net else 0) + int(bits)
    key = abi.pack("sp_src_key", prefixlen=plen, svc_id=svc_id, addr=addr16(net))
    dp.maps[mapname("sp_src")].update(key, abi.pack("sp_src_val", allow=1))


def fwd_ct(svc: Svc, be: Backend, snat: tuple[str, int] | None = None) -> tuple[CtKey, CtVal]:
    return (
        CtKey(OUTSIDE, svc.addr, CPORT, svc.port, be.proto, FORWARD),
        CtVal(be.addr, be.port, be.id, svc.svc_id, *(snat or (None, 0))),
    )


def external_flow(svc: Svc, be: Backend) -> dict[CtKey, CtVal]:
    """The three entries a new masqueraded flow creates at ext ingress."""
    k, v = fwd_ct(svc, be)
    return {
        k: v,
        CtKey(be.addr, OUTSIDE, be.port, CPORT, be.proto, REPLY): CtVal(svc.addr, svc.port, be.id, svc.svc_id),
        CtKey(OUTSIDE, be.addr, CPORT, be.port, be.proto, SNAT): CtVal(None, 0, be.id, svc.svc_id, svc.addr, svc.port),
    }


def pkt(proto: int, src: str, dst: str, sport: int, dport: int, flags: str = "S") -> bytes:
    return tcp(src, dst, sport, dport, flags=flags) if proto == TCP_P else udp(src, dst, sport, dport)


def check_rewrite(got: bytes, sent: bytes, want: bytes, which: str) -> None:
    verify_checksums(got)
    assert got == want, f"got {Ether(got).summary()}, expected {Ether(want).summary()}"
    extra = changed_offsets(sent, got) - nat_offsets(sent, which)
    assert not extra, f"bytes changed outside the {which} address, port and checksums: {sorted(extra)}"


def ct(dp) -> dict[CtKey, CtVal]:
    return {k: v for k, (v, _) in ct_dump(dp).items()}


# -- ext ingress: which packets are DNATed --------------------------------------


@pytest.mark.parametrize(
    "services,ranges,src,verdict,retval,dnat",
    [
        pytest.param((NP,), (), OUTSIDE, "DNAT_NEW", TC_ACT_OK, True, id="nodeport-external-scope-dnat"),
        pytest.param((NP_INTERNAL,), (), OUTSIDE, "PASS_NO_SERVICE", TC_ACT_OK, False, id="internal-scope-only-passed"),
        pytest.param((LB,), ("198.18.100.0/24",), OUTSIDE, "DNAT_NEW", TC_ACT_OK, True, id="source-in-range-allowed"),
        pytest.param((LB,), ("198.18.100.5/32",), OUTSIDE, "DNAT_NEW", TC_ACT_OK, True, id="source-exact-32-allowed"),
        pytest.param(
            (LB,), ("198.18.100.0/24",), OUTSIDE2, "DROP_SOURCE_RANGE", TC_ACT_SHOT, False, id="source-outside-dropped"
        ),
        pytest.param((LB,), (), OUTSIDE, "DROP_SOURCE_RANGE", TC_ACT_SHOT, False, id="flag-without-ranges-drops-all"),
    ],
)
def test_ext_ingress_frontends_and_source_ranges(dp, services, ranges, src, verdict, retval, dnat):
    seed(dp, Seed(services=services, backends=(BE,)))
    for r in ranges:
        put_range(dp, services[0].svc_id, r)
    front = services[0]
    sent = tcp(src, front.addr, CPORT, front.port)
    r = run(dp, sent, external=True)
    assert (r.retval, r.counted) == (retval, {verdict: (1, len(sent))})
    if dnat:
        check_rewrite(r.out, sent, tcp(src, BE_REMOTE, CPORT, 8080), "dst")
    else:
        assert r.out == sent


def test_source_ranges_apply_to_the_pod_side_too(dp):
    """kube-proxy's firewall chain sees pods' packets to an LB IP as well."""
    internal_lb = Svc(LB_IP, 80, TCP_P, svc_id=26, slots=(BE.id,), scope=0, flags=F_SRC_RANGES)
    seed(dp, Seed(services=(internal_lb,), backends=(BE,)))
    put_range(dp, 26, "198.18.100.0/24")
    assert run(dp, tcp(OUTSIDE, LB_IP, CPORT, 80)).counted.keys() == {"DNAT_NEW"}
    r = run(dp, tcp(OUTSIDE2, LB_IP, CPORT, 80))
    assert r.retval == TC_ACT_SHOT and r.counted.keys() == {"DROP_SOURCE_RANGE"}


@pytest.mark.parametrize(
    "svc,masq", [pytest.param(NP, True, id="etp-cluster"), pytest.param(NP_LOCAL, False, id="etp-local")]
)
def test_ext_ingress_creates_a_snat_entry_only_under_policy_cluster(dp, svc, masq):
    seed(dp, Seed(services=(svc,), backends=(BE,)))
    run(dp, tcp(OUTSIDE, NODE, CPORT, NODEPORT), external=True)
    want = external_flow(svc, BE)
    if not masq:
        want = {k: v for k, v in want.items() if k.dir != SNAT}
    assert ct(dp) == want


# -- the whole path, step by step ----------------------------------------------


@pytest.mark.parametrize("proto", [pytest.param(TCP_P, id="tcp"), pytest.param(UDP_P, id="udp")])
def test_masqueraded_round_trip(dp, proto):
    svc, be = (NP, BE) if proto == TCP_P else (NP_UDP, BE_UDP)
    seed(dp, Seed(services=(svc,), backends=(be,)))
    put_cfg(dp)

    # 1. DNAT at ext ingress.
    sent = pkt(proto, OUTSIDE, NODE, CPORT, NODEPORT)
    r = run(dp, sent, external=True)
    assert r.counted.keys() == {"DNAT_NEW"}
    check_rewrite(r.out, sent, pkt(proto, OUTSIDE, BE_REMOTE, CPORT, be.port), "dst")

    # 2. SNAT at ext egress: the node's address and a port of the range.
    sent = r.out
    r = run(dp, sent, egress=True, external=True)
    assert (r.retval, r.counted.keys()) == (TC_ACT_OK, {"SNAT"})
    l4 = TCP if proto == TCP_P else UDP
    port = Ether(r.out)[l4].sport
    assert PORT_MIN <= port <= PORT_MAX
    check_rewrite(r.out, sent, pkt(proto, NODE, BE_REMOTE, port, be.port), "src")
    entries = ct(dp)
    assert entries[CtKey(OUTSIDE, BE_REMOTE, CPORT, be.port, proto, SNAT)] == CtVal(
        NODE, port, be.id, svc.svc_id, NODE, NODEPORT
    )
    assert entries[CtKey(BE_REMOTE, NODE, be.port, port, proto, UNSNAT)] == CtVal(OUTSIDE, CPORT, be.id, svc.svc_id)
    # The forward entry remembers the port, to rebuild an evicted SNAT entry.
    assert entries[CtKey(OUTSIDE, NODE, CPORT, NODEPORT, proto, FORWARD)] == CtVal(
        BE_REMOTE, be.port, be.id, svc.svc_id, NODE, port
    )

    # A second packet of the flow keeps the port.
    again = run(dp, pkt(proto, OUTSIDE, BE_REMOTE, CPORT, be.port, flags="A"), egress=True, external=True)
    assert again.counted.keys() == {"SNAT"} and Ether(again.out)[l4].sport == port

    # 3. The reply: only its destination goes back to the client.
    sent = pkt(proto, BE_REMOTE, NODE, be.port, port, flags="SA")
    r = run(dp, sent, external=True)
    assert (r.retval, r.counted.keys()) == (TC_ACT_OK, {"UNSNAT"})
    check_rewrite(r.out, sent, pkt(proto, BE_REMOTE, OUTSIDE, be.port, CPORT, flags="SA"), "dst")

    # 4. Leaving towards the client: the source back to the frontend.
    sent = r.out
    r = run(dp, sent, egress=True, external=True)
    assert (r.retval, r.counted.keys()) == (TC_ACT_OK, {"REVNAT"})
    check_rewrite(r.out, sent, pkt(proto, NODE, OUTSIDE, NODEPORT, CPORT, flags="SA"), "src")


def test_policy_local_flow_leaving_is_not_masqueraded(dp):
    """No SNAT entry (ETP Local, or a pod's in-cluster flow): the external
    egress leaves the client's source alone."""
    seed(dp, Seed(services=(NP_LOCAL,), backends=(BE,)))
    put_cfg(dp)
    r = run(dp, tcp(OUTSIDE, NODE, CPORT, NODEPORT), external=True)
    sent = r.out
    r = run(dp, sent, egress=True, external=True)
    assert (r.retval, r.counted.keys(), r.out) == (TC_ACT_OK, {"PASS_NO_FLOW"}, sent)


def snat_after_dnat(dp, client_port: int = CPORT) -> tuple[int, bytes]:
    r = run(dp, tcp(OUTSIDE, NODE, client_port, NODEPORT), external=True)
    r = run(dp, r.out, egress=True, external=True)
    return r.retval, r.out


@pytest.mark.parametrize(
    "taken,last_seen,expect",
    [
        pytest.param((61000,), "now", 61001, id="busy-port-skipped"),
        pytest.param((61001,), "now", 61000, id="other-busy-port-skipped"),
        pytest.param((61000, 61001), "now", None, id="all-busy-dropped"),
        pytest.param((61000, 61001), "long-ago", "any", id="idle-entries-reclaimed"),
        # Stamped on another CPU after this one read its clock: idle 0, held.
        pytest.param((61000,), "ahead", 61001, id="stamp-ahead-of-now-held"),
    ],
)
def test_snat_port_collisions(dp, uptime, taken, last_seen, expect):
    seed(dp, Seed(services=(NP,), backends=(BE,)))
    put_cfg(dp, lo=61000, hi=61001, reclaim=300)
    last = stamp(dp, {"now": 0, "long-ago": 3600, "ahead": -1}[last_seen])
    for i, port in enumerate(taken):
        # Another client's flow to the same backend holds the port.
        put_ct(
            dp, CtKey(BE_REMOTE, NODE, 8080, port, TCP_P, UNSNAT), CtVal(OUTSIDE2, 50000 + i, BE.id, NP.svc_id), last
        )
    retval, out = snat_after_dnat(dp)
    if expect is None:
        assert retval == TC_ACT_SHOT
        return
    assert retval == TC_ACT_OK
    port = Ether(out)[TCP].sport
    assert port == expect if expect != "any" else port in (61000, 61001)
    assert ct(dp)[CtKey(BE_REMOTE, NODE, 8080, port, TCP_P, UNSNAT)] == CtVal(OUTSIDE, CPORT, BE.id, NP.svc_id)


def test_snat_drop_is_counted(dp, uptime):
    seed(dp, Seed(services=(NP,), backends=(BE,)))
    put_cfg(dp, lo=61000, hi=61000)
    put_ct(
        dp, CtKey(BE_REMOTE, NODE, 8080, 61000, TCP_P, UNSNAT), CtVal(OUTSIDE2, 50000, BE.id, NP.svc_id), stamp(dp, 0)
    )
    r = run(dp, tcp(OUTSIDE, NODE, CPORT, NODEPORT), external=True)
    r = run(dp, r.out, egress=True, external=True)
    assert (r.retval, r.counted.keys()) == (TC_ACT_SHOT, {"DROP_SNAT"})


@pytest.mark.parametrize(
    "cfg", [pytest.param(None, id="no-config"), pytest.param({"addr4": None}, id="no-ipv4-address")]
)
def test_snat_without_a_node_address_drops(dp, cfg):
    seed(dp, Seed(services=(NP,), backends=(BE,)))
    if cfg is not None:
        put_cfg(dp, **cfg)
    retval, _ = snat_after_dnat(dp)
    assert retval == TC_ACT_SHOT


def test_many_clients_get_distinct_ports(dp):
    seed(dp, Seed(services=(NP,), backends=(BE,)))
    put_cfg(dp, lo=61000, hi=61015)
    ports = set()
    for i in range(16):
        retval, out = snat_after_dnat(dp, client_port=CPORT + i)
        assert retval == TC_ACT_OK
        ports.add(Ether(out)[TCP].sport)
    assert ports == set(range(61000, 61016))


def test_evicted_snat_entry_comes_back_with_its_port(dp):
    seed(dp, Seed(services=(NP,), backends=(BE,)))
    put_cfg(dp)
    _, out = snat_after_dnat(dp)
    port = Ether(out)[TCP].sport
    from .packets import ct_key_bytes

    assert dp.maps[mapname("sp_ct")].delete(ct_key_bytes(CtKey(OUTSIDE, BE_REMOTE, CPORT, 8080, TCP_P, SNAT)))
    r = run(dp, tcp(OUTSIDE, NODE, CPORT, NODEPORT, flags="A"), external=True)
    assert r.counted.keys() == {"DNAT_ESTABLISHED"}
    r = run(dp, r.out, egress=True, external=True)
    assert r.counted.keys() == {"SNAT"} and Ether(r.out)[TCP].sport == port


# -- IPv6 ---------------------------------------------------------------------

V6_OUT, V6_NODE, V6_BE = "2001:db8:100::5", "2001:db8:0:1::101", "2001:db8:2::2"


def v6(proto: int, src: str, dst: str, sport: int, dport: int) -> bytes:
    l4 = TCP(sport=sport, dport=dport, flags="S") if proto == TCP_P else UDP(sport=sport, dport=dport)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IPv6(src=src, dst=dst) / l4 / b"payload")


def v6_ok(raw: bytes, l4) -> Ether:
    p = Ether(raw)
    got = p[l4].chksum
    q = Ether(raw)
    del q[l4].chksum
    assert Ether(bytes(q))[l4].chksum == got, "L4 checksum wrong"
    return p


@pytest.mark.parametrize("proto,l4", [pytest.param(TCP_P, TCP, id="tcp"), pytest.param(UDP_P, UDP, id="udp")])
def test_ipv6_masqueraded_round_trip(dp, proto, l4):
    put_backend(dp, Backend(9, V6_BE, 8080, proto))
    put_service(dp, Svc(V6_NODE, NODEPORT, proto, svc_id=40, slots=(9,), scope=1, flags=F_MASQ))
    put_cfg(dp, addr6=V6_NODE)
    steps = [
        (v6(proto, V6_OUT, V6_NODE, CPORT, NODEPORT), False, (V6_OUT, V6_BE, CPORT, 8080)),
        (None, True, (V6_NODE, V6_BE, "port", 8080)),
    ]
    out = None
    for sent, egress, want in steps:
        r = run(dp, sent if sent is not None else out, egress=egress, external=True)
        assert r.retval == TC_ACT_OK
        p = v6_ok(r.out, l4)
        got = (p[IPv6].src, p[IPv6].dst, p[l4].sport, p[l4].dport)
        assert got[:2] == want[:2] and got[3] == want[3]
        if want[2] != "port":
            assert got[2] == want[2]
        out = r.out
    port = Ether(out)[l4].sport
    assert PORT_MIN <= port <= PORT_MAX
    r = run(dp, v6(proto, V6_BE, V6_NODE, 8080, port), external=True)
    p = v6_ok(r.out, l4)
    assert (p[IPv6].src, p[IPv6].dst, p[l4].sport, p[l4].dport) == (V6_BE, V6_OUT, 8080, CPORT)
    r = run(dp, r.out, egress=True, external=True)
    p = v6_ok(r.out, l4)
    assert (p[IPv6].src, p[IPv6].dst, p[l4].sport, p[l4].dport) == (V6_NODE, V6_OUT, NODEPORT, CPORT)
    assert bytes(p[l4].payload) == b"payload"


def test_unrelated_traffic_on_the_uplink_is_untouched(dp):
    seed(dp, Seed(services=(NP,), backends=(BE,)))
    put_cfg(dp)
    for egress in (False, True):
        sent = tcp(OUTSIDE, NODE, CPORT, 22)
        r = run(dp, sent, egress=egress, external=True)
        assert r.retval == TC_ACT_OK and r.out == sent


# -- TCP close and SNAT port reclaim --------------------------------------------

F_FIN_FWD = abi.const("SP_CT_F_FIN_FWD")
F_FIN_REPLY = abi.const("SP_CT_F_FIN_REPLY")
F_FIN_REPLY_FIRST = abi.const("SP_CT_F_FIN_REPLY_FIRST")
F_RST = abi.const("SP_CT_F_RST")
CLOSED_CLIENT_FIRST = F_FIN_FWD | F_FIN_REPLY
CLOSED_BACKEND_FIRST = F_FIN_FWD | F_FIN_REPLY | F_FIN_REPLY_FIRST

# Packets of an established masqueraded flow as the uplink sees them: the
# client's leave through ext egress (SNAT path), the backend's arrive at ext
# ingress (UNSNAT path). "c:FA" is the client's FIN+ACK, "b:R" the backend's RST.
CLOSES = {
    "client-first": (["c:FA", "b:FA", "c:A"], CLOSED_CLIENT_FIRST),
    "backend-first": (["b:FA", "c:FA", "b:A"], CLOSED_BACKEND_FIRST),
    "client-fin-only": (["c:FA", "b:A"], F_FIN_FWD),
    "backend-fin-only": (["b:FA", "c:A"], F_FIN_REPLY | F_FIN_REPLY_FIRST),
    "client-rst": (["c:R"], F_RST),
    "backend-rst": (["b:RA"], F_RST),
    "fin-then-rst": (["c:FA", "b:R"], F_FIN_FWD | F_RST),
    "retransmitted-fins": (["c:FA", "c:FA", "b:FA", "b:FA", "c:A"], CLOSED_CLIENT_FIRST),
    "open": (["c:PA", "b:A", "b:PA", "c:A"], 0),
}


def open_masqueraded_flow(dp, client_port: int = CPORT) -> int:
    """SYN, SYN-ACK, ACK of a masqueraded flow; returns its SNAT port."""
    retval, out = snat_after_dnat(dp, client_port)
    assert retval == TC_ACT_OK
    port = Ether(out)[TCP].sport
    send(dp, client_port, port, "b:SA")
    send(dp, client_port, port, "c:A")
    return port


def send(dp, client_port: int, port: int, step: str) -> None:
    """One packet of the flow, at the uplink, already past DNAT (client's) or
    before UNSNAT (backend's): the rewrite it gets is checked as well."""
    side, flags = step.split(":")
    if side == "c":
        sent = tcp(OUTSIDE, BE_REMOTE, client_port, 8080, flags=flags)
        r = run(dp, sent, egress=True, external=True)
        assert r.counted.keys() == {"SNAT"}
        check_rewrite(r.out, sent, tcp(NODE, BE_REMOTE, port, 8080, flags=flags), "src")
    else:
        sent = tcp(BE_REMOTE, NODE, 8080, port, flags=flags)
        r = run(dp, sent, external=True)
        assert r.counted.keys() == {"UNSNAT"}
        check_rewrite(r.out, sent, tcp(BE_REMOTE, OUTSIDE, 8080, client_port, flags=flags), "dst")


def unsnat_key(port: int) -> CtKey:
    return CtKey(BE_REMOTE, NODE, 8080, port, TCP_P, UNSNAT)


@pytest.mark.parametrize("close", list(CLOSES))
def test_tcp_close_is_recorded_in_the_unsnat_entry(dp, close):
    seed(dp, Seed(services=(NP,), backends=(BE,)))
    put_cfg(dp)
    port = open_masqueraded_flow(dp)
    assert ct(dp)[unsnat_key(port)].flags == 0
    steps, want = CLOSES[close]
    for step in steps:
        send(dp, CPORT, port, step)
    assert ct(dp)[unsnat_key(port)] == CtVal(OUTSIDE, CPORT, BE.id, NP.svc_id, flags=want)


def test_a_new_syn_on_the_same_tuple_clears_the_close(dp):
    """The client reuses its port for a new connection: the old close no
    longer says anything about the port."""
    seed(dp, Seed(services=(NP,), backends=(BE,)))
    put_cfg(dp)
    port = open_masqueraded_flow(dp)
    for step in CLOSES["client-first"][0]:
        send(dp, CPORT, port, step)
    assert ct(dp)[unsnat_key(port)].flags == CLOSED_CLIENT_FIRST
    r = run(dp, tcp(OUTSIDE, NODE, CPORT, NODEPORT), external=True)
    assert r.counted.keys() == {"DNAT_ESTABLISHED"}
    r = run(dp, r.out, egress=True, external=True)
    assert r.counted.keys() == {"SNAT"} and Ether(r.out)[TCP].sport == port
    assert ct(dp)[unsnat_key(port)].flags == 0


def age(dp, key: CtKey, seconds: float) -> None:
    """Make an entry look idle for `seconds`: its last_seen moved back by the
    programs' clock, modulo 2**64 (at an uptime below `seconds` the stamp
    wraps, as the programs' arithmetic does), every other field kept."""
    val, _ = ct_dump(dp)[key]
    put_ct(dp, key, val, stamp(dp, seconds))


RECLAIM, RECLAIM_CLOSED = 600, 10


@pytest.mark.parametrize(
    "close,idle,reused",
    [
        # Client closed first, or a reset: the short grace.
        ("client-first", 8, False),
        ("client-first", 12, True),
        ("client-rst", 8, False),
        ("client-rst", 12, True),
        ("backend-rst", 12, True),
        ("fin-then-rst", 12, True),
        # Backend closed first: its socket sits in TIME_WAIT for 60 s.
        ("backend-first", 12, False),
        ("backend-first", 58, False),
        ("backend-first", 62, True),
        # Open or half-closed: snat_reclaim.
        ("open", 62, False),
        ("open", 598, False),
        ("open", 602, True),
        ("client-fin-only", 62, False),
        ("client-fin-only", 602, True),
        ("backend-fin-only", 62, False),
    ],
)
def test_snat_port_of_a_closed_flow_is_reused_after_its_hold(dp, uptime, close, idle, reused):
    """One SNAT port: client A's flow takes it, ends (or not) as `close`
    says, is made to look idle for `idle` seconds; then client B's new flow
    gets the port, or is dropped."""
    seed(dp, Seed(services=(NP,), backends=(BE,)))
    put_cfg(dp, lo=61000, hi=61000, reclaim=RECLAIM, reclaim_closed=RECLAIM_CLOSED)
    port = open_masqueraded_flow(dp)
    for step in CLOSES[close][0]:
        send(dp, CPORT, port, step)
    retval, _ = snat_after_dnat(dp, CPORT + 1)
    assert retval == TC_ACT_SHOT, "the port was reused with no idle time at all"
    age(dp, unsnat_key(port), idle)
    retval, out = snat_after_dnat(dp, CPORT + 1)
    if not reused:
        assert retval == TC_ACT_SHOT
        assert ct(dp)[unsnat_key(port)].nat_port == CPORT
        return
    assert retval == TC_ACT_OK and Ether(out)[TCP].sport == port
    assert ct(dp)[unsnat_key(port)] == CtVal(OUTSIDE, CPORT + 1, BE.id, NP.svc_id)


@pytest.mark.parametrize(
    "reclaim,reclaim_closed,close,idle,reused",
    [
        # Close tracking off: a closed flow holds its port as an open one.
        (RECLAIM, 0, "client-first", 12, False),
        (RECLAIM, 0, "client-first", 602, True),
        (RECLAIM, 0, "backend-first", 62, False),
        # A closed flow never holds its port longer than an open one.
        (30, RECLAIM_CLOSED, "backend-first", 32, True),
        (5, RECLAIM_CLOSED, "client-first", 7, True),
        # A grace longer than TIME_WAIT applies to backend-first closes too.
        (RECLAIM, 90, "backend-first", 62, False),
        (RECLAIM, 90, "backend-first", 92, True),
        # snat_reclaim 0: open flows keep their ports for ever, closed ones not.
        (0, RECLAIM_CLOSED, "open", 3600, False),
        (0, RECLAIM_CLOSED, "client-first", 12, True),
    ],
)
def test_snat_hold_settings(dp, uptime, reclaim, reclaim_closed, close, idle, reused):
    seed(dp, Seed(services=(NP,), backends=(BE,)))
    put_cfg(dp, lo=61000, hi=61000, reclaim=reclaim, reclaim_closed=reclaim_closed)
    port = open_masqueraded_flow(dp)
    for step in CLOSES[close][0]:
        send(dp, CPORT, port, step)
    age(dp, unsnat_key(port), idle)
    retval, _ = snat_after_dnat(dp, CPORT + 1)
    assert retval == (TC_ACT_OK if reused else TC_ACT_SHOT)


def test_client_packets_keep_the_port_held(dp, uptime):
    """The client's packets refresh the UNSNAT entry too: a flow whose
    backend is silent (one-way UDP, a long upload) keeps its port."""
    seed(dp, Seed(services=(NP,), backends=(BE,)))
    put_cfg(dp, lo=61000, hi=61000, reclaim=RECLAIM)
    port = open_masqueraded_flow(dp)
    age(dp, unsnat_key(port), RECLAIM + 2)
    send(dp, CPORT, port, "c:PA")
    retval, _ = snat_after_dnat(dp, CPORT + 1)
    assert retval == TC_ACT_SHOT


def test_a_flow_whose_port_was_given_away_takes_another(dp, uptime):
    """Client A's flow closed and its port went to client B. A late packet
    of A's (a retransmitted ACK) must not enter B's connection: A gets a
    new port, and B's entry is left alone."""
    seed(dp, Seed(services=(NP,), backends=(BE,)))
    put_cfg(dp, lo=61000, hi=61000, reclaim=RECLAIM, reclaim_closed=RECLAIM_CLOSED)
    port = open_masqueraded_flow(dp)
    for step in CLOSES["client-first"][0]:
        send(dp, CPORT, port, step)
    age(dp, unsnat_key(port), RECLAIM_CLOSED + 2)
    port_b = open_masqueraded_flow(dp, CPORT + 1)
    assert port_b == port
    b_entry = ct(dp)[unsnat_key(port)]

    put_cfg(dp, lo=61000, hi=61001, reclaim=RECLAIM, reclaim_closed=RECLAIM_CLOSED)
    sent = tcp(OUTSIDE, BE_REMOTE, CPORT, 8080, flags="A")
    r = run(dp, sent, egress=True, external=True)
    assert r.counted.keys() == {"SNAT"}
    check_rewrite(r.out, sent, tcp(NODE, BE_REMOTE, 61001, 8080, flags="A"), "src")
    entries = ct(dp)
    assert entries[unsnat_key(port)] == b_entry
    assert entries[unsnat_key(61001)] == CtVal(OUTSIDE, CPORT, BE.id, NP.svc_id)
    assert entries[CtKey(OUTSIDE, BE_REMOTE, CPORT, 8080, TCP_P, SNAT)].nat_port == 61001


def test_a_late_reset_of_a_flow_whose_port_was_given_away_holds_its_new_port_briefly(dp, uptime):
    seed(dp, Seed(services=(NP,), backends=(BE,)))
    put_cfg(dp, lo=61000, hi=61000, reclaim=RECLAIM, reclaim_closed=RECLAIM_CLOSED)
    port = open_masqueraded_flow(dp)
    age(dp, unsnat_key(port), RECLAIM + 2)
    assert open_masqueraded_flow(dp, CPORT + 1) == port
    put_cfg(dp, lo=61000, hi=61001, reclaim=RECLAIM, reclaim_closed=RECLAIM_CLOSED)
    r = run(dp, tcp(OUTSIDE, BE_REMOTE, CPORT, 8080, flags="R"), egress=True, external=True)
    assert r.counted.keys() == {"SNAT"} and Ether(r.out)[TCP].sport == 61001
    assert ct(dp)[unsnat_key(61001)].flags == F_RST


def test_udp_flows_keep_ports_for_snat_reclaim(dp, uptime):
    seed(dp, Seed(services=(NP_UDP,), backends=(BE_UDP,)))
    put_cfg(dp, lo=61000, hi=61000, reclaim=RECLAIM, reclaim_closed=RECLAIM_CLOSED)
    r = run(dp, udp(OUTSIDE, NODE, CPORT, NODEPORT), external=True)
    r = run(dp, r.out, egress=True, external=True)
    assert r.counted.keys() == {"SNAT"}
    key = CtKey(BE_REMOTE, NODE, 5353, 61000, UDP_P, UNSNAT)
    for idle, want in ((RECLAIM_CLOSED + 2, TC_ACT_SHOT), (RECLAIM + 2, TC_ACT_OK)):
        age(dp, key, idle)
        r = run(dp, udp(OUTSIDE, NODE, CPORT + 1, NODEPORT), external=True)
        r = run(dp, r.out, egress=True, external=True)
        assert r.retval == want
