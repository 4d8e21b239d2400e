"""Tier 2: the external interfaces' XDP program (sp_ext_xdp) under
BPF_PROG_TEST_RUN.

What XDP ends itself: a packet loadBalancerSourceRanges refuse (XDP_DROP,
counted as tc counts it), and with forwarding on a flow to a backend the
node routes back out of the uplink (DNAT and SNAT as tc's ingress and
egress, the same conntrack entries, XDP_TX) or out of another uplink that
runs the XDP program (the same, XDP_REDIRECT through sp_uplinks: the run
cannot follow a redirect, so its return code and frame are checked).
Everything else leaves with
XDP_PASS byte for byte as it came, for tc, and counts nothing (tc counts
it); with forwarding on, a flow XDP decided but leaves to the kernel's
routing (a backend on this node...) with its decision as metadata in
front of the frame (the run's output starts at data_meta), and a flow
XDP sends out itself with none (its output is exactly the frame). tc's
side of that handoff is tested in the netns tier: BPF_PROG_TEST_RUN gives
a tc program an skb without metadata. Forwarding needs a FIB: those tests run the program from a thread in a
node namespace the test made (a Topology), with static neighbours, so the
route lookup sees the test's routes and never the machine's.

Every output frame is compared with one scapy built from scratch and its
checksums recomputed by scapy. Addresses: 198.18.0.0/15, 2001:db8::/32.
"""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from ctrl.dataplane import abi, loader
from scripts.harness.nsforward import in_netns
from scripts.harness.topo import Topology

from .packets import (
    FORWARD,
    HAIRPIN4,
    HAIRPIN6,
    REPLY,
    TC_ACT_OK,
    TCP_P,
    UDP_P,
    Backend,
    CtKey,
    CtVal,
    Seed,
    Svc,
    ct_dump,
    eth,
    ip4,
    l4pkt,
    mapped,
    put_ct,
    run,
    seed,
    stats,
    tcp,
    udp,
)
from .test_external import (
    BE,
    BE_REMOTE,
    CPORT,
    F_MASQ,
    F_SRC_RANGES,
    LB,
    LB_IP,
    NODE,
    NODEPORT,
    NP,
    NP_UDP,
    OUTSIDE,
    OUTSIDE2,
    PORT_MAX,
    PORT_MIN,
    put_cfg,
    put_range,
)

XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 1, 2, 3, 4
SNAT, UNSNAT = abi.CT_SNAT, abi.CT_UNSNAT

# IPv6: an LB IP refusing all but one /64, a NodePort, a remote backend.
OUT6, OUT6_OTHER = "2001:db8:100::5", "2001:db8:101::7"
NODE6, LB6 = "2001:db8:200::1", "2001:db8:5::5"
BE6_REMOTE = "2001:db8:2::2"
BE6 = Backend(9, BE6_REMOTE, 8080, TCP_P)
BE6_UDP = Backend(10, BE6_REMOTE, 5353, UDP_P)
LB_V6 = Svc(LB6, 80, TCP_P, svc_id=31, slots=(BE6.id,), scope=1, flags=F_MASQ | F_SRC_RANGES)
NP6 = Svc(NODE6, NODEPORT, TCP_P, svc_id=32, slots=(BE6.id,), scope=1, flags=F_MASQ)
NP6_UDP = Svc(NODE6, NODEPORT, UDP_P, svc_id=33, slots=(BE6_UDP.id,), scope=1, flags=F_MASQ)


def xdp(dp, pkt: bytes, ifindex: int = 0):
    """One frame through the XDP program: the run's (action, frame out,
    counters moved); ifindex: the interface it arrives on (the xdp_md's
    ingress_ifindex, in the calling thread's namespace), 0: none."""
    before = stats(dp)
    ctx = struct.pack("6I", 0, len(pkt), 0, ifindex, 0, 0) if ifindex else None
    retval, out, _ = dp.test_run(pkt, xdp=True, ctx=ctx)
    after = stats(dp)
    moved = {}
    for k, (p, b) in after.items():
        p0, b0 = before.get(k, (0, 0))
        if (p - p0, b - b0) != (0, 0):
            moved[k] = (p - p0, b - b0)
    return retval, out, moved


