import socket
from dataclasses import replace

import pytest

from ctrl.dataplane import abi, programmed
from ctrl.dataplane.abi import Codecs, MapSizes, map_name
from ctrl.dataplane.apply import encode
from ctrl.dataplane.changeset import ChangeSet, Rows
from ctrl.dataplane.programmed import Programmed, SlotTable
from ctrl.dataplane.slots import assign_slots
from ctrl.model.plan import Frontend, FrontendFlag, Scope
from ctrl.util.addrs import addr16

TCP = socket.IPPROTO_TCP
VIP = addr16("198.19.0.10")
INT, EXT = Scope.INTERNAL, Scope.EXTERNAL
SCOPE_INTERNAL_VALUE = abi.SCOPE_INTERNAL  # the frontend map's value of INT


def be(i, port=8080):
    return (addr16(f"198.18.1.{i}"), port, TCP)


def front(*backend_nums, port=80, name="default/web:http/TCP", vip=VIP):
    return Frontend(vip, port, TCP, INT, name, tuple(sorted(be(i) for i in backend_nums)))


@pytest.mark.parametrize(
    "current,wanted,expect",
    [
        pytest.param([], [1, 2, 3], [1, 2, 3], id="fresh"),
        pytest.param([1, 2, 3], [1, 2, 3], [1, 2, 3], id="unchanged"),
        pytest.param([1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4], id="append"),
        pytest.param([1, 2, 3], [1, 3], [1, 3], id="remove-middle-moves-last-into-hole"),
        pytest.param([1, 2, 3, 4], [1, 3, 4], [1, 4, 3], id="remove-keeps-others-in-place"),
        pytest.param([1, 2, 3], [1, 3, 5], [1, 5, 3], id="replace-fills-hole"),
        pytest.param([1, 2, 3], [3], [3], id="shrink-to-one"),
        pytest.param([1, 2, 3], [], [], id="empty"),
        pytest.param([1, None, 3], [1, 3], [1, 3], id="adopted-hole"),
        pytest.param([1, 1, 2], [1, 2], [1, 2], id="duplicate-dropped"),
    ],
)
def test_assign_slots(current, wanted, expect):
    assert assign_slots(current, wanted) == expect


def test_same_state_twice_writes_nothing():
    p = Programmed()
    first = p.sync({"default/web": [front(1, 2, 3)]})
    assert len(first) > 0
    assert len(p.sync({"default/web": [front(1, 2, 3)]})) == 0


def test_new_service_writes_backends_slots_frontend_and_name():
    cs = Programmed().sync({"default/web": [front(1, 2)]})
    assert [b for _, b in cs.be_upd] == [be(1), be(2)]
    assert [(s, i) for s, i, _ in cs.slot_upd] == [(1, 0), (1, 1)]
    assert cs.svc_upd == [((VIP, 80, TCP, INT), (1, 2, 0, 0, 1))]
    assert cs.name_upd == [(1, "default/web:http/TCP")]


def test_removing_one_backend_of_100_touches_few_entries():
    p = Programmed()
    p.sync({"default/web": [front(*range(1, 101))]})
    cs = p.sync({"default/web": [front(*range(2, 101))]})
    assert len(cs.slot_upd) <= 1 and len(cs.slot_del) == 1 and len(cs.be_del) == 1
    assert cs.svc_upd[0][1][1] == 99
    assert cs.removed == []  # TCP: its flows drain, nothing to purge


def test_a_backend_that_leaves_a_udp_frontend_is_listed_for_the_purge():
    udp = socket.IPPROTO_UDP
    key = (VIP, 53, udp, INT)

    def dns(*nums):
        backends = tuple((addr16(f"198.18.1.{i}"), 53, udp) for i in nums)
        return Frontend(VIP, 53, udp, INT, "default/dns:dns/UDP", backends)

    p = Programmed()
    p.sync({"default/dns": [dns(1, 2, 3)], "default/web": [front(1, 2, 3)]})
    cs = p.sync({"default/dns": [dns(1, 3)], "default/web": [front(1, 3)]})
    assert cs.removed == [(key, (addr16("198.18.1.2"), 53, udp))]
    # The frontend gone: each backend it had.
    cs = p.sync({"default/dns": [], "default/web": [front(1, 3)]})
    assert sorted(cs.removed) == [(key, (addr16(f"198.18.1.{i}"), 53, udp)) for i in (1, 3)]


