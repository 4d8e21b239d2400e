"""Tier 2: the tc program under BPF_PROG_TEST_RUN (docs/architecture.md, "Test tiers").

Each case is {packet in, maps seeded, expected verdict (return code and the
one counter moved), expected packet out, expected conntrack}. Expected
output frames are built from scratch by scapy (not derived from the
program's output), every rewritten frame is re-parsed and its checksums
recomputed by scapy, and a rewrite may only touch the bytes of the address,
the port and the two checksums.

Needs root (BPF_PROG_LOAD, BPF_PROG_TEST_RUN) and the object built by
`make` (build/sliceproxy_tc.bpf.o).

What this tier cannot see: BPF_PROG_TEST_RUN hands the program an skb with
ip_summed = CHECKSUM_NONE, so checksum offload states (CHECKSUM_PARTIAL from
a pod's veth, CHECKSUM_COMPLETE) and hence the BPF_F_PSEUDO_HDR flag make no
difference here; the netns tier (3) covers them. Linux also refuses to run
an IPv4 frame with fewer than 20 bytes of IP header (EINVAL), so the
shortest truncated header below is one whose options are cut.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from ctrl.dataplane import abi

from .packets import (
    BE1,
    BE2,
    BE3,
    CLIENT,
    CLIENT2,
    FORWARD,
    REPLY,
    TC_ACT_OK,
    TC_ACT_SHOT,
    TCP_P,
    UDP_P,
    UNKNOWN,
    VIP,
    VIP2,
    Backend,
    CtKey,
    CtVal,
    Seed,
    Svc,
    arp_request,
    changed_offsets,
    ct_dump,
    ct_key_bytes,
    ct_pair,
    del_backend,
    icmp_echo,
    ipv6_tcp,
    mapname,
    mapped,
    max_options,
    nat_offsets,
    prog_now,
    put_backend,
    put_service,
    put_slot,
    router_alert,
    run,
    seed,
    set_bytes,
    stamp,
    tcp,
    udp,
    verify_checksums,
)

# -- the fixture world -------------------------------------------------------
# Service ids and backend ids are deliberately different numbers, so a
# program that mixed them up would look up the wrong slot or backend.

CPORT = 40000

BE_WEB1 = Backend(1, BE1, 8080, TCP_P)
BE_DNS1 = Backend(2, BE1, 5353, UDP_P)
BE_WEB_SAMEPORT = Backend(3, BE2, 80, TCP_P)
BE_WEB2 = Backend(4, BE2, 8080, TCP_P)
BE_WEB3 = Backend(5, BE3, 8080, TCP_P)

WEB = Svc(VIP, 80, TCP_P, svc_id=10, slots=(BE_WEB1.id,))
DNS = Svc(VIP, 53, UDP_P, svc_id=11, slots=(BE_DNS1.id,))

WEB_SEED = Seed(services=(WEB,), backends=(BE_WEB1,))
DNS_SEED = Seed(services=(DNS,), backends=(BE_DNS1,))
BOTH_SEED = Seed(services=(WEB, DNS), backends=(BE_WEB1, BE_DNS1))

WEB_FLOW = ct_pair(CLIENT, CPORT, VIP, 80, BE_WEB1, WEB.svc_id, TCP_P)
DNS_FLOW = ct_pair(CLIENT, CPORT, VIP, 53, BE_DNS1, DNS.svc_id, UDP_P)
WEB_FWD = CtKey(CLIENT, VIP, CPORT, 80, TCP_P, FORWARD)
WEB_REV = CtKey(BE1, CLIENT, 8080, CPORT, TCP_P, REPLY)
DNS_FWD = CtKey(CLIENT, VIP, CPORT, 53, UDP_P, FORWARD)
DNS_REV = CtKey(BE1, CLIENT, 5353, CPORT, UDP_P, REPLY)

PAYLOAD = b"GET / HTTP/1.1\r\nHost: web\r\n\r\n"


def udp_payload_summing_to_zero(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A payload for which the UDP checksum of (src, dst, sport, dport)
    computes to 0x0000, which must go on the wire as 0xffff (RFC 768: zero
    means "no checksum")."""
    tail = b"sliceproxy"
    c = Ether(udp(src, dst, sport, dport, payload=b"\0\0" + tail))[UDP].chksum
    # The 16-bit word c added to a sum s whose complement is c gives 0xffff:
    # the complement, the checksum, becomes 0.
    payload = c.to_bytes(2, "big") + tail
    assert Ether(udp(src, dst, sport, dport, payload=payload))[UDP].chksum == 0xFFFF
    return payload


ZERO_SUM_PAYLOAD = udp_payload_summing_to_zero(CLIENT, BE1, CPORT, 5353)


def truncated_tcp() -> bytes:
    """A full IPv4 header (claiming a 40-byte TCP header) and only the
    first 10 bytes of the TCP header, addressed to the VIP."""
    full = tcp(CLIENT, VIP, CPORT, 80)
    return full[: 14 + 20 + 10]


def truncated_udp() -> bytes:
    full = udp(CLIENT, VIP, CPORT, 53)
    return full[: 14 + 20 + 4]


def ihl(pkt: bytes, words: int) -> bytes:
    """The frame with the IPv4 header length field forced to words."""
    return set_bytes(pkt, 14, bytes([0x40 | words]))


def fragment(offset_words: int, mf: bool) -> bytes:
    """A TCP SYN to the VIP marked as a fragment. Its bytes after the IP
    header still read as ports 40000 -> 80: only the fragment check stops
    a DNAT of one that is not the first."""
    return tcp(CLIENT, VIP, CPORT, 80, ip_flags="MF" if mf else "", frag=offset_words)


# -- single packets ------------------------------------------------------------


