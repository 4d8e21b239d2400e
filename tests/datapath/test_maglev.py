"""Tier 2: Maglev picks (--external-lb=maglev) under BPF_PROG_TEST_RUN.

A frontend flagged SP_SVC_F_MAGLEV sends a new flow to the backend its
table (sp_mgl_v5) names at (flow hash % M), the hash computed in Python
by ctrl.model.maglev.flow_hash: the program and the control plane agree
on it, so every node does. A frontend without the flag (ClusterIP) keeps
its random slot whatever table its id has. Addresses: 198.18.0.0/15,
2001:db8::/32.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from ctrl.dataplane import abi
from ctrl.model import maglev

from .packets import (
    TCP_P,
    UDP_P,
    Backend,
    Seed,
    Svc,
    l4pkt,
    mapname,
    mapped,
    run,
    seed,
    stamp,
    verify_checksums,
)

M = maglev.MIN_SIZE  # a small table: fewer entries to write per test
F_MAGLEV = abi.const("SP_SVC_F_MAGLEV")
F_MASQ = abi.const("SP_SVC_F_MASQ")
MGL_SLOT = 0x80000000  # LB_MGL_SLOT in ebpf/lib/lb.h: an affinity entry naming a table entry
FAMILIES = {
    4: ("198.18.100.5", "198.19.1.1", [f"198.18.2.{i}" for i in range(1, 6)]),
    6: ("2001:db8:100::5", "2001:db8:1::1", [f"2001:db8:2::{i}" for i in range(1, 6)]),
}


def backends(v: int, proto: int = TCP_P) -> list[Backend]:
    return [Backend(10 + i, a, 8080, proto) for i, a in enumerate(FAMILIES[v][2])]


def put_table(
    dp, svc_id: int, bes: list[Backend], m: int = M, pointer: bool = True, tid: int = 0, skip_chunk: int | None = None
) -> list[int]:
    """The control plane's table of these backends, written as it writes
    it (its chunks, then the frontend's pointer), under table id tid
    (default: 100 + svc_id); without the pointer, or without one chunk,
    when asked. Returns the backend id per entry."""
    ordered, positions = maglev.build_for([(mapped(b.addr), b.port) for b in bes], m)
    by_ident = {(mapped(b.addr), b.port): b.id for b in bes}
    table = [by_ident[ordered[i]] for i in positions]
    tid = tid or 100 + svc_id
    chunk = abi.MGL_CHUNK
    padded = table + [0] * (abi.mgl_chunks(m) * chunk - m)
    ks = [k for k in range(abi.mgl_chunks(m)) if k != skip_chunk]
    key = abi.codec("sp_mgl_key", ("id", "chunk"))
    dp.maps[mapname("sp_mgl")].update_batch(
        key.pack_columns([tid] * len(ks), ks),
        b"".join(abi.U32.pack_columns(padded[k * chunk : (k + 1) * chunk]) for k in ks),
    )
    if pointer:
        dp.maps[mapname("sp_mglptr")].update(abi.u32(svc_id), abi.pack("sp_mgl_ptr", table=tid, size=m))
    return table


def dest(out: bytes) -> tuple[str, int]:
    """Where a rewritten frame goes, its checksums checked by scapy."""
    if IPv6 not in Ether(out):
        ip = verify_checksums(out)[IP]
        return ip.dst, ip.payload.dport
    p = Ether(out)
    l4 = p[IPv6].payload
    sent = l4.chksum
    del l4.chksum
    assert Ether(bytes(p))[IPv6].payload.chksum == sent, "TCP/UDP checksum"
    return p[IPv6].dst, l4.dport


def clear_ct(dp) -> None:
    ct = dp.maps[mapname("sp_ct")]
    ct.delete_batch(b"".join(k for k, _ in ct.items()))


def lb_svc(v: int, bes: list[Backend], proto: int = TCP_P, flags: int = F_MAGLEV | F_MASQ, **kw) -> Svc:
    return Svc(FAMILIES[v][1], 80, proto, svc_id=31, slots=tuple(b.id for b in bes), scope=1, flags=flags, **kw)


@pytest.mark.parametrize("v", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("proto", [TCP_P, UDP_P], ids=["tcp", "udp"])
def test_new_flow_takes_its_table_entry(dp, v, proto):
    client, lb, _ = FAMILIES[v]
    bes = backends(v, proto)
    svc = lb_svc(v, bes, proto)
    seed(dp, Seed(services=(svc,), backends=tuple(bes)))
    table = put_table(dp, svc.svc_id, bes)
    addr_of = {b.id: b.addr for b in bes}
    seen = set()
    for sport in range(40000, 40040):
        want = table[maglev.flow_hash(mapped(client), sport, 80, proto) % M]
        sent = l4pkt(proto, client, lb, sport, 80)
        r = run(dp, sent, external=True)
        assert r.counted == {"DNAT_NEW": (1, len(sent))}
        assert dest(r.out) == (addr_of[want], 8080), f"source port {sport}"
        seen.add(want)
    assert len(seen) == len(bes)  # 40 flows spread over the 5 backends


def test_same_flow_same_backend_after_its_state_is_gone(dp):
    """What another node does with a flow it never saw: no conntrack entry,
    the same table, the same backend (random slots would differ)."""
    client, lb, _ = FAMILIES[4]
    bes = backends(4)
    svc = lb_svc(4, bes)
    seed(dp, Seed(services=(svc,), backends=tuple(bes)))
    put_table(dp, svc.svc_id, bes)
    flows = [l4pkt(TCP_P, client, lb, sport, 80) for sport in range(41000, 41020)]
    first = [dest(run(dp, f, external=True).out) for f in flows]
    for _ in range(3):
        clear_ct(dp)
        assert [dest(run(dp, f, external=True).out) for f in flows] == first


def test_clusterip_keeps_random_slots(dp):
    """No SP_SVC_F_MAGLEV (internal scope): its slots decide, not a table,
    even one written under its id (here naming only another backend)."""
    client, vip, _ = FAMILIES[4]
    bes = backends(4)
    svc = Svc(vip, 80, TCP_P, svc_id=32, slots=(bes[0].id,), scope=0)
    seed(dp, Seed(services=(svc,), backends=tuple(bes)))
    put_table(dp, svc.svc_id, bes[1:2])
    for sport in range(42000, 42010):
        r = run(dp, l4pkt(TCP_P, client, vip, sport, 80))
        assert dest(r.out) == (bes[0].addr, 8080)


@pytest.mark.parametrize("missing", ["pointer", "chunk"])
def test_flag_without_table_falls_back_to_slots(dp, missing):
    """A frontend flagged before its pointer is written (or with none), or
    whose table lacks the chunk its flow hash picks: a random slot, never
    a drop."""
    client, lb, _ = FAMILIES[4]
    bes = backends(4)
    svc = lb_svc(4, bes[:1])
    seed(dp, Seed(services=(svc,), backends=tuple(bes)))
    index = maglev.flow_hash(mapped(client), 43000, 80, TCP_P) % M
    if missing == "pointer":
        put_table(dp, svc.svc_id, bes[1:2], pointer=False)
    else:
        put_table(dp, svc.svc_id, bes[1:2], skip_chunk=index // abi.MGL_CHUNK)
    r = run(dp, l4pkt(TCP_P, client, lb, 43000, 80), external=True)
    assert r.counted.keys() == {"DNAT_NEW"} and dest(r.out) == (bes[0].addr, 8080)


def test_affinity_hashes_the_client_only(dp):
    """ClientIP affinity with Maglev: every flow of a client takes the
    entry of (client, port 0), on any node; the affinity entry records it
    as a table entry, and holds while that entry names the backend."""
    client, lb, _ = FAMILIES[4]
    bes = backends(4)
    svc = lb_svc(4, bes, affinity_timeout=600)
    seed(dp, Seed(services=(svc,), backends=tuple(bes)))
    table = put_table(dp, svc.svc_id, bes)
    index = maglev.flow_hash(mapped(client), 0, 80, TCP_P) % M
    addr_of = {b.id: b.addr for b in bes}
    for sport in range(44000, 44010):
        r = run(dp, l4pkt(TCP_P, client, lb, sport, 80), external=True)
        assert dest(r.out) == (addr_of[table[index]], 8080)
    aff = dp.maps[mapname("sp_aff")].items()
    assert len(aff) == 1
    val = abi.unpack("sp_aff_val", aff[0][1])
    assert (val["backend_id"], val["slot"]) == (table[index], MGL_SLOT | index)


def put_entry(dp, tid: int, index: int, backend_id: int) -> None:
    """Entry index of table tid rewritten (its chunk, as the control
    plane writes one)."""
    chunk = abi.MGL_CHUNK
    key = abi.pack("sp_mgl_key", id=tid, chunk=index // chunk)
    m = dp.maps[mapname("sp_mgl")]
    ids = abi.mgl_ids(m.lookup(key))
    ids[index % chunk] = backend_id
    m.update(key, ids.tobytes())


def test_affinity_holds_while_its_table_entry_names_its_backend(dp):
    """A client's affinity entry recorded from table entry j (not the one
    its hash picks now) keeps it on that backend while entry j names it;
    once entry j is rewritten the affinity ends and the table decides."""
    client, lb, _ = FAMILIES[4]
    bes = backends(4)
    svc = lb_svc(4, bes, affinity_timeout=600)
    seed(dp, Seed(services=(svc,), backends=tuple(bes)))
    table = put_table(dp, svc.svc_id, bes)
    tid = 100 + svc.svc_id
    index = maglev.flow_hash(mapped(client), 0, 80, TCP_P) % M
    j = next(i for i in range(M) if table[i] != table[index])
    addr_of = {b.id: b.addr for b in bes}
    dp.maps[mapname("sp_aff")].update(
        abi.pack("sp_aff_key", svc_id=svc.svc_id, addr=mapped(client)),
        abi.pack("sp_aff_val", backend_id=table[j], slot=MGL_SLOT | j, last_used=stamp(dp, 1)),
    )
    r = run(dp, l4pkt(TCP_P, client, lb, 45000, 80), external=True)
    assert dest(r.out) == (addr_of[table[j]], 8080)
    other = next(b.id for b in bes if b.id not in (table[j], table[index]))
    put_entry(dp, tid, j, other)
    r = run(dp, l4pkt(TCP_P, client, lb, 45001, 80), external=True)
    assert dest(r.out) == (addr_of[table[index]], 8080)