def test_ids_stable_across_changes_and_other_services():
    p = Programmed()
    p.sync({"default/web": [front(1, 2)]})
    sid = p.frontends[(VIP, 80, TCP, INT)].svc_id
    p.sync({"default/other": [front(3, port=81, name="default/other:81/TCP")]})
    p.sync({"default/web": [front(1, 2, 4)]})
    assert p.frontends[(VIP, 80, TCP, INT)].svc_id == sid
    assert p.backend_ids[be(1)] == 1 and p.backend_ids[be(2)] == 2


def test_backend_shared_by_two_services_is_kept_until_both_drop_it():
    p = Programmed()
    p.sync({"default/a": [front(1, port=80, name="a")], "default/b": [front(1, port=81, name="b")]})
    assert len(p.backends) == 1
    cs = p.sync({"default/a": []})
    assert cs.be_del == [] and len(p.backends) == 1
    cs = p.sync({"default/b": []})
    assert cs.be_del == [1] and not p.backends


def test_backend_moving_between_services_in_one_sync_keeps_its_id():
    p = Programmed()
    p.sync({"default/a": [front(1, port=80, name="a")]})
    cs = p.sync({"default/a": [], "default/b": [front(1, port=81, name="b")]})
    assert cs.be_del == [] and cs.be_upd == [] and p.backend_ids[be(1)] == 1


def test_full_map_rejects_whole_service_and_keeps_previous():
    p = Programmed(MapSizes(services=10, slots=5, backends=100))
    p.sync({"default/web": [front(1, 2)]})
    cs = p.sync({"default/web": [front(1, 2, 3, 4, 5, 6)], "default/ok": [front(9, port=81, name="ok")]})
    assert "slot map holds at most 5" in cs.rejected["default/web"]
    # Nothing of the rejected service was written; the other one was.
    assert all(s != 1 for s, _, _ in cs.slot_upd)
    assert len(p.frontends[(VIP, 80, TCP, INT)].slots) == 2
    assert (VIP, 81, TCP, INT) in p.frontends


def test_prune_only_with_full_sync():
    p = Programmed()
    p.sync({"default/a": [front(1, port=80, name="a")], "default/b": [front(2, port=81, name="b")]})
    assert len(p.sync({})) == 0
    cs = p.sync({}, prune_except={"default/a"})
    assert cs.svc_del == [(VIP, 81, TCP, INT)] and cs.be_del == [2]


def test_adopt_rebuilds_ids_and_diffs_empty():
    p = Programmed()
    p.sync({"default/web": [front(1, 2, 3)]})
    st = p.frontends[(VIP, 80, TCP, INT)]
    svc = {(VIP, 80, TCP, INT): (st.svc_id, 3, 0, 0, st.svc_id)}
    slots = {(st.svc_id, i): b for i, b in enumerate(st.slots)}
    q = Programmed()
    q.adopt(svc, slots, dict(p.backends), {st.svc_id: "default/web:http/TCP"})
    assert len(q.sync({"default/web": [front(1, 2, 3)]}, prune_except={"default/web"})) == 0
    cs = q.sync({"default/web": [front(1, 2, 3, 4)]})
    assert cs.be_upd == [(4, be(4))]  # next id continues after the adopted ones


def test_adopt_unnamed_orphans_are_removed_only_at_full_sync():
    q = Programmed()
    q.adopt({(VIP, 80, TCP, INT): (7, 1, 0, 0, 7)}, {(7, 0): 1, (9, 0): 1}, {1: be(1)}, {})
    assert len(q.sync({})) == 0
    cs = q.sync({}, prune_except=set())
    assert cs.svc_del == [(VIP, 80, TCP, INT)]
    assert sorted(cs.slot_del) == [(7, 0), (9, 0)]
    assert cs.be_del == [1]