@dataclass
class Case:
    packet: bytes
    seed: Seed
    retval: int
    verdict: str  # SP_V_* without the prefix
    out: bytes | None = None  # None: the packet leaves byte for byte untouched
    # Conntrack entries this packet must create or overwrite; every seeded
    # entry not listed must stay as it was (value and last_seen).
    ct_new: dict[CtKey, CtVal] = field(default_factory=dict)
    # Seeded entries whose last_seen this packet must refresh.
    ct_touched: tuple[CtKey, ...] = ()
    # Which program: ingress (packets pods send: DNAT) or egress (packets
    # into pods: reverse NAT of replies).
    egress: bool = False


def passed(packet: bytes, verdict: str, s: Seed = BOTH_SEED) -> Case:
    return Case(packet, s, TC_ACT_OK, verdict)


def dropped(packet: bytes, verdict: str, s: Seed) -> Case:
    return Case(packet, s, TC_ACT_SHOT, verdict)


CASES = [
    # --- DNAT of a new flow -------------------------------------------------
    pytest.param(
        Case(
            tcp(CLIENT, VIP, CPORT, 80),
            WEB_SEED,
            TC_ACT_OK,
            "DNAT_NEW",
            out=tcp(CLIENT, BE1, CPORT, 8080),
            ct_new=WEB_FLOW,
        ),
        id="tcp-syn-to-vip-dnat-new",
    ),
    pytest.param(
        Case(
            tcp(CLIENT, VIP, CPORT, 80, flags="PA", payload=PAYLOAD),
            WEB_SEED,
            TC_ACT_OK,
            "DNAT_NEW",
            out=tcp(CLIENT, BE1, CPORT, 8080, flags="PA", payload=PAYLOAD),
            ct_new=WEB_FLOW,
        ),
        id="tcp-data-to-vip-dnat-new",
    ),
    pytest.param(
        Case(
            tcp(CLIENT, VIP, CPORT, 80),
            Seed(services=(Svc(VIP, 80, TCP_P, 10, slots=(3,)),), backends=(BE_WEB_SAMEPORT,)),
            TC_ACT_OK,
            "DNAT_NEW",
            out=tcp(CLIENT, BE2, CPORT, 80),
            ct_new=ct_pair(CLIENT, CPORT, VIP, 80, BE_WEB_SAMEPORT, 10, TCP_P),
        ),
        id="tcp-backend-same-port-only-address-rewritten",
    ),
    pytest.param(
        Case(
            tcp(CLIENT, VIP, CPORT, 80, ip_options=router_alert()),
            WEB_SEED,
            TC_ACT_OK,
            "DNAT_NEW",
            out=tcp(CLIENT, BE1, CPORT, 8080, ip_options=router_alert()),
            ct_new=WEB_FLOW,
        ),
        id="tcp-ip-options-ihl6-dnat",
    ),
    pytest.param(
        Case(
            tcp(CLIENT, VIP, CPORT, 80, flags="PA", payload=PAYLOAD, ip_options=max_options()),
            WEB_SEED,
            TC_ACT_OK,
            "DNAT_NEW",
            out=tcp(CLIENT, BE1, CPORT, 8080, flags="PA", payload=PAYLOAD, ip_options=max_options()),
            ct_new=WEB_FLOW,
        ),
        id="tcp-ip-options-ihl15-dnat",
    ),
    pytest.param(
        Case(
            tcp(CLIENT, VIP, CPORT, 80, ip_flags="DF"),
            WEB_SEED,
            TC_ACT_OK,
            "DNAT_NEW",
            out=tcp(CLIENT, BE1, CPORT, 8080, ip_flags="DF"),
            ct_new=WEB_FLOW,
        ),
        id="tcp-dont-fragment-is-not-a-fragment",
    ),
    pytest.param(
        Case(
            udp(CLIENT, VIP, CPORT, 53),
            DNS_SEED,
            TC_ACT_OK,
            "DNAT_NEW",
            out=udp(CLIENT, BE1, CPORT, 5353),
            ct_new=DNS_FLOW,
        ),
        id="udp-to-vip-dnat-new",
    ),
    pytest.param(
        Case(
            udp(CLIENT, VIP, CPORT, 53, chksum=0),
            DNS_SEED,
            TC_ACT_OK,
            "DNAT_NEW",
            out=udp(CLIENT, BE1, CPORT, 5353, chksum=0),
            ct_new=DNS_FLOW,
        ),
        id="udp-checksum-0-stays-0",
    ),
    pytest.param(
        Case(
            udp(CLIENT, VIP, CPORT, 53, payload=ZERO_SUM_PAYLOAD),
            DNS_SEED,
            TC_ACT_OK,
            "DNAT_NEW",
            out=udp(CLIENT, BE1, CPORT, 5353, payload=ZERO_SUM_PAYLOAD),
            ct_new=DNS_FLOW,
        ),
        id="udp-checksum-computing-to-0-sent-as-ffff",
    ),
    pytest.param(
        Case(
            udp(CLIENT, VIP, CPORT, 53, ip_options=router_alert()),
            DNS_SEED,
            TC_ACT_OK,
            "DNAT_NEW",
            out=udp(CLIENT, BE1, CPORT, 5353, ip_options=router_alert()),
            ct_new=DNS_FLOW,
        ),
        id="udp-ip-options-dnat",
    ),
    # --- a flow already in conntrack -------------------------------------------
    pytest.param(
        Case(
            tcp(CLIENT, VIP, CPORT, 80, flags="A"),
            Seed(services=(Svc(VIP, 80, TCP_P, 10, slots=(BE_WEB2.id,)),), backends=(BE_WEB1, BE_WEB2), ct=WEB_FLOW),
            TC_ACT_OK,
            "DNAT_ESTABLISHED",
            out=tcp(CLIENT, BE1, CPORT, 8080, flags="A"),
            ct_touched=(WEB_FWD,),
        ),
        id="established-keeps-backend-not-in-slots",
    ),
    pytest.param(
        Case(
            udp(CLIENT, VIP, CPORT, 53),
            Seed(services=(DNS,), backends=(BE_DNS1,), ct=DNS_FLOW),
            TC_ACT_OK,
            "DNAT_ESTABLISHED",
            out=udp(CLIENT, BE1, CPORT, 5353),
            ct_touched=(DNS_FWD,),
        ),
        id="udp-established",
    ),
    pytest.param(
        Case(
            tcp(CLIENT, VIP, CPORT, 80, flags="A"),
            Seed(services=(Svc(VIP, 80, TCP_P, 10, slots=(BE_WEB2.id,)),), backends=(BE_WEB2,), ct=WEB_FLOW),
            TC_ACT_OK,
            "DNAT_NEW",
            out=tcp(CLIENT, BE2, CPORT, 8080, flags="A"),
            ct_new=ct_pair(CLIENT, CPORT, VIP, 80, BE_WEB2, 10, TCP_P),
        ),
        id="established-backend-deleted-repicked",
    ),
    pytest.param(
        Case(
            tcp(CLIENT, VIP, CPORT, 80, flags="A"),
            Seed(services=(WEB,), backends=(Backend(BE_WEB1.id, BE3, 8080, TCP_P),), ct=WEB_FLOW),
            TC_ACT_OK,
            "DNAT_NEW",
            out=tcp(CLIENT, BE3, CPORT, 8080, flags="A"),
            ct_new=ct_pair(CLIENT, CPORT, VIP, 80, Backend(BE_WEB1.id, BE3, 8080, TCP_P), 10, TCP_P),
        ),
        id="established-backend-id-reused-other-address-repicked",
    ),
    pytest.param(
        Case(
            tcp(CLIENT, VIP, CPORT, 80, flags="A"),
            Seed(services=(WEB,), backends=(Backend(BE_WEB1.id, BE1, 9090, TCP_P),), ct=WEB_FLOW),
            TC_ACT_OK,
            "DNAT_NEW",
            out=tcp(CLIENT, BE1, CPORT, 9090, flags="A"),
            ct_new=ct_pair(CLIENT, CPORT, VIP, 80, Backend(BE_WEB1.id, BE1, 9090, TCP_P), 10, TCP_P),
        ),
        id="established-backend-id-reused-other-port-repicked",
    ),
    pytest.param(
        Case(
            tcp(CLIENT, VIP, CPORT, 80, flags="A"),
            Seed(services=(Svc(VIP, 80, TCP_P, 12, slots=(BE_WEB2.id,)),), backends=(BE_WEB1, BE_WEB2), ct=WEB_FLOW),
            TC_ACT_OK,
            "DNAT_NEW",
            out=tcp(CLIENT, BE2, CPORT, 8080, flags="A"),
            ct_new=ct_pair(CLIENT, CPORT, VIP, 80, BE_WEB2, 12, TCP_P),
        ),
        id="established-of-another-service-id-repicked",
    ),
    # --- replies: reverse NAT ---------------------------------------------------
    pytest.param(
        Case(
            tcp(BE1, CLIENT, 8080, CPORT, flags="SA"),
            Seed(WEB_SEED.services, WEB_SEED.backends, WEB_FLOW),
            TC_ACT_OK,
            "REVNAT",
            out=tcp(VIP, CLIENT, 80, CPORT, flags="SA"),
            ct_touched=(WEB_REV,),
            egress=True,
        ),
        id="tcp-reply-revnat",
    ),
    pytest.param(
        Case(
            tcp(BE1, CLIENT, 8080, CPORT, flags="PA", payload=PAYLOAD, ip_options=router_alert()),
            Seed(WEB_SEED.services, WEB_SEED.backends, WEB_FLOW),
            TC_ACT_OK,
            "REVNAT",
            out=tcp(VIP, CLIENT, 80, CPORT, flags="PA", payload=PAYLOAD, ip_options=router_alert()),
            ct_touched=(WEB_REV,),
            egress=True,
        ),
        id="tcp-reply-ip-options-revnat",
    ),
    pytest.param(
        Case(
            udp(BE1, CLIENT, 5353, CPORT),
            Seed(DNS_SEED.services, DNS_SEED.backends, DNS_FLOW),
            TC_ACT_OK,
            "REVNAT",
            out=udp(VIP, CLIENT, 53, CPORT),
            ct_touched=(DNS_REV,),
            egress=True,
        ),
        id="udp-reply-revnat",
    ),
    pytest.param(
        Case(
            udp(BE1, CLIENT, 5353, CPORT, chksum=0),
            Seed(DNS_SEED.services, DNS_SEED.backends, DNS_FLOW),
            TC_ACT_OK,
            "REVNAT",
            out=udp(VIP, CLIENT, 53, CPORT, chksum=0),
            ct_touched=(DNS_REV,),
            egress=True,
        ),
        id="udp-reply-checksum-0-stays-0",
    ),
    pytest.param(
        replace(passed(tcp(BE1, CLIENT, 8080, CPORT, flags="SA"), "PASS_NO_FLOW", WEB_SEED), egress=True),
        id="reply-without-conntrack-passed",
    ),
    pytest.param(
        replace(
            passed(udp(BE1, CLIENT, 8080, CPORT), "PASS_NO_FLOW", Seed(WEB_SEED.services, WEB_SEED.backends, WEB_FLOW)),
            egress=True,
        ),
        id="reply-other-protocol-passed",
    ),
    pytest.param(
        replace(
            passed(
                tcp(BE1, CLIENT2, 8080, CPORT, flags="SA"),
                "PASS_NO_FLOW",
                Seed(WEB_SEED.services, WEB_SEED.backends, WEB_FLOW),
            ),
            egress=True,
        ),
        id="reply-to-other-client-passed",
    ),
    pytest.param(
        # Only a forward entry for (client -> VIP:80): the direction is part
        # of the key, so it must not reverse-NAT.
        replace(
            passed(tcp(CLIENT, VIP, CPORT, 80), "PASS_NO_FLOW", Seed(ct={WEB_FWD: WEB_FLOW[WEB_FWD]})), egress=True
        ),
        id="forward-entry-never-used-as-reply",
    ),
    pytest.param(
        # Egress never DNATs: a packet to a frontend on its way into a pod is
        # not a request this node's pods sent.
        replace(passed(tcp(CLIENT, VIP, CPORT, 80), "PASS_NO_FLOW", WEB_SEED), egress=True),
        id="egress-never-dnats",
    ),
    pytest.param(
        # Ingress never reverse-NATs: netfilter must see the reply as the
        # backend sent it (see sp_tc_egress).
        passed(
            tcp(BE1, CLIENT, 8080, CPORT, flags="SA"),
            "PASS_NO_SERVICE",
            Seed(WEB_SEED.services, WEB_SEED.backends, WEB_FLOW),
        ),
        id="ingress-leaves-replies-alone",
    ),
    # --- no frontend: passed untouched ---------------------------------------
    pytest.param(passed(tcp(CLIENT, UNKNOWN, CPORT, 80), "PASS_NO_SERVICE"), id="tcp-unknown-address"),
    pytest.param(passed(udp(CLIENT, UNKNOWN, CPORT, 53), "PASS_NO_SERVICE"), id="udp-unknown-address"),
    pytest.param(passed(tcp(CLIENT, VIP2, CPORT, 80), "PASS_NO_SERVICE"), id="tcp-other-vip"),
    pytest.param(passed(tcp(CLIENT, VIP, CPORT, 81), "PASS_NO_SERVICE"), id="tcp-vip-other-port"),
    pytest.param(passed(tcp(CLIENT, VIP, CPORT, 53), "PASS_NO_SERVICE", DNS_SEED), id="tcp-to-udp-only-frontend"),
    pytest.param(passed(udp(CLIENT, VIP, CPORT, 80), "PASS_NO_SERVICE", WEB_SEED), id="udp-to-tcp-only-frontend"),
    pytest.param(
        # The program sits on pod interfaces: in-cluster traffic, internal scope.
        passed(
            tcp(CLIENT, VIP, CPORT, 80),
            "PASS_NO_SERVICE",
            Seed(services=(Svc(VIP, 80, TCP_P, 10, slots=(1,), scope=1),), backends=(BE_WEB1,)),
        ),
        id="frontend-only-in-external-scope",
    ),
    # --- not ours: passed untouched -------------------------------------------
    pytest.param(passed(arp_request(CLIENT, VIP), "PASS_NOT_IP"), id="arp"),
    pytest.param(passed(ipv6_tcp(CPORT, 80), "PASS_NO_SERVICE"), id="ipv6-no-frontend"),
    pytest.param(passed(icmp_echo(CLIENT, VIP), "PASS_OTHER_PROTO"), id="icmp-to-vip"),
    # A first fragment (MF, offset 0) is translated: tests/datapath/test_frag.py.
    # The others, with no first fragment seen, pass untouched.
    pytest.param(passed(fragment(185, mf=True), "PASS_FRAGMENT"), id="fragment-middle-offset-and-mf"),
    pytest.param(passed(fragment(185, mf=False), "PASS_FRAGMENT"), id="fragment-last-offset-only"),
    pytest.param(passed(fragment(1, mf=False), "PASS_FRAGMENT"), id="fragment-offset-1"),
    # Linux (6.18) refuses to BPF_PROG_TEST_RUN an IPv4 frame with less than
    # 20 bytes of IP header (EINVAL), so the shortest truncated header these
    # tests can feed is one whose options are cut.
    pytest.param(
        passed(tcp(CLIENT, VIP, CPORT, 80, ip_options=router_alert())[: 14 + 22], "PASS_TRUNCATED"),
        id="truncated-ipv4-header-options-cut",
    ),
    pytest.param(passed(tcp(CLIENT, VIP, CPORT, 80)[: 14 + 20], "PASS_TRUNCATED"), id="ipv4-header-without-tcp"),
    pytest.param(passed(truncated_tcp(), "PASS_TRUNCATED"), id="truncated-tcp-header"),
    pytest.param(passed(truncated_udp(), "PASS_TRUNCATED"), id="truncated-udp-header"),
    pytest.param(
        passed(ihl(tcp(CLIENT, VIP, CPORT, 80, ip_options=router_alert()), 15), "PASS_TRUNCATED"),
        id="ihl-beyond-packet",
    ),
    pytest.param(passed(ihl(tcp(CLIENT, VIP, CPORT, 80), 4), "PASS_TRUNCATED"), id="ihl-below-5"),
    pytest.param(
        # Ethertype IPv4 but version 6 in the header: not IPv4, passed.
        passed(set_bytes(tcp(CLIENT, VIP, CPORT, 80), 14, b"\x65"), "PASS_NOT_IP"),
        id="ipv4-ethertype-version-6",
    ),
    # --- dropped ----------------------------------------------------------------
    pytest.param(
        dropped(tcp(CLIENT, VIP, CPORT, 80), "DROP_NO_BACKEND", Seed(services=(Svc(VIP, 80, TCP_P, 10),))),
        id="tcp-service-without-backend",
    ),
    pytest.param(
        dropped(udp(CLIENT, VIP, CPORT, 53), "DROP_NO_BACKEND", Seed(services=(Svc(VIP, 53, UDP_P, 11),))),
        id="udp-service-without-backend",
    ),
    pytest.param(
        dropped(
            tcp(CLIENT, VIP, CPORT, 80),
            "DROP_ERROR",
            Seed(services=(Svc(VIP, 80, TCP_P, 10, count=1),), backends=(BE_WEB1,)),
        ),
        id="count-without-slot",
    ),
    pytest.param(
        dropped(tcp(CLIENT, VIP, CPORT, 80), "DROP_ERROR", Seed(services=(Svc(VIP, 80, TCP_P, 10, slots=(99,)),))),
        id="slot-without-backend",
    ),
]


