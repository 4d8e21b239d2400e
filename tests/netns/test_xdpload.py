"""Tier 3: the external-traffic load bench's machinery (scripts/bench/xdpload.py)
moves real frames: the kernel-driven sender (BPF_PROG_TEST_RUN with live
frames, XDP_TX out of a veth) reaches the node's uplink, every dataplane
forwards an allowed source's frames to the other node's backend DNATed and
masqueraded with both checksums right, and drops a refused source's. Counts
only, never rates: a few thousand frames in each case."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest

from ctrl.dataplane import abi
from scripts.bench import xdpload
from scripts.bench.xdpload import ALLOWED, FIRST_PORT, LB_IP, LB_PORT, REFUSED

pytestmark = pytest.mark.root

FLOWS, FRAMES = 50, 3000


@pytest.fixture(scope="module")
def load() -> Iterator[xdpload.Load]:
    with xdpload.Load() as ld:
        yield ld


def settled(read: Callable[[], object], want: object, timeout: float = 10.0) -> object:
    """read() once it equals want, or its last value after timeout: the
    receiving NAPI poll may finish the last frames after the sender
    returns."""
    deadline = time.monotonic() + timeout
    while (got := read()) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def deltas(ld: xdpload.Load, mode: str, send: Callable[[], object]) -> tuple[int, int, list[int]]:
    """Frames sent, frames the node finished in mode, and the sink's counts
    (translated, bad checksum, other), over send()."""
    c0, s0, seen0 = ld.count(mode), ld.progs.sent(), ld.progs.seen()
    send()
    sent = ld.progs.sent() - s0
    settled(lambda: ld.count(mode) - c0, sent)
    return sent, ld.count(mode) - c0, [b - a for a, b in zip(seen0, ld.progs.seen(), strict=True)]


@pytest.mark.parametrize("mode", ["xdp_forward", "tc_forward", "iptables_forward"])
def test_forwarded_frames_arrive_translated(load: xdpload.Load, mode: str) -> None:
    seg = load.set(mode)
    sent, handled, sink = deltas(load, mode, lambda: seg.send(ALLOWED, FLOWS, FRAMES))
    assert sent == FRAMES
    # Every frame reached the far end with the backend's address and port
    # and the node's source, both checksums right; nothing else did.
    assert handled == FRAMES
    assert sink == [FRAMES, 0, 0]


def test_the_sender_spreads_frames_over_its_flows(load: xdpload.Load) -> None:
    """One conntrack entry per source port the sender used: the flows the
    node saw are the ones asked for, no more."""
    seg = load.set("xdp_forward")
    seg.send(ALLOWED, FLOWS, 2 * FLOWS)
    key_codec, _ = abi.ct_codecs()
    client, lb = socket.inet_aton(ALLOWED), socket.inet_aton(LB_IP)
    ports = set()
    for k, _v in load.fwd.maps[abi.map_name("sp_ct")].items():
        saddr, daddr, sport, dport, _proto, _dir = key_codec.unpack(k)
        if saddr[-4:] == client and daddr[-4:] == lb and dport == LB_PORT:
            ports.add(sport)
    assert ports == set(range(FIRST_PORT, FIRST_PORT + FLOWS))


@pytest.mark.parametrize("mode", ["xdp_drop", "tc_drop", "iptables_drop", "iptables_drop_many"])
def test_refused_frames_are_dropped(load: xdpload.Load, mode: str) -> None:
    seg = load.set(mode)
    sent, handled, sink = deltas(load, mode, lambda: seg.send(REFUSED, FLOWS, FRAMES))
    assert sent == FRAMES
    # Counted by the dataplane as a source-range drop (iptables: by
    # KUBE-PROXY-FIREWALL's DROP rule), and none forwarded.
    assert handled == FRAMES
    assert sink == [0, 0, 0]


def test_the_sender_builds_whole_frames(load: xdpload.Load) -> None:
    """The floor's sink on the uplink, told to expect the untranslated
    frame: every frame the sender built, whatever its source port, has both
    checksums right. Told a wrong template checksum, the sink counts every
    frame as bad: its check is real."""
    seg = load.set("floor")
    untranslated = (LB_IP, LB_PORT, REFUSED)
    sent, _, sink = deltas(load, "floor", lambda: seg.send(REFUSED, FLOWS, FRAMES, expect=untranslated))
    assert sent == FRAMES and sink == [FRAMES, 0, 0]

    pkt, csum = xdpload.frame(seg.up_mac, seg.gen_mac, REFUSED, LB_IP, FIRST_PORT, LB_PORT)
    load.progs.configure(pkt, csum ^ 0x0101, FLOWS, untranslated)
    s0, seen0 = load.progs.sent(), load.progs.seen()
    seg.in_gen(lambda: xdpload.live_frames(load.progs.tx_fd, pkt, FRAMES, seg.gen_index))
    assert load.progs.sent() - s0 == FRAMES
    got = settled(lambda: [b - a for a, b in zip(seen0, load.progs.seen(), strict=True)], [0, FRAMES, 0])
    assert got == [0, FRAMES, 0]
