"""Tier 2: an idle SNAT port changes hands atomically, with two CPUs racing.

Each lane is one backend and one SNAT port (the range is a single port).
Flow A holds the port and has been idle past its hold; flow B is new and
wants a port. In each round, one process pinned to the first CPU sends one
packet of every lane's flow A through sp_ext_egress while another, pinned to
the second CPU, sends every lane's flow B's first packet: per lane, A's
refresh and B's claim race for the port. Whichever lands first must win
alone. In any order one at a time, that is exactly one flow leaving with
the port: A, if its packet came first (the port is fresh again, B finds no
free port and is dropped); B, if its claim came first (A finds the port
given away and no other free: dropped). And the UNSNAT entry must name
that flow at the end of the round.

Reusing a port by overwriting its UNSNAT entry (BPF_EXIST) broke this: A
could check that the entry still named it, B overwrite it, and both packets
leave with the port.

Processes, not threads: the runs must overlap in the kernel, and Python
threads would take turns at the interpreter lock between two runs. The
rounds are bounded in number, not in time; each uses fresh stamps, so the
outcome depends on no clock reading.
"""

from __future__ import annotations

import mmap
import os
import select
import struct

import pytest

from ctrl.dataplane import abi

from .packets import (
    TC_ACT_OK,
    TC_ACT_SHOT,
    TCP_P,
    Backend,
    CtKey,
    Seed,
    Svc,
    ct_dump,
    put_ct,
    run,
    seed,
    stamp,
    tcp,
)
from .test_external import NODE, put_cfg

SNAT, UNSNAT = abi.CT_SNAT, abi.CT_UNSNAT
CLIENT_A = "198.18.100.5"
CLIENT_B = "198.18.100.6"
PORT = 61000
RECLAIM = 300
LANES = 16
ROUNDS = 1000
# Only to notice a worker that hangs (a test must not wait for ever): a
# round takes well under a millisecond.
STUCK_SECONDS = 120
F_MASQ = abi.const("SP_SVC_F_MASQ")


def lanes() -> list[tuple[Svc, Backend]]:
    out = []
    for k in range(LANES):
        be = Backend(200 + k, "198.18.2.2", 9000 + k, TCP_P)
        out.append((Svc(NODE, 30100 + k, TCP_P, svc_id=100 + k, slots=(be.id,), scope=1, flags=F_MASQ), be))
    return out


def a_port(k: int) -> int:
    return 40000 + k


def b_port(k: int) -> int:
    return 50000 + k