def ct(dp) -> dict[CtKey, CtVal]:
    return {k: v for k, (v, _) in ct_dump(dp).items()}


def checked(raw: bytes) -> Ether:
    """The frame parsed by scapy, its IPv4 header checksum and TCP/UDP
    checksum (IPv4 or IPv6) equal to the ones scapy computes from scratch."""
    p = Ether(raw)
    assert bytes(p) == raw, "scapy does not round-trip the frame"
    q = Ether(raw)
    if IP in q:
        del q[IP].chksum
    l4 = TCP if TCP in p else UDP
    del q[l4].chksum
    r = Ether(bytes(q))
    if IP in p:
        assert p[IP].chksum == r[IP].chksum, f"IPv4 header checksum {p[IP].chksum:#06x}, correct {r[IP].chksum:#06x}"
    assert p[l4].chksum == r[l4].chksum, f"{l4.__name__} checksum {p[l4].chksum:#06x}, correct {r[l4].chksum:#06x}"
    return p


# -- without forwarding: source ranges, and everything else untouched -------------


@pytest.mark.parametrize(
    "sent,ranges,action,verdict",
    [
        pytest.param(
            tcp(OUTSIDE2, LB_IP, CPORT, 80), ("198.18.100.0/24",), XDP_DROP, "DROP_SOURCE_RANGE", id="v4-refused"
        ),
        pytest.param(udp(OUTSIDE2, LB_IP, CPORT, 80), ("198.18.100.0/24",), XDP_PASS, None, id="v4-udp-no-frontend"),
        pytest.param(tcp(OUTSIDE, LB_IP, CPORT, 80), ("198.18.100.0/24",), XDP_PASS, None, id="v4-allowed-passed"),
        pytest.param(tcp(OUTSIDE, LB_IP, CPORT, 80), (), XDP_DROP, "DROP_SOURCE_RANGE", id="v4-flag-without-ranges"),
        pytest.param(tcp(OUTSIDE2, LB_IP, CPORT, 81), ("198.18.100.0/24",), XDP_PASS, None, id="v4-no-service"),
        pytest.param(
            l4pkt(TCP_P, OUT6_OTHER, LB6, CPORT, 80),
            ("2001:db8:100::/64",),
            XDP_DROP,
            "DROP_SOURCE_RANGE",
            id="v6-refused",
        ),
        pytest.param(
            l4pkt(TCP_P, OUT6, LB6, CPORT, 80), ("2001:db8:100::/64",), XDP_PASS, None, id="v6-allowed-passed"
        ),
        # What tc looks at closer: handed on untouched, refused source or not.
        pytest.param(
            bytes(eth() / ip4(OUTSIDE2, LB_IP) / ICMP(type=8) / Raw(b"ping")), (), XDP_PASS, None, id="v4-icmp-echo"
        ),
        pytest.param(tcp(OUTSIDE2, LB_IP, CPORT, 80, ip_flags="MF"), (), XDP_PASS, None, id="v4-first-fragment-to-tc"),
        pytest.param(
            bytes(eth() / ip4(OUTSIDE2, LB_IP, frag=100) / Raw(b"x" * 32)), (), XDP_PASS, None, id="v4-later-fragment"
        ),
        pytest.param(
            bytes(eth() / IPv6(src=OUT6_OTHER, dst=LB6) / IPv6ExtHdrDestOpt() / TCP(sport=CPORT, dport=80)),
            (),
            XDP_PASS,
            None,
            id="v6-extension-header-to-tc",
        ),
    ],
)
def test_source_ranges_dropped_in_xdp_the_rest_passed(dp, sent, ranges, action, verdict):
    seed(dp, Seed(services=(LB, LB_V6), backends=(BE, BE6)))
    for r in ranges:
        put_range(dp, (LB_V6 if ":" in r else LB).svc_id, r)
    retval, out, moved = xdp(dp, sent)
    assert retval == action
    assert moved == ({verdict: (1, len(sent))} if verdict else {}), "XDP counts only what it ends"
    if action == XDP_PASS:
        assert out == sent, "a packet handed to tc leaves XDP untouched"
    assert ct(dp) == {}, "without forwarding XDP records no flow"