def _order(cs):
    return [(m, op) for m, op, _, _ in encode(cs, Codecs.get())]


def test_write_order_on_growth_slots_before_count():
    p = Programmed()
    p.sync({"default/web": [front(1)]})
    order = _order(p.sync({"default/web": [front(1, 2)]}))
    assert (
        order.index((map_name("sp_be"), "update"))
        < order.index((map_name("sp_slot"), "update"))
        < order.index((map_name("sp_svc"), "update"))
    )


def test_write_order_on_shrink_count_before_slot_and_backend_deletes():
    p = Programmed()
    p.sync({"default/web": [front(1, 2, 3)]})
    order = _order(p.sync({"default/web": [front(1)]}))
    assert (
        order.index((map_name("sp_svc"), "update"))
        < order.index((map_name("sp_slot"), "delete"))
        < order.index((map_name("sp_be"), "delete"))
    )


def test_write_order_on_service_removal_frontend_first():
    p = Programmed()
    p.sync({"default/web": [front(1, 2)]})
    order = _order(p.sync({"default/web": []}))
    assert order == [
        (map_name("sp_svc"), "delete"),
        (map_name("sp_slot"), "delete"),
        (map_name("sp_be"), "delete"),
        (map_name("sp_names"), "delete"),
    ]


def test_unused_backend_drains_before_it_is_deleted():
    p = Programmed(drain_period=10.0)
    p.sync({"default/web": [front(1, 2)]}, now=0.0)
    cs = p.sync({"default/web": [front(1)]}, now=1.0)
    # Out of the slots at once (no new flow picks it), still in the backend
    # map, marked draining (a SYN reusing an old flow's ports re-picks).
    assert cs.slot_del == [(1, 1)] and cs.be_del == []
    assert cs.be_mark == [(2, be(2), 1, 11.0)]
    assert p.next_drain_end() == 11.0
    assert len(p.sync({}, now=5.0)) == 0
    cs = p.sync({}, now=11.0)
    assert cs.be_del == [2] and p.next_drain_end() is None


def test_draining_backend_used_again_keeps_its_id():
    p = Programmed(drain_period=10.0)
    p.sync({"default/web": [front(1, 2)]}, now=0.0)
    p.sync({"default/web": [front(1)]}, now=1.0)
    cs = p.sync({"default/web": [front(1, 2)]}, now=2.0)
    assert cs.be_upd == [] and cs.slot_upd == [(1, 1, 2)]
    assert cs.be_mark == [(2, be(2), 0, 0.0)]  # serving again
    assert p.next_drain_end() is None
    assert len(p.sync({}, now=50.0)) == 0


def test_backend_unused_again_after_reuse_gets_a_fresh_drain_period():
    p = Programmed(drain_period=10.0)
    p.sync({"default/web": [front(1, 2, 3)]}, now=0.0)
    p.sync({"default/web": [front(1, 3)]}, now=1.0)  # 2 drains until 11
    p.sync({"default/web": [front(1)]}, now=2.0)  # 3 drains until 12
    p.sync({"default/web": [front(1, 2)]}, now=3.0)  # 2 back in service
    p.sync({"default/web": [front(1)]}, now=4.0)  # 2 drains again, until 14
    assert p.next_drain_end() == 12.0
    assert p.sync({}, now=12.0).be_del == [3]
    assert p.sync({}, now=13.0).be_del == [] and p.next_drain_end() == 14.0
    assert p.sync({}, now=14.0).be_del == [2]


