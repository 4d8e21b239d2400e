"""Helpers for the datapath tests (tier 2: BPF_PROG_TEST_RUN).

Packets are built and checked with scapy, a parser that shares no code with
the program under test, and map entries are packed by field name with
ctrl.dataplane.abi (layouts read from ebpf/sliceproxy.h and checked against
the object's BTF); a field a test does not name is zero.

Addresses: only 198.18.0.0/15 and 2001:db8::/32 (docs/architecture.md, "Test tiers").
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, IPOption, IPOption_Router_Alert
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, ICMPv6TimeExceeded, IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from ctrl.dataplane import abi
from ctrl.dataplane.libbpf import ffi, lib
from ctrl.dataplane.maps import Map

TCP_P = socket.IPPROTO_TCP
UDP_P = socket.IPPROTO_UDP

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7  # bpf_redirect(): a hairpin packet sent back into its pod

CLIENT = "198.18.1.1"
CLIENT2 = "198.18.1.2"
VIP = "198.19.0.10"
VIP2 = "198.19.0.11"
BE1 = "198.18.2.1"
BE2 = "198.18.2.2"
BE3 = "198.18.2.3"
UNKNOWN = "198.18.3.3"
CLIENT6 = "2001:db8::1"
VIP6 = "2001:db8::10"

MAC_POD = "02:00:00:00:00:01"
MAC_NODE = "02:00:00:00:00:02"

# The hairpin source addresses the datapath tests load the program with
# (the `dp` fixture): what a pod that is its own Service's backend is
# reached from.
HAIRPIN4 = "198.18.255.254"
HAIRPIN6 = "2001:db8:ffff:ffff::fe"

ETH_HLEN = 14

_TEST_NETS = ("198.18.", "198.19.")


def _check_addr(ip: str) -> str:
    if ":" in ip:
        if not ip.lower().startswith("2001:db8:"):
            raise ValueError(f"{ip}: test addresses must come from 2001:db8::/32")
        return ip
    if not ip.startswith(_TEST_NETS):
        raise ValueError(f"{ip}: test addresses must come from 198.18.0.0/15")
    return ip


# -- addresses -------------------------------------------------------------


def mapped(ip: str) -> bytes:
    """The 16-byte form the maps store: IPv4-mapped (::ffff:a.b.c.d) for
    IPv4, the address itself for IPv6."""
    if ":" in ip:
        return socket.inet_pton(socket.AF_INET6, _check_addr(ip))
    return b"\0" * 10 + b"\xff\xff" + socket.inet_aton(_check_addr(ip))


def unmapped(a16: bytes) -> str:
    """Inverse of mapped: a dotted quad for IPv4-mapped, else IPv6 text."""
    assert len(a16) == 16, a16.hex()
    if a16[:12] != b"\0" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET6, a16)
    return socket.inet_ntoa(a16[12:])


# -- packets ---------------------------------------------------------------


def eth() -> Ether:
    return Ether(src=MAC_POD, dst=MAC_NODE)


def ip4(src: str, dst: str, ip_flags: str = "", frag: int = 0, ip_options=None) -> IP:
    ip = IP(src=_check_addr(src), dst=_check_addr(dst), ttl=63, id=0x1234, flags=ip_flags, frag=frag)
    if ip_options is not None:
        ip.options = ip_options
    return ip


def tcp(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    flags: str = "S",
    payload: bytes = b"",
    ip_options=None,
    **ipkw,
) -> bytes:
    """An Ethernet/IPv4/TCP frame with real-looking TCP options."""
    ip = ip4(src, dst, ip_options=ip_options, **ipkw)
    opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123456, 0)), ("NOP", None), ("WScale", 7)]
    seg = TCP(
        sport=sport, dport=dport, flags=flags, seq=1000, ack=0 if flags == "S" else 2000, window=64240, options=opts
    )
    return bytes(eth() / ip / seg / Raw(payload)) if payload else bytes(eth() / ip / seg)


def udp(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    payload: bytes = b"sliceproxy-udp",
    chksum: int | None = None,
    ip_options=None,
    **ipkw,
) -> bytes:
    """An Ethernet/IPv4/UDP frame; chksum=0 means "no checksum" (RFC 768)."""
    ip = ip4(src, dst, ip_options=ip_options, **ipkw)
    return bytes(eth() / ip / UDP(sport=sport, dport=dport, chksum=chksum) / Raw(payload))


def icmp_echo(src: str, dst: str) -> bytes:
    return bytes(eth() / ip4(src, dst) / ICMP(type=8, id=7, seq=1) / Raw(b"ping"))


def arp_request(src: str, dst: str) -> bytes:
    return bytes(Ether(src=MAC_POD, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=MAC_POD, psrc=src, pdst=dst))


def ipv6_tcp(sport: int, dport: int) -> bytes:
    return bytes(eth() / IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=sport, dport=dport, flags="S"))


def router_alert() -> list:
    """One 4-byte IP option (ihl=6). Its bytes (94 04 00 00) read as ports
    would be 37892 -> 0: a program that ignored ihl would not find the VIP."""
    return [IPOption_Router_Alert()]


def max_options() -> list:
    """40 bytes of options (ihl=15, the maximum): 39 NOPs and an EOL."""
    return [IPOption(b"\x01" * 39 + b"\x00")]


def set_bytes(pkt: bytes, off: int, new: bytes) -> bytes:
    return pkt[:off] + new + pkt[off + len(new) :]


def l4_offset(pkt: bytes) -> int:
    return ETH_HLEN + (pkt[ETH_HLEN] & 0x0F) * 4


# -- either family ----------------------------------------------------------


def is6(ip: str) -> bool:
    return ":" in ip


def frame(src: str, dst: str, l4, ip_options=None) -> bytes:
    """Ether / IPv4 or IPv6 (by the addresses' family) / l4 (scapy layers)."""
    if is6(src):
        return bytes(eth() / IPv6(src=_check_addr(src), dst=_check_addr(dst), hlim=63) / l4)
    return bytes(eth() / ip4(src, dst, ip_options=ip_options) / l4)


def l4pkt(proto: int, src: str, dst: str, sport: int, dport: int, flags: str = "S", payload: bytes = b"") -> bytes:
    """A TCP segment (flags; a payload if given) or a UDP datagram (payload
    defaults to the flags, so each step of a flow differs), either family."""
    if proto == TCP_P:
        seg = TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=0 if flags == "S" else 2000, window=64240)
        return frame(src, dst, seg / Raw(payload) if payload else seg)
    return frame(src, dst, UDP(sport=sport, dport=dport) / Raw(payload or flags.encode()))


