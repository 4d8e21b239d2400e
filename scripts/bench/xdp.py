"""External traffic per packet: the XDP program against the tc programs of
an external interface, through BPF_PROG_TEST_RUN (ctrl.dataplane.loader's
test_run), on the same maps.

  source-range drop  a packet loadBalancerSourceRanges refuse: XDP_DROP at
                     the XDP hook, or TC_ACT_SHOT at tc ingress (where the
                     kernel has already built the skb: not counted here)
  forward            a packet of an established flow to a backend on
                     another node: XDP (DNAT, SNAT, the FIB lookup, XDP_TX)
                     against tc's ingress (DNAT) plus its egress (SNAT), the
                     kernel's routing between them not counted
  pass-through       what a packet tc serves pays for XDP in front (an
                     allowed new flow, forwarding off: handed to tc)

The forwarding figures need a FIB: the program runs from a thread in a
node namespace the bench makes (scripts/harness/topo.py), with an uplink
and a static neighbour, so the route lookup sees those and never the
machine's. The drops and the hand-over leave the frame as it is: run
`repeat` times in the kernel. A forwarded frame is rewritten (a repeated
run would measure another path): those are medians of single runs, each
with the kernel's timer around it, which the bench estimates (a single
drop's median less the repeated one's) and takes once off tc's two runs.
Drops per second are 1e9 / ns per packet on one core: the program's bound,
not a line rate. The bench has no per-packet iptables peer (its iptables
figures are ruleset loads and connect() latency), so none is given here.
"""

from __future__ import annotations

import json
import socket
import statistics
import struct
import subprocess
from typing import Any

from ctrl.dataplane import abi, loader
from ctrl.util.addrs import addr16
from scripts.harness.nsforward import in_netns
from scripts.harness.topo import Topology

from .common import progress
from .ours import tcp_packet

NODE, NEXT_HOP, NEXT_MAC = "198.18.200.1", "198.18.200.2", "02:00:00:00:c8:02"
LB_IP, BE_IP = "198.19.5.5", "198.18.2.2"
ALLOWED, REFUSED = "198.18.100.5", "198.18.101.7"
SVC_ID, BE_ID = 1, 1


def _seed(dp: loader.Dataplane) -> None:
    m = dp.maps
    flags = abi.const("SP_SVC_F_MASQ") | abi.const("SP_SVC_F_SRC_RANGES")
    m[abi.map_name("sp_be")].update(
        abi.u32(BE_ID), abi.pack("sp_backend", addr=addr16(BE_IP), port=8080, proto=socket.IPPROTO_TCP)
    )
    m[abi.map_name("sp_slot")].update(
        abi.pack("sp_slot_key", svc_id=SVC_ID, slot=0), abi.pack("sp_slot_val", backend_id=BE_ID)
    )
    m[abi.map_name("sp_svc")].update(
        abi.pack(
            "sp_svc_key", addr=addr16(LB_IP), port=80, proto=socket.IPPROTO_TCP, scope=abi.const("SP_SCOPE_EXTERNAL")
        ),
        abi.pack("sp_svc_val", svc_id=SVC_ID, count=1, flags=flags),
    )
    m[abi.map_name("sp_src")].update(
        abi.pack("sp_src_key", prefixlen=32 + 96 + 24, svc_id=SVC_ID, addr=addr16("198.18.100.0")),
        abi.pack("sp_src_val", allow=1),
    )
    m[abi.map_name("sp_cfg")].update(
        abi.u32(0),
        abi.pack(
            "sp_cfg", addr4=addr16(NODE), addr6=bytes(16), snat_port_min=61000, snat_port_max=65535, snat_reclaim=600
        ),
    )


def _in_ns(path: str, fn):
    """fn() in a thread that entered the namespace at path."""
    return in_netns(path, fn)


def _median(fd: int, pkt: bytes, n: int, ctx: bytes | None, want: int) -> float:
    ds = []
    for _ in range(n):
        ret, _, d = loader.test_run(fd, pkt, 1, ctx)
        if ret != want:
            raise RuntimeError(f"xdp bench: program {fd} returned {ret}, expected {want}")
        ds.append(d)
    return float(statistics.median(ds))


