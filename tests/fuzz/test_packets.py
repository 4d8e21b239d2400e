"""Tier 6: random and mutated packets through every program.

Each packet goes through all four tc programs (sp_tc_ingress, sp_tc_egress,
sp_ext_ingress, sp_ext_egress) and the external interfaces' XDP program
(sp_ext_xdp, without forwarding: it runs no route lookup here) by
BPF_PROG_TEST_RUN, with Services and
established flows programmed (world.py): random bytes, truncated headers,
IPv4 options, IPv6 extension headers, fragments, ICMP and ICMPv6 (errors
quoting packets of tracked flows included), every TCP flag combination,
packets to programmed frontends with random ports, VLAN tags and other
ethertypes, and well-formed packets broken by one to three mutations.

What must hold for every run:
- the return code is a verdict the programs give (TC_ACT_OK or SHOT, and
  at a pod's ingress TC_ACT_REDIRECT: a hairpin flow's packets go straight
  back into the pod they came from);
- a packet addressed to no frontend and belonging to no tracked flow
  leaves byte for byte as it came, and is not dropped. The judge is an
  independent parser in this file that errs towards "related": any
  frontend's address, port and protocol at a place an L4 header may be
  (IPv4 header length honoured, IPv6 extension headers walked, VLAN tags
  skipped), a conntrack entry for the packet's addresses and ports in any
  direction, or an ICMP message naming an address of the world (the
  programs may translate ICMP errors about tracked flows);
- every run of a tc program is counted under exactly one verdict; the XDP
  program either passes a packet byte for byte as it came, uncounted (tc
  counts it), or drops one of the world's packets, counted as
  drop_source_range, and one the external tc ingress drops too;
- rewritten well-formed packets carry correct checksums (scapy recomputes
  them, for a sample);
- the kernel logs no WARNING, BUG or bpf line during the run.

SLICEPROXY_FUZZ_SEED=N replays a run (the seed is printed, and named in
every failure); SLICEPROXY_FUZZ_PACKETS sets the number of packets
(default 50,000 in `make test`; `make fuzz` runs 1,000,000).
"""

from __future__ import annotations

import errno
import os
import random
import re
import struct
import time
from collections import Counter

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from ctrl.dataplane import abi
from ctrl.dataplane.libbpf import ffi, lib

from ..datapath.packets import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, stats
from . import gen
from .world import World, program

DEFAULT_PACKETS = 50_000
# What the programs return; any other value (an SP_V_* index returned by
# mistake, say) is a bug. Only the ingress programs redirect: hairpin
# packets go back into the pod they came from (docs/semantics.md,
# "Hairpin"), and a rejected packet, turned into an ICMP error, back out
# of the interface it came in by.
VERDICTS = {TC_ACT_OK, TC_ACT_SHOT}
PROG_VERDICTS = {"sp_tc_ingress": VERDICTS | {TC_ACT_REDIRECT}, "sp_ext_ingress": VERDICTS | {TC_ACT_REDIRECT}}
XDP_DROP, XDP_PASS = 1, 2
SCAPY_SAMPLE = 200  # rewritten well-formed packets also re-checked by scapy (slow)
KERNEL_TROUBLE = re.compile(r"WARNING|BUG|Oops|Call Trace|general protection|\bbpf|\bBPF")


# -- the programs, run without per-packet allocations ----------------------------


class Prog:
    OUT = 4096

    def __init__(self, name: str, fd: int):
        self.name, self.fd = name, fd
        self.out = ffi.new("char[]", self.OUT)
        self.opts = ffi.new(
            "struct bpf_test_run_opts *",
            {"sz": ffi.sizeof("struct bpf_test_run_opts"), "data_out": self.out, "repeat": 1},
        )
        self.run_ = lib().bpf_prog_test_run_opts

    def run(self, pkt: bytes) -> tuple[int, bytes] | int:
        """(return code, frame out), or the errno of a refused run."""
        buf = ffi.from_buffer(pkt)
        o = self.opts
        o.data_in, o.data_size_in, o.data_size_out = buf, len(pkt), self.OUT
        if self.run_(self.fd, o) != 0:
            return ffi.errno
        return o.retval, ffi.buffer(self.out, o.data_size_out)[:]