def swap_macs(raw: bytes) -> bytes:
    """The frame with its Ethernet source and destination exchanged: how a
    packet sent back into the pod it came from leaves."""
    return raw[6:12] + raw[0:6] + raw[12:]


def ip_part(raw: bytes) -> bytes:
    """The IP packet of a frame (what an ICMP error quotes)."""
    return raw[ETH_HLEN:]


ICMP_KINDS = ("port-unreachable", "too-big", "time-exceeded")


def icmp_error(src: str, dst: str, quoted: bytes, kind: str = "port-unreachable", ip_options=None) -> bytes:
    """Ether / IP src -> dst / an ICMP (ICMPv6 for IPv6 addresses) error of
    kind ICMP_KINDS quoting `quoted` (an IP packet, cut where the sender of
    the error cut it). Checksums computed by scapy."""
    if is6(src):
        msg = {
            "port-unreachable": ICMPv6DestUnreach(code=4),
            "too-big": ICMPv6PacketTooBig(mtu=1280),
            "time-exceeded": ICMPv6TimeExceeded(code=0),
        }[kind]
    else:
        msg = {
            "port-unreachable": ICMP(type=3, code=3),
            "too-big": ICMP(type=3, code=4, nexthopmtu=1280),
            "time-exceeded": ICMP(type=11, code=0),
        }[kind]
    return frame(src, dst, msg / Raw(quoted), ip_options=ip_options)


def _icmp_layer(p: Ether):
    if IP in p:
        return p[ICMP]
    for cls in (ICMPv6DestUnreach, ICMPv6PacketTooBig, ICMPv6TimeExceeded):
        if cls in p:
            return p[cls]
    raise AssertionError(f"no ICMP error in {p!r}")


