"""Packets for the fuzz tier, built with struct (scapy is too slow for a
million): well-formed frames towards the world the test programs (its
frontends and tracked flows), then broken in every way a parser meets.

Every function takes a random.Random, so a seed replays the same sequence.
Addresses: 198.18.0.0/15 and 2001:db8::/32 only.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass

from scripts.bench.common import inet_csum

TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58
ETH_IP, ETH_IP6, ETH_VLAN, ETH_QINQ, ETH_ARP = 0x0800, 0x86DD, 0x8100, 0x88A8, 0x0806
# IPv6 extension headers: hop-by-hop, routing, destination options, fragment, AH.
HOP, ROUTING, DSTOPTS, FRAGMENT, AH, NO_NEXT = 0, 43, 60, 44, 51, 59

MAC = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"

# The kernel refuses to BPF_PROG_TEST_RUN a frame shorter than Ethernet, or
# an IPv4 (IPv6) one with fewer than 20 (40) bytes after it.
MIN_LEN = {ETH_IP: 14 + 20, ETH_IP6: 14 + 40}


def a16(ip: str) -> bytes:
    """The 16-byte form the maps use: IPv4-mapped for IPv4."""
    a = ipaddress.ip_address(ip)
    return (b"\0" * 10 + b"\xff\xff" + a.packed) if a.version == 4 else a.packed


def fam_of(a: bytes) -> int:
    return 4 if a[:12] == b"\0" * 10 + b"\xff\xff" else 6


def raw_addr(a: bytes) -> bytes:
    """Wire form: 4 bytes for an IPv4-mapped address, else 16."""
    return a[12:] if fam_of(a) == 4 else a


@dataclass(frozen=True)
class Tuple:
    """A flow's packet as one program sees it: addresses in map form."""

    src: bytes
    dst: bytes
    sport: int
    dport: int
    proto: int

    @property
    def fam(self) -> int:
        return fam_of(self.src)


def random_addr(rng: random.Random, fam: int) -> bytes:
    if fam == 4:
        return b"\0" * 10 + b"\xff\xff" + bytes([198, 18 + rng.getrandbits(1)]) + rng.randbytes(2)
    return bytes.fromhex("20010db8") + rng.randbytes(12)


# -- checksums -----------------------------------------------------------------


csum = inet_csum


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if fam_of(src) == 4:
        return raw_addr(src) + raw_addr(dst) + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


# -- layers ----------------------------------------------------------------------


def eth(ethertype: int) -> bytes:
    return MAC + struct.pack("!H", ethertype)