# -- the judge: could this packet be one the programs own? -----------------------


class Judge:
    def __init__(self, dp, world: World):
        self.w = world
        self.ct = dp.maps[abi.map_name("sp_ct")]
        self.kc = abi.codec("sp_ct_key", ("saddr", "daddr", "sport", "dport", "proto", "dir"))
        # Every conntrack direction the header defines (SP_CT_*, not the flags).
        self.dirs = [abi.const(c) for c in abi.constants_with_prefix("SP_CT_") if not c.startswith("SP_CT_F_")]

        self.frag = dp.maps[abi.map_name("sp_frag")]
        self.fk = abi.codec("sp_frag_key", ("saddr", "daddr", "id", "proto", "hook"))

    def frag_tracked(self, pkt: bytes) -> bool:
        """A fragment other than the first whose datagram's first fragment
        was translated (sp_frag, at any attach point): the programs give
        it the same rewrite."""
        et = struct.unpack_from("!H", pkt, 12)[0]
        if et == gen.ETH_IP and len(pkt) >= 34:
            src, dst, ident, proto = v4(pkt[26:30]), v4(pkt[30:34]), struct.unpack_from("!H", pkt, 18)[0], pkt[23]
        elif et == gen.ETH_IP6 and len(pkt) >= 62 and pkt[20] == gen.FRAGMENT:
            src, dst, ident, proto = pkt[22:38], pkt[38:54], struct.unpack_from("!I", pkt, 58)[0], pkt[54]
        else:
            return False
        return any(self.frag.lookup(self.fk.pack(src, dst, ident, proto, h)) is not None for h in range(4))

    def tracked(self, src: bytes, dst: bytes, sport: int, dport: int, proto: int) -> bool:
        return any(self.ct.lookup(self.kc.pack(src, dst, sport, dport, proto, d)) is not None for d in self.dirs)

    def related(self, pkt: bytes) -> bool:
        if self.frag_tracked(pkt):
            return True
        for src, dst, proto, off, end in views(pkt):
            # A TCP or UDP header counts only whole, in the frame and in the
            # datagram (docs/semantics.md).
            if proto in (gen.TCP, gen.UDP) and off + (20 if proto == gen.TCP else 8) <= min(len(pkt), end):
                sport, dport = struct.unpack_from("!HH", pkt, off)
                if (dst, dport, proto) in self.w.frontends or self.tracked(src, dst, sport, dport, proto):
                    return True
            if proto in (gen.ICMP, gen.ICMP6):
                if src in self.w.addrs or dst in self.w.addrs:
                    return True
                inner = quoted(pkt, off + 8)
                if inner and (inner[0] in self.w.addrs or inner[1] in self.w.addrs):
                    return True
        return False


def v4(a: bytes) -> bytes:
    return b"\0" * 10 + b"\xff\xff" + a


def views(pkt: bytes):
    """(source, destination, protocol, offset, end of the datagram) of every
    place a parser may take for an L4 header: after the IPv4 header (its
    IHL honoured; not in a fragment other than the first), after the IPv6
    header and after each of its extension headers; behind up to two VLAN
    tags too."""
    off, et = 12, struct.unpack_from("!H", pkt, 12)[0]
    starts = [(off + 2, et)]
    for _ in range(2):
        if et in (gen.ETH_VLAN, gen.ETH_QINQ) and len(pkt) >= off + 6:
            off += 4
            et = struct.unpack_from("!H", pkt, off)[0]
            starts.append((off + 2, et))
    for base, et in starts:
        if et == gen.ETH_IP and len(pkt) >= base + 20:
            ihl = (pkt[base] & 0xF) * 4
            frag_off = struct.unpack_from("!H", pkt, base + 6)[0] & 0x1FFF
            end = base + struct.unpack_from("!H", pkt, base + 2)[0]
            if ihl >= 20 and not frag_off:
                yield v4(pkt[base + 12 : base + 16]), v4(pkt[base + 16 : base + 20]), pkt[base + 9], base + ihl, end
        elif et == gen.ETH_IP6 and len(pkt) >= base + 40:
            src, dst = pkt[base + 8 : base + 24], pkt[base + 24 : base + 40]
            nh, o = pkt[base + 6], base + 40
            end = o + struct.unpack_from("!H", pkt, base + 4)[0]
            for _ in range(8):
                yield src, dst, nh, o, end
                if len(pkt) < o + 8:
                    break
                if nh in (gen.HOP, gen.ROUTING, gen.DSTOPTS):
                    nh, o = pkt[o], o + (pkt[o + 1] + 1) * 8
                elif nh == gen.FRAGMENT:
                    if struct.unpack_from("!H", pkt, o + 2)[0] >> 3:
                        break  # not the first fragment: no L4 header
                    nh, o = pkt[o], o + 8
                elif nh == gen.AH:
                    nh, o = pkt[o], o + (pkt[o + 1] + 2) * 4
                else:
                    break


