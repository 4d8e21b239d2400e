"""Tier 2: ICMP errors about translated flows, under BPF_PROG_TEST_RUN.

An ICMP error quotes the packet it is about. When that packet was
translated, the error has to be translated back, or the host it reaches
finds no socket for it: a connected UDP socket to a ClusterIP never learns
that the port is closed, and path MTU discovery never lowers the MTU.

Each flow below is opened by running its real packets through the program,
so the quoted packets are exactly what the program made. Each expected
frame is built from scratch by scapy; an error translated back must quote
exactly the packet its receiver sent (the same bytes, checksums included),
and every checksum of the output (outer IPv4 header, ICMP, ICMPv6 with its
pseudo-header, quoted IPv4 header) is recomputed by scapy.

Addresses: 198.18.0.0/15 and 2001:db8::/32 only.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from .packets import (
    HAIRPIN4,
    HAIRPIN6,
    ICMP_KINDS,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TCP_P,
    UDP_P,
    Backend,
    Seed,
    Svc,
    changed_offsets,
    eth,
    icmp_error,
    ip4,
    ip_part,
    l4pkt,
    router_alert,
    run,
    seed,
    swap_macs,
    verify_icmp_checksums,
)
from .test_external import F_MASQ, put_cfg

CPORT = 40000

# family: client, frontend, backend, a router on the way, another client
HOSTS = {
    "v4": ("198.18.1.1", "198.19.0.10", "198.18.2.1", "198.18.0.1", "198.18.1.2"),
    "v6": ("2001:db8:1::1", "2001:db8:ffff::10", "2001:db8:2::1", "2001:db8::1", "2001:db8:1::2"),
}
PROTOS = {"tcp": TCP_P, "udp": UDP_P}
FAM_PROTO = [pytest.param(f, p, id=f"{f}-{p}") for f in HOSTS for p in PROTOS]


def open_flow(dp, fam: str, proto: int, client: str | None = None) -> tuple[bytes, bytes]:
    """Seed frontend:80 -> backend:8080 and send the client's first packet
    through the pod ingress. Returns (as the client sent it, as the backend
    got it)."""
    c, vip, be, _, _ = HOSTS[fam]
    client = client or c
    seed(dp, Seed(services=(Svc(vip, 80, proto, svc_id=10, slots=(1,)),), backends=(Backend(1, be, 8080, proto),)))
    sent = l4pkt(proto, client, vip, CPORT, 80, payload=b"a request the quote carries")
    r = run(dp, sent)
    assert r.counted.keys() == {"DNAT_NEW"}
    return sent, r.out


def quote(raw: bytes, cut: str) -> bytes:
    """The IP packet of a frame as an error quotes it: whole, or cut 8
    bytes into its TCP/UDP header (the least RFC 792 asks for; a TCP
    checksum is then not quoted)."""
    ip = ip_part(raw)
    if cut == "whole":
        return ip
    hlen = 40 if ip[0] >> 4 == 6 else (ip[0] & 0x0F) * 4
    return ip[: hlen + 8]


def expect(dp, sent: bytes, want: bytes | None, verdict: str, egress=False, external=False, retval=TC_ACT_OK):
    """Run one frame; want None: it must leave untouched."""
    r = run(dp, sent, egress=egress, external=external)
    assert (r.retval, r.counted) == (retval, {verdict: (1, len(sent))})
    if want is None:
        assert r.out == sent, f"changed: {Ether(r.out).summary()}"
        return r.out
    verify_icmp_checksums(r.out)
    assert r.out == want, (
        f"got      {Ether(r.out).summary()}\nexpected {Ether(want).summary()}\n"
        f"got      {r.out.hex()}\nexpected {want.hex()}"
    )
    return r.out


# -- to a pod's client: the reply direction ----------------------------------


@pytest.mark.parametrize("cut", ["whole", "cut"])
@pytest.mark.parametrize("kind", ICMP_KINDS)
@pytest.mark.parametrize("sender", ["backend", "router"])
@pytest.mark.parametrize(("fam", "proto"), FAM_PROTO)
def test_an_error_about_a_request_reaches_the_client_about_the_frontend(dp, fam, proto, sender, kind, cut):
    """The backend (port unreachable) or a router on the way (the node
    itself: fragmentation needed / packet too big; time exceeded) reports on
    client -> backend. At the client's interface egress the quoted
    destination becomes the frontend again; the outer source too when it
    was the backend, not when it was a router."""
    c, vip, be, router, _ = HOSTS[fam]
    sent, dnatted = open_flow(dp, fam, PROTOS[proto])
    src = be if sender == "backend" else router
    err = icmp_error(src, c, quote(dnatted, cut), kind)
    want = icmp_error(vip if sender == "backend" else router, c, quote(sent, cut), kind)
    expect(dp, err, want, "REVNAT", egress=True)


@pytest.mark.parametrize("fam", list(HOSTS))
def test_errors_about_flows_not_tracked_or_not_errors_pass_untouched(dp, fam):
    c, vip, be, router, other = HOSTS[fam]
    _, dnatted = open_flow(dp, fam, UDP_P)
    # Another client's flow to the same backend: no entry.
    stranger = l4pkt(UDP_P, other, be, CPORT, 8080, payload=b"a request the quote carries")
    expect(dp, icmp_error(be, other, ip_part(stranger)), None, "PASS_OTHER_PROTO", egress=True)
    # The quote cut inside the ports: nothing to find the flow by.
    short = ip_part(dnatted)[: len(quote(dnatted, "cut")) - 6]
    expect(dp, icmp_error(be, c, short), None, "PASS_OTHER_PROTO", egress=True)
    # An error not addressed to the sender of the packet it quotes.
    expect(dp, icmp_error(router, be, ip_part(dnatted)), None, "PASS_OTHER_PROTO", egress=True)
    expect(dp, icmp_error(router, be, ip_part(dnatted)), None, "PASS_OTHER_PROTO")


def test_echo_and_quoted_fragments_pass_untouched(dp):
    c, vip, be, router, _ = HOSTS["v4"]
    _, dnatted = open_flow(dp, "v4", UDP_P)
    echo_reply = bytes(eth() / ip4(be, c) / ICMP(type=0, id=7, seq=1) / b"ping")
    expect(dp, echo_reply, None, "PASS_OTHER_PROTO", egress=True)
    # A quoted fragment other than the first carries no ports.
    frag = ip_part(dnatted)
    frag = frag[:6] + b"\x00\x10" + frag[8:]  # fragment offset 16 (x 8 bytes)
    expect(dp, icmp_error(be, c, frag), None, "PASS_OTHER_PROTO", egress=True)


def test_bytes_past_the_ip_length_are_never_touched(dp):
    """An error whose quote stops 8 bytes into the TCP header, in a frame
    padded beyond the IP length (Ethernet padding) with bytes where the TCP
    checksum would be: the padding is not part of the packet and stays."""
    c, vip, be, _, _ = HOSTS["v4"]
    sent, dnatted = open_flow(dp, "v4", TCP_P)
    padding = bytes(range(1, 33))
    err = icmp_error(be, c, quote(dnatted, "cut")) + padding
    want = icmp_error(vip, c, quote(sent, "cut")) + padding
    r = run(dp, err, egress=True)
    assert (r.retval, r.counted.keys()) == (TC_ACT_OK, {"REVNAT"})
    assert r.out == want
    verify_icmp_checksums(r.out[: -len(padding)])


@pytest.mark.parametrize("proto", list(PROTOS))
def test_ip_options_outside_and_in_the_quote(dp, proto):
    """Options move the ICMP header (outer) and the quoted L4 header
    (quoted): every offset follows the header lengths."""
    c, vip, be, _, _ = HOSTS["v4"]
    p = PROTOS[proto]
    seed(dp, Seed(services=(Svc(vip, 80, p, svc_id=10, slots=(1,)),), backends=(Backend(1, be, 8080, p),)))
    l4 = TCP(sport=CPORT, dport=80, flags="S") if p == TCP_P else UDP(sport=CPORT, dport=80) / b"data"
    sent = bytes(eth() / ip4(c, vip, ip_options=router_alert()) / l4)
    dnatted = run(dp, sent).out
    err = icmp_error(be, c, ip_part(dnatted), ip_options=router_alert())
    want = icmp_error(vip, c, ip_part(sent), ip_options=router_alert())
    expect(dp, err, want, "REVNAT", egress=True)


def test_a_quoted_udp_checksum_of_zero_stays_zero(dp):
    c, vip, be, _, _ = HOSTS["v4"]
    seed(dp, Seed(services=(Svc(vip, 53, UDP_P, svc_id=11, slots=(2,)),), backends=(Backend(2, be, 5353, UDP_P),)))
    sent = bytes(eth() / ip4(c, vip) / UDP(sport=CPORT, dport=53, chksum=0) / b"query")
    dnatted = run(dp, sent).out
    assert Ether(dnatted)[UDP].chksum == 0
    out = expect(dp, icmp_error(be, c, ip_part(dnatted)), icmp_error(vip, c, ip_part(sent)), "REVNAT", egress=True)
    assert out[-len(b"query") - 2 : -len(b"query")] == b"\0\0"


# -- from a pod's client: the request direction --------------------------------


@pytest.mark.parametrize(("fam", "proto"), FAM_PROTO)
def test_an_error_the_client_sends_about_a_reply_reaches_the_backend(dp, fam, proto):
    """The client's socket is gone when the backend's reply arrives (port
    unreachable): the error leaves the client about frontend -> client and
    must reach the backend about backend -> client, as its reply left."""
    c, vip, be, _, _ = HOSTS[fam]
    p = PROTOS[proto]
    open_flow(dp, fam, p)
    reply = l4pkt(p, be, c, 8080, CPORT, flags="SA", payload=b"an answer")
    r = run(dp, reply, egress=True)
    assert r.counted.keys() == {"REVNAT"}
    err = icmp_error(c, vip, ip_part(r.out))
    expect(dp, err, icmp_error(c, be, ip_part(reply)), "DNAT_ESTABLISHED")


# -- hairpin: the pod is its own Service's backend -----------------------------


@pytest.mark.parametrize(("fam", "proto"), FAM_PROTO)
def test_an_error_about_a_hairpin_flow_goes_back_into_the_pod(dp, fam, proto):
    """The pod reached itself through the frontend and nothing listens on
    the backend port: its own stack answers the hairpin address with port
    unreachable about hairpin -> pod:8080. It must come back into the pod
    from the frontend, quoting pod -> frontend as the pod sent it."""
    pod, vip = HOSTS[fam][0], HOSTS[fam][1]
    hp = HAIRPIN6 if fam == "v6" else HAIRPIN4
    p = PROTOS[proto]
    seed(dp, Seed(services=(Svc(vip, 80, p, svc_id=10, slots=(1,)),), backends=(Backend(1, pod, 8080, p),)))
    sent = l4pkt(p, pod, vip, CPORT, 80, payload=b"to myself")
    r = run(dp, sent)
    assert r.retval == TC_ACT_REDIRECT
    err = icmp_error(pod, hp, ip_part(r.out))
    expect(dp, err, swap_macs(icmp_error(vip, pod, ip_part(sent))), "REVNAT", retval=TC_ACT_REDIRECT)


# -- the external interface: a masqueraded NodePort flow ----------------------

# family: outside client, node (the NodePort's address and the SNAT
# source), remote backend, a router between the node and the backend, a
# router near the client
EXT = {
    "v4": ("198.18.100.5", "198.18.0.101", "198.18.2.2", "198.18.200.254", "198.18.100.1"),
    "v6": ("2001:db8:100::5", "2001:db8:0:1::101", "2001:db8:2::2", "2001:db8:200::fe", "2001:db8:100::1"),
}
NODEPORT = 30080


def open_masqueraded(dp, fam: str, proto: int) -> dict[str, bytes]:
    """A NodePort flow from outside to a backend on another node, step by
    step at the node's uplink (see test_external.py). Returns its request
    and reply at each step."""
    out, node, be, _, _ = EXT[fam]
    seed(
        dp,
        Seed(
            services=(Svc(node, NODEPORT, proto, svc_id=21, slots=(7,), scope=1, flags=F_MASQ),),
            backends=(Backend(7, be, 8080, proto),),
        ),
    )
    put_cfg(dp, addr4=node if fam == "v4" else None, addr6=node if fam == "v6" else None)
    f = {"sent": l4pkt(proto, out, node, CPORT, NODEPORT, payload=b"a request the quote carries")}
    r = run(dp, f["sent"], external=True)
    assert r.counted.keys() == {"DNAT_NEW"}
    f["dnatted"] = r.out
    r = run(dp, f["dnatted"], egress=True, external=True)
    assert r.counted.keys() == {"SNAT"}
    f["on_wire"] = r.out
    l4 = TCP if proto == TCP_P else UDP
    f["port"] = Ether(r.out)[l4].sport.to_bytes(2, "big")
    port = Ether(r.out)[l4].sport
    f["reply_on_wire"] = l4pkt(proto, be, node, 8080, port, flags="SA", payload=b"an answer")
    r = run(dp, f["reply_on_wire"], external=True)
    assert r.counted.keys() == {"UNSNAT"}
    f["reply_unsnat"] = r.out
    r = run(dp, f["reply_unsnat"], egress=True, external=True)
    assert r.counted.keys() == {"REVNAT"}
    f["reply_got"] = r.out
    return f


@pytest.mark.parametrize("sender", ["backend", "router"])
@pytest.mark.parametrize(("fam", "proto"), FAM_PROTO)
def test_an_error_about_a_masqueraded_request_reaches_the_outside_client(dp, fam, proto, sender):
    """The remote backend (port unreachable) or a router between the nodes
    (too big) reports on node:SNAT port -> backend. At the uplink's ingress
    the quoted source and the outer destination go back to the client (as
    UNSNAT does); at its egress towards the client, the quoted destination
    (and the outer source if it was the backend) back to the NodePort."""
    out, node, be, router, _ = EXT[fam]
    f = open_masqueraded(dp, fam, PROTOS[proto])
    kind = "port-unreachable" if sender == "backend" else "too-big"
    src = be if sender == "backend" else router
    err = icmp_error(src, node, ip_part(f["on_wire"]), kind)
    mid = expect(dp, err, icmp_error(src, out, ip_part(f["dnatted"]), kind), "UNSNAT", external=True)
    want = icmp_error(node if sender == "backend" else router, out, ip_part(f["sent"]), kind)
    expect(dp, mid, want, "REVNAT", egress=True, external=True)


@pytest.mark.parametrize(("fam", "proto"), FAM_PROTO)
def test_an_error_about_a_masqueraded_reply_reaches_the_backend(dp, fam, proto):
    """A router near the outside client reports on the reply it got
    (NodePort -> client: too big): at the uplink's ingress it goes to the
    backend about backend -> client, and at the uplink's egress it is
    masqueraded as the flow's requests are: about backend -> node:SNAT
    port, the reply as the backend sent it; the router stays the source."""
    out, node, be, _, router = EXT[fam]
    f = open_masqueraded(dp, fam, PROTOS[proto])
    err = icmp_error(router, node, ip_part(f["reply_got"]), "too-big")
    mid = expect(
        dp, err, icmp_error(router, be, ip_part(f["reply_unsnat"]), "too-big"), "DNAT_ESTABLISHED", external=True
    )
    want = icmp_error(router, be, ip_part(f["reply_on_wire"]), "too-big")
    expect(dp, mid, want, "SNAT", egress=True, external=True)


def test_an_error_about_a_flow_not_yet_masqueraded_is_not_masqueraded(dp):
    """An SNAT entry without a port (the flow never left the node) gives
    no address to translate to."""
    out, node, be, _, router = EXT["v4"]
    seed(
        dp,
        Seed(
            services=(Svc(node, NODEPORT, UDP_P, svc_id=21, slots=(7,), scope=1, flags=F_MASQ),),
            backends=(Backend(7, be, 8080, UDP_P),),
        ),
    )
    put_cfg(dp)
    run(dp, l4pkt(UDP_P, out, node, CPORT, NODEPORT), external=True)
    quoted = ip_part(l4pkt(UDP_P, be, out, 8080, CPORT))
    err = icmp_error(router, be, quoted)
    expect(dp, err, None, "PASS_OTHER_PROTO", egress=True, external=True)


def test_the_quote_is_what_the_client_sent_byte_for_byte(dp):
    """Independent of the expected-frame builder: the quote the client gets
    back is a prefix of the very bytes it sent."""
    c, vip, be, _, _ = HOSTS["v4"]
    sent, dnatted = open_flow(dp, "v4", UDP_P)
    err = icmp_error(be, c, ip_part(dnatted))
    r = run(dp, err, egress=True)
    p = verify_icmp_checksums(r.out)
    assert (p[IP].src, p[IP].dst) == (vip, c)
    assert bytes(p[ICMP].payload) == ip_part(sent)
    # Only these bytes may change: the outer source and the outer header
    # checksum, the ICMP checksum, and in the quote (at 42) its header
    # checksum, its destination, its destination port and its UDP checksum.
    q = 14 + 20 + 8
    allowed = {24, 25, *range(26, 30), 36, 37, q + 10, q + 11, *range(q + 16, q + 20), q + 22, q + 23, q + 26, q + 27}
    assert changed_offsets(err, r.out) <= allowed, sorted(changed_offsets(err, r.out) - allowed)