def measure(runs: int = 2000, repeat: int = 100_000) -> dict[str, Any]:
    """ns per packet of each figure, and source-range drops per second."""
    progress("xdp: external packets through XDP and tc (BPF_PROG_TEST_RUN)")
    out: dict[str, Any] = {"runs": runs, "repeat": repeat}
    with Topology() as t:
        up, peer = f"{t.prefix}x0", f"{t.prefix}x1"
        for argv in (
            ["link", "add", up, "type", "veth", "peer", "name", peer],
            ["link", "set", up, "up"],
            ["link", "set", peer, "up"],
            ["addr", "add", f"{NODE}/24", "dev", up],
            ["neigh", "replace", NEXT_HOP, "lladdr", NEXT_MAC, "dev", up, "nud", "permanent"],
            ["route", "add", "198.18.2.0/24", "via", NEXT_HOP, "dev", up],
        ):
            subprocess.run(["ip", "-n", t.node_ns, *argv], check=True, capture_output=True)
        link = json.loads(
            subprocess.run(
                ["ip", "-n", t.node_ns, "-j", "link", "show", up], check=True, capture_output=True, text=True
            ).stdout
        )[0]
        fwd = loader.load(pin_dir=None, xdp_forward=True)
        passing = loader.load(pin_dir=None, xdp_forward=False)
        try:
            for dp in (fwd, passing):
                _seed(dp)
            refused = tcp_packet(REFUSED, LB_IP, 40000, 80, 0x02)

            def ctx(pkt: bytes) -> bytes:
                return struct.pack("6I", 0, len(pkt), 0, link["ifindex"], 0, 0)

            def run() -> dict[str, float]:
                r: dict[str, float] = {}
                r["xdp_drop"] = loader.test_run(fwd.xdp_fd, refused, repeat, ctx(refused))[2]
                r["tc_drop"] = loader.test_run(fwd.ext_fd, refused, repeat)[2]
                # Established flows: the first packet of each records it.
                syn = tcp_packet(ALLOWED, LB_IP, 40001, 80, 0x02)
                if loader.test_run(fwd.xdp_fd, syn, 1, ctx(syn))[0] != 3:
                    raise RuntimeError("xdp bench: the first packet was not sent back out (XDP_TX)")
                ack = tcp_packet(ALLOWED, LB_IP, 40001, 80, 0x10)
                r["xdp_forward"] = _median(fwd.xdp_fd, ack, runs, ctx(ack), 3)
                syn2 = tcp_packet(ALLOWED, LB_IP, 40002, 80, 0x02)
                first = loader.test_run(fwd.ext_fd, syn2, 1)[1]
                loader.test_run(fwd.ext_egress_fd, first, 1)
                ack2 = tcp_packet(ALLOWED, LB_IP, 40002, 80, 0x10)
                dnated = loader.test_run(fwd.ext_fd, ack2, 1)[1]
                r["tc_forward_ingress"] = _median(fwd.ext_fd, ack2, runs, None, 0)
                r["tc_forward_egress"] = _median(fwd.ext_egress_fd, dnated, runs, None, 0)
                # Handed on untouched: the same frame each time, a new flow
                # each time (nothing is recorded).
                new = tcp_packet(ALLOWED, LB_IP, 40003, 80, 0x02)
                ret, _, r["xdp_pass"] = loader.test_run(passing.xdp_fd, new, repeat, ctx(new))
                if ret != 2:
                    raise RuntimeError(f"xdp bench: a flow tc serves got XDP action {ret}, not XDP_PASS")
                # What one run costs beyond the program (the kernel's timer
                # around it): a single run's median less the per-packet time
                # of the same drop repeated.
                r["single_run_overhead"] = max(0.0, _median(fwd.xdp_fd, refused, runs, ctx(refused), 1) - r["xdp_drop"])
                return r

            r = _in_ns(t.ns_path("node"), run)
        finally:
            fwd.close()
            passing.close()
    out["ns"] = r
    # Two runs on tc's side, one on XDP's: one run's overhead off tc's sum.
    out["ns"]["tc_forward"] = r["tc_forward_ingress"] + r["tc_forward_egress"] - r["single_run_overhead"]
    out["drops_per_s"] = {k: 1e9 / r[f"{k}_drop"] for k in ("xdp", "tc")}
    return out