def quoted(pkt: bytes, off: int) -> tuple[bytes, bytes] | None:
    """Source and destination of the IP header an ICMP error quotes."""
    if len(pkt) >= off + 20 and pkt[off] >> 4 == 4:
        return v4(pkt[off + 12 : off + 16]), v4(pkt[off + 16 : off + 20])
    if len(pkt) >= off + 40 and pkt[off] >> 4 == 6:
        return pkt[off + 8 : off + 24], pkt[off + 24 : off + 40]
    return None


# -- packets -----------------------------------------------------------------------


class Source:
    """The seeded packet sequence. Returns (frame, clean): clean frames are
    well-formed with right checksums, so a rewrite must keep them right."""

    def __init__(self, rng: random.Random, world: World):
        self.rng, self.w = rng, world
        # Sorted: a set's order changes with each process's hash seed, and
        # a seed must replay the same packets.
        self.fronts = sorted(world.frontends)
        self.addrs = {fam: sorted(a for a in world.addrs if gen.fam_of(a) == fam) for fam in (4, 6)}
        self.flags = 0  # every TCP flag byte in turn, for the flows' packets

    def front_tuple(self) -> gen.Tuple:
        r = self.rng
        addr, port, proto = r.choice(self.fronts)
        fam = gen.fam_of(addr)
        src = r.choice(self.addrs[fam]) if r.random() < 0.3 else gen.random_addr(r, fam)
        if r.random() < 0.1:
            proto = gen.UDP if proto == gen.TCP else gen.TCP
        return gen.Tuple(src, addr, r.getrandbits(16), port if r.random() < 0.6 else r.getrandbits(16), proto)

    def flow_tuple(self) -> gen.Tuple:
        return self.rng.choice(self.w.flows)

    def random_tuple(self) -> gen.Tuple:
        r = self.rng
        fam = r.choice((4, 6))
        return gen.Tuple(
            gen.random_addr(r, fam), gen.random_addr(r, fam), r.getrandbits(16), r.getrandbits(16), r.choice((6, 17))
        )

    def any_tuple(self) -> gen.Tuple:
        return self.rng.choice((self.front_tuple, self.flow_tuple, self.random_tuple))()

    def next_flags(self) -> int:
        self.flags = (self.flags + 1) % 256
        return self.flags

    def __call__(self) -> tuple[bytes, bool]:
        r = self.rng
        k = r.random()
        if k < 0.18:
            return gen.clean(self.front_tuple(), r), True
        if k < 0.36:
            t = self.flow_tuple()
            return gen.clean(t, r, self.next_flags() if t.proto == gen.TCP else None), True
        if k < 0.42:
            return gen.clean(self.random_tuple(), r), True
        if k < 0.60:
            return gen.mutate(gen.clean(self.any_tuple(), r), r), False
        if k < 0.66:
            t = self.any_tuple()
            if t.fam == 4:
                return gen.with_v4_options(t, r), False
            return gen.with_v6_ext_headers(t, r), False
        if k < 0.70:
            return gen.with_v6_ext_headers(self._v6(), r), False
        if k < 0.75:
            t = self.any_tuple()
            return (gen.fragment(t, r) if t.fam == 4 else gen.with_v6_ext_headers(t, r)), False
        if k < 0.84:
            return self._icmp(), False
        if k < 0.88:
            return gen.vlan(gen.clean(self.any_tuple(), r), r), False
        if k < 0.91:
            return gen.other_ethertype(r), False
        return gen.random_bytes(r), False

    def _v6(self) -> gen.Tuple:
        for _ in range(10):
            t = self.any_tuple()
            if t.fam == 6:
                return t
        return gen.Tuple(gen.random_addr(self.rng, 6), gen.random_addr(self.rng, 6), 1, 2, gen.TCP)

    def _icmp(self) -> bytes:
        r = self.rng
        about = self.flow_tuple() if r.random() < 0.6 else self.any_tuple()
        quoted_pkt = gen.clean(about, r)[14:]
        # From a router or the far end, to either end of the quoted packet.
        peer = gen.random_addr(r, about.fam) if r.random() < 0.5 else about.dst
        to = about.src if r.random() < 0.7 else gen.random_addr(r, about.fam)
        t = gen.Tuple(peer, to, 0, 0, gen.ICMP if about.fam == 4 else gen.ICMP6)
        if r.random() < 0.2:
            return gen.icmp_echo(t, r)
        pkt = gen.icmp_error(t, quoted_pkt, r)
        return gen.mutate(pkt, r) if r.random() < 0.2 else pkt