class Worker:
    """A child process pinned to one CPU that runs a fixed list of packets
    through one program each round, after a barrier with its peer."""

    def __init__(self, prog_fd: int, cpu: int, index: int, packets: list[bytes], shm: mmap.mmap):
        self.cmd_r, self.cmd_w = os.pipe()
        self.res_r, self.res_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child
            code = 1
            try:
                os.close(self.cmd_w)
                os.close(self.res_r)
                os.sched_setaffinity(0, {cpu})
                self._serve(prog_fd, index, packets, shm)
                code = 0
            finally:
                os._exit(code)
        os.close(self.cmd_r)
        os.close(self.res_w)

    def _serve(self, prog_fd: int, index: int, packets: list[bytes], shm: mmap.mmap) -> None:
        from ctrl.dataplane.libbpf import ffi, lib

        test_run = lib().bpf_prog_test_run_opts
        size = 256
        bufs, opts = [], []
        for pkt in packets:
            out = ffi.new("char[]", len(pkt) + size)
            o = ffi.new(
                "struct bpf_test_run_opts *",
                {
                    "sz": ffi.sizeof("struct bpf_test_run_opts"),
                    "data_in": ffi.from_buffer(pkt),
                    "data_size_in": len(pkt),
                    "data_out": out,
                    "data_size_out": len(pkt) + size,
                    "repeat": 1,
                },
            )
            bufs.append((pkt, out))
            opts.append(o)
        me, peer = 8 * index, 8 * (1 - index)
        while True:
            rnd = struct.unpack("<q", os.read(self.cmd_r, 8))[0]
            if rnd < 0:
                return
            # Barrier: both processes start their runs together.
            shm[me : me + 8] = struct.pack("<q", rnd)
            while struct.unpack("<q", shm[peer : peer + 8])[0] < rnd:
                pass
            res = []
            for o, (pkt, out) in zip(opts, bufs, strict=True):
                o.data_size_out = len(pkt) + size
                if test_run(prog_fd, o) != 0:
                    res.append((-1, 0))
                    continue
                # IPv4 without options: the TCP source port at 14 + 20.
                res.append((o.retval, int.from_bytes(ffi.buffer(out, 36)[34:36], "big")))
            os.write(self.res_w, struct.pack(f"<{2 * len(res)}i", *(v for r in res for v in r)))

    def go(self, rnd: int) -> None:
        os.write(self.cmd_w, struct.pack("<q", rnd))

    def results(self, n: int) -> list[tuple[int, int]]:
        want = 8 * n
        data = b""
        while len(data) < want:
            ready, _, _ = select.select([self.res_r], [], [], STUCK_SECONDS)
            assert ready, f"worker {self.pid} gave no result in {STUCK_SECONDS} s"
            chunk = os.read(self.res_r, want - len(data))
            assert chunk, "a worker process died"
            data += chunk
        vals = struct.unpack(f"<{2 * n}i", data)
        return [(vals[2 * i], vals[2 * i + 1]) for i in range(n)]

    def stop(self) -> None:
        try:
            os.write(self.cmd_w, struct.pack("<q", -1))
        except OSError:
            pass
        _, status = os.waitpid(self.pid, 0)
        for fd in (self.cmd_w, self.res_r):
            os.close(fd)
        assert os.waitstatus_to_exitcode(status) == 0, f"worker {self.pid} exited with {status}"

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except OSError:
            pass