def check_run(dp, case: Case) -> None:
    before = ct_dump(dp)
    r = run(dp, case.packet, egress=case.egress)

    assert r.retval == case.retval, f"return code {r.retval}, expected {case.retval}"
    assert r.counted == {case.verdict: (1, len(case.packet))}, f"counters moved: {r.counted}"

    if case.out is None:
        assert r.out == case.packet, "the packet was changed: " + Ether(r.out).summary()
    else:
        assert case.out != case.packet
        parsed = verify_checksums(r.out)
        assert r.out == case.out, (
            f"got      {Ether(r.out).summary()}\nexpected {Ether(case.out).summary()}\n"
            f"got      {r.out.hex()}\nexpected {case.out.hex()}"
        )
        which = "src" if case.verdict == "REVNAT" else "dst"
        extra = changed_offsets(case.packet, r.out) - nat_offsets(case.packet, which)
        assert not extra, f"bytes changed outside {which} address, port and checksums: {sorted(extra)}"
        if UDP in parsed and Ether(case.packet)[UDP].chksum == 0:
            assert parsed[UDP].chksum == 0

    after = ct_dump(dp)
    expected = {k: v for k, (v, _) in before.items()}
    expected.update(case.ct_new)
    assert {k: v for k, (v, _) in after.items()} == expected
    fresh = set(case.ct_new) | set(case.ct_touched)
    for k, (_, last_seen) in after.items():
        if k in fresh:
            assert r.t0 <= last_seen <= r.t1, f"{k}: last_seen {last_seen} not set during the run"
        else:
            assert last_seen == before[k][1], f"{k}: last_seen changed"


