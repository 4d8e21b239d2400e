"""Tier 2: the programs' half of `sliceproxy trace` under BPF_PROG_TEST_RUN,
and the bcc tap compiled against the current header (ebpf/trace/tap.c).

The gate (ebpf/lib/trace.h): a packet counted while this CPU's sp_trace
entry is armed for its interface sends one event into sp_events with the
verdict, the tc action and the packet as the program left it, takes a
token and disarms the entry; anything else sends nothing. The tap: it
compiles with bcc against this header and the pinned maps, and run in
front of the program (as tc runs it) it arms exactly the packets its
filter matches.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctrl.dataplane import abi, loader
from ctrl.dataplane import trace as dtrace

from .packets import (
    BE1,
    CLIENT,
    CLIENT6,
    TC_ACT_OK,
    TC_ACT_SHOT,
    TCP_P,
    VIP,
    VIP2,
    VIP6,
    Backend,
    Seed,
    Svc,
    l4_offset,
    l4pkt,
    mapname,
    mapped,
    run,
    seed,
    stats,
)

BE6 = "2001:db8::21"
WEB = Svc(VIP, 80, TCP_P, svc_id=10, slots=(1,))
WEB6 = Svc(VIP6, 80, TCP_P, svc_id=12, slots=(3,))
FW = Svc(VIP2, 80, TCP_P, svc_id=11, slots=(1,), flags=abi.const("SP_SVC_F_SRC_RANGES"))  # no range: all refused
SEED = Seed(services=(WEB, WEB6, FW), backends=(Backend(1, BE1, 8080), Backend(3, BE6, 8080)))
LO = 1  # BPF_PROG_TEST_RUN runs the program on the loopback device
ALL = (1 << abi.const("SP_V_MAX")) - 1
HOOK_POD_INGRESS = abi.const("SP_TRACE_HOOK_POD_INGRESS")


def tcp(src: str, dst: str, sport: int, dport: int, flags: str = "S") -> bytes:
    return l4pkt(TCP_P, src, dst, sport, dport, flags)


def verdict_bit(name: str) -> int:
    return 1 << abi.verdicts().index(name)


def arm(dp, pkt: bytes, src: str, dst: str, armed: int = LO, tokens: int = 5, verdicts: int = ALL) -> None:
    """Every CPU's sp_trace entry armed as the tap arms it for pkt."""
    ev = abi.pack(
        "sp_trace_event",
        time=12345,
        saddr=mapped(src),
        daddr=mapped(dst),
        sport=40000,
        dport=80,
        front_addr=mapped(dst),
        front_port=80,
        l4_off=14 + 40 if ":" in src else l4_offset(pkt),  # no extension header
        ifindex=armed,
        svc_id=99,
        proto=TCP_P,
        v6=int(":" in src),
        hook=HOOK_POD_INGRESS,
    )
    dtrace.set_state(
        dp.maps[mapname("sp_trace")], abi.pack("sp_trace", armed=armed, tokens=tokens, verdicts=verdicts, ev=ev)
    )


def states(dp) -> list[dict]:
    m = dp.maps[mapname("sp_trace")]
    return [abi.unpack("sp_trace", raw) for raw in m.lookup_percpu(abi.u32(0))]


def events(dp) -> list[dict]:
    """What the ring buffer holds now (read, so consumed)."""
    got: list[dict] = []
    r = dtrace.EventReader(dp.maps[mapname("sp_events")], got.append)
    try:
        r.poll(0)
    finally:
        r.close()
    return got