def two_cpus() -> tuple[int, int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("the SNAT port race needs two CPUs to run on")
    return cpus[0], cpus[1]


def test_an_idle_snat_port_goes_to_exactly_one_of_two_racing_flows(dp):
    cpu_a, cpu_b = two_cpus()
    ls = lanes()
    seed(dp, Seed(services=tuple(s for s, _ in ls), backends=tuple(b for _, b in ls)))
    put_cfg(dp, lo=PORT, hi=PORT, reclaim=RECLAIM, reclaim_closed=0)

    # Every lane: flow A opened and given the port; flow B DNATed, no port yet.
    for k, (svc, _) in enumerate(ls):
        r = run(dp, tcp(CLIENT_A, NODE, a_port(k), svc.port), external=True)
        r = run(dp, r.out, egress=True, external=True)
        assert r.counted.keys() == {"SNAT"}
        r = run(dp, tcp(CLIENT_B, NODE, b_port(k), svc.port), external=True)
        assert r.counted.keys() == {"DNAT_NEW"}
    entries = ct_dump(dp)
    unsnat = [CtKey(be.addr, NODE, be.port, PORT, TCP_P, UNSNAT) for _, be in ls]
    snat_a = [CtKey(CLIENT_A, be.addr, a_port(k), be.port, TCP_P, SNAT) for k, (_, be) in enumerate(ls)]
    snat_b = [CtKey(CLIENT_B, be.addr, b_port(k), be.port, TCP_P, SNAT) for k, (_, be) in enumerate(ls)]
    start = {k: entries[k][0] for k in (*unsnat, *snat_a, *snat_b)}
    assert all(start[u].nat_addr == CLIENT_A for u in unsnat)
    assert all(start[s].nat_port == 0 for s in snat_b)

    a_pkts = [tcp(CLIENT_A, be.addr, a_port(k), be.port, flags="A") for k, (_, be) in enumerate(ls)]
    b_pkts = [tcp(CLIENT_B, be.addr, b_port(k), be.port, flags="S") for k, (_, be) in enumerate(ls)]
    shm = mmap.mmap(-1, 16)
    workers: list[Worker] = []
    try:
        workers = [Worker(dp.ext_egress_fd, cpu_a, 0, a_pkts, shm), Worker(dp.ext_egress_fd, cpu_b, 1, b_pkts, shm)]
        won = {"A": 0, "B": 0}
        broken = []
        for rnd in range(1, ROUNDS + 1):
            # Back to the start: A holds the port, idle past its hold; B has none.
            for k in unsnat:
                put_ct(dp, k, start[k], stamp(dp, RECLAIM + 5))
            for k in (*snat_a, *snat_b):
                put_ct(dp, k, start[k], stamp(dp, 0))
            for w in workers:
                w.go(rnd)
            res_a, res_b = workers[0].results(LANES), workers[1].results(LANES)
            after = ct_dump(dp)
            for k in range(LANES):
                left = {
                    name
                    for name, (ret, sport) in (("A", res_a[k]), ("B", res_b[k]))
                    if ret == TC_ACT_OK and sport == PORT
                }
                for ret, _ in (res_a[k], res_b[k]):
                    assert ret in (TC_ACT_OK, TC_ACT_SHOT), f"round {rnd} lane {k}: return code {ret}"
                owner = after[unsnat[k]][0]
                named = "A" if owner.nat_port == a_port(k) else "B" if owner.nat_port == b_port(k) else "?"
                if left != {named}:
                    broken.append((rnd, k, sorted(left), named))
                else:
                    won[named] += 1
        for w in workers:
            w.stop()
        workers = []
    finally:
        for w in workers:
            w.kill()
        shm.close()
    assert not broken, (
        f"{len(broken)} of {ROUNDS * LANES} races did not leave exactly one flow on the port "
        f"(round, lane, flows that left with it, flow the UNSNAT entry names): {broken[:10]}"
    )
    # Both outcomes happen: the aged port was really up for grabs, and the
    # old flow's packets really refresh it.
    assert won["A"] and won["B"], won
    print(f"\nSNAT port races: {ROUNDS * LANES}, held by the old flow {won['A']}, taken by the new {won['B']}")


# -- one instant of the hand-over, without a race ------------------------------


def claiming_mark() -> int:
    """CT_CLAIMING, read from the programs' conntrack code (it is no layout,
    so not in the header): the stamp of an UNSNAT entry another CPU is
    claiming."""
    import re
    from pathlib import Path

    src = (Path(__file__).resolve().parents[2] / "ebpf" / "lib" / "conntrack.h").read_text()
    m = re.search(r"#define CT_CLAIMING (0x[0-9a-fA-F]+)ULL", src)
    assert m, "CT_CLAIMING not found in ebpf/lib/conntrack.h"
    return int(m.group(1), 16)


@pytest.mark.parametrize("side", ["client", "backend"])
def test_a_port_being_handed_over_is_no_longer_the_old_flows(dp, side):
    """Another CPU has marked A's idle port as being claimed, and not yet
    written the new flow into it: A's next packet out takes another port,
    and the backend's packet to the port is dropped; the entry stays the
    claimer's to finish."""
    (svc, be), *_ = lanes()
    seed(dp, Seed(services=(svc,), backends=(be,)))
    put_cfg(dp, lo=PORT, hi=PORT + 1, reclaim=RECLAIM, reclaim_closed=0)
    r = run(dp, tcp(CLIENT_A, NODE, a_port(0), svc.port), external=True)
    r = run(dp, r.out, egress=True, external=True)
    port = int.from_bytes(r.out[34:36], "big")
    key = CtKey(be.addr, NODE, be.port, port, TCP_P, UNSNAT)
    val, _ = ct_dump(dp)[key]
    put_ct(dp, key, val, claiming_mark())
    if side == "client":
        r = run(dp, tcp(CLIENT_A, be.addr, a_port(0), be.port, flags="A"), egress=True, external=True)
        assert r.counted.keys() == {"SNAT"}
        assert int.from_bytes(r.out[34:36], "big") == (PORT + 1 if port == PORT else PORT)
    else:
        sent = tcp(be.addr, NODE, be.port, port, flags="A")
        r = run(dp, sent, external=True)
        assert (r.retval, r.counted.keys(), r.out) == (TC_ACT_SHOT, {"DROP_SNAT"}, sent)
    assert ct_dump(dp)[key] == (val, claiming_mark())