@pytest.mark.parametrize("case", CASES)
def test_packet(dp, case: Case):
    seed(dp, case.seed)
    assert {k: v for k, (v, _) in ct_dump(dp).items()} == case.seed.ct
    check_run(dp, case)


# -- flows: several packets through the same maps ----------------------------

FLOWS = [
    pytest.param(
        TCP_P,
        lambda sport, **kw: tcp(CLIENT, VIP, sport, 80, flags=kw.get("flags", "S")),
        lambda dst, dport, sport, **kw: tcp(CLIENT, dst, sport, dport, flags=kw.get("flags", "S")),
        id="tcp",
    ),
    pytest.param(
        UDP_P,
        lambda sport, **kw: udp(CLIENT, VIP, sport, 80),
        lambda dst, dport, sport, **kw: udp(CLIENT, dst, sport, dport),
        id="udp",
    ),
]


def two_backends(proto: int) -> tuple[Svc, Backend, Backend]:
    return (
        Svc(VIP, 80, proto, 20, slots=(7,)),
        Backend(7, BE1, 8080, proto),
        Backend(8, BE2, 8081, proto),
    )


def new_flow(to_vip, to_be, cport: int, be: Backend, proto: int, flags: str = "S") -> Case:
    """A client packet to VIP:80 that opens a flow on `be` (service 20)."""
    return Case(
        to_vip(cport, flags=flags),
        Seed(),
        TC_ACT_OK,
        "DNAT_NEW",
        out=to_be(be.addr, be.port, cport, flags=flags),
        ct_new=ct_pair(CLIENT, cport, VIP, 80, be, 20, proto),
    )


