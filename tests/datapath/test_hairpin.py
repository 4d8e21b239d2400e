"""Tier 2: hairpin, a pod reaching a Service that picks the pod itself.

The pod POD sends POD:cport -> VIP:80 and the chosen backend is POD:8080.
At the pod interface's ingress the packet becomes HAIRPIN:cport ->
POD:8080 and is sent straight back into the pod (TC_ACT_REDIRECT, to the
same interface, Ethernet addresses swapped). The pod's answer POD:8080 ->
HAIRPIN:cport arrives at the same ingress and becomes VIP:80 -> POD:cport,
back into the pod as well. The `dp` fixture loads the program with the
hairpin addresses HAIRPIN4 and HAIRPIN6 (tests/datapath/conftest.py).

Every expected frame is built from scratch by scapy and every output
frame's checksums are recomputed by scapy. Addresses: 198.18.0.0/15 and
2001:db8::/32 only.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from ctrl.dataplane import abi, loader

from .packets import (
    FORWARD,
    HAIRPIN4,
    HAIRPIN6,
    REPLY,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TCP_P,
    UDP_P,
    Backend,
    CtKey,
    CtVal,
    Seed,
    Svc,
    changed_offsets,
    ct_dump,
    ct_key_bytes,
    l4pkt,
    mapname,
    mapped,
    run,
    seed,
    swap_macs,
)

POD, OTHER = "198.18.1.1", "198.18.2.2"
VIP = "198.19.0.10"
POD6, OTHER6 = "2001:db8:1::1", "2001:db8:2::2"
VIP6 = "2001:db8:ffff::10"
CPORT = 40000

FAMILIES = {
    "v4": (POD, OTHER, VIP, HAIRPIN4),
    "v6": (POD6, OTHER6, VIP6, HAIRPIN6),
}
CASES = [
    pytest.param(fam, proto, id=f"{fam}-{name}") for fam in FAMILIES for proto, name in ((TCP_P, "tcp"), (UDP_P, "udp"))
]


def world(fam: str, proto: int, *backends: str) -> tuple[Seed, dict[str, Backend]]:
    """One frontend VIP:80 whose slots hold `backends` (addresses), each
    serving on 8080."""
    bes = {addr: Backend(i + 1, addr, 8080, proto) for i, addr in enumerate(backends)}
    svc = Svc(FAMILIES[fam][2], 80, proto, svc_id=10, slots=tuple(b.id for b in bes.values()))
    return Seed(services=(svc,), backends=tuple(bes.values())), bes


def ct(dp) -> dict[CtKey, CtVal]:
    return {k: v for k, (v, _) in ct_dump(dp).items()}


def checked(raw: bytes) -> Ether:
    """Parse and recompute the IPv4 header and TCP/UDP checksums with scapy."""
    p = Ether(raw)
    assert bytes(p) == raw
    q = Ether(raw)
    l4 = TCP if TCP in q else UDP
    if IP in q:
        del q[IP].chksum
    del q[l4].chksum
    r = Ether(bytes(q))
    if IP in p:
        assert p[IP].chksum == r[IP].chksum, "IPv4 header checksum"
    assert p[l4].chksum == r[l4].chksum, f"{l4.__name__} checksum {p[l4].chksum:#06x}, correct {r[l4].chksum:#06x}"
    return p


def hairpin_step(dp, proto: int, sent: bytes, want: bytes, verdict: str) -> None:
    """One packet at the pod interface's ingress that must come back into
    the pod as `want` (built from scratch, MACs swapped)."""
    r = run(dp, sent)
    assert (r.retval, r.counted) == (TC_ACT_REDIRECT, {verdict: (1, len(sent))})
    checked(r.out)
    assert r.out == want, f"got {Ether(r.out).summary()}, expected {Ether(want).summary()}"


@pytest.mark.parametrize(("fam", "proto"), CASES)
def test_a_pod_that_is_its_own_backend_is_reached_from_the_hairpin_address(dp, fam, proto):
    pod, _, vip, hp = FAMILIES[fam]
    s, bes = world(fam, proto, pod)
    seed(dp, s)
    be = bes[pod]

    # The request: source the hairpin address, straight back into the pod.
    sent = l4pkt(proto, pod, vip, CPORT, 80)
    hairpin_step(dp, proto, sent, swap_macs(l4pkt(proto, hp, pod, CPORT, 8080)), "DNAT_NEW")
    # The flow's reply entry is keyed by what the pod will answer: to the
    # hairpin address, not to itself.
    assert ct(dp) == {
        CtKey(pod, vip, CPORT, 80, proto, FORWARD): CtVal(pod, 8080, be.id, 10),
        CtKey(pod, hp, 8080, CPORT, proto, REPLY): CtVal(vip, 80, be.id, 10),
    }

    # The answer, from the frontend to the pod's own address and port.
    sent = l4pkt(proto, pod, hp, 8080, CPORT, flags="SA")
    hairpin_step(dp, proto, sent, swap_macs(l4pkt(proto, vip, pod, 80, CPORT, flags="SA")), "REVNAT")

    # The established flow, both ways, with data.
    for flags in ("A", "PA"):
        sent = l4pkt(proto, pod, vip, CPORT, 80, flags=flags, payload=b"request")
        want = swap_macs(l4pkt(proto, hp, pod, CPORT, 8080, flags=flags, payload=b"request"))
        hairpin_step(dp, proto, sent, want, "DNAT_ESTABLISHED")
        sent = l4pkt(proto, pod, hp, 8080, CPORT, flags=flags, payload=b"answer")
        want = swap_macs(l4pkt(proto, vip, pod, 80, CPORT, flags=flags, payload=b"answer"))
        hairpin_step(dp, proto, sent, want, "REVNAT")
    assert len(ct(dp)) == 2


@pytest.mark.parametrize(("fam", "proto"), CASES)
def test_an_evicted_hairpin_reply_entry_comes_back_with_the_next_request(dp, fam, proto):
    pod, _, vip, hp = FAMILIES[fam]
    s, _ = world(fam, proto, pod)
    seed(dp, s)
    run(dp, l4pkt(proto, pod, vip, CPORT, 80))
    rev = CtKey(pod, hp, 8080, CPORT, proto, REPLY)
    assert dp.maps[mapname("sp_ct")].delete(ct_key_bytes(rev))
    hairpin_step(
        dp, proto, l4pkt(proto, pod, vip, CPORT, 80, flags="A"),
        swap_macs(l4pkt(proto, hp, pod, CPORT, 8080, flags="A")), "DNAT_ESTABLISHED",
    )  # fmt: skip
    assert rev in ct(dp)
    hairpin_step(
        dp, proto, l4pkt(proto, pod, hp, 8080, CPORT, flags="A"),
        swap_macs(l4pkt(proto, vip, pod, 80, CPORT, flags="A")), "REVNAT",
    )  # fmt: skip


@pytest.mark.parametrize(("fam", "proto"), CASES)
def test_flows_to_the_services_other_backends_are_not_affected(dp, fam, proto):
    """A Service with the pod and another backend: the pod's flows that get
    the other backend are plain DNAT (its own source, routed on); those that
    get the pod itself are hairpinned. 40 flows over 2 slots: each kind is
    seen unless all 40 picks agree (probability 2 * 2**-40)."""
    pod, other, vip, hp = FAMILIES[fam]
    s, bes = world(fam, proto, pod, other)
    seed(dp, s)
    seen = set()
    for i in range(40):
        cport = CPORT + i
        sent = l4pkt(proto, pod, vip, cport, 80)
        r = run(dp, sent)
        to = Ether(r.out)[IPv6 if fam == "v6" else IP].dst
        seen.add(to)
        entries = ct(dp)
        if to == other:
            assert (r.retval, r.counted) == (TC_ACT_OK, {"DNAT_NEW": (1, len(sent))})
            assert r.out == l4pkt(proto, pod, other, cport, 8080)
            assert entries[CtKey(other, pod, 8080, cport, proto, REPLY)] == CtVal(vip, 80, bes[other].id, 10)
        else:
            assert to == pod
            assert r.retval == TC_ACT_REDIRECT
            assert r.out == swap_macs(l4pkt(proto, hp, pod, cport, 8080))
            assert entries[CtKey(pod, hp, 8080, cport, proto, REPLY)] == CtVal(vip, 80, bes[pod].id, 10)
        checked(r.out)
    assert seen == {pod, other}
    # No reply entry is ever keyed by the pod answering itself.
    assert not [k for k in ct(dp) if k.dir == REPLY and k.saddr == k.daddr]


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_the_reflected_packets_are_left_alone_by_the_egress(dp, fam):
    """A reflected packet leaves through the egress of the pod's interface:
    neither the request (from the hairpin address) nor the answer (from the
    frontend) is a reply the egress would rewrite."""
    pod, _, vip, hp = FAMILIES[fam]
    s, _ = world(fam, TCP_P, pod)
    seed(dp, s)
    for sent in (l4pkt(TCP_P, pod, vip, CPORT, 80), l4pkt(TCP_P, pod, hp, 8080, CPORT, flags="SA")):
        out = run(dp, sent).out
        r = run(dp, out, egress=True)
        assert (r.retval, r.out, r.counted.keys()) == (TC_ACT_OK, out, {"PASS_NO_FLOW"})


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_a_packet_to_the_hairpin_address_of_no_flow_is_passed_untouched(dp, fam):
    pod, _, vip, hp = FAMILIES[fam]
    s, _ = world(fam, TCP_P, pod)
    seed(dp, s)
    run(dp, l4pkt(TCP_P, pod, vip, CPORT, 80))
    # Another port pair: no hairpin flow answers it.
    sent = l4pkt(TCP_P, pod, hp, 8080, CPORT + 1, flags="SA")
    r = run(dp, sent)
    assert (r.retval, r.out, r.counted.keys()) == (TC_ACT_OK, sent, {"PASS_NO_SERVICE"})


def test_external_traffic_from_a_backends_own_address_is_not_hairpinned(dp):
    """The external interface's frontends serve traffic from outside: the
    hairpin rule is for a pod of this node reaching its own Service."""
    s = Seed(
        services=(Svc(VIP, 80, TCP_P, svc_id=10, slots=(1,), scope=1),),
        backends=(Backend(1, POD, 8080, TCP_P),),
    )
    seed(dp, s)
    sent = l4pkt(TCP_P, POD, VIP, CPORT, 80)
    r = run(dp, sent, external=True)
    assert (r.retval, r.counted.keys()) == (TC_ACT_OK, {"DNAT_NEW"})
    assert r.out == l4pkt(TCP_P, POD, POD, CPORT, 8080)
    assert CtKey(POD, POD, 8080, CPORT, TCP_P, REPLY) in ct(dp)


@pytest.mark.parametrize(
    ("hairpin", "fam", "hairpinned"),
    [
        pytest.param((None, None), "v4", False, id="none-set-v4"),
        pytest.param((None, None), "v6", False, id="none-set-v6"),
        pytest.param((HAIRPIN4, None), "v4", True, id="v4-only-v4"),
        pytest.param((HAIRPIN4, None), "v6", False, id="v4-only-v6"),
        pytest.param((None, HAIRPIN6), "v6", True, id="v6-only-v6"),
        pytest.param((None, HAIRPIN6), "v4", False, id="v6-only-v4"),
    ],
)
def test_the_hairpin_address_is_set_per_family_before_load(hairpin, fam, hairpinned):
    """Without a hairpin address for its family, a pod reaching itself gets
    the plain DNAT (the behaviour before hairpin support)."""
    a4, a6 = hairpin
    d = loader.load(pin_dir=None, hairpin=abi.Hairpin(mapped(a4) if a4 else None, mapped(a6) if a6 else None))
    try:
        pod, _, vip, hp = FAMILIES[fam]
        s, _ = world(fam, TCP_P, pod)
        seed(d, s)
        sent = l4pkt(TCP_P, pod, vip, CPORT, 80)
        r = run(d, sent)
        if hairpinned:
            assert (r.retval, r.out) == (TC_ACT_REDIRECT, swap_macs(l4pkt(TCP_P, hp, pod, CPORT, 8080)))
        else:
            assert (r.retval, r.out) == (TC_ACT_OK, l4pkt(TCP_P, pod, pod, CPORT, 8080))
            # Only the destination address, port and checksums changed.
            assert len(changed_offsets(sent, r.out)) <= (16 if fam == "v6" else 4) + 2 + 2 + 2
    finally:
        d.close()
