"""The memory system's share of a new flow's cost (docs/benchmarks.md, "Per
packet: where a new flow's time goes").

scripts/bench/probe.bpf.c does, per packet, only the part of the
dataplane's new-flow path whose maps grow with the cluster: a slot lookup,
a backend lookup and the two conntrack inserts, on maps of the dataplane's
layouts and sizes. Timed on new flows exactly as scripts/bench/ours.py
times the dataplane (one BPF_PROG_TEST_RUN per new flow, its median), with
the probed service holding 100 slots and then as many as the scenario has
endpoints: if the probe's cost grows as the dataplane's does, the growth is
what the cache and TLB misses of that working set cost on this machine,
not work the dataplane could skip.

Run alone: .venv/bin/python -m scripts.bench.probe [--sizes 100,100000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ctrl.dataplane import abi
from ctrl.dataplane.loader import test_run

from .bpfobj import BpfObject
from .common import compile_bpf

SOURCE = Path(__file__).resolve().with_name("probe.bpf.c")


def build(out_dir: Path) -> Path:
    """Compile the probe with the flags the dataplane is built with."""
    return compile_bpf(SOURCE, out_dir / "probe.bpf.o")


class Probe(BpfObject):
    def __init__(self, obj_path: Path):
        super().__init__(obj_path)
        self.prog_fd = self.fd_of("probe")

    def fill(self, n: int, skip_backend: bool = False) -> None:
        """The probed service with n slots, each naming a backend of its
        own; skip_backend: the probe takes the backend from the slot."""
        slots = b"".join(abi.pack("sp_slot_key", svc_id=1, slot=i) for i in range(n))
        sv = b"".join(abi.pack("sp_slot_val", backend_id=i + 1) for i in range(n))
        self.maps["probe_slot"].update_batch(slots, sv)
        ids = b"".join(abi.u32(i + 1) for i in range(n))
        addr = bytes(10) + b"\xff\xff"
        bes = b"".join(
            abi.pack("sp_backend", addr=addr + bytes((198, 18, 64 + (i >> 16), (i >> 8) & 255)), port=8080, proto=6)
            for i in range(n)
        )
        self.maps["probe_be"].update_batch(ids, bes)
        self.maps["probe_cfg"].update(abi.u32(0), abi.u32(n))
        self.maps["probe_cfg"].update(abi.u32(1), abi.u32(1 if skip_backend else 0))

    def run(self, packet: bytes) -> tuple[int, int]:
        ret, _, ns = test_run(self.prog_fd, packet)
        return ret, ns


def new_flow_ns(probe: Probe, flows: int, first_port: int) -> float:
    """Median ns of `flows` new flows (fresh source ports), as ours.py times them."""
    from .ours import tcp_packet

    ns = []
    for k in range(flows):
        ret, d = probe.run(tcp_packet("198.18.255.3", "198.19.0.10", first_port + k, 80, 0x02))
        if ret != 0:  # TC_ACT_OK: every lookup found its entry
            raise RuntimeError(f"probe: a new flow missed its slot or backend (verdict {ret})")
        ns.append(d)
    return sorted(ns)[len(ns) // 2]


def measure(sizes: list[int], flows: int = 1000, rounds: int = 5) -> dict[str, dict[int, float]]:
    """ "full" (slot, backend, two conntrack inserts) and "no_backend" (the
    backend lookup left out): size -> median over rounds of the median
    new-flow ns, each size in maps of its own."""
    kinds = {"full": False, "no_backend": True}
    with tempfile.TemporaryDirectory(prefix="sliceproxy-probe-") as d:
        obj = build(Path(d))
        probes: dict[tuple[str, int], Probe] = {}
        try:
            for kind, skip in kinds.items():
                for n in sizes:
                    probes[kind, n] = p = Probe(obj)
                    p.fill(n, skip)
            res: dict[tuple[str, int], list[float]] = {k: [] for k in probes}
            port = 1024
            for _ in range(rounds):
                for k, p in probes.items():  # interleaved: a busy moment hits every size
                    res[k].append(new_flow_ns(p, flows, port))
                port += flows
            return {kind: {n: sorted(res[kind, n])[len(res[kind, n]) // 2] for n in sizes} for kind in kinds}
        finally:
            for p in probes.values():
                p.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,100000")
    ap.add_argument("--flows", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    r = measure([int(s) for s in a.sizes.split(",")], a.flows, a.rounds)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