def established(to_vip, to_be, cport: int, be: Backend, proto: int) -> Case:
    """A client packet of a flow already on `be`: kept there, entry touched."""
    return Case(
        to_vip(cport, flags="A"),
        Seed(),
        TC_ACT_OK,
        "DNAT_ESTABLISHED",
        out=to_be(be.addr, be.port, cport, flags="A"),
        ct_touched=(CtKey(CLIENT, VIP, cport, 80, proto, FORWARD),),
    )


@pytest.mark.parametrize(("proto", "to_vip", "to_be"), FLOWS)
def test_flow_keeps_backend_when_slots_rewritten(dp, proto, to_vip, to_be):
    svc, b1, b2 = two_backends(proto)
    seed(dp, Seed(services=(svc,), backends=(b1, b2)))
    check_run(dp, new_flow(to_vip, to_be, CPORT, b1, proto))

    put_slot(dp, svc.svc_id, 0, b2.id)  # the control plane moves slot 0 to b2

    check_run(dp, established(to_vip, to_be, CPORT, b1, proto))
    # A new flow follows the slots.
    check_run(dp, new_flow(to_vip, to_be, CPORT + 1, b2, proto))


@pytest.mark.parametrize(("proto", "to_vip", "to_be"), FLOWS)
def test_flow_moves_when_backend_deleted(dp, proto, to_vip, to_be):
    svc, b1, b2 = two_backends(proto)
    seed(dp, Seed(services=(svc,), backends=(b1,)))
    check_run(dp, new_flow(to_vip, to_be, CPORT, b1, proto))

    # The control plane's order: the new backend and slot, then the delete.
    put_backend(dp, b2)
    put_slot(dp, svc.svc_id, 0, b2.id)
    del_backend(dp, b1.id)

    check_run(dp, new_flow(to_vip, to_be, CPORT, b2, proto, flags="A"))
    # From now on the flow is established on b2.
    check_run(dp, established(to_vip, to_be, CPORT, b2, proto))


