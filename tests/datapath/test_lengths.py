"""Tier 2: parsing is bounded by the IP datagram's own length.

A TCP or UDP header is only translated and tracked when it lies within the
frame and within the datagram its IP header describes (IPv4 total length,
IPv6 payload length). A SYN whose total length leaves no room for its TCP
header, or that is shorter than its own IP header, is passed untouched
and counted `pass_truncated`, by every program and in every direction.

Each scenario seeds the maps so that its packet, with a correct length, is
translated (checked first, on a fresh load), then the same packet with a
bad length must come out byte for byte as it went in, with no conntrack
entry written or refreshed. Addresses: 198.18.0.0/15, 2001:db8::/32.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ctrl.dataplane import abi
from ctrl.dataplane.libbpf import lib
from ctrl.util.addrs import addr16

from . import packets
from .packets import TC_ACT_OK, TCP_P, UDP_P, Backend, CtKey, CtVal, Svc, mapname, stamp, stats

FORWARD, REPLY, SNAT, UNSNAT = abi.CT_FORWARD, abi.CT_REPLY, abi.CT_SNAT, abi.CT_UNSNAT
F_MASQ = abi.const("SP_SVC_F_MASQ")

ADDRS = {
    4: {"client": "198.18.1.1", "vip": "198.19.0.10", "be": "198.18.2.1", "node": "198.18.0.101"},
    6: {"client": "2001:db8:1::1", "vip": "2001:db8:ffff::10", "be": "2001:db8:2::1", "node": "2001:db8::101"},
}
CPORT, VPORT, BPORT, NODEPORT, SNAT_PORT = 40000, 80, 8080, 30080, 61000


# -- packets -------------------------------------------------------------------


def frame(fam: int, proto: int, src: str, dst: str, sport: int, dport: int, options: bool = False) -> bytes:
    """A SYN (TCP, no options: a 20-byte header) or a UDP datagram, with a
    payload, and IPv4 options (ihl 6) when asked."""
    ip = IP(src=src, dst=dst, ttl=63) if fam == 4 else IPv6(src=src, dst=dst, hlim=63)
    if options:
        ip.options = [IPOption_Router_Alert()]
    l4 = TCP(sport=sport, dport=dport, flags="S", seq=1000) if proto == TCP_P else UDP(sport=sport, dport=dport)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip / l4 / Raw(b"sliceproxy"))


def with_ip_len(pkt: bytes, length: int) -> bytes:
    """The frame with its IPv4 total length (IPv4 header checksum fixed) or
    IPv6 payload length set to `length`; nothing else changed."""
    b = bytearray(pkt)
    if b[14] >> 4 == 4:
        struct.pack_into("!H", b, 14 + 2, length)
        ihl = (b[14] & 0xF) * 4
        struct.pack_into("!H", b, 14 + 10, 0)
        words = struct.unpack(f"!{ihl // 2}H", bytes(b[14 : 14 + ihl]))
        s = sum(words)
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        struct.pack_into("!H", b, 14 + 10, ~s & 0xFFFF)
    else:
        struct.pack_into("!H", b, 14 + 4, length)
    return bytes(b)


def ip_header_len(pkt: bytes) -> int:
    return (pkt[14] & 0xF) * 4 if pkt[14] >> 4 == 4 else 40


def l4_len(proto: int) -> int:
    return 20 if proto == TCP_P else 8


# Bad lengths, as a function of (IP header length, L4 header length). An IPv4
# length counts its header, an IPv6 one does not (ihl 0 below).
def counted(pkt: bytes) -> int:
    return ip_header_len(pkt) if pkt[14] >> 4 == 4 else 0


BAD = {
    "l4-header-one-byte-short": lambda pkt, l4: counted(pkt) + l4 - 1,
    "ports-only": lambda pkt, l4: counted(pkt) + 4,
    "no-l4-byte": lambda pkt, l4: counted(pkt),
    "zero-without-gso": lambda pkt, l4: 0,
}
BAD_V4_ONLY = {
    "shorter-than-ip-header": lambda pkt, l4: ip_header_len(pkt) - 1,
    "shorter-than-20": lambda pkt, l4: 19,
}


# -- maps, for either family ---------------------------------------------------


def put_ct(dp, k: tuple, v: tuple, last_seen: int) -> None:
    """k: (saddr, daddr, sport, dport, proto, dir); v: (nat_addr, nat_port,
    backend_id, svc_id, addr2, port2)."""
    packets.put_ct(dp, CtKey(*k), CtVal(*v), last_seen)


def put_service(dp, addr: str, port: int, proto: int, scope: int, flags: int = 0) -> None:
    packets.put_backend(dp, Backend(7, BE[addr], BPORT, proto))
    packets.put_service(dp, Svc(addr, port, proto, svc_id=50, slots=(7,), scope=scope, flags=flags))


BE = {a["vip"]: a["be"] for a in ADDRS.values()} | {a["node"]: a["be"] for a in ADDRS.values()}


def put_cfg(dp) -> None:
    cfg = abi.pack(
        "sp_cfg",
        addr4=addr16(ADDRS[4]["node"]),
        addr6=addr16(ADDRS[6]["node"]),
        snat_port_min=SNAT_PORT,
        snat_port_max=SNAT_PORT + 100,
        snat_reclaim=600,
        snat_reclaim_closed=10,
    )
    dp.maps[mapname("sp_cfg")].update(abi.u32(0), cfg)


@dataclass(frozen=True)
class Scenario:
    egress: bool
    external: bool
    verdict: str  # of the packet with a correct length
    setup: Callable  # (dp, fam, proto) -> None
    packet: Callable  # (fam, proto, options) -> bytes


def _pod_dnat(dp, fam, proto):
    put_service(dp, ADDRS[fam]["vip"], VPORT, proto, 0)


def _ext_dnat(dp, fam, proto):
    put_service(dp, ADDRS[fam]["node"], NODEPORT, proto, 1)


def _revnat(dp, fam, proto):
    a = ADDRS[fam]
    put_ct(dp, (a["be"], a["client"], BPORT, CPORT, proto, REPLY), (a["vip"], VPORT, 7, 50, None, 0), stamp(dp, 1))


def _unsnat(dp, fam, proto):
    a = ADDRS[fam]
    put_ct(
        dp, (a["be"], a["node"], BPORT, SNAT_PORT, proto, UNSNAT), (a["client"], CPORT, 7, 50, None, 0), stamp(dp, 1)
    )


def _snat(dp, fam, proto):
    a = ADDRS[fam]
    put_cfg(dp)
    put_ct(
        dp,
        (a["client"], a["be"], CPORT, BPORT, proto, SNAT),
        (a["node"], SNAT_PORT, 7, 50, a["node"], NODEPORT),
        stamp(dp, 1),
    )
    _unsnat(dp, fam, proto)


def _from_client(to: str, port: int):
    return lambda fam, proto, opt: frame(fam, proto, ADDRS[fam]["client"], ADDRS[fam][to], CPORT, port, opt)


def _from_backend(to: str, port: int):
    return lambda fam, proto, opt: frame(fam, proto, ADDRS[fam]["be"], ADDRS[fam][to], BPORT, port, opt)


SCENARIOS = {
    "pod-ingress-dnat": Scenario(False, False, "DNAT_NEW", _pod_dnat, _from_client("vip", VPORT)),
    "pod-egress-revnat": Scenario(True, False, "REVNAT", _revnat, _from_backend("client", CPORT)),
    "ext-ingress-dnat": Scenario(False, True, "DNAT_NEW", _ext_dnat, _from_client("node", NODEPORT)),
    "ext-ingress-unsnat": Scenario(False, True, "UNSNAT", _unsnat, _from_backend("node", SNAT_PORT)),
    "ext-egress-snat": Scenario(True, True, "SNAT", _snat, _from_client("be", BPORT)),
    "ext-egress-revnat": Scenario(True, True, "REVNAT", _revnat, _from_backend("client", CPORT)),
}


# -- running, with the skb's gso_size when asked ---------------------------------


def run(dp, pkt: bytes, egress: bool, external: bool, gso_size: int = 0) -> tuple[int, bytes, dict]:
    """One packet through a program: (return code, frame out, counters it
    moved). gso_size, set through the test run's __sk_buff, makes the
    kernel's skb a GSO one."""
    size, fields = abi.btf_struct(lib().bpf_object__btf(dp._obj), "__sk_buff")
    ctx = bytearray(size)
    off = {name: o for name, o, _ in fields}["gso_size"]
    struct.pack_into("<I", ctx, off, gso_size)
    before = stats(dp)
    ret, out, _ = dp.test_run(pkt, egress=egress, external=external, ctx=bytes(ctx))
    after = stats(dp)
    moved = {k: after[k][0] - before.get(k, (0, 0))[0] for k in after if after[k][0] != before.get(k, (0, 0))[0]}
    return ret, out, moved