def test_xdp_and_tc_refuse_the_same_sources(dp):
    """The one decision (nat.h's dnat_flow): for each source, XDP drops
    exactly what tc's ingress drops, and passes what tc serves."""
    seed(dp, Seed(services=(LB,), backends=(BE,)))
    put_range(dp, LB.svc_id, "198.18.100.0/30")
    for last in range(0, 8):
        src = f"198.18.100.{last}"
        sent = tcp(src, LB_IP, CPORT + last, 80)
        action, _, _ = xdp(dp, sent)
        tc = run(dp, sent, external=True)
        assert (action == XDP_DROP) == (tc.counted.keys() == {"DROP_SOURCE_RANGE"}), src
        assert (action == XDP_DROP) == (last >= 4), src


def test_masqueraded_reply_is_left_to_tc_before_any_frontend(dp):
    """tc's ingress looks for a masqueraded reply (unsnat) before any
    frontend: so does XDP. A reply to an SNAT port that is also a refused
    frontend's port passes to tc (which un-masquerades it)."""
    front = Svc(NODE, 61000, TCP_P, svc_id=41, slots=(BE.id,), scope=1, flags=F_SRC_RANGES)
    seed(dp, Seed(services=(front,), backends=(BE,)))
    put_ct(dp, CtKey(BE_REMOTE, NODE, 8080, 61000, TCP_P, UNSNAT), CtVal(OUTSIDE, CPORT, BE.id, NP.svc_id))
    sent = tcp(BE_REMOTE, NODE, 8080, 61000, flags="SA")
    assert xdp(dp, sent)[:2] == (XDP_PASS, sent)
    other = tcp(BE_REMOTE, NODE, 8081, 61000, flags="SA")
    assert xdp(dp, other)[0] == XDP_DROP


def test_forwarding_off_passes_served_flows(dp):
    """Loaded without forwarding (the default): a NodePort flow to a remote
    backend is tc's, and XDP leaves no trace of it."""
    seed(dp, Seed(services=(NP,), backends=(BE,)))
    put_cfg(dp)
    sent = tcp(OUTSIDE, NODE, CPORT, NODEPORT)
    assert xdp(dp, sent) == (XDP_PASS, sent, {})
    assert ct(dp) == {}


# -- forwarding: a node namespace with a FIB -------------------------------------

NEIGH_MAC = "02:00:00:00:c8:02"  # the other node, next hop of BE_REMOTE's subnet
UNRESOLVED_BE = "198.18.3.3"  # behind a next hop with no neighbour entry
LOCAL_BE = "198.18.1.11"  # a pod of this node


@dataclass
class Fib:
    topo: Topology
    uplink: str
    ifindex: int
    mac: str
    pod_if: str

    def run(self, fn):
        """fn() in a thread that entered the node namespace (BPF_PROG_TEST_RUN
        looks the ingress interface and the routes up in the caller's)."""
        return in_netns(self.topo.ns_path("node"), fn)