@pytest.mark.parametrize("proto", [pytest.param(TCP_P, id="tcp"), pytest.param(UDP_P, id="udp")])
def test_evicted_reply_entry_is_restored_by_the_next_forward_packet(dp, proto):
    """The LRU can evict a flow's reply entry alone; the next packet from the
    client puts it back, so the backend's answer is still reverse-NATed."""
    svc, b1, _ = two_backends(proto)
    seed(dp, Seed(services=(svc,), backends=(b1,)))
    mk = tcp if proto == TCP_P else udp
    pair = ct_pair(CLIENT, CPORT, VIP, 80, b1, 20, proto)
    check_run(
        dp,
        Case(mk(CLIENT, VIP, CPORT, 80), Seed(), TC_ACT_OK, "DNAT_NEW", out=mk(CLIENT, BE1, CPORT, 8080), ct_new=pair),
    )
    rev = CtKey(BE1, CLIENT, 8080, CPORT, proto, REPLY)
    assert dp.maps[mapname("sp_ct")].delete(ct_key_bytes(rev))
    check_run(
        dp,
        Case(
            mk(CLIENT, VIP, CPORT, 80),
            Seed(),
            TC_ACT_OK,
            "DNAT_ESTABLISHED",
            out=mk(CLIENT, BE1, CPORT, 8080),
            ct_new={rev: pair[rev]},
            ct_touched=(CtKey(CLIENT, VIP, CPORT, 80, proto, FORWARD),),
        ),
    )
    check_run(
        dp,
        Case(
            mk(BE1, CLIENT, 8080, CPORT),
            Seed(),
            TC_ACT_OK,
            "REVNAT",
            out=mk(VIP, CLIENT, 80, CPORT),
            ct_touched=(rev,),
            egress=True,
        ),
    )


@pytest.mark.parametrize("proto", [pytest.param(TCP_P, id="tcp"), pytest.param(UDP_P, id="udp")])
def test_round_trip(dp, proto):
    """The reply entry the program itself wrote turns the backend's answer
    into exactly the packet the client expects from the VIP."""
    svc, b1, _ = two_backends(proto)
    seed(dp, Seed(services=(svc,), backends=(b1,)))
    if proto == TCP_P:

        def mk(src, dst, sport, dport, flags):
            return tcp(src, dst, sport, dport, flags=flags, payload=PAYLOAD if "P" in flags else b"")
    else:

        def mk(src, dst, sport, dport, flags):
            return udp(src, dst, sport, dport, payload=flags.encode())

    check_run(
        dp,
        Case(
            mk(CLIENT, VIP, CPORT, 80, "S"),
            Seed(),
            TC_ACT_OK,
            "DNAT_NEW",
            out=mk(CLIENT, BE1, CPORT, 8080, "S"),
            ct_new=ct_pair(CLIENT, CPORT, VIP, 80, b1, 20, proto),
        ),
    )
    rev = CtKey(BE1, CLIENT, 8080, CPORT, proto, REPLY)
    check_run(
        dp,
        Case(
            mk(BE1, CLIENT, 8080, CPORT, "SA"),
            Seed(),
            TC_ACT_OK,
            "REVNAT",
            out=mk(VIP, CLIENT, 80, CPORT, "SA"),
            ct_touched=(rev,),
            egress=True,
        ),
    )
    check_run(
        dp,
        Case(
            mk(CLIENT, VIP, CPORT, 80, "PA"),
            Seed(),
            TC_ACT_OK,
            "DNAT_ESTABLISHED",
            out=mk(CLIENT, BE1, CPORT, 8080, "PA"),
            ct_touched=(CtKey(CLIENT, VIP, CPORT, 80, proto, FORWARD),),
        ),
    )
    check_run(
        dp,
        Case(
            mk(BE1, CLIENT, 8080, CPORT, "PA"),
            Seed(),
            TC_ACT_OK,
            "REVNAT",
            out=mk(VIP, CLIENT, 80, CPORT, "PA"),
            ct_touched=(rev,),
            egress=True,
        ),
    )


def test_new_flows_spread_over_all_backends(dp):
    """300 new flows over 3 backends. Each backend's share is Binomial(300,
    1/3): mean 100, sd 8.2; below 40 is more than 7 sd away (p < 1e-12), so
    this fails only when selection does not use every slot about evenly."""
    backends = [Backend(101, BE1, 8080), Backend(102, BE2, 8080), Backend(103, BE3, 8080)]
    web = Svc(VIP, 80, TCP_P, 7, slots=tuple(b.id for b in backends))
    # A decoy service whose slots lead elsewhere: picking slots by the wrong
    # service id would send flows to 198.18.4.x.
    decoys = [Backend(201 + i, f"198.18.4.{i + 1}", 9999) for i in range(3)]
    decoy = Svc(VIP2, 80, TCP_P, 8, slots=tuple(b.id for b in decoys))
    seed(dp, Seed(services=(web, decoy), backends=(*backends, *decoys)))

    n = 300
    by_addr = {b.addr: b for b in backends}
    seen: Counter[str] = Counter()
    for i in range(n):
        sport = 20000 + i
        pkt = tcp(CLIENT, VIP, sport, 80)
        r = run(dp, pkt)
        assert r.retval == TC_ACT_OK and r.counted == {"DNAT_NEW": (1, len(pkt))}, r.counted
        p = verify_checksums(r.out)
        assert p[IP].dst in by_addr, f"flow {sport} sent to {p[IP].dst}"
        assert p[TCP].dport == 8080
        assert r.out == tcp(CLIENT, p[IP].dst, sport, 8080)
        seen[p[IP].dst] += 1

    assert set(seen) == set(by_addr), f"backends reached: {dict(seen)}"
    assert min(seen.values()) >= 40, f"uneven spread: {dict(seen)}"

    # Every flow has its pair of conntrack entries, naming the backend it got.
    ct = {k: v for k, (v, _) in ct_dump(dp).items()}
    assert len(ct) == 2 * n
    for k, v in ct.items():
        if k.dir == FORWARD:
            b = by_addr[v.nat_addr]
            assert v == CtVal(b.addr, 8080, b.id, 7)
            assert ct[CtKey(b.addr, CLIENT, 8080, k.sport, TCP_P, REPLY)] == CtVal(VIP, 80, b.id, 7)