def cases():
    for name in SCENARIOS:
        for fam in (4, 6):
            for proto, pname in ((TCP_P, "tcp"), (UDP_P, "udp")):
                yield pytest.param(name, fam, proto, False, id=f"{name}-ipv{fam}-{pname}")
                if fam == 4:
                    yield pytest.param(name, fam, proto, True, id=f"{name}-ipv4-options-{pname}")


@pytest.mark.parametrize("scenario,fam,proto,options", list(cases()))
def test_a_datagram_too_short_for_its_l4_header_passes_untouched(dp, scenario, fam, proto, options):
    """Every bad length in turn (none may change any state), then the
    control: the same packet with its correct length is translated."""
    sc = SCENARIOS[scenario]
    sc.setup(dp, fam, proto)
    good = sc.packet(fam, proto, options)
    before = raw_ct(dp)
    bad = BAD | (BAD_V4_ONLY if fam == 4 else {})
    for name, length in bad.items():
        pkt = with_ip_len(good, length(good, l4_len(proto)))
        ret, out, moved = run(dp, pkt, sc.egress, sc.external)
        assert (ret, moved) == (TC_ACT_OK, {"PASS_TRUNCATED": 1}), f"{name}: {ret}, {moved}"
        assert out == pkt, f"{name}: the packet was changed"
        assert raw_ct(dp) == before, f"{name}: conntrack written or refreshed"
    ret, out, moved = run(dp, good, sc.egress, sc.external)
    assert (ret, moved) == (TC_ACT_OK, {sc.verdict: 1}) and out != good, "the control was not translated"


