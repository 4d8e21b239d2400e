"""What `sliceproxy trace` costs per packet, by BPF_PROG_TEST_RUN
(docs/inspecting.md, "What a trace costs").

    .venv/bin/python -m scripts.bench.trace_cost [--baseline OBJ] [--repeat N] [--rounds K]

On one packet of an established flow to a ClusterIP (the pod ingress
program's common case; one Service, one backend), in ns per packet:

  gate off     our program with no trace (each CPU's sp_trace entry
               disarmed): what every packet pays for the gate, against
  baseline     the same packet through another build of the object (say,
               the one before the trace existed: --baseline OBJ).
  tap          the bcc tap alone, as compiled by `sliceproxy trace`, with
               no filter and with --service: what a trace adds in front of
               our program on every packet of its hooks.
  armed        our program on a packet the tap armed (the event sent into
               the ring buffer), against the same single runs disarmed:
               BPF_PROG_TEST_RUN can only arm one packet per run, so these
               two are means over single runs, which include the run's own
               overhead, unlike the repeated runs above.

Objects are run in turns, round after round, and the best round of each is
kept, so a machine busy with something else in one round moves every figure
alike. Needs root; it pins maps under a bpffs directory of its own, removed
at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ctrl.dataplane import abi, loader  # noqa: E402
from ctrl.dataplane import trace as dtrace  # noqa: E402
from ctrl.dataplane.libbpf import ffi, lib  # noqa: E402
from ctrl.dataplane.maps import Map  # noqa: E402
from scripts.bench.ours import tcp_packet  # noqa: E402

CLIENT, VIP, BACKEND = "198.18.1.2", "198.19.0.10", "198.18.1.11"
SYN, ACK = 0x02, 0x10


def _a16(ip: str) -> bytes:
    return bytes(10) + b"\xff\xff" + bytes(int(x) for x in ip.split("."))


class Raw:
    """Another build of the object, loaded by libbpf as it is: its layout
    check is the loader's, and an older build lacks the trace's structs.
    Private maps; the pod ingress program."""

    def __init__(self, path: str) -> None:
        lb = lib()
        self._obj = lb.bpf_object__open_file(path.encode(), ffi.NULL)
        if self._obj == ffi.NULL:
            raise OSError(ffi.errno, f"opening {path}")
        for name in loader.HOST_PROGRAMS:  # cgroup programs: not needed here
            prog = lb.bpf_object__find_program_by_name(self._obj, name.encode())
            if prog != ffi.NULL:
                lb.bpf_program__set_autoload(prog, False)
        m = lb.bpf_object__next_map(self._obj, ffi.NULL)
        while m != ffi.NULL:
            if abi.map_base(ffi.string(lb.bpf_map__name(m)).decode()) in loader.HOST_MAPS:
                lb.bpf_map__set_autocreate(m, False)
            m = lb.bpf_object__next_map(self._obj, m)
        if lb.bpf_object__load(self._obj) < 0:
            raise OSError(ffi.errno, f"loading {path}")
        self.fd = lb.bpf_program__fd(lb.bpf_object__find_program_by_name(self._obj, loader.PROGRAM.encode()))
        self.maps = {}
        m = lb.bpf_object__next_map(self._obj, ffi.NULL)
        while m != ffi.NULL:
            name = ffi.string(lb.bpf_map__name(m)).decode()
            if not name.startswith(".") and lb.bpf_map__fd(m) >= 0:
                self.maps[name] = Map(lb.bpf_map__fd(m), name)
            m = lb.bpf_object__next_map(self._obj, m)

    def test_run(self, pkt: bytes, repeat: int = 1) -> tuple[int, bytes, int]:
        return 0, b"", run_fd(self.fd, pkt, repeat)

    def close(self) -> None:
        lib().bpf_object__close(self._obj)


def seed(d: loader.Dataplane | Raw) -> bytes:
    """One Service with one backend, and a flow to it: the ACK of that flow."""
    m = d.maps
    m[abi.map_name("sp_be")].update(abi.u32(1), abi.pack("sp_backend", addr=_a16(BACKEND), port=8080, proto=6))
    m[abi.map_name("sp_slot")].update(abi.pack("sp_slot_key", svc_id=7, slot=0), abi.pack("sp_slot_val", backend_id=1))
    m[abi.map_name("sp_svc")].update(
        abi.pack("sp_svc_key", addr=_a16(VIP), port=80, proto=6, scope=abi.SCOPE_INTERNAL),
        abi.pack("sp_svc_val", svc_id=7, count=1),
    )
    m[abi.map_name("sp_names")].update(abi.u32(7), abi.pack("sp_svc_name", name=b"default/web:http/TCP"))
    d.test_run(tcp_packet(CLIENT, VIP, 40000, 80, SYN))
    return tcp_packet(CLIENT, VIP, 40000, 80, ACK)


def run_fd(fd: int, pkt: bytes, repeat: int) -> int:
    return loader.test_run(fd, pkt, repeat)[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", help="another build of sliceproxy_tc.bpf.o to compare the gate-off figure with")
    ap.add_argument("--repeat", type=int, default=200_000, help="packets per BPF_PROG_TEST_RUN (default 200000)")
    ap.add_argument("--rounds", type=int, default=15, help="turns of every measurement; the best is kept")
    ap.add_argument("--single", type=int, default=3000, help="single runs for the armed figure (default 3000)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("trace_cost: needs root (BPF_PROG_LOAD, BPF_PROG_TEST_RUN)", file=sys.stderr)
        return 2
    # One CPU: the tap and the program share this CPU's sp_trace entry.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    pin = f"/sys/fs/bpf/sliceproxy-trace-cost-{uuid.uuid4().hex[:10]}"
    work = tempfile.mkdtemp(prefix="sliceproxy-trace-cost-")
    ours = loader.load(pin_dir=pin)
    base = Raw(a.baseline) if a.baseline else None
    taps = []
    try:
        pkt = seed(ours)
        if base is not None:
            seed(base)
        state = ours.maps[abi.map_name("sp_trace")]
        dtrace.set_state(state, abi.pack("sp_trace"))
        for filt in (dtrace.Filter(), dtrace.Filter(service="default/web")):
            b, fds = dtrace.compile_tap(pin, filt, work)
            taps.append((b, fds["tap_pod_ingress"]))
        runs: dict[str, list[float]] = {}

        def take(name: str, ns: float) -> None:
            runs.setdefault(name, []).append(ns)

        for _ in range(a.rounds):
            take("gate off (this build)", ours.test_run(pkt, repeat=a.repeat)[2])
            if base is not None:
                take(f"baseline ({a.baseline})", base.test_run(pkt, repeat=a.repeat)[2])
            # The tap arms this CPU's entry on every run: disarm before our
            # program's repeated runs above, which must see no trace.
            take("tap, no filter", run_fd(taps[0][1], pkt, a.repeat))
            take("tap, --service default/web", run_fd(taps[1][1], pkt, a.repeat))
            dtrace.set_state(state, abi.pack("sp_trace"))
        rb = dtrace.EventReader(ours.maps[abi.map_name("sp_events")], lambda ev: None)
        armed, disarmed = [], []
        try:
            for i in range(a.single):
                disarmed.append(ours.test_run(pkt, repeat=1)[2])
                run_fd(taps[0][1], pkt, 1)  # the tap arms it, as in tc
                armed.append(ours.test_run(pkt, repeat=1)[2])
                if i % 256 == 255:
                    rb.poll(0)
        finally:
            rb.close()
        dtrace.set_state(state, abi.pack("sp_trace"))
        print(f"BPF_PROG_TEST_RUN, pod ingress, established TCP flow; {a.repeat} packets x {a.rounds} rounds, best")
        for name, v in runs.items():
            print(f"  {name:<44} {min(v):6.1f} ns/packet")
        print(f"single runs x {a.single}, mean (median):")
        for name, v in (("our program, disarmed", disarmed), ("our program, armed (one event each)", armed)):
            print(f"  {name:<44} {statistics.mean(v):6.1f} ns ({statistics.median(v):.0f})")
        return 0
    finally:
        for b, _ in taps:
            b.cleanup()
        ours.close()
        if base is not None:
            base.close()
        shutil.rmtree(pin, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