def test_frontends_sharing_a_slot_table(dp):
    """Two frontends read slot table 50 (their slots_id): flows to either
    reach its backends and are recorded under their own frontend's id. Each
    frontend's own id holds decoy slots: a lookup by svc_id would use them.
    Under affinity the sticky entry is the frontend's, its slot the table's."""
    backends = [Backend(101, BE1, 8080), Backend(102, BE2, 8080), Backend(103, BE3, 8080)]
    decoys = [Backend(201 + i, f"198.18.4.{i + 1}", 9999) for i in range(3)]
    table = Svc(VIP, 80, TCP_P, 7, slots=tuple(b.id for b in backends), slots_id=50)
    other = Svc(VIP2, 80, TCP_P, 8, count=3, slots_id=50, affinity_timeout=60)
    decoy7 = Svc(VIP, 81, TCP_P, 7, slots=tuple(b.id for b in decoys))  # its own table: id 7
    decoy8 = Svc(VIP2, 81, TCP_P, 8, slots=tuple(b.id for b in decoys))
    seed(dp, Seed(services=(decoy7, decoy8, table, other), backends=(*backends, *decoys)))
    by_addr = {b.addr: b for b in backends}
    to_vip = {backend_of(dp, tcp(CLIENT, VIP, 20000 + i, 80)) for i in range(60)}
    assert to_vip == set(by_addr), to_vip
    to_vip2 = {backend_of(dp, tcp(CLIENT, VIP2, 20000 + i, 80)) for i in range(30)}
    assert len(to_vip2) == 1 and to_vip2 <= set(by_addr), to_vip2  # sticky
    ct = {k: v for k, (v, _) in ct_dump(dp).items() if k.dir == FORWARD}
    assert {v.svc_id for k, v in ct.items() if k.daddr == VIP} == {7}
    assert {v.svc_id for k, v in ct.items() if k.daddr == VIP2} == {8}
    vc = abi.codec("sp_aff_val", ("backend_id", "slot", "last_used"))
    be_id, slot, _ = vc.unpack(dp.maps[mapname("sp_aff")].lookup(aff_key(8, CLIENT)))
    assert by_addr[to_vip2.pop()].id == be_id == table.slots[slot]


# -- sessionAffinity ClientIP --------------------------------------------------

AFF_BACKENDS = (BE_WEB1, BE_WEB2, BE_WEB3)


def aff_key(svc_id: int, client: str) -> bytes:
    return abi.pack("sp_aff_key", svc_id=svc_id, addr=mapped(client))


def backend_of(dp, pkt: bytes) -> str:
    retval, out, _ = dp.test_run(pkt)
    assert retval == TC_ACT_OK
    return Ether(out)[IP].dst


def test_affinity_keeps_a_clients_new_flows_on_one_backend(dp):
    seed(dp, Seed(services=(Svc(VIP, 80, TCP_P, 30, slots=(1, 4, 5), affinity_timeout=60),), backends=AFF_BACKENDS))
    seen = {backend_of(dp, tcp(CLIENT, VIP, 20000 + i, 80)) for i in range(60)}
    assert len(seen) == 1, seen
    # Another client is free to land elsewhere, and sticks as well.
    others = {backend_of(dp, tcp(CLIENT2, VIP, 20000 + i, 80)) for i in range(60)}
    assert len(others) == 1
    assert dp.maps[mapname("sp_aff")].lookup(aff_key(30, CLIENT)) is not None


def test_without_affinity_new_flows_spread(dp):
    seed(dp, Seed(services=(Svc(VIP, 80, TCP_P, 30, slots=(1, 4, 5)),), backends=AFF_BACKENDS))
    seen = {backend_of(dp, tcp(CLIENT, VIP, 20000 + i, 80)) for i in range(60)}
    assert len(seen) == 3, seen
    assert dp.maps[mapname("sp_aff")].items() == []


@pytest.mark.parametrize(
    "slot,backend_id,age_s,sticks",
    [
        pytest.param(2, 5, 1, True, id="recent-entry-sticks"),
        pytest.param(2, 5, 120, False, id="expired-entry-repicks"),
        pytest.param(2, 5, 59, True, id="entry-just-within-timeout-sticks"),
        pytest.param(2, 5, 61, False, id="entry-just-past-timeout-repicks"),
        # Another CPU stamped the entry after this one read its clock: the
        # stamp is ahead of now, idle 0, not 584 years (1 s ahead here, so
        # that it still is when the packet runs).
        pytest.param(2, 5, -1, True, id="stamp-ahead-of-now-sticks"),
        pytest.param(2, 1, 1, False, id="slot-rewritten-since-repicks"),
        pytest.param(7, 5, 1, False, id="slot-beyond-count-repicks"),
    ],
)
def test_affinity_entry_rules(dp, uptime, slot, backend_id, age_s, sticks):
    seed(dp, Seed(services=(Svc(VIP, 80, TCP_P, 30, slots=(1, 4, 5), affinity_timeout=60),), backends=AFF_BACKENDS))
    vc = abi.codec("sp_aff_val", ("backend_id", "slot", "last_used"))
    firsts = []
    # Each round: the entry as the case has it, then one new flow. Sticking
    # always gives BE3 (slot 2); a fresh pick is uniform, so twelve rounds
    # all on one backend would happen with probability 3 * (1/3)**12.
    for i in range(12):
        now = prog_now(dp)
        dp.maps[mapname("sp_aff")].update(aff_key(30, CLIENT), vc.pack(backend_id, slot, stamp(dp, age_s)))
        firsts.append(backend_of(dp, tcp(CLIENT, VIP, 30000 + i, 80)))
        be, s_, last = vc.unpack(dp.maps[mapname("sp_aff")].lookup(aff_key(30, CLIENT)))
        # Refreshed (stamped after `now`, modulo 2**64), and naming a valid slot.
        assert 0 < (last - now) % 2**64 < 2**63 and s_ < 3
    if sticks:
        assert set(firsts) == {BE3}
    else:
        assert len(set(firsts)) > 1, firsts