def test_adopted_unused_backends_drain_too():
    q = Programmed(drain_period=10.0)
    q.adopt({(VIP, 80, TCP, INT): (7, 1, 0, 0, 7)}, {(7, 0): 1}, {1: be(1), 2: be(2)}, {7: "default/web:http/TCP"})
    cs = q.sync({"default/web": [front(1)]}, prune_except={"default/web"}, now=100.0)
    assert cs.be_del == [] and q.next_drain_end() == 110.0


def web(*nums):
    return {"default/web": [front(*nums)]}


def shop(*nums):
    return {"default/shop": [front(*nums, name="default/shop:http/TCP", vip=addr16("198.19.0.11"))]}


def test_a_full_backend_map_ends_the_oldest_drains_instead_of_refusing_a_service():
    p = Programmed(MapSizes(services=8, backends=4, slots=8, conntrack=8), drain_period=60.0)
    p.sync(web(1, 2, 3), now=0.0)
    p.sync(web(4), now=1.0)  # 1, 2, 3 drain until 61; the map holds 4
    ids = {b: i for i, b in p.backends.items()}
    cs = p.sync(shop(5, 6), now=2.0)
    assert not cs.rejected
    assert cs.be_evict == [ids[be(1)], ids[be(2)]]  # the oldest first, just enough
    assert set(p.backends.values()) == {be(3), be(4), be(5), be(6)}
    # Written before the new backends: the map never holds more than 4.
    assert _order(cs)[:2] == [(map_name("sp_be"), "delete"), (map_name("sp_be"), "update")]
    assert p.sync({}, now=61.0).be_del == [ids[be(3)]]  # the rest drains in full


def test_eviction_spares_draining_backends_in_service_again_and_still_refuses_what_cannot_fit():
    p = Programmed(MapSizes(services=8, backends=4, slots=8, conntrack=8), drain_period=60.0)
    p.sync(web(1, 2), now=0.0)
    p.sync(web(3), now=1.0)  # 1, 2 drain
    one = {b: i for i, b in p.backends.items()}[be(1)]
    cs = p.sync(shop(2, 4, 5, 6), now=2.0)  # 2 is back; 4, 5, 6 need room for 2, only 1 can be made
    assert "raise --max-backends" in cs.rejected["default/shop"]
    assert cs.be_evict == [] and be(1) in p.backends.values()  # refused: the drains go on
    cs = p.sync(shop(2, 4, 5), now=3.0)  # fits once 1 goes
    assert not cs.rejected and cs.be_evict == [one]
    assert set(p.backends.values()) == {be(2), be(3), be(4), be(5)}


def test_adopted_drain_deadlines_are_kept_not_restarted():
    q = Programmed(drain_period=10.0)
    q.adopt(
        {(VIP, 80, TCP, INT): (7, 1, 0, 0, 7)},
        {(7, 0): 1},
        {1: be(1), 2: be(2), 3: be(3)},
        {7: "default/web:http/TCP"},
        draining={3: 104.0, 2: 103.0},
    )
    assert list(q.draining.items()) == [(2, 103.0), (3, 104.0)]  # time order
    cs = q.sync(web(1), prune_except={"default/web"}, now=100.0)
    assert cs.be_mark == [] and cs.be_del == []  # no new drain period, no new mark
    assert q.sync({}, now=103.0).be_del == [2]
    assert q.sync({}, now=104.0).be_del == [3]


def test_a_deadline_earlier_than_adopted_ones_is_not_stuck_behind_them():
    # The previous agent ran with a longer drain period than this one.
    q = Programmed(drain_period=5.0)
    q.adopt({(VIP, 80, TCP, INT): (7, 2, 0, 0, 7)}, {(7, 0): 1, (7, 1): 2}, {1: be(1), 2: be(2), 3: be(3)},
            {7: "default/web:http/TCP"}, draining={3: 200.0})  # fmt: skip
    q.sync(web(1), now=100.0)  # 2 drains until 105
    assert q.next_drain_end() == 105.0
    assert q.sync({}, now=105.0).be_del == [2]