def tcp(t: Tuple, flags: int, payload: bytes = b"", options: bytes = b"") -> bytes:
    options += b"\x01" * (-len(options) % 4)  # NOP padding to whole words
    off = (20 + len(options)) // 4
    hdr = struct.pack("!HHIIBBHHH", t.sport, t.dport, 1000, 2000, off << 4, flags, 64240, 0, 0) + options
    seg = hdr + payload
    c = csum(pseudo(t.src, t.dst, TCP, len(seg)) + seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def udp(t: Tuple, payload: bytes = b"", zero_csum: bool = False) -> bytes:
    seg = struct.pack("!HHHH", t.sport, t.dport, 8 + len(payload), 0) + payload
    if zero_csum and t.fam == 4:
        return seg
    c = csum(pseudo(t.src, t.dst, UDP, len(seg)) + seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", c) + seg[8:]


def ipv4(src: bytes, dst: bytes, proto: int, body: bytes, options: bytes = b"", frag: int = 0, ttl: int = 63) -> bytes:
    options += b"\0" * (-len(options) % 4)
    ihl = 5 + len(options) // 4
    fixed = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(body), 0x1234, frag, ttl, proto, 0, raw_addr(src), raw_addr(dst)
    )
    hdr = fixed + options
    c = csum(hdr)
    return hdr[:10] + struct.pack("!H", c) + hdr[12:] + body


def ipv6(src: bytes, dst: bytes, nexthdr: int, body: bytes) -> bytes:
    return struct.pack("!IHBB", 0x60000000, len(body), nexthdr, 63) + src + dst + body


def l4(t: Tuple, rng: random.Random, flags: int | None = None) -> bytes:
    """A TCP segment (flags: the header's flag byte, random if None, with
    or without options) or a UDP datagram, with a short random payload."""
    payload = rng.randbytes(rng.choice((0, 0, 1, 7, 32)))
    if t.proto == TCP:
        opts = rng.choice(
            (b"", b"\x02\x04\x05\xb4", b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + bytes(8) + b"\x01\x03\x03\x07")
        )
        return tcp(t, rng.getrandbits(8) if flags is None else flags, payload, opts)
    return udp(t, payload, zero_csum=rng.random() < 0.1)


def frame(t: Tuple, body: bytes, rng: random.Random, options: bytes = b"") -> bytes:
    """Ethernet / IP (t's family) / body, body being the L4 bytes of t.proto."""
    if t.fam == 4:
        return eth(ETH_IP) + ipv4(t.src, t.dst, t.proto, body, options)
    return eth(ETH_IP6) + ipv6(t.src, t.dst, t.proto, body)


def clean(t: Tuple, rng: random.Random, flags: int | None = None) -> bytes:
    """A well-formed frame for t, checksums right."""
    return frame(t, l4(t, rng, flags), rng)


# -- broken and unusual packets --------------------------------------------------


def ipv4_options(rng: random.Random) -> bytes:
    """1 to 40 bytes of options: sensible ones (NOP, router alert, record
    route, timestamp) or random bytes."""
    kind = rng.randrange(4)
    if kind == 0:
        return b"\x94\x04\x00\x00"  # router alert
    if kind == 1:
        n = rng.randrange(1, 10)
        return bytes([7, 3 + 4 * n, 4]) + bytes(4 * n)  # record route
    if kind == 2:
        return b"\x01" * rng.randrange(1, 40)
    return rng.randbytes(rng.randrange(1, 41))


def with_v4_options(t: Tuple, rng: random.Random) -> bytes:
    return frame(t, l4(t, rng), rng, options=ipv4_options(rng)[:40])


def with_v6_ext_headers(t: Tuple, rng: random.Random) -> bytes:
    """IPv6 with one to three extension headers before the L4 header."""
    body = l4(t, rng)
    nh = t.proto
    for _ in range(rng.randrange(1, 4)):
        kind = rng.choice((HOP, ROUTING, DSTOPTS, FRAGMENT, AH))
        if kind == FRAGMENT:
            off = rng.choice((0, 0, rng.getrandbits(13)))
            hdr = struct.pack("!BBHI", nh, 0, (off << 3) | rng.getrandbits(1), rng.getrandbits(32))
        elif kind == AH:
            hdr = struct.pack("!BBH", nh, 1, 0) + rng.randbytes(8)  # (1 + 2) * 4 bytes
        else:
            n = rng.randrange(0, 3)
            hdr = struct.pack("!BB", nh, n) + b"\x01\x04\x00\x00\x00\x00" + bytes(8 * n)
        body, nh = hdr + body, kind
    return eth(ETH_IP6) + ipv6(t.src, t.dst, nh, body)


def fragment(t: Tuple, rng: random.Random) -> bytes:
    """An IPv4 fragment: first (MF, offset 0), middle or last."""
    frag = rng.choice((0x2000, 0x2000 | rng.randrange(1, 0x2000), rng.randrange(1, 0x2000)))
    if rng.random() < 0.3:
        frag |= 0x4000  # DF as well (contradictory, but seen)
    return eth(ETH_IP) + ipv4(t.src, t.dst, t.proto, l4(t, rng), frag=frag)


def icmp_error(t: Tuple, about: bytes, rng: random.Random) -> bytes:
    """An ICMP (ICMPv6) error from t.src to t.dst quoting `about`, an IP
    packet (a tracked flow's, or any): IPv4 quotes the header and 8 bytes,
    ICMPv6 as much as fits."""
    if t.fam == 4:
        typ, code = rng.choice(((3, 0), (3, 1), (3, 3), (3, 4), (3, 13), (11, 0), (12, 0), (4, 0), (5, 1)))
        quote = about[: ((about[0] & 0xF) * 4 if about else 0) + 8] if rng.random() < 0.8 else about
        rest = struct.pack("!HH", 0, 1400) if (typ, code) == (3, 4) else b"\0\0\0\0"
        msg = struct.pack("!BBH", typ, code, 0) + rest + quote
        msg = msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]
        return eth(ETH_IP) + ipv4(t.src, t.dst, ICMP, msg)
    typ, code = rng.choice(((1, 0), (1, 4), (2, 0), (3, 0), (4, 0)))
    rest = struct.pack("!I", 1280) if typ == 2 else b"\0\0\0\0"
    msg = struct.pack("!BBH", typ, code, 0) + rest + about[:1200]
    c = csum(pseudo(t.src, t.dst, ICMP6, len(msg)) + msg)
    msg = msg[:2] + struct.pack("!H", c) + msg[4:]
    return eth(ETH_IP6) + ipv6(t.src, t.dst, ICMP6, msg)