@pytest.fixture
def one_cpu() -> Iterator[int]:
    """Run on one CPU: the tap and the program must see the same per-CPU
    entry, as they do inside one tc hook."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


@pytest.mark.parametrize(
    "src,dst,backend",
    [(CLIENT, VIP, BE1), (CLIENT6, VIP6, BE6)],
    ids=["ipv4", "ipv6"],
)
def test_armed_packet_sends_one_event_with_both_tuples(dp, one_cpu, src, dst, backend):
    seed(dp, SEED)
    pkt = tcp(src, dst, 40000, 80)
    arm(dp, pkt, src, dst)
    r = run(dp, pkt)
    assert r.retval == TC_ACT_OK
    (ev,) = events(dp)
    assert ev["verdict"] == abi.verdicts().index("dnat_new") and ev["action"] == TC_ACT_OK
    # The tap's half, kept.
    assert (ev["saddr"], ev["daddr"], ev["sport"], ev["dport"]) == (mapped(src), mapped(dst), 40000, 80)
    assert (ev["svc_id"], ev["time"], ev["ifindex"], ev["front_port"]) == (99, 12345, LO, 80)
    # The program's: the packet as it left, DNATed to the backend.
    assert (ev["nat_saddr"], ev["nat_sport"]) == (mapped(src), 40000)
    assert (ev["nat_daddr"], ev["nat_dport"]) == (mapped(backend), 8080)
    st = states(dp)[one_cpu]
    assert (st["armed"], st["tokens"], st["emitted"], st["limited"], st["lost"]) == (0, 4, 1, 0, 0)
    # Disarmed: the next packet of the flow sends nothing.
    run(dp, tcp(src, dst, 40000, 80, flags="A"))
    assert events(dp) == []


def test_nothing_armed_sends_nothing(dp, one_cpu):
    seed(dp, SEED)
    r = run(dp, tcp(CLIENT, VIP, 40000, 80))
    assert r.counted == {"DNAT_NEW": (1, r.counted["DNAT_NEW"][1])}
    assert events(dp) == []
    assert states(dp)[one_cpu]["emitted"] == 0


def test_drop_has_its_verdict_and_no_translated_tuple(dp, one_cpu):
    seed(dp, SEED)
    pkt = tcp(CLIENT, VIP2, 40000, 80)
    arm(dp, pkt, CLIENT, VIP2)
    assert run(dp, pkt).retval == TC_ACT_SHOT
    (ev,) = events(dp)
    assert ev["verdict"] == abi.verdicts().index("drop_source_range") and ev["action"] == TC_ACT_SHOT
    assert ev["nat_saddr"] == ev["nat_daddr"] == bytes(16) and ev["nat_sport"] == ev["nat_dport"] == 0


# An external frontend whose source ranges refuse every client: XDP drops
# its packets itself, unless a trace runs.
FW_EXT = Svc(VIP2, 80, TCP_P, svc_id=13, slots=(1,), scope=1, flags=abi.const("SP_SVC_F_SRC_RANGES"))
XDP_DROP, XDP_PASS = 1, 2


@pytest.mark.parametrize("verdicts", [ALL, verdict_bit("dnat_new")], ids=["every-verdict", "one-verdict"])
def test_xdp_hands_every_packet_to_tc_while_a_trace_runs(dp, one_cpu, verdicts):
    """The tap sees packets only at tc: while this CPU's entry asks for any
    verdict, XDP passes even a packet it would drop, uncounted, for tc to
    decide (the same drop) under the tap; the entry reset, XDP drops it
    again."""
    seed(dp, Seed(services=(FW_EXT,), backends=(Backend(1, BE1, 8080),)))
    pkt = tcp(CLIENT, VIP2, 40000, 80)

    def xdp_run() -> tuple[int, int]:
        before = stats(dp).get("DROP_SOURCE_RANGE", (0, 0))[0]
        retval, out, _ = dp.test_run(pkt, xdp=True)
        assert out == pkt, "XDP never rewrites what it drops or passes here"
        return retval, stats(dp).get("DROP_SOURCE_RANGE", (0, 0))[0] - before

    assert xdp_run() == (XDP_DROP, 1)
    dtrace.set_state(dp.maps[mapname("sp_trace")], abi.pack("sp_trace", tokens=5, verdicts=verdicts))
    assert xdp_run() == (XDP_PASS, 0)
    assert run(dp, pkt, external=True).retval == TC_ACT_SHOT, "tc drops it as XDP would have"
    dtrace.set_state(dp.maps[mapname("sp_trace")], abi.pack("sp_trace"))
    assert xdp_run() == (XDP_DROP, 1)


@pytest.mark.parametrize(
    "armed,tokens,verdicts,limited",
    [(LO, 5, ALL & ~verdict_bit("dnat_new"), 0), (LO, 0, ALL, 1), (4242, 5, ALL, 0)],
    ids=["verdict-not-asked", "over-the-rate", "armed-on-another-interface"],
)
def test_armed_but_not_sent(dp, one_cpu, armed, tokens, verdicts, limited):
    """Disarmed at the verdict, no event: a verdict the trace did not ask
    for, no token left (counted as limited), or an entry armed for a
    packet of another interface (the tap's packet was never counted)."""
    seed(dp, SEED)
    pkt = tcp(CLIENT, VIP, 40000, 80)
    arm(dp, pkt, CLIENT, VIP, armed=armed, tokens=tokens, verdicts=verdicts)
    assert run(dp, pkt).retval == TC_ACT_OK
    assert events(dp) == []
    st = states(dp)[one_cpu]
    assert (st["armed"], st["emitted"], st["limited"], st["tokens"]) == (0, 0, limited, tokens)


# -- the tap, compiled by bcc ----------------------------------------------------------


@pytest.fixture
def pinned(tmp_path: Path) -> Iterator[loader.Dataplane]:
    """The programs with their maps pinned in a bpffs directory of this
    test's own (the tap opens them by path), removed at the end."""
    pin = f"/sys/fs/bpf/sliceproxy-test-trace-{uuid.uuid4().hex[:12]}"
    d = loader.load(pin_dir=pin)
    try:
        yield d
    finally:
        d.close()
        shutil.rmtree(pin, ignore_errors=True)


def test_tap_compiles_against_this_header(pinned, tmp_path):
    """The tap is C compiled on the node: this is where a change to a
    struct or map it reads breaks the build, not on an operator's node."""
    f = dtrace.Filter(
        service="default/web",
        frontend=(mapped(VIP), 80),
        backend=mapped(BE1),
        verdicts=frozenset({"dnat_new"}),
        rate=10,
    )
    for filt in (dtrace.Filter(), f):
        b, fds = dtrace.compile_tap(pinned.pin_dir, filt, str(tmp_path))
        try:
            assert sorted(fds) == sorted(dtrace.TAP_FUNCTIONS.values()) and all(fd > 0 for fd in fds.values())
        finally:
            b.cleanup()


def _test_run(fd: int, pkt: bytes) -> int:
    """The program's return value as the signed tc action it is."""
    ret = loader.test_run(fd, pkt)[0]
    return ret - (1 << 32) if ret >= 1 << 31 else ret


@pytest.mark.parametrize(
    "flags,dst,sent",
    [
        ((), VIP, True),
        (("--service", "default/web"), VIP, True),
        (("--service", "default/other"), VIP, False),
        (("--frontend", f"{VIP}:80"), VIP, True),
        (("--frontend", f"{VIP}:81"), VIP, False),
        ((), "198.19.0.99", False),  # no Service there
        (("--verdict", "drop"), VIP, False),
    ],
    ids=["all", "service", "other-service", "frontend", "other-frontend", "no-service", "other-verdict"],
)
def test_tap_in_front_of_the_program(pinned, one_cpu, tmp_path, flags, dst, sent):
    """The tap then our program on one CPU, as tc runs a hook's filters:
    the tap returns "continue" (TC_ACT_UNSPEC) and an event comes out
    exactly when the filter matches."""
    from ctrl.cli.parser import build_parser
    from ctrl.cli.trace import trace_filter

    seed(pinned, SEED)
    pinned.maps[mapname("sp_names")].update(abi.u32(WEB.svc_id), abi.pack("sp_svc_name", name=b"default/web:http/TCP"))
    args = build_parser().parse_args(["trace", *flags])
    filt = trace_filter(args)
    b, fds = dtrace.compile_tap(pinned.pin_dir, filt, str(tmp_path))
    try:
        dtrace.set_state(pinned.maps[mapname("sp_trace")], abi.pack("sp_trace", tokens=5, verdicts=filt.verdict_mask()))
        pkt = tcp(CLIENT, dst, 40000, 80)
        assert _test_run(fds["tap_pod_ingress"], pkt) == -1  # TC_ACT_UNSPEC: the next filter decides
        run(pinned, pkt)
        got = events(pinned)
    finally:
        b.cleanup()
        with contextlib.suppress(Exception):
            dtrace.set_state(pinned.maps[mapname("sp_trace")], abi.pack("sp_trace"))
    if not sent:
        assert got == []
        return
    (ev,) = got
    assert ev["svc_id"] == WEB.svc_id and ev["hook"] == HOOK_POD_INGRESS and ev["ifindex"] == LO
    assert (ev["front_addr"], ev["front_port"]) == (mapped(VIP), 80)
    assert (ev["saddr"], ev["daddr"], ev["sport"], ev["dport"]) == (mapped(CLIENT), mapped(VIP), 40000, 80)
    assert (ev["nat_daddr"], ev["nat_dport"]) == (mapped(BE1), 8080)