# -- IPv6 ----------------------------------------------------------------------

V6_CLIENT, V6_VIP, V6_BE = "2001:db8:1::2", "2001:db8:ffff::10", "2001:db8:1::11"


def seed_v6(dp, proto: int, backend_addr: str = V6_BE) -> None:
    put_backend(dp, Backend(9, backend_addr, 8080, proto))
    put_service(dp, Svc(V6_VIP, 80, proto, svc_id=40, slots=(9,)))


def v6_packet(l4, src: str, dst: str, ext=None) -> bytes:
    from scapy.layers.inet6 import IPv6

    ip = IPv6(src=src, dst=dst)
    frame = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    return bytes(frame / (ip / ext / l4 if ext is not None else ip / l4))


def checksum_ok(raw: bytes, layer) -> bool:
    from scapy.layers.inet6 import IPv6

    pkt = Ether(raw)
    got = pkt[layer].chksum
    del pkt[layer].chksum
    return Ether(bytes(pkt))[layer].chksum == got and IPv6 in pkt


@pytest.mark.parametrize("proto,layer", [pytest.param(TCP_P, TCP, id="tcp"), pytest.param(UDP_P, UDP, id="udp")])
def test_ipv6_dnat_and_reverse_nat(dp, proto, layer):
    from scapy.layers.inet6 import IPv6

    seed_v6(dp, proto)
    l4 = (TCP(sport=40000, dport=80, flags="S") if proto == TCP_P else UDP(sport=40000, dport=80)) / b"hello"
    retval, out, _ = dp.test_run(v6_packet(l4, V6_CLIENT, V6_VIP))
    assert retval == TC_ACT_OK
    pkt = Ether(out)
    assert (pkt[IPv6].src, pkt[IPv6].dst, pkt[layer].sport, pkt[layer].dport) == (V6_CLIENT, V6_BE, 40000, 8080)
    assert checksum_ok(out, layer) and bytes(pkt[layer].payload) == b"hello"

    back = (TCP(sport=8080, dport=40000, flags="SA") if proto == TCP_P else UDP(sport=8080, dport=40000)) / b"world"
    retval, out, _ = dp.test_run(v6_packet(back, V6_BE, V6_CLIENT), egress=True)
    assert retval == TC_ACT_OK
    pkt = Ether(out)
    assert (pkt[IPv6].src, pkt[IPv6].dst, pkt[layer].sport, pkt[layer].dport) == (V6_VIP, V6_CLIENT, 80, 40000)
    assert checksum_ok(out, layer)


@pytest.mark.parametrize(
    "ext,verdict",
    [
        # A first fragment is translated (test_frag.py); another, whose
        # first fragment was never seen here, passes.
        pytest.param("frag", "PASS_FRAGMENT", id="fragment-header-not-first"),
        pytest.param("hop", "PASS_OTHER_PROTO", id="hop-by-hop-header-not-walked"),
    ],
)
def test_ipv6_extension_headers_are_passed_untouched(dp, ext, verdict):
    from scapy.layers.inet6 import IPv6ExtHdrFragment, IPv6ExtHdrHopByHop

    seed_v6(dp, TCP_P)
    hdr = IPv6ExtHdrFragment(m=1, offset=185) if ext == "frag" else IPv6ExtHdrHopByHop()
    pkt = v6_packet(TCP(sport=40000, dport=80), V6_CLIENT, V6_VIP, ext=hdr)
    r = run(dp, pkt)
    assert r.retval == TC_ACT_OK and r.out == pkt and set(r.counted) == {verdict}


def test_backend_of_the_other_family_is_never_used(dp):
    seed_v6(dp, TCP_P, backend_addr="198.18.2.1")
    r = run(dp, v6_packet(TCP(sport=40000, dport=80), V6_CLIENT, V6_VIP))
    assert r.retval == TC_ACT_SHOT and set(r.counted) == {"DROP_ERROR"}


# -- draining backends ---------------------------------------------------------


@pytest.mark.parametrize(
    "flags,draining,stays",
    [
        pytest.param("A", True, True, id="established-packet-stays-on-draining-backend"),
        pytest.param("S", False, True, id="syn-stays-on-serving-backend"),
        pytest.param("S", True, False, id="syn-reusing-ports-leaves-draining-backend"),
    ],
)
def test_syn_with_a_stale_entry_to_a_draining_backend_is_a_new_connection(dp, flags, draining, stays):
    """A client port reused after its old connection closed finds the old
    conntrack entry; if that backend drains (it left the service), the SYN
    must get a serving backend, as netfilter re-balances a SYN on a closed
    entry."""
    old = Backend(7, BE1, 8080, TCP_P, flags=1 if draining else 0)
    serving = Backend(8, BE2, 8080, TCP_P)
    seed(
        dp,
        Seed(
            services=(Svc(VIP, 80, TCP_P, 20, slots=(8,)),),
            backends=(old, serving),
            ct=ct_pair(CLIENT, CPORT, VIP, 80, old, 20, TCP_P),
        ),
    )
    retval, out, _ = dp.test_run(tcp(CLIENT, VIP, CPORT, 80, flags=flags))
    assert retval == TC_ACT_OK
    assert Ether(out)[IP].dst == (BE1 if stays else BE2)