def test_an_adopted_backend_flagged_draining_but_in_a_slot_is_unflagged():
    q = Programmed(drain_period=10.0)
    q.adopt({(VIP, 80, TCP, INT): (7, 1, 0, 0, 7)}, {(7, 0): 1}, {1: be(1)}, {7: "default/web:http/TCP"},
            draining={1: 50.0})  # fmt: skip
    assert q.draining == {}
    cs = q.sync(web(1), prune_except={"default/web"}, now=100.0)
    assert cs.be_mark == [(1, be(1), 0, 0.0)] and cs.be_del == []


def test_a_drain_mark_carries_its_end_in_nanoseconds():
    p = Programmed(drain_period=10.0)
    p.sync(web(1, 2), now=0.0)
    cs = p.sync(web(1), now=1234.5)
    ((_, op, keys, vals),) = [e for e in encode(cs, Codecs.get()) if e[0] == map_name("sp_be")]
    assert op == "update"
    c = Codecs.get().backend
    assert c.unpack(vals) == (be(2)[0], 8080, TCP, 1, 1244_500_000_000)


def test_a_name_that_does_not_fit_the_names_map_refuses_its_service_only():
    p = Programmed()
    longest = "n" * 63 + "/" + "s" * 63 + ":" + "p" * 63 + "/SCTP"  # Kubernetes' limits: 196 bytes
    assert len(longest) == 196 <= p.name_max
    too_long = "default/" + "l" * 253 + ":http/TCP"
    cs = p.sync(
        {
            "default/long": [front(1, name=too_long)],
            "n/s": [front(2, port=81, name=longest)],
        }
    )
    assert set(cs.refused) == {"default/long"} and "names map holds" in cs.refused["default/long"]
    assert cs.name_upd == [(1, longest)] and [k[1] for k, _ in cs.svc_upd] == [81]
    assert p.owners() == {"n/s"}


def test_a_refused_service_keeps_what_it_had():
    p = Programmed()
    p.sync({"default/web": [front(1, 2)]})
    cs = p.sync({"default/web": [front(1, 2, 3, name="default/web:" + "x" * 200 + "/TCP")]})
    assert "default/web" in cs.refused and len(cs) == 0
    assert len(p.frontends[(VIP, 80, TCP, INT)].slots) == 2


def lb(owner, num, *cidrs, port=80):
    """A frontend of `owner` filtering sources by `cidrs` (IPv4 /24s)."""
    ranges = tuple((addr16(c), 96 + 24) for c in cidrs)
    vip = addr16(f"198.19.1.{num}")
    flags = FrontendFlag.SRC_RANGES
    return [Frontend(vip, port, TCP, EXT, f"{owner}:http/TCP", (be(num),), flags=flags, source_ranges=ranges)]


def test_source_ranges_that_do_not_fit_refuse_that_service_only():
    p = Programmed(MapSizes(source_ranges=3))
    p.sync({"default/a": lb("default/a", 1, "198.18.0.0", "198.18.1.0")})
    cs = p.sync({"default/b": lb("default/b", 2, "198.18.2.0", "198.18.3.0"), "default/web": [front(1)]})
    assert set(cs.rejected) == {"default/b"}
    assert (
        "source range map holds at most 3 entries, 2 more needed (raise --max-source-ranges)"
        in cs.rejected["default/b"]
    )
    assert cs.src_upd == [] and [k[0] for k, _ in cs.svc_upd] == [VIP]  # web only
    # Ranges given back make room: a's shrink is written before b grows.
    cs = p.sync({"default/a": lb("default/a", 1, "198.18.0.0"), "default/b": lb("default/b", 2, "198.18.2.0")})
    assert not cs.rejected and p.range_count == 2
    assert len(cs.src_del) == 1 and len(cs.src_upd) == 1
    cs = p.sync({"default/a": []})
    assert p.range_count == 1 and len(cs.src_del) == 1


