"""External traffic under load (docs/benchmarks.md, "External traffic under
load"): a sender namespace floods a node's uplink with UDP frames for a
LoadBalancer IP, and the bench counts what the node gets through per
second with sliceproxy's XDP program, with its tc programs alone, and with
kube-proxy's iptables rules for the same Service.

The segment: namespace <prefix>-gen holds gen0, a veth whose peer is the
node's uplink <prefix>x0 (198.18.200.1/24; the next hop 198.18.200.2 with
a static neighbour entry; the backend's network, 198.18.2.0/24, and the
LB IP's, 198.19.5.0/24, routed through it: the backend is on another node).
The sender is scripts/bench/xdpload.bpf.c's load_tx, run in the kernel by
BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES from a thread in the
sender's namespace pinned to one CPU: every repetition is a frame sent out
of gen0 by XDP_TX, over `flows` source ports. The node's uplink receives
it in its NAPI poll, on that CPU (the veth hands frames over there), so the
figure is what one core does generating and handling the frames in turn.
load_sink, attached to gen0, counts and drops what the node sends back out
(forwarded frames), checking their translation and checksums.

Each dataplane has the node namespace to itself, so netfilter's conntrack
never runs under the BPF figures: one topology for sliceproxy (its tc
programs on the uplink as `sliceproxy run --external-interfaces` attaches
them, its XDP program native in front for the XDP figures), one for
kube-proxy's ruleset (scripts/bench/iptables.py's lb_ruleset, restored with
iptables-legacy-restore), one for that ruleset among MANY other Services.
The uplink has GRO on (a veth's NAPI, which receives frames from a peer's
XDP_TX, runs only with GRO or an XDP program): a NIC's default.

  floor      load_sink on the uplink: the generator, the veth and an XDP
             program that counts and drops
  drop       frames from a source loadBalancerSourceRanges refuse: XDP_DROP,
             tc's TC_ACT_SHOT (after the skb is built), or iptables (nat
             PREROUTING's KUBE-SERVICES and KUBE-FW chains, routing, then
             filter FORWARD's KUBE-PROXY-FIREWALL DROP; each frame is a new
             connection to conntrack, which keeps nothing of a dropped one).
             Counted by the node: sliceproxy's verdict counters, the DROP
             rule's counter. iptables again with MANY ClusterIP Services
             around ours (a third topology): every dropped frame walks all
             their KUBE-SERVICES rules (KUBE-FW returns what it refuses to
             that chain, which goes on after ours).
  forward    frames of established flows from an allowed source, to the
             backend on another node: XDP's DNAT, masquerade and XDP_TX
             (--xdp-forward), tc's ingress DNAT, routing and egress SNAT, or
             iptables' DNAT and MASQUERADE (conntrack's binding, after the
             first frame of each flow). Counted at the far end: frames that
             arrive translated with both checksums right.

Every figure is a rate: frames the node finished per second of the time
the kernel timed the sender (its loop over the frames and the softirqs it
ran between batches, the uplink's NAPI poll among them; not the run's
setup, nor while other work had the CPU), the median of `rounds` rounds
(the dataplanes interleaved in each), and per frame the ns beyond the
floor's: the node's own cost, the sender's taken off. Run alone:
    .venv/bin/python -m scripts.bench.xdpload [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctrl.dataplane import abi, attach, loader
from ctrl.dataplane.libbpf import check, ffi, lib
from ctrl.util.addrs import addr16
from scripts.harness.nsforward import in_netns
from scripts.harness.topo import Topology

from . import iptables
from .bpfobj import BpfObject
from .common import POOL_BASE, VIP_BASE, compile_bpf, inet_csum, ipv4, progress
from .common import in_netns as nsenter

SOURCE = Path(__file__).resolve().with_name("xdpload.bpf.c")

NODE, NEXT_HOP, NEXT_MAC = "198.18.200.1", "198.18.200.2", "02:00:00:00:c8:02"
CLUSTER_IP, LB_IP, LB_PORT, NODE_PORT = "198.19.0.10", "198.19.5.5", 80, 30080
BE_IP, BE_PORT = "198.18.2.2", 8080
ALLOWED, REFUSED, RANGE = "198.18.100.5", "198.18.101.7", "198.18.100.0/24"
PORT_NAME = "bench/lb:udp"
SVC_ID, BE_ID = 1, 1
FIRST_PORT = 20000
PAYLOAD = bytes(range(20))  # load_tx's datagram: 8 + 20 bytes (LOAD_UDP_LEN)

BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
XDP_FLAGS_DRV_MODE = attach.XDP_MODES["native"]
SIOCETHTOOL, ETHTOOL_SGRO = 0x8946, 0x2C

# kube-proxy's rules again, with this many ClusterIP Services around ours.
MANY = 1000
MODES = (
    "floor", "xdp_drop", "tc_drop", "iptables_drop", "iptables_drop_many", "xdp_forward", "tc_forward",
    "iptables_forward",
)  # fmt: skip


def build(out_dir: Path) -> Path:
    """Compile the sender and the sink with the dataplane's flags."""
    return compile_bpf(SOURCE, out_dir / "xdpload.bpf.o")


