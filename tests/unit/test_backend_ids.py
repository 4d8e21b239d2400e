"""Backend ids: allocation in bulk and one by one, and the backend map's
room counted for a Service whose frontends select different sets."""

import dataclasses
import socket

from ctrl.dataplane.abi import MapSizes
from ctrl.dataplane.changeset import backend_rows
from ctrl.dataplane.ids import BackendIds
from ctrl.dataplane.programmed import Programmed
from ctrl.model.plan import Frontend, Scope
from ctrl.util.addrs import addr16

TCP = socket.IPPROTO_TCP


def be(i):
    return (addr16(f"198.18.2.{i}"), 8080, TCP)


def consistent(ids: BackendIds) -> None:
    assert {b: i for i, b in ids.backends.items()} == ids.ids
    assert ids.next_id > max(ids.backends, default=0)


def test_all_new_backends_get_consecutive_ids_in_one_go():
    ids = BackendIds({7: be(9)})
    new = backend_rows()
    got = ids.get([be(1), be(2), be(3)], new)
    assert got == [8, 9, 10] and list(new) == [(8, be(1)), (9, be(2)), (10, be(3))]
    consistent(ids)


def test_all_new_with_one_listed_twice_gives_it_one_id():
    """The bulk path learns of the repeat from the dict's size: what it
    wrote is undone and the backends are taken one by one."""
    ids = BackendIds()
    new = backend_rows()
    got = ids.get([be(1), be(2), be(1), be(3)], new)
    assert got == [1, 2, 1, 3]
    assert list(new) == [(1, be(1)), (2, be(2)), (3, be(3))]
    assert len(ids) == 3 and ids.next_id == 4
    consistent(ids)


def test_known_and_new_backends_mixed():
    ids = BackendIds()
    ids.get([be(1), be(2)], backend_rows())
    new = backend_rows()
    assert ids.get([be(2), be(5), be(1), be(6)], new) == [2, 3, 1, 4]
    assert list(new) == [(3, be(5)), (4, be(6))]
    consistent(ids)


def _fronts(cluster, local):
    """A Service whose internal frontend spreads over `cluster` and whose
    external one (a Local policy) over `local`: two groups, two tables."""
    vip, node = addr16("198.19.0.20"), addr16("198.18.0.1")
    f = Frontend(vip, 80, TCP, Scope.INTERNAL, "default/web:http/TCP", tuple(map(be, cluster)), group=("c",))
    g = dataclasses.replace(f, addr=node, port=30080, scope=Scope.EXTERNAL, backends=tuple(map(be, local)))
    return {"default/web": [f, dataclasses.replace(g, group=("l",))]}


def test_backends_two_groups_share_count_once_towards_the_map():
    p = Programmed(MapSizes(services=8, backends=4, slots=16, conntrack=8))
    cs = p.sync(_fronts([1, 2, 3, 4], [2, 4]))
    assert not cs.rejected and len(p.backends) == 4
    p = Programmed(MapSizes(services=8, backends=4, slots=16, conntrack=8))
    cs = p.sync(_fronts([1, 2, 3, 4], [2, 5]))  # 5 backends: one too many
    assert "the backend map holds at most 4 backends, 5 more needed" in cs.rejected["default/web"]


def _front(owner, last, nums):
    return Frontend(addr16(f"198.19.0.{last}"), 80, TCP, Scope.INTERNAL, f"{owner}:http/TCP", tuple(map(be, nums)))


def test_one_group_counts_only_the_backends_not_known():
    p = Programmed(MapSizes(services=8, backends=4, slots=16, conntrack=8))
    a = {"default/a": [_front("default/a", 21, [1, 2])]}
    p.sync(a)
    # 1 and 2 are known: 2 more fit in a map of 4.
    assert not p.sync({**a, "default/b": [_front("default/b", 22, [1, 2, 3, 4])]}).rejected
    cs = p.sync({**a, "default/b": [_front("default/b", 22, [1, 5, 6])]})
    assert "the backend map holds at most 4 backends, 2 more needed" in cs.rejected["default/b"]