def test_deleted_ranges_count_until_the_write_that_deletes_them():
    # Deletes are written after every addition of the change set: the
    # ranges a removed Service gives back are not room for another yet.
    p = Programmed(MapSizes(source_ranges=2))
    p.sync({"default/a": lb("default/a", 1, "198.18.0.0", "198.18.1.0")})
    cs = p.sync({"default/a": [], "default/b": lb("default/b", 2, "198.18.2.0")})
    assert set(cs.rejected) == {"default/b"} and len(cs.src_del) == 2


def test_adopted_and_orphan_ranges_count():
    q = Programmed(MapSizes(source_ranges=3))
    r = {(addr16("198.18.0.0"), 120), (addr16("198.18.1.0"), 120)}
    svc = {(VIP, 80, TCP, INT): (7, 0, 2, 0, 7)}
    q.adopt(svc, {}, {}, {7: "default/web:http/TCP"}, ranges={7: r, 9: {next(iter(r))}})
    assert q.range_count == 3
    cs = q.sync({"default/b": lb("default/b", 2, "198.18.2.0")})
    assert "raise --max-source-ranges" in cs.rejected["default/b"]
    q.sync({}, prune_except={"default/web"})  # the orphan of id 9 goes
    assert q.range_count == 2
    assert not q.sync({"default/b": lb("default/b", 2, "198.18.2.0")}).rejected


def test_names_left_by_gone_frontends_count_against_the_names_map():
    q = Programmed(MapSizes(services=3))
    q.adopt({(VIP, 80, TCP, INT): (7, 1, 0, 0, 7)}, {(7, 0): 1}, {1: be(1)},
            {7: "default/web:http/TCP", 8: "default/old:a/TCP", 9: "default/old:b/TCP"})  # fmt: skip
    b = {"default/b": [front(2, port=81, name="default/b:http/TCP")]}
    cs = q.sync(b)
    assert "names map holds at most 3 entries, 2 of them names of frontends gone" in cs.rejected["default/b"]
    cs = q.sync(b, prune_except={"default/web", "default/b"})
    assert "default/b" in cs.rejected  # the orphans still count until deleted, after the additions
    assert not q.sync(b).rejected


VIP2 = addr16("198.19.0.11")


def claims(owner, *nums, port=80, vip=VIP, other_port=None):
    """owner's frontends: vip:port with backends nums, and one of its own on
    other_port (at VIP2) when given."""
    out = [front(*nums, port=port, vip=vip, name=f"{owner}:http/TCP")]
    if other_port:
        out.append(front(*nums, port=other_port, vip=VIP2, name=f"{owner}:alt/TCP"))
    return out


def test_the_holder_keeps_a_frontend_a_second_service_claims():
    p = Programmed()
    p.sync({"default/first": claims("default/first", 1)})
    sid = p.frontends[(VIP, 80, TCP, INT)].svc_id
    cs = p.sync({"default/second": claims("default/second", 2, other_port=90)})
    assert cs.conflicts == [("default/second", "default/first", (VIP, 80, TCP, INT))]
    # The second Service's other frontend is programmed, the claimed one not.
    assert [k for k, _ in cs.svc_upd] == [(VIP2, 90, TCP, INT)]
    st = p.frontends[(VIP, 80, TCP, INT)]
    assert (st.owner, st.svc_id, st.slots) == ("default/first", sid, [1])
    # Reported once: the next sync of the claimant says nothing new.
    cs = p.sync({"default/second": claims("default/second", 2, 3, other_port=90)})
    assert cs.conflicts == [] and p.frontends[(VIP, 80, TCP, INT)].owner == "default/first"


def test_the_claimant_gets_the_frontend_when_the_holder_goes():
    p = Programmed()
    p.sync({"default/first": claims("default/first", 1)})
    p.sync({"default/second": claims("default/second", 2)})
    cs = p.sync({"default/first": []})
    assert cs.svc_del == [(VIP, 80, TCP, INT)] and cs.resync == {"default/second"}
    cs = p.sync({"default/second": claims("default/second", 2)})
    st = p.frontends[(VIP, 80, TCP, INT)]
    assert st.owner == "default/second" and cs.conflicts == [] and not p.waiting
    assert [b for _, _, b in cs.slot_upd] == [p.backend_ids[be(2)]]