def frame(dst_mac: bytes, src_mac: bytes, src: str, dst: str, sport: int, dport: int) -> tuple[bytes, int]:
    """An Ethernet / IPv4 / UDP frame with both checksums whole (as from a
    wire), and its UDP checksum."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    ulen = 8 + len(PAYLOAD)
    pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_UDP, ulen)
    ck = inet_csum(pseudo + struct.pack("!HHHH", sport, dport, ulen, 0) + PAYLOAD)
    udp = struct.pack("!HHHH", sport, dport, ulen, ck or 0xFFFF) + PAYLOAD
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0x4000, 64, socket.IPPROTO_UDP, 0, s, d)
    ip = ip[:10] + struct.pack("!H", inet_csum(ip)) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + udp, ck or 0xFFFF


class LoadProgs(BpfObject):
    """xdpload.bpf.o loaded: load_tx's and load_sink's fds, and the maps."""

    def __init__(self, obj_path: Path):
        super().__init__(obj_path)
        self.tx_fd = self.fd_of("load_tx")
        self.sink_fd = self.fd_of("load_sink")

    def configure(
        self, template: bytes, csum: int, flows: int, expect: tuple[str, int, str] = (BE_IP, BE_PORT, NODE)
    ) -> None:
        """The sender's template frame (its headers: the payload is the
        frame test_run starts from) and its UDP checksum, and what the sink
        counts as translated: (destination, port, source)."""
        daddr, dport, saddr = expect
        cfg = struct.pack(
            "=44sIHH4sHH4s",
            template[:42],
            flows,
            FIRST_PORT,
            socket.htons(csum),
            socket.inet_aton(daddr),
            socket.htons(dport),
            0,
            socket.inet_aton(saddr),
        )
        self.maps["load_cfg"].update(abi.u32(0), cfg)

    def _sum(self, name: str, key: int) -> int:
        return sum(struct.unpack("=Q", v)[0] for v in self.maps[name].lookup_percpu(abi.u32(key)))

    def seen(self) -> list[int]:
        """load_seen summed over CPUs: translated, bad checksum, other."""
        return [self._sum("load_seen", k) for k in range(3)]

    def sent(self) -> int:
        return self._sum("load_seq", 0)


def live_frames(prog_fd: int, pkt: bytes, repeat: int, ifindex: int) -> float:
    """Run the sender `repeat` times on live frames: each one sent out of
    the interface ifindex (in the calling thread's namespace) by XDP_TX.
    The seconds the kernel timed: its loop over the frames, with the
    softirqs it ran when it let them (the receiving NAPI poll among them),
    not the run's setup, nor while the thread was scheduled out. The
    kernel gives its mean per frame in whole ns: at 100 ns a frame, up to
    1% short."""
    ctx = struct.pack("6I", 0, len(pkt), 0, ifindex, 0, 0)
    opts = ffi.new(
        "struct bpf_test_run_opts *",
        {
            "sz": ffi.sizeof("struct bpf_test_run_opts"),
            "data_in": ffi.from_buffer(pkt),
            "data_size_in": len(pkt),
            "ctx_in": ffi.from_buffer(ctx),
            "ctx_size_in": len(ctx),
            "repeat": repeat,
            "flags": BPF_F_TEST_XDP_LIVE_FRAMES,
        },
    )
    check(
        lib().bpf_prog_test_run_opts(prog_fd, opts),
        f"BPF_PROG_TEST_RUN with live frames (Linux 5.18 or later; this is {os.uname().release})",
    )
    return float(opts.duration) * repeat / 1e9


def _set_gro(ifname: str) -> None:
    """GRO on (ETHTOOL_SGRO), in the calling thread's namespace."""
    val = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_SGRO, 1), 8)
    ifr = struct.pack("16sP", ifname.encode(), ctypes.addressof(val)).ljust(40, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)