def _node(topo: Topology, *argv: str) -> str:
    return subprocess.run(["ip", "-n", topo.node_ns, *argv], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def fib() -> Iterator[Fib]:
    """A node namespace: an uplink (a veth pair's end, both ends in the
    namespace) on 198.18.200.1/24 and 2001:db8:200::1/64, the other node
    at 198.18.200.2 / 2001:db8:200::2 with a permanent neighbour entry
    routing 198.18.2.0/24 and 2001:db8:2::/64, a next hop with no
    neighbour entry for 198.18.3.0/24, and a local pod (198.18.1.11)."""
    with Topology() as t:
        up, peer = f"{t.prefix}x0", f"{t.prefix}x1"
        _node(t, "link", "add", up, "type", "veth", "peer", "name", peer)
        for ifname in (up, peer):
            _node(t, "link", "set", ifname, "up")
        _node(t, "addr", "add", "198.18.200.1/24", "dev", up)
        _node(t, "-6", "addr", "add", f"{NODE6}/64", "dev", up, "nodad")
        for via in ("198.18.200.2", "2001:db8:200::2"):
            _node(t, "neigh", "replace", via, "lladdr", NEIGH_MAC, "dev", up, "nud", "permanent")
        _node(t, "route", "add", "198.18.2.0/24", "via", "198.18.200.2", "dev", up)
        _node(t, "-6", "route", "add", "2001:db8:2::/64", "via", "2001:db8:200::2", "dev", up)
        _node(t, "route", "add", "198.18.3.0/24", "via", "198.18.200.3", "dev", up)
        pod = t.add_pod("web", LOCAL_BE)
        link = json.loads(_node(t, "-j", "link", "show", up))[0]
        yield Fib(t, up, link["ifindex"], link["address"], pod.host_if)


@pytest.fixture
def fwd() -> Iterator[loader.Dataplane]:
    """The programs loaded with XDP forwarding on, private maps."""
    d = loader.load(pin_dir=None, hairpin=abi.Hairpin(mapped(HAIRPIN4), mapped(HAIRPIN6)), xdp_forward=True)
    try:
        yield d
    finally:
        d.close()


def expected_out(
    fib: Fib,
    proto: int,
    src: str,
    dst: str,
    sport: int,
    dport: int,
    flags: str,
    hop: int,
    macs: tuple[str, str] | None = None,
) -> bytes:
    """The frame XDP sends out: l4pkt's, with the egress interface's and
    the next hop's MACs (macs, default the uplink's and NEIGH_MAC) and the
    TTL (hop limit) less one."""
    p = Ether(l4pkt(proto, src, dst, sport, dport, flags=flags))
    p[Ether].src, p[Ether].dst = macs or (fib.mac, NEIGH_MAC)
    if IP in p:
        p[IP].ttl = hop
        del p[IP].chksum
    else:
        p[IPv6].hlim = hop
    l4 = TCP if proto == TCP_P else UDP
    del p[l4].chksum
    return bytes(Ether(bytes(p)))


@pytest.mark.parametrize(
    "svc,be,client,node",
    [
        pytest.param(NP, BE, OUTSIDE, NODE, id="v4-tcp"),
        pytest.param(NP_UDP, Backend(8, BE_REMOTE, 5353, UDP_P), OUTSIDE, NODE, id="v4-udp"),
        pytest.param(NP6, BE6, OUT6, NODE6, id="v6-tcp"),
        pytest.param(NP6_UDP, BE6_UDP, OUT6, NODE6, id="v6-udp"),
    ],
)
def test_remote_backend_translated_and_sent_back_out(fwd, fib, svc, be, client, node):
    """A new flow to a NodePort whose backend is on the other node: DNAT
    and SNAT as tc's ingress and egress would do them, conntrack entries as
    they would write them, TTL less one, the next hop's MAC, XDP_TX. The
    next packet keeps the port; the backend's reply then takes tc's path
    (UNSNAT at ingress, REVNAT at egress) on those same entries."""
    seed(fwd, Seed(services=(svc,), backends=(be,)))
    put_cfg(fwd, addr4=NODE, addr6=NODE6)
    proto, l4 = be.proto, (TCP if be.proto == TCP_P else UDP)
    sent = l4pkt(proto, client, node, CPORT, NODEPORT, flags="S")
    action, out, moved = fib.run(lambda: xdp(fwd, sent, fib.ifindex))
    assert action == XDP_TX, moved
    assert moved.keys() == {"DNAT_NEW", "SNAT", "XDP_TX"}
    port = checked(out)[l4].sport
    assert PORT_MIN <= port <= PORT_MAX
    assert out == expected_out(fib, proto, node, be.addr, port, be.port, "S", 62)
    entries = ct(fwd)
    assert entries[CtKey(client, node, CPORT, NODEPORT, proto, FORWARD)] == CtVal(
        be.addr, be.port, be.id, svc.svc_id, node, port
    )
    assert entries[CtKey(be.addr, client, be.port, CPORT, proto, REPLY)] == CtVal(node, NODEPORT, be.id, svc.svc_id)
    assert entries[CtKey(client, be.addr, CPORT, be.port, proto, SNAT)] == CtVal(
        node, port, be.id, svc.svc_id, node, NODEPORT
    )
    assert entries[CtKey(be.addr, node, be.port, port, proto, UNSNAT)] == CtVal(client, CPORT, be.id, svc.svc_id)

    # The flow's next packet: established, the same port.
    again = l4pkt(proto, client, node, CPORT, NODEPORT, flags="A")
    action, out, moved = fib.run(lambda: xdp(fwd, again, fib.ifindex))
    assert (action, moved.keys()) == (XDP_TX, {"DNAT_ESTABLISHED", "SNAT", "XDP_TX"})
    assert out == expected_out(fib, proto, node, be.addr, port, be.port, "A", 62)

    # The reply, through tc: back to the client, from the frontend.
    r = run(fwd, l4pkt(proto, be.addr, node, be.port, port, flags="SA"), external=True)
    assert (r.retval, r.counted.keys()) == (TC_ACT_OK, {"UNSNAT"})
    r = run(fwd, r.out, egress=True, external=True)
    assert (r.retval, r.counted.keys()) == (TC_ACT_OK, {"REVNAT"})
    p = checked(r.out)
    ip = p[IPv6] if IPv6 in p else p[IP]
    assert (ip.src, ip.dst, p[l4].sport, p[l4].dport) == (node, client, NODEPORT, CPORT)


def test_flow_tc_started_is_continued_in_xdp(fwd, fib):
    """A flow whose first packet tc translated (its port allocated at the
    egress) keeps that port when XDP forwards its next packets."""
    seed(fwd, Seed(services=(NP,), backends=(BE,)))
    put_cfg(fwd)
    r = run(fwd, tcp(OUTSIDE, NODE, CPORT, NODEPORT), external=True)
    r = run(fwd, r.out, egress=True, external=True)
    port = Ether(r.out)[TCP].sport
    action, out, moved = fib.run(lambda: xdp(fwd, tcp(OUTSIDE, NODE, CPORT, NODEPORT, flags="A"), fib.ifindex))
    assert (action, moved.keys()) == (XDP_TX, {"DNAT_ESTABLISHED", "SNAT", "XDP_TX"})
    assert checked(out)[TCP].sport == port


def handed(out: bytes, sent: bytes) -> dict:
    """The metadata in front of the frame XDP handed to tc (BPF_PROG_TEST_RUN
    gives the buffer from data_meta on), decoded as struct sp_xdp_meta;
    the frame after it must be the one sent, untouched."""
    size = len(abi.pack("sp_xdp_meta"))
    assert len(out) == size + len(sent) and out[size:] == sent
    return abi.unpack("sp_xdp_meta", out[:size])


@pytest.mark.parametrize(
    "backend,ttl,proto,client,node",
    [
        pytest.param(LOCAL_BE, 64, TCP_P, OUTSIDE, NODE, id="local-backend"),
        pytest.param(LOCAL_BE, 64, UDP_P, OUTSIDE, NODE, id="local-backend-udp"),
        pytest.param(UNRESOLVED_BE, 64, TCP_P, OUTSIDE, NODE, id="neighbour-not-resolved"),
        pytest.param(BE_REMOTE, 1, TCP_P, OUTSIDE, NODE, id="ttl-ends-here"),
        pytest.param("198.18.9.9", 64, TCP_P, OUTSIDE, NODE, id="no-route"),
        pytest.param("2001:db8:9::9", 64, TCP_P, OUT6, NODE6, id="v6-not-out-of-an-uplink"),
    ],
)
def test_what_xdp_cannot_send_back_out_is_handed_to_tc(fwd, fib, backend, ttl, proto, client, node):
    """A backend on this node, one behind a neighbour the kernel has not
    resolved, a TTL that ends here, no route: XDP_PASS, the frame as it
    came, no counter (tc counts), and XDP's decision in front of it as
    metadata: this load's cookie, the backend, dnat_new. The new flow is
    recorded by XDP, as tc's ingress would record it; its next packet is
    handed on as dnat_established, the same backend."""
    be = Backend(11, backend, 8080, proto)
    svc = Svc(node, NODEPORT, proto, svc_id=51, slots=(be.id,), scope=1, flags=F_MASQ)
    seed(fwd, Seed(services=(svc,), backends=(be,)))
    put_cfg(fwd, addr4=NODE, addr6=NODE6)
    l3 = IPv6(src=client, dst=node, hlim=ttl) if ":" in node else IP(src=client, dst=node, ttl=ttl, id=0x1234)
    l4 = TCP(sport=CPORT, dport=NODEPORT, flags="S") if proto == TCP_P else UDP(sport=CPORT, dport=NODEPORT)
    sent = bytes(eth() / l3 / l4)
    action, out, moved = fib.run(lambda: xdp(fwd, sent, fib.ifindex))
    assert (action, moved) == (XDP_PASS, {})
    assert handed(out, sent) == {
        "cookie": fwd.xdp_cookie,
        "backend": mapped(backend),
        "port": 8080,
        "verdict": abi.const("SP_V_DNAT_NEW"),
    }
    entries = ct(fwd)
    assert entries[CtKey(client, node, CPORT, NODEPORT, proto, FORWARD)] == CtVal(backend, 8080, be.id, svc.svc_id)
    assert entries[CtKey(backend, client, 8080, CPORT, proto, REPLY)] == CtVal(node, NODEPORT, be.id, svc.svc_id)

    action, out, moved = fib.run(lambda: xdp(fwd, sent, fib.ifindex))
    assert (action, moved) == (XDP_PASS, {})
    meta = handed(out, sent)
    assert (meta["backend"], meta["verdict"]) == (mapped(backend), abi.const("SP_V_DNAT_ESTABLISHED"))


def test_no_handoff_without_forwarding(dp):
    """Forwarding off: XDP decides no flow, so it hands none on: the
    frame as it came, without metadata, nothing recorded."""
    be = Backend(11, LOCAL_BE, 8080, TCP_P)
    svc = Svc(NODE, NODEPORT, TCP_P, svc_id=51, slots=(be.id,), scope=1)
    seed(dp, Seed(services=(svc,), backends=(be,)))
    put_cfg(dp)
    sent = tcp(OUTSIDE, NODE, CPORT, NODEPORT)
    assert xdp(dp, sent) == (XDP_PASS, sent, {})
    assert ct(dp) == {}


def test_handoff_cookie_is_each_loads_own(fwd):
    """Two loads, two cookies, never 0 (tc trusts no metadata with 0)."""
    other = loader.load(pin_dir=None, xdp_forward=True)
    try:
        assert 0 != fwd.xdp_cookie != other.xdp_cookie != 0
    finally:
        other.close()


def test_forwarded_refused_source_still_dropped(fwd, fib):
    seed(fwd, Seed(services=(LB,), backends=(BE,)))
    put_cfg(fwd)
    put_range(fwd, LB.svc_id, "198.18.100.0/24")
    sent = tcp(OUTSIDE2, LB_IP, CPORT, 80)
    action, _, moved = fib.run(lambda: xdp(fwd, sent, fib.ifindex))
    assert (action, moved) == (XDP_DROP, {"DROP_SOURCE_RANGE": (1, len(sent))})
    ok = tcp(OUTSIDE, LB_IP, CPORT, 80)
    action, out, moved = fib.run(lambda: xdp(fwd, ok, fib.ifindex))
    assert (action, moved.keys()) == (XDP_TX, {"DNAT_NEW", "SNAT", "XDP_TX"})
    assert checked(out)[IP].dst == BE_REMOTE


def test_udp_without_checksum_keeps_none(fwd, fib):
    """RFC 768: a UDP checksum of zero means none, and stays zero."""
    be = Backend(8, BE_REMOTE, 5353, UDP_P)
    seed(fwd, Seed(services=(NP_UDP,), backends=(be,)))
    put_cfg(fwd)
    sent = udp(OUTSIDE, NODE, CPORT, NODEPORT, chksum=0)
    action, out, _ = fib.run(lambda: xdp(fwd, sent, fib.ifindex))
    assert action == XDP_TX
    p = Ether(out)
    assert p[UDP].chksum == 0 and (p[IP].dst, p[UDP].dport) == (BE_REMOTE, 5353)


# -- forwarding out of another uplink: a redirect through sp_uplinks ----------------

NEIGH2_MAC = "02:00:00:00:d2:02"  # the next hop behind the second uplink
NEIGH3_MAC = "02:00:00:00:dc:02"  # ... behind an interface without our XDP
BE_VIA2, BE6_VIA2 = "198.18.4.4", "2001:db8:4::4"  # routed out of the second uplink
BE_VIA3 = "198.18.5.5"  # routed out of the third interface


@dataclass
class Link:
    name: str
    ifindex: int
    mac: str


def _veth(fib: Fib, name: str, peer: str, addr4: str, addr6: str | None, via: str, via6: str | None, mac: str) -> Link:
    """A veth end in the node namespace (its peer there too) with addr4/24
    (and addr6/64), a permanent neighbour via (via6) at mac."""
    _node(fib.topo, "link", "add", name, "type", "veth", "peer", "name", peer)
    for ifname in (name, peer):
        _node(fib.topo, "link", "set", ifname, "up")
    _node(fib.topo, "addr", "add", addr4, "dev", name)
    _node(fib.topo, "neigh", "replace", via, "lladdr", mac, "dev", name, "nud", "permanent")
    if addr6 is not None and via6 is not None:
        _node(fib.topo, "-6", "addr", "add", addr6, "dev", name, "nodad")
        _node(fib.topo, "-6", "neigh", "replace", via6, "lladdr", mac, "dev", name, "nud", "permanent")
    link = json.loads(_node(fib.topo, "-j", "link", "show", name))[0]
    return Link(name, link["ifindex"], link["address"])


@dataclass
class TwoUplinks:
    fib: Fib
    second: Link  # another uplink: 198.18.4.0/24 and 2001:db8:4::/64 leave by it
    third: Link  # an interface the agent did not give XDP: 198.18.5.0/24

    def list_uplinks(self, dp, *links: Link) -> None:
        """sp_uplinks holds these interfaces, as the agent writes it (from
        the node namespace: the kernel finds each ifindex there)."""
        m = dp.maps[abi.map_name("sp_uplinks")]

        def write() -> None:
            for link in links:
                m.update(abi.u32(link.ifindex), abi.u32(link.ifindex))

        self.fib.run(write)


@pytest.fixture
def two_uplinks(fib: Fib) -> TwoUplinks:
    """fib's node with a second uplink (198.18.210.1/24,
    2001:db8:210::1/64; next hop .2 / ::2 routing 198.18.4.0/24 and
    2001:db8:4::/64) and a third interface (198.18.220.1/24; next hop .2
    routing 198.18.5.0/24), every neighbour permanent."""
    t = fib.topo
    second = _veth(
        fib, f"{t.prefix}x2", f"{t.prefix}x3", "198.18.210.1/24", "2001:db8:210::1/64",
        "198.18.210.2", "2001:db8:210::2", NEIGH2_MAC,
    )  # fmt: skip
    third = _veth(fib, f"{t.prefix}x4", f"{t.prefix}x5", "198.18.220.1/24", None, "198.18.220.2", None, NEIGH3_MAC)
    _node(t, "route", "add", "198.18.4.0/24", "via", "198.18.210.2", "dev", second.name)
    _node(t, "-6", "route", "add", "2001:db8:4::/64", "via", "2001:db8:210::2", "dev", second.name)
    _node(t, "route", "add", "198.18.5.0/24", "via", "198.18.220.2", "dev", third.name)
    return TwoUplinks(fib, second, third)


@pytest.mark.parametrize(
    "proto,client,node,backend,port",
    [
        pytest.param(TCP_P, OUTSIDE, NODE, BE_VIA2, 8080, id="v4-tcp"),
        pytest.param(UDP_P, OUTSIDE, NODE, BE_VIA2, 5353, id="v4-udp"),
        pytest.param(TCP_P, OUT6, NODE6, BE6_VIA2, 8080, id="v6-tcp"),
    ],
)
def test_route_out_of_another_uplink_is_redirected_there(fwd, two_uplinks, proto, client, node, backend, port):
    """A NodePort flow whose backend's route leaves by the second uplink,
    which runs our XDP program (in sp_uplinks): translated as for XDP_TX,
    the second uplink's MAC as source and its next hop's as destination,
    TTL less one, XDP_REDIRECT, counted as xdp_redirect besides the
    translation's verdicts; the next packet keeps the flow's port."""
    fib, second = two_uplinks.fib, two_uplinks.second
    be = Backend(12, backend, port, proto)
    svc = Svc(node, NODEPORT, proto, svc_id=61, slots=(be.id,), scope=1, flags=F_MASQ)
    seed(fwd, Seed(services=(svc,), backends=(be,)))
    put_cfg(fwd, addr4=NODE, addr6=NODE6)
    two_uplinks.list_uplinks(fwd, fib_link(fib), second)
    l4 = TCP if proto == TCP_P else UDP
    sent = l4pkt(proto, client, node, CPORT, NODEPORT, flags="S")
    action, out, moved = fib.run(lambda: xdp(fwd, sent, fib.ifindex))
    assert action == XDP_REDIRECT, moved
    assert moved.keys() == {"DNAT_NEW", "SNAT", "XDP_REDIRECT"}
    assert moved["XDP_REDIRECT"] == (1, len(sent))
    sport = checked(out)[l4].sport
    assert PORT_MIN <= sport <= PORT_MAX
    macs = (second.mac, NEIGH2_MAC)
    assert out == expected_out(fib, proto, node, backend, sport, port, "S", 62, macs)
    assert ct(fwd)[CtKey(client, node, CPORT, NODEPORT, proto, FORWARD)] == CtVal(
        backend, port, be.id, svc.svc_id, node, sport
    )

    again = l4pkt(proto, client, node, CPORT, NODEPORT, flags="A")
    action, out, moved = fib.run(lambda: xdp(fwd, again, fib.ifindex))
    assert (action, moved.keys()) == (XDP_REDIRECT, {"DNAT_ESTABLISHED", "SNAT", "XDP_REDIRECT"})
    assert out == expected_out(fib, proto, node, backend, sport, port, "A", 62, macs)


def fib_link(fib: Fib) -> Link:
    return Link(fib.uplink, fib.ifindex, fib.mac)


@pytest.mark.parametrize(
    "backend,listed",
    [
        pytest.param(BE_VIA2, "first", id="second-uplink-not-listed"),
        pytest.param(BE_VIA3, "both", id="interface-without-xdp"),
    ],
)
def test_route_out_of_an_interface_not_listed_goes_to_tc(fwd, two_uplinks, backend, listed):
    """A route out of an interface sp_uplinks does not hold (the second
    uplink before the agent listed it; an interface the agent gave no XDP
    program): XDP_PASS, the frame as it came, no counter, handed to tc
    with XDP's decision (the flow recorded here, tc applies it)."""
    fib = two_uplinks.fib
    links = [fib_link(fib)] + ([two_uplinks.second] if listed == "both" else [])
    two_uplinks.list_uplinks(fwd, *links)
    be = Backend(13, backend, 8080, TCP_P)
    svc = Svc(NODE, NODEPORT, TCP_P, svc_id=62, slots=(be.id,), scope=1, flags=F_MASQ)
    seed(fwd, Seed(services=(svc,), backends=(be,)))
    put_cfg(fwd)
    sent = tcp(OUTSIDE, NODE, CPORT, NODEPORT)
    action, out, moved = fib.run(lambda: xdp(fwd, sent, fib.ifindex))
    assert (action, moved) == (XDP_PASS, {})
    assert handed(out, sent)["backend"] == mapped(backend)
    assert ct(fwd)[CtKey(OUTSIDE, NODE, CPORT, NODEPORT, TCP_P, FORWARD)].nat_addr == backend


def test_back_out_of_the_same_uplink_stays_xdp_tx_whatever_the_list(fwd, two_uplinks):
    """The interface a frame came in by needs no entry: XDP_TX, counted as
    xdp_tx, with sp_uplinks empty or holding the other uplinks."""
    fib = two_uplinks.fib
    seed(fwd, Seed(services=(NP,), backends=(BE,)))
    put_cfg(fwd)
    for i, listed in enumerate(((), (two_uplinks.second,))):
        two_uplinks.list_uplinks(fwd, *listed)
        sent = tcp(OUTSIDE, NODE, CPORT + i, NODEPORT)
        action, out, moved = fib.run(lambda sent=sent: xdp(fwd, sent, fib.ifindex))
        assert (action, moved.keys()) == (XDP_TX, {"DNAT_NEW", "SNAT", "XDP_TX"})
        assert Ether(out)[Ether].src == fib.mac