def test_a_frontend_given_up_and_taken_in_one_sync_is_not_deleted_by_it():
    p = Programmed()
    p.sync({"default/a": claims("default/a", 1)})
    p.sync({"default/b": claims("default/b", 2)})  # waits for a's
    cs = p.sync({"default/a": [], "default/b": claims("default/b", 2)})  # a goes first (sorted)
    assert p.frontends[(VIP, 80, TCP, INT)].owner == "default/b" and cs.resync == set()
    ops = encode(cs, Codecs.get())
    (svc_upd,) = [keys for m, op, keys, _ in ops if m == map_name("sp_svc") and op == "update"]
    assert svc_upd == Codecs.get().svc_key.pack(VIP, 80, TCP, SCOPE_INTERNAL_VALUE)
    assert not [op for m, op, _, _ in ops if m == map_name("sp_svc") and op == "delete"]


def test_two_new_claimants_in_one_sync_first_by_name_wins():
    p = Programmed()
    cs = p.sync({"default/zeta": claims("default/zeta", 2), "default/alpha": claims("default/alpha", 1)})
    assert p.frontends[(VIP, 80, TCP, INT)].owner == "default/alpha"
    assert cs.conflicts == [("default/zeta", "default/alpha", (VIP, 80, TCP, INT))]


def test_a_claimant_that_stops_claiming_no_longer_waits():
    p = Programmed()
    p.sync({"default/a": claims("default/a", 1)})
    p.sync({"default/b": claims("default/b", 2, other_port=90)})
    p.sync({"default/b": claims("default/b", 2, vip=addr16("198.19.0.12"))})
    assert not p.waiting and not p.blocked
    assert p.sync({"default/a": []}).resync == set()


def test_waiting_claimants_survive_a_readoption():
    p = Programmed()
    p.sync({"default/a": claims("default/a", 1)})
    p.sync({"default/b": claims("default/b", 2)})
    st = p.frontends[(VIP, 80, TCP, INT)]
    p.adopt({(VIP, 80, TCP, INT): (st.svc_id, 1, 0, 0, st.svc_id)}, {(st.svc_id, 0): 1}, dict(p.backends),
            {st.svc_id: "default/a:http/TCP"})  # fmt: skip
    assert p.sync({"default/a": []}).resync == {"default/b"}


def test_a_frontend_of_no_known_owner_is_taken_over_with_its_id_at_the_full_sync():
    q = Programmed()
    q.adopt({(VIP, 80, TCP, INT): (7, 1, 0, 0, 7)}, {(7, 0): 1}, {1: be(1)}, {})
    cs = q.sync({"default/web": [front(1)]}, prune_except={"default/web"})
    st = q.frontends[(VIP, 80, TCP, INT)]
    assert (st.owner, st.svc_id) == ("default/web", 7)
    assert cs.svc_del == [] and cs.name_upd == [(7, "default/web:http/TCP")]


def _entries(cs):
    from ctrl.dataplane.changeset import _LISTS

    return {f: sorted(map(repr, getattr(cs, f))) for f in _LISTS}


