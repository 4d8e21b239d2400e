"""The programmed world the fuzz tier throws packets at: frontends in both
scopes (masquerade, source ranges, affinity, without backends: dropped
or rejected), the
node's masquerade settings, and established flows in every conntrack
direction, IPv4 and IPv6, seeded with the datapath tier's helpers.

Everything here is fixed (ports included), so a seed replays the same
packets whatever the kernel picked during an earlier run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ctrl.dataplane import abi
from ctrl.util.addrs import addr16

from ..datapath.packets import Backend, CtKey, CtVal, Svc, mapname, put_backend, put_ct, put_service, stamp
from ..datapath.test_external import put_cfg, put_range
from .gen import TCP, UDP, Tuple, a16

F_AFFINITY = abi.const("SP_SVC_F_AFFINITY")
F_SRC_RANGES = abi.const("SP_SVC_F_SRC_RANGES")
F_MASQ = abi.const("SP_SVC_F_MASQ")
F_REJECT = abi.const("SP_SVC_F_REJECT")
INTERNAL, EXTERNAL = abi.SCOPE_INTERNAL, abi.SCOPE_EXTERNAL
FORWARD, REPLY, SNAT, UNSNAT = abi.CT_FORWARD, abi.CT_REPLY, abi.CT_SNAT, abi.CT_UNSNAT

NODE4, NODE6 = "198.18.0.101", "2001:db8::101"
PORT_MIN, PORT_MAX = 61000, 61999


@dataclass(frozen=True)
class Front:
    addr: str
    port: int
    proto: int
    scope: int
    svc_id: int
    backends: tuple[tuple[str, int], ...]  # (address, port)
    flags: int = 0
    affinity: int = 0  # seconds


FRONTS = (
    # Pods' view (internal scope).
    Front("198.19.0.10", 80, TCP, INTERNAL, 10, (("198.18.2.1", 8080), ("198.18.2.2", 8080))),
    Front("198.19.0.10", 53, UDP, INTERNAL, 11, (("198.18.2.1", 5353),)),
    Front("198.19.0.11", 80, TCP, INTERNAL, 12, (("198.18.2.3", 8080),), F_AFFINITY, 60),
    Front("198.19.0.12", 80, TCP, INTERNAL, 13, ()),  # no backend, a Local policy: dropped
    Front("198.19.1.1", 80, TCP, INTERNAL, 14, (("198.18.2.2", 8080),), F_SRC_RANGES),
    Front("2001:db8:ffff::10", 80, TCP, INTERNAL, 15, (("2001:db8:2::1", 8080),)),
    Front("2001:db8:ffff::10", 53, UDP, INTERNAL, 16, (("2001:db8:2::1", 5353),)),
    # Outside clients' view (external scope): NodePorts, an LB IP.
    Front(NODE4, 30080, TCP, EXTERNAL, 20, (("198.18.2.2", 8080),), F_MASQ),
    Front(NODE4, 30080, UDP, EXTERNAL, 21, (("198.18.2.2", 5353),), F_MASQ),
    Front(NODE4, 30081, TCP, EXTERNAL, 22, (("198.18.2.1", 8080),)),  # policy Local
    Front("198.19.1.1", 80, TCP, EXTERNAL, 23, (("198.18.2.2", 8080),), F_MASQ | F_SRC_RANGES),
    Front(NODE6, 30080, TCP, EXTERNAL, 24, (("2001:db8:2::2", 8080),), F_MASQ),
    Front(NODE6, 30080, UDP, EXTERNAL, 25, (("2001:db8:2::2", 5353),), F_MASQ),
    # No endpoint anywhere: rejected (ICMP port unreachable), both scopes.
    Front(NODE4, 30090, UDP, EXTERNAL, 26, (), F_REJECT),
    Front("198.19.0.13", 80, TCP, INTERNAL, 17, (), F_REJECT),
    Front("2001:db8:ffff::13", 53, UDP, INTERNAL, 18, (), F_REJECT),
)
RANGES = {14: ("198.18.100.0/24",), 23: ("198.18.100.0/24", "198.18.1.0/24")}


@dataclass
class World:
    fronts: tuple[Front, ...] = FRONTS
    # Packets of established flows, as each program sees them: the client's
    # to the frontend, the backend's reply, the client's after DNAT (SNAT
    # path), the backend's to the node's SNAT port (UNSNAT path).
    flows: list[Tuple] = field(default_factory=list)
    # Every address of the world: frontends, backends, node, flows' clients.
    addrs: set[bytes] = field(default_factory=set)
    # (address, port, protocol) of every frontend, both scopes.
    frontends: set[tuple[bytes, int, int]] = field(default_factory=set)


def _backend_ids() -> dict[tuple[str, int, int], int]:
    ids: dict[tuple[str, int, int], int] = {}
    for f in FRONTS:
        for addr, port in f.backends:
            ids.setdefault((addr, port, f.proto), 100 + len(ids))
    return ids


def _put_ct(dp, k: tuple, v: tuple, last_seen: int) -> None:
    """Either family: k (saddr, daddr, sport, dport, proto, dir), v (nat
    address, nat port, backend id, service id, addr2 or None, port2)."""
    put_ct(dp, CtKey(*k), CtVal(*v), last_seen)


def program(dp) -> World:
    w = World()
    ids = _backend_ids()
    for (addr, port, proto), bid in ids.items():
        put_backend(dp, Backend(bid, addr, port, proto))
        w.addrs.add(a16(addr))
    for f in FRONTS:
        slots = tuple(ids[(addr, port, f.proto)] for addr, port in f.backends)
        put_service(dp, Svc(f.addr, f.port, f.proto, f.svc_id, slots, f.scope, None, f.affinity, f.flags))
        w.addrs.add(a16(f.addr))
        w.frontends.add((a16(f.addr), f.port, f.proto))
    for svc_id, cidrs in RANGES.items():
        for c in cidrs:
            put_range(dp, svc_id, c)
    put_cfg(dp, addr4=NODE4, addr6=NODE6, lo=PORT_MIN, hi=PORT_MAX, reclaim=600, reclaim_closed=10)
    w.addrs |= {a16(NODE4), a16(NODE6)}

    fresh = stamp(dp, 0)
    # Pods' flows: client -> frontend (forward), backend -> client (reply).
    for client, f in (("198.18.1.1", FRONTS[0]), ("198.18.1.1", FRONTS[1]), ("2001:db8:1::1", FRONTS[5])):
        (be, bport), cport = f.backends[0], 40000 + f.svc_id
        bid = ids[(be, bport, f.proto)]
        _put_ct(dp, (client, f.addr, cport, f.port, f.proto, FORWARD), (be, bport, bid, f.svc_id, None, 0), fresh)
        _put_ct(dp, (be, client, bport, cport, f.proto, REPLY), (f.addr, f.port, bid, f.svc_id, None, 0), fresh)
        w.flows += [_t(client, f.addr, cport, f.port, f.proto), _t(be, client, bport, cport, f.proto)]
        w.addrs.add(a16(client))
    # Masqueraded external flows: forward, reply, SNAT, UNSNAT.
    for client, f, node in (
        ("198.18.100.5", FRONTS[7], NODE4),
        ("198.18.100.5", FRONTS[8], NODE4),
        ("2001:db8:100::5", FRONTS[11], NODE6),
    ):
        (be, bport), cport, port = f.backends[0], 40000 + f.svc_id, PORT_MIN + f.svc_id
        bid = ids[(be, bport, f.proto)]
        _put_ct(dp, (client, f.addr, cport, f.port, f.proto, FORWARD), (be, bport, bid, f.svc_id, node, port), fresh)
        _put_ct(dp, (be, client, bport, cport, f.proto, REPLY), (f.addr, f.port, bid, f.svc_id, None, 0), fresh)
        _put_ct(dp, (client, be, cport, bport, f.proto, SNAT), (node, port, bid, f.svc_id, f.addr, f.port), fresh)
        _put_ct(dp, (be, node, bport, port, f.proto, UNSNAT), (client, cport, bid, f.svc_id, None, 0), fresh)
        w.flows += [
            _t(client, f.addr, cport, f.port, f.proto),
            _t(be, client, bport, cport, f.proto),
            _t(client, be, cport, bport, f.proto),
            _t(be, node, bport, port, f.proto),
        ]
        w.addrs.add(a16(client))
    # A client with session affinity to the affinity frontend.
    aff = FRONTS[2]
    dp.maps[mapname("sp_aff")].update(
        abi.pack("sp_aff_key", svc_id=aff.svc_id, addr=addr16("198.18.1.1")),
        abi.pack("sp_aff_val", backend_id=ids[(*aff.backends[0], aff.proto)], slot=0, last_used=fresh),
    )
    return w


def _t(src: str, dst: str, sport: int, dport: int, proto: int) -> Tuple:
    return Tuple(a16(src), a16(dst), sport, dport, proto)