def verify_icmp_checksums(raw: bytes) -> Ether:
    """Parse an ICMP error frame with scapy and recompute from scratch the
    outer IPv4 header checksum, the ICMP checksum (ICMPv6: over its
    pseudo-header too) and the quoted IPv4 header's checksum: each must
    equal the one in raw. (A quoted TCP/UDP checksum covers data the quote
    may not hold: tests compare the quote with the packet it stands for.)"""
    p = Ether(raw)
    assert bytes(p) == raw, "scapy does not round-trip the output frame"
    q = Ether(raw)
    field = "chksum" if IP in q else "cksum"
    if IP in q:
        del q[IP].chksum
        if IPerror in q:
            del q[IPerror].chksum
    delattr(_icmp_layer(q), field)
    r = Ether(bytes(q))
    if IP in p:
        assert p[IP].chksum == r[IP].chksum, f"IPv4 header checksum {p[IP].chksum:#06x}, correct {r[IP].chksum:#06x}"
        if IPerror in p:
            got, want = p[IPerror].chksum, r[IPerror].chksum
            assert got == want, f"quoted IPv4 header checksum {got:#06x}, correct {want:#06x}"
    got, want = getattr(_icmp_layer(p), field), getattr(_icmp_layer(r), field)
    assert got == want, f"ICMP checksum {got:#06x}, correct {want:#06x}"
    return p


# -- checking output ------------------------------------------------------


def nat_offsets(pkt: bytes, which: str) -> set[int]:
    """Byte offsets a DNAT ("dst") or reverse NAT ("src") may change: the
    address, the port, the IP checksum and the L4 checksum."""
    proto = pkt[ETH_HLEN + 9]
    l4 = l4_offset(pkt)
    addr = ETH_HLEN + (16 if which == "dst" else 12)
    port = l4 + (2 if which == "dst" else 0)
    csum = l4 + (16 if proto == TCP_P else 6)
    ipck = ETH_HLEN + 10
    return set(range(addr, addr + 4)) | {port, port + 1, csum, csum + 1, ipck, ipck + 1}


def changed_offsets(a: bytes, b: bytes) -> set[int]:
    assert len(a) == len(b), f"length changed: {len(a)} -> {len(b)}"
    return {i for i in range(len(a)) if a[i] != b[i]}


def verify_checksums(raw: bytes) -> Ether:
    """Parse the frame with scapy, recompute the IPv4 header checksum and the
    TCP/UDP checksum from scratch, and check they equal those in raw."""
    p = Ether(raw)
    assert IP in p, f"not an IPv4 frame: {p!r}"
    assert bytes(p) == raw, "scapy does not round-trip the output frame"
    q = Ether(raw)
    del q[IP].chksum
    l4 = TCP if TCP in p else UDP if UDP in p else None
    assert l4 is not None, f"no TCP/UDP header parsed in {p!r}"
    udp_none = l4 is UDP and p[UDP].chksum == 0
    if not udp_none:
        del q[l4].chksum
    r = Ether(bytes(q))
    assert p[IP].chksum == r[IP].chksum, f"IPv4 header checksum {p[IP].chksum:#06x}, correct {r[IP].chksum:#06x}"
    if not udp_none:
        assert p[l4].chksum == r[l4].chksum, f"{l4.__name__} checksum {p[l4].chksum:#06x}, correct {r[l4].chksum:#06x}"
    return p


# -- maps ------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    id: int
    addr: str
    port: int
    proto: int = TCP_P
    flags: int = 0  # SP_BE_F_*


@dataclass(frozen=True)
class Svc:
    """A frontend and its slots. count defaults to len(slots); a different
    count seeds deliberately inconsistent maps. The slots go under slots_id
    (the slot table other frontends may share), or with slots_id 0 (an
    entry as layout 3 left it) under svc_id."""

    addr: str
    port: int
    proto: int
    svc_id: int
    slots: tuple[int, ...] = ()
    scope: int = 0  # SP_SCOPE_INTERNAL
    count: int | None = None
    affinity_timeout: int = 0  # seconds; non-zero sets SP_SVC_F_AFFINITY
    flags: int = 0  # more SP_SVC_F_* (SRC_RANGES, MASQ)
    slots_id: int = 0


class CtKey(NamedTuple):
    saddr: str
    daddr: str
    sport: int
    dport: int
    proto: int
    dir: int


class CtVal(NamedTuple):
    nat_addr: str | None
    nat_port: int
    backend_id: int
    svc_id: int
    addr2: str | None = None  # forward: SNAT address; snat: the frontend
    port2: int = 0
    flags: int = 0  # unsnat: SP_CT_F_*


ZERO16 = b"\0" * 16


def _a16(ip: str | None) -> bytes:
    return ZERO16 if ip is None else mapped(ip)


def _ip(a16: bytes) -> str | None:
    return None if a16 == ZERO16 else unmapped(a16)


@dataclass
class Seed:
    services: tuple[Svc, ...] = ()
    backends: tuple[Backend, ...] = ()
    ct: dict[CtKey, CtVal] = field(default_factory=dict)