def test_split_cuts_a_change_set_into_services_and_the_node_rest():
    p = Programmed(drain_period=10.0)
    p.sync({**web(1, 2), **shop(3)}, now=0.0)
    cs = p.sync(
        {
            "default/web": [front(1, 4)],  # 2 drains (the node's part), 4 is new
            "default/shop": [front(3, 4, name="default/shop:http/TCP", vip=addr16("198.19.0.11"))],
            "default/new": [front(5, port=81, name="default/new:http/TCP")],
        },
        now=1.0,
    )
    parts, rest = cs.split()
    assert [o for o, _ in parts] == ["default/new", "default/shop", "default/web"]
    by = dict(parts)
    four = p.backend_ids[be(4)]
    # 4 is allocated by the first Service that names it (shop, sorted
    # first); web's slots name it too.
    assert [b for b, _ in by["default/shop"].be_upd] == [four] and by["default/web"].be_upd == []
    assert four in {b for _, _, b in by["default/web"].slot_upd}
    assert [k[1] for k, _ in by["default/new"].svc_upd] == [81]
    assert rest.be_mark == [(p.backend_ids[be(2)], be(2), 1, 11.0)] and rest.svc_upd == []
    # Every entry is in exactly one piece.
    merged = ChangeSet()
    for piece in [*by.values(), rest]:
        for f, v in vars(piece).items():
            if isinstance(v, list | Rows) and f != "marks":
                getattr(merged, f).extend(v)
    assert _entries(merged) == _entries(cs)
    assert by["default/web"].services == {"default/web"}


def test_split_of_a_change_set_made_by_hand_is_all_rest():
    cs = ChangeSet(be_del=[1, 2])
    parts, rest = cs.split()
    assert parts == [] and rest.be_del == [1, 2]


# -- streaming: the rows a diff hands the writer before its end --------------


@pytest.mark.parametrize("one_pass", [True, False])
def test_the_diff_offers_its_rows_after_each_service_and_a_large_tables_new_backends(one_pass, monkeypatch):
    """Programmed.sync calls `stream` with the change set so far, what the
    writer may send to the kernel while the diff goes on: after each
    owner, and after the new backends of a table of STREAM_WITHIN_FROM or
    more are given ids (before its slots are assigned)."""
    monkeypatch.setattr(programmed, "STREAM_WITHIN_FROM", 3)
    seen = []
    p = Programmed()
    p.fresh_in_one_pass = one_pass
    desired = {**web(1, 2), **shop(3, 4, 5)}
    for fs in desired.values():  # one group each: the one-pass path takes them
        fs[:] = [replace(f, group=(80,)) for f in fs]
    cs = p.sync(desired, stream=lambda c: seen.append((len(c.be_upd), len(c.slot_upd), len(c.svc_upd))))
    # sorted: default/shop (3 backends), then default/web (2)
    assert seen == [(3, 0, 0), (3, 3, 1), (5, 5, 2)]
    assert len(cs.be_upd) == 5


def test_the_write_leaves_out_the_rows_already_written():
    """cs.written: rows of be_upd and slot_upd the writer's stream put in
    the kernel; the write packs the rest only."""
    p = Programmed()
    cs = p.sync(web(1, 2, 3))
    c = Codecs.get()
    ids, backends = cs.be_upd.cols
    tables, slots, named = cs.slot_upd.cols
    cs.written = (2, 1)
    ops = encode(cs, c)
    (be_keys,) = [k for m, op, k, _ in ops if m == map_name("sp_be") and op == "update"]
    assert be_keys == abi.U32.pack_columns([ids[2]])
    (slot_keys,) = [k for m, op, k, _ in ops if m == map_name("sp_slot") and op == "update"]
    assert slot_keys == c.slot_key.pack_columns(tables[1:], slots[1:])
    cs.written = (3, 3)
    assert [m for m, op, _, _ in encode(cs, c) if op == "update"] == [map_name("sp_svc"), map_name("sp_names")]


def test_slot_rows_are_known_distinct_until_a_table_is_written_twice():
    """ChangeSet.slot_tables: the diff records each slot table it writes;
    one written a second time in the same change set makes the rows not
    known distinct (None), so the writer keeps their order."""
    cs = ChangeSet(slot_tables=set())
    a, b = SlotTable(1, ("default/a", None), []), SlotTable(2, ("default/b", None), [])
    Programmed._slots_of(a, cs)
    Programmed._slots_of(b, cs)
    assert cs.slot_tables == {1, 2}
    Programmed._slots_of(a, cs)
    assert cs.slot_tables is None
    Programmed._slots_of(b, cs)
    assert cs.slot_tables is None
    assert ChangeSet().slot_tables is None  # rows given by hand: not known