def icmp_echo(t: Tuple, rng: random.Random) -> bytes:
    if t.fam == 4:
        msg = struct.pack("!BBHHH", 8, 0, 0, 7, 1) + rng.randbytes(8)
        msg = msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]
        return eth(ETH_IP) + ipv4(t.src, t.dst, ICMP, msg)
    msg = struct.pack("!BBHHH", 128, 0, 0, 7, 1) + rng.randbytes(8)
    c = csum(pseudo(t.src, t.dst, ICMP6, len(msg)) + msg)
    return eth(ETH_IP6) + ipv6(t.src, t.dst, ICMP6, msg[:2] + struct.pack("!H", c) + msg[4:])


def vlan(inner: bytes, rng: random.Random) -> bytes:
    """The frame behind one or two VLAN tags (802.1Q, QinQ)."""
    tags = struct.pack("!HH", ETH_VLAN, rng.getrandbits(12))
    if rng.random() < 0.3:
        tags = struct.pack("!HH", ETH_QINQ, rng.getrandbits(12)) + tags
    return inner[:12] + tags + inner[12:]


def other_ethertype(rng: random.Random) -> bytes:
    et = rng.choice((ETH_ARP, 0x88CC, 0x8847, 0x8863, 0x88E5, 0x0842, rng.getrandbits(16)))
    return eth(et) + rng.randbytes(rng.randrange(0, 80))


def random_bytes(rng: random.Random) -> bytes:
    """Random bytes after an Ethernet header whose type is random, or IPv4
    or IPv6 (then at least the fixed header, as the kernel demands)."""
    et = rng.choice((ETH_IP, ETH_IP6, rng.getrandbits(16)))
    n = rng.randrange(MIN_LEN.get(et, 14) - 14, 160)
    body = bytearray(rng.randbytes(n))
    if et == ETH_IP and rng.random() < 0.7:
        body[0] = 0x40 | (body[0] & 0xF)
    if et == ETH_IP6 and rng.random() < 0.7:
        body[0] = 0x60 | (body[0] & 0xF)
    return eth(et) + bytes(body)


def mutate(pkt: bytes, rng: random.Random) -> bytes:
    """One to three changes a parser must survive: a byte flipped anywhere,
    the frame cut short, an IP length, IHL, protocol, version or fragment
    field set at random, or bytes appended. Never below the kernel's
    minimum length for the frame's ethertype."""
    b = bytearray(pkt)
    et = struct.unpack("!H", b[12:14])[0]
    v4, v6 = et == ETH_IP, et == ETH_IP6
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(9)
        if op == 0:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        elif op == 2:
            lo = MIN_LEN.get(et, 14)
            if len(b) > lo:
                del b[rng.randrange(lo, len(b)) :]
        elif op == 3 and v4:
            struct.pack_into(
                "!H", b, 16, rng.choice((0, rng.randrange(0, 20), rng.randrange(20, 60), rng.getrandbits(16)))
            )
        elif op == 3 and v6:
            struct.pack_into("!H", b, 18, rng.choice((0, rng.randrange(0, 20), rng.getrandbits(16))))
        elif op == 4 and v4:
            b[14] = (b[14] & 0xF0) | rng.getrandbits(4)
        elif op == 5 and (v4 or v6):
            b[23 if v4 else 20] = rng.choice((TCP, UDP, ICMP, ICMP6, HOP, FRAGMENT, 132, rng.getrandbits(8)))
        elif op == 6 and (v4 or v6):
            b[14] = (rng.getrandbits(4) << 4) | (b[14] & 0xF)
        elif op == 7 and v4:
            struct.pack_into("!H", b, 20, rng.getrandbits(16))
        else:
            b += rng.randbytes(rng.randrange(1, 32))
    return bytes(b)