FORWARD = abi.CT_FORWARD
REPLY = abi.CT_REPLY
# last_seen of seeded conntrack entries: a value the tests recognise. How
# old it looks depends on the clock; a test that needs an age writes one
# with stamp().
SEEDED_LAST_SEEN = 1


# -- the programs' clock -------------------------------------------------------
# The programs stamp entries with bpf_ktime_get_ns() (CLOCK_MONOTONIC) plus
# sp_clock_shift, a global the tests may set: set_uptime(dp, 5) runs them as
# on a machine booted 5 seconds ago, whatever this machine's uptime, so the
# stamps the aging tests write ("idle for 600 s") lie before the clock's zero
# and wrap around, as they would in the first minute after boot.

NS = 1_000_000_000
U64 = 1 << 64


def _clock_map(dp) -> Map | None:
    """The map of the programs' .data.clock section (sp_clock_shift), or
    None for an object built without it."""
    m = lib().bpf_object__next_map(dp._obj, ffi.NULL)
    while m != ffi.NULL:
        if ffi.string(lib().bpf_map__name(m)) == b".data.clock":
            return Map(lib().bpf_map__fd(m), ".data.clock")
        m = lib().bpf_object__next_map(dp._obj, m)
    return None


def clock_shift(dp) -> int:
    m = _clock_map(dp)
    raw = m.lookup((0).to_bytes(4, "little")) if m is not None else None
    return int.from_bytes(raw[:8], "little") if raw else 0


def set_uptime(dp, seconds: float | None) -> None:
    """Shift the programs' clock so that it reads `seconds` now; None: the
    machine's own clock (no shift)."""
    shift = 0 if seconds is None else (int(seconds * NS) - time.clock_gettime_ns(time.CLOCK_MONOTONIC)) % U64
    m = _clock_map(dp)
    if m is None:
        assert seconds is None, "this BPF object has no sp_clock_shift: it cannot run at another uptime"
        return
    m.update((0).to_bytes(4, "little"), shift.to_bytes(8, "little"))


def prog_now(dp) -> int:
    """What now_ns() in the programs reads at this moment."""
    return (time.clock_gettime_ns(time.CLOCK_MONOTONIC) + clock_shift(dp)) % U64


def stamp(dp, idle: float) -> int:
    """A stamp `idle` seconds old by the programs' clock (negative: ahead of
    it), modulo 2**64 as the programs compute ages."""
    return (prog_now(dp) - int(idle * NS)) % U64


def idle_of(dp, last_seen: int) -> float:
    """Seconds since last_seen by the programs' clock (negative: ahead)."""
    d = (prog_now(dp) - last_seen) % U64
    return (d - U64 if d >= 1 << 63 else d) / NS


def mapname(base: str) -> str:
    """A map's name in this build (sp_ct -> sp_ct_v5): the layout version
    comes from the header, so a layout change renames no test."""
    return abi.map_name(base)


def svc_key(addr: str, port: int, proto: int, scope: int = 0) -> bytes:
    return abi.pack("sp_svc_key", addr=mapped(addr), port=port, proto=proto, scope=scope)


def put_service(dp, s: Svc) -> None:
    count = len(s.slots) if s.count is None else s.count
    for i, be_id in enumerate(s.slots):
        put_slot(dp, s.slots_id or s.svc_id, i, be_id)
    flags = (abi.const("SP_SVC_F_AFFINITY") if s.affinity_timeout else 0) | s.flags
    dp.maps[mapname("sp_svc")].update(
        svc_key(s.addr, s.port, s.proto, s.scope),
        abi.pack(
            "sp_svc_val",
            svc_id=s.svc_id,
            count=count,
            flags=flags,
            affinity_timeout=s.affinity_timeout,
            slots_id=s.slots_id,
        ),
    )


def put_slot(dp, svc_id: int, slot: int, backend_id: int) -> None:
    dp.maps[mapname("sp_slot")].update(
        abi.pack("sp_slot_key", svc_id=svc_id, slot=slot), abi.pack("sp_slot_val", backend_id=backend_id)
    )


def put_backend(dp, b: Backend) -> None:
    dp.maps[mapname("sp_be")].update(
        abi.u32(b.id), abi.pack("sp_backend", addr=mapped(b.addr), port=b.port, proto=b.proto, flags=b.flags)
    )


def del_backend(dp, be_id: int) -> None:
    assert dp.maps[mapname("sp_be")].delete(abi.u32(be_id))


