"""Tier 2: fragmented datagrams.

Only a datagram's first fragment carries ports. Each attach point
remembers what it did to a first fragment (sp_frag) and gives the other
fragments of the same datagram (addresses, identification, protocol) the
same: the same IP addresses (with the IPv4 header checksum), the same way
out, or a drop. Fragments are cut by scapy; the rewritten fragments are
reassembled by scapy and the whole datagram's TCP/UDP checksum recomputed,
so a rewrite that is right per fragment but wrong for the datagram fails.
Addresses: 198.18.0.0/15 and 2001:db8::/32 only.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP, defragment, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, defragment6, fragment6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ctrl.dataplane import abi

from .packets import (
    HAIRPIN4,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    UDP_P,
    Backend,
    Seed,
    Svc,
    eth,
    mapname,
    run,
    seed,
    stamp,
)

CLIENT, VIP, BE = "198.18.1.1", "198.19.0.10", "198.18.2.1"
CLIENT6, VIP6, BE6 = "2001:db8:1::1", "2001:db8:ffff::10", "2001:db8:2::1"
OUTSIDE, NODE = "198.18.100.5", "198.18.0.101"
CPORT = 40000
PAYLOAD = bytes(range(256)) * 8  # 2048 bytes: three fragments at MTU 1000
B1, B6 = Backend(1, BE, 5353, UDP_P), Backend(2, BE6, 5353, UDP_P)
SEED = Seed(
    services=(Svc(VIP, 53, UDP_P, 10, slots=(1,)), Svc(VIP6, 53, UDP_P, 11, slots=(2,))),
    backends=(B1, B6),
)
F_REJECT = abi.const("SP_SVC_F_REJECT")


def datagram(src: str, dst: str, sport: int, dport: int, ident: int = 0x4242):
    if ":" in src:
        return IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(PAYLOAD)
    return IP(src=src, dst=dst, id=ident) / UDP(sport=sport, dport=dport) / Raw(PAYLOAD)


def frags(dg, ident: int = 0x4242) -> list[bytes]:
    """The datagram cut into fragments of about 1000 bytes, as frames."""
    if IPv6 in dg:
        parts = fragment6(_v6(dg, ident), 1000)
    else:
        parts = fragment(IP(bytes(dg)), fragsize=976)
    assert len(parts) == 3, len(parts)
    return [bytes(eth() / p) for p in parts]


def _v6(dg, ident: int):
    p = IPv6(bytes(dg))
    return IPv6(src=p.src, dst=p.dst) / IPv6ExtHdrFragment(id=ident) / p[UDP]


def reassembled(frames: list[bytes]):
    """The datagram scapy reassembles from output frames, its checksums
    recomputed from scratch and compared with those in it."""
    pkts = [Ether(f).payload for f in frames]
    if IPv6 in Ether(frames[0]):
        whole = defragment6([IPv6(bytes(p)) for p in pkts])
        whole = IPv6(bytes(whole))
    else:
        for p in pkts:  # every fragment's own header checksum
            q = IP(bytes(p))
            want = q.chksum
            del q.chksum
            assert IP(bytes(q)).chksum == want, "IPv4 header checksum of a fragment"
        out = defragment([IP(bytes(p)) for p in pkts])
        assert len(out) == 1, out
        whole = IP(bytes(out[0]))
    got = whole[UDP].chksum
    del whole[UDP].chksum
    want = (IPv6 if IPv6 in whole else IP)(bytes(whole))[UDP].chksum
    assert got == want, f"UDP checksum of the reassembled datagram {got:#06x}, correct {want:#06x}"
    assert bytes(whole[UDP].payload) == PAYLOAD
    return whole


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_every_fragment_of_a_datagram_to_a_clusterip_is_translated(dp, v6):
    """First fragment: a new flow, DNAT (address, port, the datagram's
    checksum). The others: the same destination address."""
    seed(dp, SEED)
    src, vip, be = (CLIENT6, VIP6, BE6) if v6 else (CLIENT, VIP, BE)
    frames = frags(datagram(src, vip, CPORT, 53))
    outs = []
    for i, f in enumerate(frames):
        r = run(dp, f)
        assert r.retval == TC_ACT_OK
        assert r.counted == {("DNAT_NEW" if i == 0 else "FRAGMENT"): (1, len(f))}, (i, r.counted)
        outs.append(r.out)
    whole = reassembled(outs)
    ip = whole[IPv6] if v6 else whole[IP]
    assert (ip.src, ip.dst, whole[UDP].sport, whole[UDP].dport) == (src, be, CPORT, 5353)

    # The backend's answer, fragmented too, at the client's egress: every
    # fragment's source back to the ClusterIP.
    outs = []
    for i, f in enumerate(frags(datagram(be, src, 5353, CPORT), ident=0x1717)):
        r = run(dp, f, egress=True)
        assert r.retval == TC_ACT_OK
        assert r.counted == {("REVNAT" if i == 0 else "FRAGMENT"): (1, len(f))}, (i, r.counted)
        outs.append(r.out)
    whole = reassembled(outs)
    ip = whole[IPv6] if v6 else whole[IP]
    assert (ip.src, ip.dst, whole[UDP].sport, whole[UDP].dport) == (vip, src, 53, CPORT)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_fragment_before_its_first_passes_untouched(dp, v6):
    """A fragment that overtakes its first: nothing known of its datagram
    yet, so it passes untouched (sliceproxy cannot hold it back; the
    datagram is then lost as if that fragment had been). Once the first has
    been seen, the next fragments are translated."""
    seed(dp, SEED)
    src, vip = (CLIENT6, VIP6) if v6 else (CLIENT, VIP)
    first, second, third = frags(datagram(src, vip, CPORT, 53))
    r = run(dp, third)
    assert (r.retval, r.out, r.counted) == (TC_ACT_OK, third, {"PASS_FRAGMENT": (1, len(third))})
    assert run(dp, first).counted.keys() == {"DNAT_NEW"}
    r = run(dp, second)
    assert r.counted == {"FRAGMENT": (1, len(second))} and r.out != second


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_unrelated_fragments_are_untouched(dp, v6):
    """Another datagram between the same hosts (another identification), a
    datagram to no Service, and the same datagram at another attach point
    keep their bytes."""
    seed(dp, SEED)
    src, vip = (CLIENT6, VIP6) if v6 else (CLIENT, VIP)
    first, *_ = frags(datagram(src, vip, CPORT, 53))
    assert run(dp, first).counted.keys() == {"DNAT_NEW"}
    other = frags(datagram(src, vip, CPORT, 53, ident=0x4243), ident=0x4243)[1]
    nowhere = frags(datagram(src, "2001:db8:ffff::99" if v6 else "198.19.0.99", CPORT, 53))
    same = frags(datagram(src, vip, CPORT, 53))[1]
    for pkt, kw in ((other, {}), (nowhere[0], {}), (nowhere[1], {}), (same, {"egress": True})):
        r = run(dp, pkt, **kw)
        assert (r.retval, r.out) == (TC_ACT_OK, pkt), r.counted
        assert r.counted.keys() <= {"PASS_FRAGMENT", "PASS_NO_SERVICE"}, r.counted


def test_fragments_of_a_rejected_datagram_are_dropped(dp):
    """The first fragment to a Service with no endpoint becomes the ICMP
    port unreachable; the rest of the datagram is dropped, not leaked
    towards the ClusterIP untranslated."""
    seed(dp, Seed(services=(Svc(VIP, 53, UDP_P, 10, flags=F_REJECT),)))
    first, second, third = frags(datagram(CLIENT, VIP, CPORT, 53))
    assert run(dp, first).counted.keys() == {"REJECT_NO_BACKEND"}
    for f in (second, third):
        r = run(dp, f)
        assert (r.retval, r.counted) == (TC_ACT_SHOT, {"FRAGMENT": (1, len(f))})


def test_hairpin_fragments_go_back_into_the_pod(dp):
    """A pod that is its own Service's backend: the first fragment gets the
    hairpin source and the pod as destination and goes back into the pod;
    so do the others, with the same addresses."""
    seed(dp, Seed(services=(Svc(VIP, 53, UDP_P, 10, slots=(5,)),), backends=(Backend(5, CLIENT, 5353, UDP_P),)))
    outs = []
    for i, f in enumerate(frags(datagram(CLIENT, VIP, CPORT, 53))):
        r = run(dp, f)
        assert r.retval == TC_ACT_REDIRECT, (i, r.counted)
        assert r.out[:6] == f[6:12] and r.out[6:12] == f[:6]  # MACs swapped
        outs.append(r.out)
    whole = reassembled(outs)
    assert (whole[IP].src, whole[IP].dst, whole[UDP].dport) == (HAIRPIN4, CLIENT, 5353)


def test_nodeport_fragments_from_outside_are_translated_and_masqueraded(dp):
    """External path: DNAT at the external ingress, then (the backend on
    another node) SNAT at the external egress, each fragment alike."""
    from .test_external import put_cfg

    seed(
        dp,
        Seed(
            services=(Svc(NODE, 30053, UDP_P, 21, slots=(1,), scope=1, flags=abi.const("SP_SVC_F_MASQ")),),
            backends=(B1,),
        ),
    )
    put_cfg(dp, addr4=NODE, lo=61000, hi=61999, reclaim=600, reclaim_closed=10)
    ins = []
    for i, f in enumerate(frags(datagram(OUTSIDE, NODE, CPORT, 30053))):
        r = run(dp, f, external=True)
        assert r.retval == TC_ACT_OK and r.counted.keys() == {"DNAT_NEW" if i == 0 else "FRAGMENT"}, r.counted
        ins.append(r.out)
    whole = reassembled(ins)
    assert (whole[IP].src, whole[IP].dst, whole[UDP].dport) == (OUTSIDE, BE, 5353)
    outs = []
    for i, f in enumerate(ins):
        r = run(dp, f, egress=True, external=True)
        assert r.retval == TC_ACT_OK and r.counted.keys() == {"SNAT" if i == 0 else "FRAGMENT"}, r.counted
        outs.append(r.out)
    whole = reassembled(outs)
    assert (whole[IP].src, whole[IP].dst, whole[UDP].dport) == (NODE, BE, 5353)
    assert 61000 <= whole[UDP].sport <= 61999


def test_a_first_fragment_older_than_reassembly_allows_is_forgotten(dp):
    """Linux gives up reassembling an IPv4 datagram after 30 s: a fragment
    arriving later finds no translation (the entry's stamp, moved back by
    the test on the programs' clock, stands for the wait)."""
    seed(dp, SEED)
    first, second, _ = frags(datagram(CLIENT, VIP, CPORT, 53))
    run(dp, first)
    m = dp.maps[mapname("sp_frag")]
    ((k, v),) = list(m.items())
    val = abi.unpack("sp_frag_val", v)
    val["first_seen"] = stamp(dp, 31)
    m.update(k, abi.pack("sp_frag_val", **val))
    r = run(dp, second)
    assert (r.retval, r.out, r.counted) == (TC_ACT_OK, second, {"PASS_FRAGMENT": (1, len(second))})
    val["first_seen"] = stamp(dp, 29)
    m.update(k, abi.pack("sp_frag_val", **val))
    assert run(dp, second).counted.keys() == {"FRAGMENT"}


def test_the_entry_names_the_datagram_as_it_arrived(dp):
    seed(dp, SEED)
    run(dp, frags(datagram(CLIENT, VIP, CPORT, 53))[0])
    ((k, v),) = list(dp.maps[mapname("sp_frag")].items())
    key, val = abi.unpack("sp_frag_key", k), abi.unpack("sp_frag_val", v)
    assert (key["id"], key["proto"], key["hook"]) == (0x4242, UDP_P, 0)  # SP_HOOK_POD_INGRESS
    assert key["daddr"][12:] == bytes(int(x) for x in VIP.split("."))
    assert val["daddr"][12:] == bytes(int(x) for x in BE.split(".")) and val["flags"] == 0