def raw_ct(dp) -> dict[bytes, bytes]:
    """The conntrack map as raw bytes (either family)."""
    return dict(dp.maps[mapname("sp_ct")].items())


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("fam", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize(
    "case",
    [
        # A datagram exactly as long as its headers (the payload beyond the
        # length is the frame's tail, not the datagram's).
        "exact",
        # Ethernet padding after the datagram: translated, the padding kept.
        "padded-frame",
        # BIG TCP: a TCP GSO packet longer than 64 KiB carries length 0.
        "big-tcp-gso",
    ],
)
def test_datagrams_whose_l4_header_fits_are_translated(dp, scenario, fam, case):
    sc = SCENARIOS[scenario]
    sc.setup(dp, fam, TCP_P)
    good = sc.packet(fam, TCP_P, False)
    gso = 0
    if case == "exact":
        pkt = with_ip_len(good, counted(good) + 20)
    elif case == "padded-frame":
        pkt = good + b"\xa5" * 12
    else:
        pkt, gso = with_ip_len(good, 0), 1400
    ret, out, moved = run(dp, pkt, sc.egress, sc.external, gso_size=gso)
    assert (ret, moved) == (TC_ACT_OK, {sc.verdict: 1})
    assert out != pkt and len(out) == len(pkt)
    # Only addresses, ports and checksums may change: the length field,
    # the payload and the padding stay.
    hdr = 14 + ip_header_len(pkt)
    assert out[14 + 2 : 14 + 4] == pkt[14 + 2 : 14 + 4] if fam == 4 else out[18:20] == pkt[18:20]
    assert out[hdr + 20 :] == pkt[hdr + 20 :]


def test_udp_with_length_zero_is_no_big_tcp(dp):
    """Length 0 stands for "the skb's length" only in a TCP GSO packet."""
    sc = SCENARIOS["pod-ingress-dnat"]
    sc.setup(dp, 4, UDP_P)
    pkt = with_ip_len(sc.packet(4, UDP_P, False), 0)
    ret, out, moved = run(dp, pkt, sc.egress, sc.external, gso_size=1400)
    assert (ret, moved, out) == (TC_ACT_OK, {"PASS_TRUNCATED": 1}, pkt)