def ct_key_bytes(k: CtKey) -> bytes:
    a, b = mapped(k.saddr), mapped(k.daddr)
    return abi.pack("sp_ct_key", saddr=a, daddr=b, sport=k.sport, dport=k.dport, proto=k.proto, dir=k.dir)


def ct_val_bytes(v: CtVal, last_seen: int = 0) -> bytes:
    return abi.pack(
        "sp_ct_val",
        nat_addr=_a16(v.nat_addr),
        nat_port=v.nat_port,
        backend_id=v.backend_id,
        svc_id=v.svc_id,
        last_seen=last_seen,
        addr2=_a16(v.addr2),
        port2=v.port2,
        flags=v.flags,
    )


def put_ct(dp, k: CtKey, v: CtVal, last_seen: int = SEEDED_LAST_SEEN) -> None:
    dp.maps[mapname("sp_ct")].update(ct_key_bytes(k), ct_val_bytes(v, last_seen))


def seed(dp, s: Seed) -> None:
    for b in s.backends:
        put_backend(dp, b)
    for sv in s.services:
        put_service(dp, sv)
    for k, v in s.ct.items():
        put_ct(dp, k, v)


def _pad_ranges(sname: str) -> list[tuple[int, int]]:
    return [(off, off + size) for name, off, size in abi.describe(sname) if name.startswith("pad")]


def ct_dump(dp) -> dict[CtKey, tuple[CtVal, int]]:
    """Every conntrack entry, decoded: key -> (value, last_seen). Pad bytes
    must be zero: a key with garbage in its pad would never be found again."""
    out = {}
    for kb, vb in dp.maps[mapname("sp_ct")].items():
        for raw, sname in ((kb, "sp_ct_key"), (vb, "sp_ct_val")):
            for a, b in _pad_ranges(sname):
                assert raw[a:b] == b"\0" * (b - a), f"{sname} pad bytes {a}..{b} not zero: {raw.hex()}"
        k, v = abi.unpack("sp_ct_key", kb), abi.unpack("sp_ct_val", vb)
        key = CtKey(unmapped(k["saddr"]), unmapped(k["daddr"]), k["sport"], k["dport"], k["proto"], k["dir"])
        val = CtVal(
            _ip(v["nat_addr"]), v["nat_port"], v["backend_id"], v["svc_id"], _ip(v["addr2"]), v["port2"], v["flags"]
        )
        out[key] = (val, v["last_seen"])
    return out


def ct_pair(client: str, cport: int, vip: str, vport: int, be: Backend, svc_id: int, proto: int) -> dict[CtKey, CtVal]:
    """The two entries a new flow must create: forward (client -> frontend,
    value: the backend) and reply (backend -> client, value: the frontend)."""
    return {
        CtKey(client, vip, cport, vport, proto, FORWARD): CtVal(be.addr, be.port, be.id, svc_id),
        CtKey(be.addr, client, be.port, cport, proto, REPLY): CtVal(vip, vport, be.id, svc_id),
    }


def verdict_names() -> list[str]:
    return [v.upper() for v in abi.verdicts()]


def stats(dp) -> dict[str, tuple[int, int]]:
    """Non-zero per-verdict counters summed over CPUs: name -> (packets, bytes)."""
    out = {}
    for name, c in abi.counters(dp.maps).items():
        if c["packets"] or c["bytes"]:
            out[name.upper()] = (c["packets"], c["bytes"])
    return out


@dataclass
class Run:
    retval: int
    out: bytes
    counted: dict[str, tuple[int, int]]  # counters this packet moved
    t0: int  # the programs' clock (prog_now) at the bounds of the run
    t1: int


def run(dp, pkt: bytes, egress: bool = False, external: bool = False) -> Run:
    """One packet through the ingress (or egress) program of a pod (or an
    external) interface, with the counters it moved."""
    before = stats(dp)
    shift = clock_shift(dp)
    t0 = (time.clock_gettime_ns(time.CLOCK_MONOTONIC) + shift) % U64
    retval, out, _ = dp.test_run(pkt, egress=egress, external=external)
    t1 = (time.clock_gettime_ns(time.CLOCK_MONOTONIC) + shift) % U64
    after = stats(dp)
    delta = {}
    for k, (p, b) in after.items():
        p0, b0 = before.get(k, (0, 0))
        if (p - p0, b - b0) != (0, 0):
            delta[k] = (p - p0, b - b0)
    return Run(retval, out, delta, t0, t1)