# -- the kernel's log --------------------------------------------------------------


def kmsg() -> list[tuple[int, str]]:
    """(sequence number, text) of every record in the kernel's log buffer
    (what dmesg reads)."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    out = []
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # overwritten while we read: go on
                    continue
                raise
            head, _, text = rec.decode(errors="replace").partition(";")
            out.append((int(head.split(",")[1]), text.split("\n", 1)[0]))
    finally:
        os.close(fd)
    return out


# -- the run -----------------------------------------------------------------------


def sums_wrong(raw: bytes) -> str | None:
    """None if the IPv4 header and TCP/UDP checksums of a well-formed frame
    (as Source makes them: no VLAN, options or extension headers) sum right;
    else what is wrong."""
    et = struct.unpack_from("!H", raw, 12)[0]
    if et == gen.ETH_IP:
        ihl = (raw[14] & 0xF) * 4
        if gen.csum(raw[14 : 14 + ihl]):
            return "IPv4 header checksum wrong"
        proto, end = raw[23], 14 + struct.unpack_from("!H", raw, 16)[0]
        src, dst, l4 = v4(raw[26:30]), v4(raw[30:34]), 14 + ihl
    elif et == gen.ETH_IP6:
        proto, end = raw[20], 54 + struct.unpack_from("!H", raw, 18)[0]
        src, dst, l4 = raw[22:38], raw[38:54], 54
    else:
        return None
    if proto in (gen.ICMP, gen.ICMP6):
        msg = raw[l4:end]
        sum_over = msg if proto == gen.ICMP else gen.pseudo(src, dst, proto, len(msg)) + msg
        return "ICMP checksum wrong" if gen.csum(sum_over) else None
    if proto not in (gen.TCP, gen.UDP):
        return None
    seg = raw[l4:end]
    if proto == gen.UDP and et == gen.ETH_IP and seg[6:8] == b"\0\0":
        return None  # IPv4 UDP without a checksum
    if gen.csum(gen.pseudo(src, dst, proto, len(seg)) + seg):
        return ("TCP" if proto == gen.TCP else "UDP") + " checksum wrong"
    return None


def scapy_sums_wrong(raw: bytes) -> str | None:
    """The same judged by scapy, which recomputes them from scratch."""
    p = Ether(raw)
    ip = IP if IP in p else IPv6 if IPv6 in p else None
    l4 = TCP if TCP in p else UDP if UDP in p else None
    if ip is None or l4 is None:
        return None
    q = Ether(raw)
    if ip is IP:
        del q[IP].chksum
    if not (l4 is UDP and ip is IP and p[UDP].chksum == 0):
        del q[l4].chksum
    r = Ether(bytes(q))
    if ip is IP and r[IP].chksum != p[IP].chksum:
        return f"IPv4 header checksum {p[IP].chksum:#06x}, correct {r[IP].chksum:#06x}"
    if r[l4].chksum != p[l4].chksum:
        return f"{l4.__name__} checksum {p[l4].chksum:#06x}, correct {r[l4].chksum:#06x}"
    return None


def is_icmp_unreach(out: bytes) -> bool:
    et = struct.unpack_from("!H", out, 12)[0]
    if et == gen.ETH_IP and len(out) >= 42:
        return out[23] == gen.ICMP and out[34] == 3
    return et == gen.ETH_IP6 and len(out) >= 62 and out[20] == gen.ICMP6 and out[54] == 1


def reject_wrong(pkt: bytes, out: bytes) -> str | None:
    """None if out is the ICMP (ICMPv6) port unreachable about pkt that a
    rejected packet becomes (docs/semantics.md): Ethernet addresses
    swapped, the addresses swapped, and the quote the start of pkt's
    datagram, at most 576 (1280) bytes in all; else what is wrong."""
    et = struct.unpack_from("!H", pkt, 12)[0]
    if out[:6] != pkt[6:12] or out[6:12] != pkt[:6] or out[12:14] != pkt[12:14]:
        return "Ethernet addresses not swapped"
    if et == gen.ETH_IP:
        if out[14 + 12 : 14 + 20] != pkt[14 + 16 : 14 + 20] + pkt[14 + 12 : 14 + 16]:
            return "addresses not swapped"
        dgram = pkt[14 : 14 + struct.unpack_from("!H", pkt, 16)[0]]
        head, limit = out[34:42], 576
        want = bytes([3, 3])
    else:
        if out[14 + 8 : 14 + 40] != pkt[14 + 24 : 14 + 40] + pkt[14 + 8 : 14 + 24]:
            return "addresses not swapped"
        dgram = pkt[14 : 14 + 40 + struct.unpack_from("!H", pkt, 18)[0]]
        head, limit = out[54:62], 1280
        want = bytes([1, 4])
    quote = out[(42 if et == gen.ETH_IP else 62) :]
    if head[:2] != want:
        return f"ICMP type/code {head[:2].hex()}"
    if len(out) - 14 > limit or quote != dgram[: len(quote)] or (len(quote) < len(dgram) and len(out) - 14 < limit):
        return "the quote is not the start of the datagram, cut at the limit"
    return sums_wrong(out)


def test_random_packets_through_every_program(dp):
    seed = int(os.environ.get("SLICEPROXY_FUZZ_SEED") or random.SystemRandom().getrandbits(32))
    n = int(os.environ.get("SLICEPROXY_FUZZ_PACKETS") or DEFAULT_PACKETS)
    replay = f"seed {seed} (replay: SLICEPROXY_FUZZ_SEED={seed} SLICEPROXY_FUZZ_PACKETS={n})"
    print(f"\nfuzz: {replay}")

    world = program(dp)
    judge = Judge(dp, world)
    source = Source(random.Random(seed), world)
    progs = [
        Prog("sp_tc_ingress", dp.prog_fd),
        Prog("sp_tc_egress", dp.egress_fd),
        Prog("sp_ext_ingress", dp.ext_fd),
        Prog("sp_ext_egress", dp.ext_egress_fd),
    ]
    xdp = Prog("sp_ext_xdp", dp.xdp_fd)
    xdp_drops = 0
    before = {k: v[0] for k, v in stats(dp).items()}
    log_seq = max((s for s, _ in kmsg()), default=-1)

    problems: list[str] = []
    outcome: Counter[str] = Counter()
    checked_sums = by_scapy = 0
    t0 = time.perf_counter()
    for i in range(n):
        pkt, clean = source()
        xdp_dropped = False
        res = xdp.run(pkt)
        if isinstance(res, int):
            problems.append(f"packet {i} sp_ext_xdp: refused by the kernel ({os.strerror(res)}): {pkt.hex()}")
        elif res[0] == XDP_PASS:
            if res[1] != pkt:
                problems.append(f"packet {i} sp_ext_xdp: passed but changed to {res[1].hex()}: {pkt.hex()}")
        elif res[0] == XDP_DROP:
            xdp_drops += 1
            xdp_dropped = True
            if not judge.related(pkt):
                problems.append(f"packet {i} sp_ext_xdp: to no frontend and no tracked flow, dropped: {pkt.hex()}")
        else:
            problems.append(f"packet {i} sp_ext_xdp: return code {res[0]}: {pkt.hex()}")
        for prog in progs:
            res = prog.run(pkt)
            if isinstance(res, int):
                problems.append(f"packet {i} {prog.name}: refused by the kernel ({os.strerror(res)}): {pkt.hex()}")
                continue
            ret, out = res
            if xdp_dropped and prog.name == "sp_ext_ingress" and ret != TC_ACT_SHOT:
                problems.append(f"packet {i}: dropped by XDP, not by sp_ext_ingress ({ret}): {pkt.hex()}")
            if ret not in PROG_VERDICTS.get(prog.name, VERDICTS):
                problems.append(f"packet {i} {prog.name}: return code {ret}: {pkt.hex()}")
            if out == pkt and ret == TC_ACT_OK:
                outcome["passed untouched"] += 1
                continue
            if not judge.related(pkt):
                what = "dropped" if out == pkt else f"changed to {out.hex()}"
                problems.append(f"packet {i} {prog.name}: to no frontend and no tracked flow, {what}: {pkt.hex()}")
                continue
            outcome["rewritten or dropped, related"] += 1
            if ret == TC_ACT_REDIRECT and out[:6] == pkt[6:12] and is_icmp_unreach(out):
                # Rejected (or a hairpin packet that happens to be an ICMP
                # error: never, the world has none).
                bad = reject_wrong(pkt, out)
                if bad:
                    problems.append(f"packet {i} {prog.name}: rejected: {bad}: in {pkt.hex()} out {out.hex()}")
                continue
            if clean and out != pkt:
                checked_sums += 1
                bad = sums_wrong(out)
                if not bad and by_scapy < SCAPY_SAMPLE:
                    by_scapy += 1
                    bad = scapy_sums_wrong(out)
                if bad:
                    problems.append(f"packet {i} {prog.name}: {bad}: in {pkt.hex()} out {out.hex()}")
        if len(problems) >= 20:
            break
    seconds = time.perf_counter() - t0
    runs = (i + 1) * len(progs)

    after = {k: v[0] for k, v in stats(dp).items()}
    counted = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    added = [text for s, text in kmsg() if s > log_seq and KERNEL_TROUBLE.search(text)]

    print(
        f"fuzz: {i + 1} packets, {runs} runs through {len(progs)} programs in {seconds:.1f} s "
        f"({(i + 1) / seconds:,.0f} packets/s, {runs / seconds:,.0f} runs/s); {xdp_drops} dropped by XDP; {replay}"
    )
    print(f"fuzz: {dict(outcome)}; checksums verified on {checked_sums} rewritten packets ({by_scapy} by scapy too)")
    print("fuzz: verdicts " + ", ".join(f"{k.lower()}={v}" for k, v in sorted(counted.items(), key=lambda kv: -kv[1])))

    assert not problems, f"{replay}:\n" + "\n".join(problems[:20])
    assert (
        sum(counted.values()) == runs + xdp_drops
    ), f"{replay}: {runs} tc runs and {xdp_drops} XDP drops, {sum(counted.values())} counted: {counted}"
    assert counted.get("DROP_SOURCE_RANGE", 0) >= xdp_drops
    assert not added, f"{replay}: the kernel logged during the run:\n" + "\n".join(added)
    # Not vacuous: the world was reached (translations, drops, passes).
    reached = {"DNAT_NEW", "DNAT_ESTABLISHED", "REVNAT", "SNAT", "UNSNAT", "PASS_NO_SERVICE", "REJECT_NO_BACKEND"}
    assert reached <= counted.keys() or n < 1000, f"{replay}: verdicts seen {sorted(counted)}"
