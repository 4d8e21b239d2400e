"""Tier 2: kube-proxy's REJECT for a Service with no endpoint.

A new flow to a frontend with no backend and the SP_SVC_F_REJECT flag
(the Service has no endpoint anywhere) is turned into the ICMP port
unreachable (ICMPv6 port unreachable) netfilter's REJECT sends: from the
frontend the client used, to the client, quoting the client's datagram
(as much as fits in 576 bytes for IPv4, 1280 for IPv6), sent back out of
the interface it came in by (TC_ACT_REDIRECT, Ethernet addresses
swapped). Without the flag (a Local traffic policy with no local
endpoint: kube-proxy's DROP) the packet is dropped.

Every expected frame is built from scratch by scapy (which computes its
checksums) and compared byte for byte; the output's checksums are also
recomputed by scapy. Addresses: 198.18.0.0/15 and 2001:db8::/32 only.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ctrl.dataplane import abi

from .packets import (
    ETH_HLEN,
    MAC_NODE,
    MAC_POD,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    TCP_P,
    UDP_P,
    Seed,
    Svc,
    ct_dump,
    eth,
    frame,
    ip4,
    is6,
    router_alert,
    run,
    seed,
    verify_icmp_checksums,
)

F_REJECT = abi.const("SP_SVC_F_REJECT")
CLIENT, VIP = "198.18.1.1", "198.19.0.10"
CLIENT6, VIP6 = "2001:db8:1::1", "2001:db8:ffff::10"
NODE, NODE6 = "198.18.0.101", "2001:db8::101"  # NodePorts, from outside
OUTSIDE, OUTSIDE6 = "198.18.100.5", "2001:db8:100::5"
CPORT = 40000


def segment(proto: int, sport: int, dport: int, payload: bytes = b""):
    if proto == TCP_P:
        seg = TCP(sport=sport, dport=dport, flags="S", seq=1000, window=64240, options=[("MSS", 1460)])
    else:
        seg = UDP(sport=sport, dport=dport)
    return seg / Raw(payload) if payload else seg


def client_packet(proto: int, src: str, dst: str, dport: int, payload: bytes = b"", **ipkw) -> bytes:
    l4 = segment(proto, CPORT, dport, payload)
    if is6(src):
        return frame(src, dst, l4)
    return bytes(eth() / ip4(src, dst, **ipkw) / l4)


def expected_error(pkt: bytes, ip_id: int = 0) -> bytes:
    """The error for client packet pkt, from scratch: Ethernet back to the
    sender, IP from the packet's destination to its source (IPv4: TOS bits
    kept with precedence 6, TTL 64, not DF; IPv6: traffic class and flow
    label 0, hop limit 64), ICMP port unreachable quoting the datagram (not
    the Ethernet padding) cut at 576 (IPv4) / 1280 (IPv6) bytes in all."""
    p = Ether(pkt)
    back = Ether(src=p.dst, dst=p.src)
    if IPv6 in p:
        dgram = pkt[ETH_HLEN : ETH_HLEN + 40 + p[IPv6].plen]
        q = dgram[: 1280 - 48]
        return bytes(back / IPv6(src=p[IPv6].dst, dst=p[IPv6].src, hlim=64) / ICMPv6DestUnreach(code=4) / Raw(q))
    dgram = pkt[ETH_HLEN : ETH_HLEN + p[IP].len]
    q = dgram[: 576 - 28]
    tos = (p[IP].tos & 0x1E) | 0xC0
    ip = IP(src=p[IP].dst, dst=p[IP].src, ttl=64, tos=tos, id=ip_id, flags=0, proto=1)
    return bytes(back / ip / ICMP(type=3, code=3) / Raw(q))


def svc(addr: str, port: int, proto: int, scope: int = 0, flags: int = F_REJECT) -> Seed:
    return Seed(services=(Svc(addr, port, proto, 10, scope=scope, flags=flags),))


def check_rejected(dp, pkt: bytes, s: Seed, external: bool = False) -> bytes:
    seed(dp, s)
    r = run(dp, pkt, external=external)
    assert r.retval == TC_ACT_REDIRECT, r
    assert r.counted == {"REJECT_NO_BACKEND": (1, len(r.out))}, r.counted
    ip_id = Ether(r.out)[IP].id if IP in Ether(r.out) else 0
    want = expected_error(pkt, ip_id)
    assert r.out == want, f"\n got {Ether(r.out)!r}\nwant {Ether(want)!r}"
    verify_icmp_checksums(r.out)
    # A rejected packet leaves no flow behind.
    assert ct_dump(dp) == {}
    return r.out


CASES = [
    pytest.param(TCP_P, CLIENT, VIP, 80, b"", id="v4-tcp-syn"),
    pytest.param(UDP_P, CLIENT, VIP, 53, b"query", id="v4-udp"),
    pytest.param(TCP_P, CLIENT6, VIP6, 80, b"", id="v6-tcp-syn"),
    pytest.param(UDP_P, CLIENT6, VIP6, 53, b"query", id="v6-udp"),
    # The quote is cut where the RFCs say: 576 bytes of IPv4 error in all,
    # 1280 of IPv6 (the minimum MTU).
    pytest.param(UDP_P, CLIENT, VIP, 53, bytes(range(256)) * 4, id="v4-udp-quote-cut-at-576"),
    pytest.param(UDP_P, CLIENT6, VIP6, 53, bytes(range(256)) * 6, id="v6-udp-quote-cut-at-1280"),
    # Just under and just over the limit; odd lengths (padding of the sum).
    pytest.param(UDP_P, CLIENT, VIP, 53, b"x" * (548 - 28), id="v4-udp-whole-quote-fits"),
    pytest.param(UDP_P, CLIENT, VIP, 53, b"x" * (548 - 27), id="v4-udp-one-byte-over"),
    pytest.param(UDP_P, CLIENT, VIP, 53, b"odd", id="v4-udp-odd-length"),
    pytest.param(UDP_P, CLIENT6, VIP6, 53, b"y" * 1183, id="v6-udp-odd-length-whole"),
]


@pytest.mark.parametrize(("proto", "src", "dst", "port", "payload"), CASES)
def test_new_flow_to_frontend_without_endpoints_gets_port_unreachable(dp, proto, src, dst, port, payload):
    pkt = client_packet(proto, src, dst, port, payload)
    out = check_rejected(dp, pkt, svc(dst, port, proto))
    assert len(out) <= ETH_HLEN + (1280 if is6(src) else 576)
    # The error goes back into the pod through the same interface's
    # egress, where the reverse NAT finds no flow of it and leaves it be.
    r = run(dp, out, egress=True)
    assert (r.retval, r.out) == (TC_ACT_OK, out)


def test_ipv4_options_and_tos_are_quoted_and_kept(dp):
    """The quote holds the client's header options; the error's TOS keeps
    the client's TOS bits under precedence 6, as Linux's icmp_send()."""
    ip = ip4(CLIENT, VIP, ip_options=router_alert())
    ip.tos = 0x2C  # precedence 1, TOS bits 0x0c
    pkt = bytes(eth() / ip / segment(TCP_P, CPORT, 80))
    assert Ether(pkt)[IP].ihl == 6
    out = check_rejected(dp, pkt, svc(VIP, 80, TCP_P))
    assert Ether(out)[IP].tos == 0xCC


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_ethernet_padding_is_not_quoted(dp, v6):
    """A short frame padded to Ethernet's 60 bytes: the quote is the
    datagram as its IP length gives it, not the padding."""
    pkt = client_packet(UDP_P, CLIENT6 if v6 else CLIENT, VIP6 if v6 else VIP, 53, b"q")
    pkt += b"\0" * max(0, 60 - len(pkt)) + b"\xee" * 4
    check_rejected(dp, pkt, svc(VIP6 if v6 else VIP, 53, UDP_P))


@pytest.mark.parametrize(
    ("proto", "client", "node"),
    [
        pytest.param(TCP_P, OUTSIDE, NODE, id="v4-tcp"),
        pytest.param(UDP_P, OUTSIDE, NODE, id="v4-udp"),
        pytest.param(TCP_P, OUTSIDE6, NODE6, id="v6-tcp"),
        pytest.param(UDP_P, OUTSIDE6, NODE6, id="v6-udp"),
    ],
)
def test_nodeport_from_outside_without_endpoints_is_rejected_on_the_external_interface(dp, proto, client, node):
    pkt = client_packet(proto, client, node, 30080)
    out = check_rejected(dp, pkt, svc(node, 30080, proto, scope=abi.SCOPE_EXTERNAL), external=True)
    # Its way out: the external interface's egress leaves it alone.
    r = run(dp, out, egress=True, external=True)
    assert (r.retval, r.out) == (TC_ACT_OK, out)


@pytest.mark.parametrize("proto", [TCP_P, UDP_P], ids=["tcp", "udp"])
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_no_local_endpoint_is_dropped_not_rejected(dp, proto, v6):
    """kube-proxy DROPs (does not REJECT) when endpoints exist but none
    the traffic policy allows here: no SP_SVC_F_REJECT flag."""
    src, dst = (CLIENT6, VIP6) if v6 else (CLIENT, VIP)
    pkt = client_packet(proto, src, dst, 80)
    seed(dp, svc(dst, 80, proto, flags=0))
    r = run(dp, pkt)
    assert r.retval == TC_ACT_SHOT
    assert r.counted == {"DROP_NO_BACKEND": (1, len(pkt))}


def test_frame_to_link_layer_broadcast_is_dropped_not_answered(dp):
    """No error about a frame sent to a broadcast or multicast MAC (as
    Linux's icmp_send()): one broadcast would draw an error per host."""
    pkt = b"\xff" * 6 + client_packet(UDP_P, CLIENT, VIP, 53)[6:]
    seed(dp, svc(VIP, 53, UDP_P))
    r = run(dp, pkt)
    assert r.retval == TC_ACT_SHOT
    assert r.counted == {"DROP_NO_BACKEND": (1, len(pkt))}


def test_macs_are_swapped(dp):
    pkt = client_packet(TCP_P, CLIENT, VIP, 80)
    out = check_rejected(dp, pkt, svc(VIP, 80, TCP_P))
    assert Ether(out).src == MAC_NODE and Ether(out).dst == MAC_POD