def _softirq_s(cpu: int) -> float:
    """CPU time ksoftirqd/<cpu> has run: softirq work deferred to it."""
    pid = subprocess.run(["pgrep", "-x", f"ksoftirqd/{cpu}"], capture_output=True, text=True).stdout.split()
    if not pid:
        return 0.0
    f = Path(f"/proc/{pid[0]}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _xdp(ifname: str, prog_fd: int | None) -> None:
    """prog_fd attached native on ifname (None: nothing), in the calling
    thread's namespace."""
    idx = socket.if_nametoindex(ifname)
    lib().bpf_xdp_detach(idx, XDP_FLAGS_DRV_MODE, ffi.NULL)
    if prog_fd is not None:
        check(lib().bpf_xdp_attach(idx, prog_fd, XDP_FLAGS_DRV_MODE, ffi.NULL), f"XDP on {ifname}")


def _link(ns: str, ifname: str) -> tuple[bytes, int]:
    """An interface's MAC address and index in namespace ns."""
    cp = subprocess.run(["ip", "-n", ns, "-j", "link", "show", ifname], check=True, capture_output=True, text=True)
    link = json.loads(cp.stdout)[0]
    return bytes.fromhex(link["address"].replace(":", "")), int(link["ifindex"])


class Segment:
    """One node namespace and the sender's, wired by a veth (see the module
    docstring); load_sink on the sender's end."""

    def __init__(self, t: Topology, progs: LoadProgs):
        self.t = t
        self.progs = progs
        self.gen_ns = t.add_namespace("gen")
        self.up = f"{t.prefix}x0"
        ip, gen = ["ip", "-n", t.node_ns], ["ip", "-n", self.gen_ns]
        for argv in (
            [*gen, "link", "add", "gen0", "type", "veth", "peer", "name", self.up, "netns", t.node_ns],
            # Forwarded back out of the interface it came in by: no ICMP
            # redirects; no IPv6 on the segment (its neighbour discovery):
            # nothing reaches the sink but what the node forwards.
            ["ip", "netns", "exec", t.node_ns, "sysctl", "-q", "-w", "net.ipv4.conf.all.send_redirects=0",
             f"net.ipv4.conf.{self.up}.send_redirects=0", f"net.ipv6.conf.{self.up}.disable_ipv6=1"],
            ["ip", "netns", "exec", self.gen_ns, "sysctl", "-q", "-w", "net.ipv6.conf.gen0.disable_ipv6=1"],
            [*gen, "link", "set", "gen0", "up"],
            [*ip, "link", "set", self.up, "up"],
            [*ip, "addr", "add", f"{NODE}/24", "dev", self.up],
            [*ip, "neigh", "replace", NEXT_HOP, "lladdr", NEXT_MAC, "dev", self.up, "nud", "permanent"],
            [*ip, "route", "add", "198.18.2.0/24", "via", NEXT_HOP, "dev", self.up],
            [*ip, "route", "add", "198.19.5.0/24", "via", NEXT_HOP, "dev", self.up],
        ):  # fmt: skip
            subprocess.run(argv, check=True, capture_output=True)
        self.in_node(lambda: _set_gro(self.up))
        self.up_mac = _link(t.node_ns, self.up)[0]
        self.gen_mac, self.gen_index = _link(self.gen_ns, "gen0")
        self.in_gen(lambda: _xdp("gen0", progs.sink_fd))

    def in_node(self, fn: Callable[[], Any]) -> Any:
        return in_netns(self.t.ns_path("node"), fn)

    def in_gen(self, fn: Callable[[], Any]) -> Any:
        return in_netns(self.t.ns_path(self.gen_ns), fn)

    def send(
        self, src: str, flows: int, n: int, cpu: int | None = None, expect: tuple[str, int, str] | None = None
    ) -> float:
        """n frames from src over `flows` source ports (the sender's thread
        pinned to cpu if given; expect: what the sink counts as translated,
        LoadProgs.configure); the seconds the kernel timed."""
        pkt, csum = frame(self.up_mac, self.gen_mac, src, LB_IP, FIRST_PORT, LB_PORT)
        self.progs.configure(pkt, csum, flows, *([expect] if expect else []))

        def run() -> float:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            return live_frames(self.progs.tx_fd, pkt, n, self.gen_index)

        k: float = self.in_gen(run)
        return k


def _seed(dp: loader.Dataplane) -> None:
    """The LB IP's frontend (UDP), its one backend on another node, its
    source range, and the node's address for the masquerade."""
    m = dp.maps
    flags = abi.const("SP_SVC_F_MASQ") | abi.const("SP_SVC_F_SRC_RANGES")
    m[abi.map_name("sp_be")].update(
        abi.u32(BE_ID), abi.pack("sp_backend", addr=addr16(BE_IP), port=BE_PORT, proto=socket.IPPROTO_UDP)
    )
    m[abi.map_name("sp_slot")].update(
        abi.pack("sp_slot_key", svc_id=SVC_ID, slot=0), abi.pack("sp_slot_val", backend_id=BE_ID)
    )
    m[abi.map_name("sp_svc")].update(
        abi.pack(
            "sp_svc_key",
            addr=addr16(LB_IP),
            port=LB_PORT,
            proto=socket.IPPROTO_UDP,
            scope=abi.const("SP_SCOPE_EXTERNAL"),
        ),
        abi.pack("sp_svc_val", svc_id=SVC_ID, count=1, flags=flags),
    )
    net, plen = RANGE.split("/")
    m[abi.map_name("sp_src")].update(
        abi.pack("sp_src_key", prefixlen=32 + 96 + int(plen), svc_id=SVC_ID, addr=addr16(net)),
        abi.pack("sp_src_val", allow=1),
    )
    m[abi.map_name("sp_cfg")].update(
        abi.u32(0),
        abi.pack(
            "sp_cfg", addr4=addr16(NODE), addr6=bytes(16), snat_port_min=61000, snat_port_max=65535, snat_reclaim=600
        ),
    )


def _iptables_drops(ns: str) -> int:
    """Packets KUBE-PROXY-FIREWALL's DROP rule counted."""
    out = subprocess.run(
        nsenter(ns, ["iptables-legacy", "-w", "-t", "filter", "-L", "KUBE-PROXY-FIREWALL", "-v", "-x", "-n"]),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return sum(int(line.split()[0]) for line in out.splitlines()[2:] if "DROP" in line.split()[:3])


def _restore(ns: str, text: str) -> None:
    subprocess.run(
        nsenter(ns, ["iptables-legacy-restore", "-w", "60", "--noflush", "--counters"]),
        input=text,
        check=True,
        capture_output=True,
        text=True,
    )


class Load:
    """Both topologies, the sender and sink, sliceproxy's two dataplanes
    (XDP forwarding on and off) seeded with the Service, kube-proxy's rules:
    set(mode) readies the uplink for one of MODES, count(mode) reads what
    the node finished in it so far. Use as a context manager."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        try:
            d = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="sliceproxy-xdpload-"))
            self.progs = LoadProgs(build(Path(d)))
            self._stack.callback(self.progs.close)
            self.fwd = loader.load(pin_dir=None, xdp_forward=True)
            self._stack.callback(self.fwd.close)
            self.plain = loader.load(pin_dir=None, xdp_forward=False)
            self._stack.callback(self.plain.close)
            for dp in (self.fwd, self.plain):
                _seed(dp)
            self.bpf = Segment(self._stack.enter_context(Topology()), self.progs)
            self.ipt = Segment(self._stack.enter_context(Topology()), self.progs)
            self.ipt_many = Segment(self._stack.enter_context(Topology()), self.progs)
            others = [
                (f"bench/svc-{i}:http", ipv4(VIP_BASE + 0x1000 + i), f"{ipv4(POOL_BASE + 0x4000 + i)}:8080")
                for i in range(MANY)
            ]
            for seg, other in ((self.ipt, []), (self.ipt_many, others)):
                _restore(seg.t.node_ns, iptables.SETUP)
                _restore(
                    seg.t.node_ns,
                    iptables.lb_ruleset(
                        PORT_NAME, "udp", CLUSTER_IP, LB_IP, LB_PORT, NODE_PORT, f"{BE_IP}:{BE_PORT}", [RANGE], other
                    ),
                )
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _uplink(self, xdp_fd: int | None, dp: loader.Dataplane | None) -> None:
        """The BPF topology's uplink with dp's tc programs (None: none) and
        xdp_fd native in front (None: no XDP)."""
        up = self.bpf.up

        def f() -> None:
            _xdp(up, None)
            if dp is None:
                attach.detach(up)
            else:
                attach.attach(up, dp.ext_fd, dp.ext_egress_fd)
            if xdp_fd is not None:
                _xdp(up, xdp_fd)

        self.bpf.in_node(f)

    def segment(self, mode: str) -> Segment:
        """The segment mode runs on."""
        if mode == "iptables_drop_many":
            return self.ipt_many
        return self.ipt if mode.startswith("iptables") else self.bpf

    def set(self, mode: str) -> Segment:
        """The uplink readied for mode; the segment it runs on."""
        if mode.startswith("iptables"):
            return self.segment(mode)
        dp = self.plain if mode.endswith("drop") else self.fwd
        if mode == "floor":
            self._uplink(self.progs.sink_fd, None)
        elif mode.startswith("xdp"):
            self._uplink(dp.xdp_fd, dp)
        else:
            self._uplink(None, dp)
        return self.bpf

    @staticmethod
    def source(mode: str) -> str:
        return ALLOWED if "forward" in mode else REFUSED

    def count(self, mode: str) -> int:
        """Frames the node finished in mode: dropped for its reason (the
        floor: dropped at all), or forwarded and arrived translated."""
        if mode == "floor":
            return sum(self.progs.seen())
        if mode.startswith("iptables_drop"):
            return _iptables_drops(self.segment(mode).t.node_ns)
        if "drop" in mode:
            return abi.counters(self.plain.maps)[abi.verdicts()[abi.const("SP_V_DROP_SOURCE_RANGE")]]["packets"]
        return self.progs.seen()[0]

    def flood(self, mode: str, seconds: float, flows: int, cpu: int) -> dict[str, Any]:
        """Frames for mode over `flows` source ports for about `seconds` of
        the kernel's time, after a warm-up (every flow's first frames) and
        a run that sets the pace; frames the node finished per second."""
        seg = self.set(mode)
        src = self.source(mode)
        seg.send(src, flows, 16 * flows, cpu)
        n = 32768
        while (k := seg.send(src, flows, n, cpu)) < min(0.05, seconds / 4) and n < 1 << 24:
            n *= 2
        n = max(n, int(n / max(k, 1e-6) * seconds))
        n0, s0, seen0, soft0 = self.count(mode), self.progs.sent(), self.progs.seen(), _softirq_s(cpu)
        t0 = time.perf_counter()
        k = seg.send(src, flows, n, cpu)
        wall = time.perf_counter() - t0
        handled = self.count(mode) - n0
        sink = [b - a for a, b in zip(seen0, self.progs.seen(), strict=True)]
        if sink[1]:
            raise RuntimeError(f"xdpload {mode}: {sink[1]} forwarded frames arrived with a wrong checksum")
        return {
            "kernel_s": k,
            "wall_s": wall,
            "ksoftirqd_s": _softirq_s(cpu) - soft0,
            "sent": self.progs.sent() - s0,
            "handled": handled,
            "sink": sink,
            "pps": handled / k,
        }


def measure(seconds: float = 0.75, rounds: int = 3, flows: int = 256) -> dict[str, Any]:
    """Frames per second the node finished in each of MODES: every round's
    run, the median round's rate, and per frame the ns beyond the floor's."""
    progress(f"xdpload: a UDP flood between namespaces, {rounds} x {len(MODES)} runs of {seconds:g} s")
    cpu = min(os.sched_getaffinity(0))
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with Load() as load:
        for _ in range(rounds):
            for mode in MODES:  # interleaved: a busy moment hits every mode
                runs[mode].append(load.flood(mode, seconds, flows, cpu))
    pps = {m: statistics.median(r["pps"] for r in rs) for m, rs in runs.items()}
    return {
        "seconds": seconds,
        "rounds": rounds,
        "flows": flows,
        "many": MANY,
        "cpu": cpu,
        "runs": runs,
        "pps": pps,
        "ns_beyond_floor": {m: 1e9 / pps[m] - 1e9 / pps["floor"] for m in MODES if m != "floor"},
        "loadavg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs, one round")
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--flows", type=int, default=256)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    r = measure(a.seconds or (0.2 if a.quick else 0.75), a.rounds or (1 if a.quick else 3), a.flows)
    for m in MODES:
        extra = f"  {r['ns_beyond_floor'][m]:6.0f} ns a frame beyond the floor" if m != "floor" else ""
        print(f"{m:18s} {r['pps'][m] / 1e6:6.2f} M frames/s{extra}")
    print(f"load average {r['loadavg'][0]:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
