"""Tier 3: the periodic check of the maps (ctrl.dataplane.verify), on real
kernel maps in this process, the agent driven one turn at a time as in
test_agent_maps.py.

The check must find every kind of difference a hand edit or a lost write
leaves (and the repair must put back exactly what was written), must find
none when the maps hold what was written, also while syncs write entries
between its chunks, and must let those syncs happen before it completes.
"""

from __future__ import annotations

import logging

import pytest

from ctrl.dataplane import abi, verify
from ctrl.dataplane.abi import map_name, read_contents
from ctrl.runtime import agent as agent_mod
from ctrl.util.addrs import addr16

from .test_agent_maps import Clock, delete_event, make_agent, private_maps, slice_event, svc_event  # noqa: F401

pytestmark = pytest.mark.root

PERIOD = 60.0


def contents(maps) -> dict:
    """Per frontend: its flags, affinity, name, source ranges and the
    backends of its slots, sorted (ids may differ after a repair: a
    backend edited by hand is adopted under its id, and the right one
    gets a new id; and a repaired slot may take another position: a new
    flow picks a slot at random, so what matters is which backends, and
    how many slots each)."""
    c = read_contents(maps)
    out = {}
    for key, (sid, count, flags, timeout, slots_id) in c.svc.items():
        out[key] = (
            flags,
            timeout,
            c.names.get(sid),
            sorted(c.ranges.get(sid, ())),
            sorted(c.backends.get(c.slots.get((slots_id, i), -1)) or () for i in range(count)),
        )
    return out


def program(maps, clock, n_services: int = 6, per_service: int = 4):
    agent, src = make_agent(maps, clock, sync_period=PERIOD)
    for i in range(n_services):
        ips = [f"198.18.{10 + i}.{j + 1}" for j in range(per_service)]
        src.put(svc_event(f"web-{i}", f"198.19.0.{i + 1}"), slice_event(f"web-{i}-a", f"web-{i}", *ips))
    agent.step(timeout=0)
    assert agent.syncs == 1
    return agent, src


def run_check(agent, clock) -> None:
    """Reach the next period and step until the check is complete."""
    clock.t += PERIOD
    checks = agent.checks
    for _ in range(10_000):
        agent.step(timeout=0)
        if agent.checks > checks or agent.check is None and agent.schedule.need_full:
            return
    raise AssertionError("the check never completed")


def test_maps_as_written_pass_the_check_with_no_sync(private_maps, caplog) -> None:  # noqa: F811
    clock = Clock()
    agent, _ = program(private_maps, clock)
    before = contents(private_maps)
    with caplog.at_level(logging.ERROR, logger="sliceproxy"):
        run_check(agent, clock)
    assert agent.checks == 1 and not agent.schedule.need_full
    assert agent.syncs == 1  # no full sync: nothing differed
    assert "differ" not in caplog.text
    assert contents(private_maps) == before


def _first_slot(maps) -> tuple[int, int, int]:
    slots = read_contents(maps).slots
    (sid, slot), bid = min(slots.items())
    return sid, slot, bid


def edit_slot_value(maps) -> str:
    sid, slot, bid = _first_slot(maps)
    other = next(b for b in read_contents(maps).backends if b != bid)
    maps[map_name("sp_slot")].update(
        abi.pack("sp_slot_key", svc_id=sid, slot=slot), abi.pack("sp_slot_val", backend_id=other)
    )
    return f"slot {slot} of"


def delete_slot(maps) -> str:
    sid, slot, _ = _first_slot(maps)
    assert maps[map_name("sp_slot")].delete(abi.pack("sp_slot_key", svc_id=sid, slot=slot))
    return "slots programmed are not in the map"


def add_stray_slot(maps) -> str:
    maps[map_name("sp_slot")].update(
        abi.pack("sp_slot_key", svc_id=9999, slot=0), abi.pack("sp_slot_val", backend_id=1)
    )
    return "no slot table has that id"


def edit_backend(maps) -> str:
    bid = min(read_contents(maps).backends)
    maps[map_name("sp_be")].update(
        abi.u32(bid), abi.pack("sp_backend", addr=addr16("198.18.99.99"), port=8080, proto=6)
    )
    return f"backend {bid}: 198.18.99.99:8080/TCP in the map"


def flag_backend_draining(maps) -> str:
    bid = min(read_contents(maps).backends)
    row = abi.unpack("sp_backend", maps[map_name("sp_be")].lookup(abi.u32(bid)))
    row["flags"] |= abi.BE_F_DRAINING
    maps[map_name("sp_be")].update(abi.u32(bid), abi.pack("sp_backend", **row))
    return "draining flag"


def delete_backend(maps) -> str:
    bid = max(read_contents(maps).backends)
    assert maps[map_name("sp_be")].delete(abi.u32(bid))
    return "backends programmed are not in the map"


def add_stray_frontend(maps) -> str:
    key = abi.pack("sp_svc_key", addr=addr16("198.19.9.9"), port=80, proto=6, scope=abi.SCOPE_INTERNAL)
    maps[map_name("sp_svc")].update(key, abi.pack("sp_svc_val", svc_id=9998, count=0, flags=0, affinity_timeout=0))
    return "in the map, not programmed"


def delete_frontend(maps) -> str:
    key = abi.pack("sp_svc_key", addr=addr16("198.19.0.2"), port=80, proto=6, scope=abi.SCOPE_INTERNAL)
    assert maps[map_name("sp_svc")].delete(key)
    return "frontends programmed are not in the map"


def edit_frontend_count(maps) -> str:
    key = abi.pack("sp_svc_key", addr=addr16("198.19.0.3"), port=80, proto=6, scope=abi.SCOPE_INTERNAL)
    val = abi.unpack("sp_svc_val", maps[map_name("sp_svc")].lookup(key))
    val["count"] -= 1
    maps[map_name("sp_svc")].update(key, abi.pack("sp_svc_val", **val))
    return "198.19.0.3:80/TCP"


def edit_name(maps) -> str:
    sid = min(read_contents(maps).names)
    maps[map_name("sp_names")].update(abi.u32(sid), abi.pack("sp_svc_name", name=b"default/other:http/TCP\0"))
    return f"name of id {sid}"


def edit_config(maps) -> str:
    maps[map_name("sp_cfg")].update(abi.u32(0), bytes(abi.codec("sp_cfg").size))
    return "node config"


EDITS = [
    edit_slot_value,
    delete_slot,
    add_stray_slot,
    edit_backend,
    flag_backend_draining,
    delete_backend,
    add_stray_frontend,
    delete_frontend,
    edit_frontend_count,
    edit_name,
    edit_config,
]


@pytest.mark.parametrize("edit", EDITS, ids=[e.__name__ for e in EDITS])
def test_an_edit_behind_the_agents_back_is_found_and_repaired(private_maps, caplog, edit) -> None:  # noqa: F811
    clock = Clock()
    agent, _ = program(private_maps, clock)
    if edit is edit_config:
        # A node config is written once the Node is known.
        agent.state.node = None
    before = contents(private_maps)
    cfg_before = private_maps[map_name("sp_cfg")].lookup(abi.u32(0))
    said = edit(private_maps)
    with caplog.at_level(logging.ERROR, logger="sliceproxy"):
        run_check(agent, clock)
    assert "map entries differ from what was written" in caplog.text, caplog.text
    assert said in caplog.text, caplog.text
    assert agent.schedule.need_full
    agent.step(timeout=0)  # the full sync from the re-read maps
    assert not agent.schedule.need_full
    assert contents(private_maps) == before
    assert private_maps[map_name("sp_cfg")].lookup(abi.u32(0)) == cfg_before


def test_syncs_between_chunks_go_first_and_are_no_difference(private_maps, caplog, monkeypatch) -> None:  # noqa: F811
    """Two entries a turn: the check is still running when changes come,
    they are written at once, and the entries they write, delete or move
    (slots rewritten, a Service gone, a new one, backends added and
    dropped) are no difference."""
    monkeypatch.setattr(verify, "CHUNK", 2)
    monkeypatch.setattr(agent_mod, "CHECK_SLICE", 0.0)
    clock = Clock()
    agent, src = program(private_maps, clock, n_services=8, per_service=6)
    clock.t += PERIOD
    agent.step(timeout=0)
    assert agent.check is not None and not agent.check.done
    with caplog.at_level(logging.ERROR, logger="sliceproxy"):
        for turn in range(4):
            src.put(
                slice_event("web-0-a", "web-0", *[f"198.18.10.{j + 1}" for j in range(turn, turn + 6)]),
                slice_event(f"web-{turn + 1}-a", f"web-{turn + 1}", f"198.18.50.{turn + 1}"),
                svc_event(f"new-{turn}", f"198.19.1.{turn + 1}"),
                slice_event(f"new-{turn}-a", f"new-{turn}", f"198.18.60.{turn + 1}", f"198.18.60.{turn + 11}"),
            )
            syncs = agent.syncs
            agent.step(timeout=0)
            # Written now, the check not yet complete.
            assert agent.syncs == syncs + 1
            assert agent.check is not None, f"the check completed before change {turn}"
        src.put(delete_event("Service", "web-7"), delete_event("EndpointSlice", "web-7-a"))
        agent.step(timeout=0)
        checks = agent.checks
        while agent.checks == checks:
            assert not agent.schedule.need_full, caplog.text
            agent.step(timeout=0)
    assert "differ" not in caplog.text, caplog.text
    assert not agent.schedule.need_full
    c = read_contents(private_maps)
    owners = {n.split(":", 1)[0] for n in c.names.values()}
    assert "default/web-7" not in owners and "default/new-3" in owners
    # And a check right after, with nothing written meanwhile, agrees.
    with caplog.at_level(logging.ERROR, logger="sliceproxy"):
        run_check(agent, clock)
    assert "differ" not in caplog.text and not agent.schedule.need_full


# -- Maglev tables (--external-lb=maglev) ---------------------------------------


def maglev_agent(maps, clock):
    from ctrl.dataplane.abi import MapSizes
    from ctrl.dataplane.apply import Writer
    from ctrl.dataplane.programmed import Programmed
    from ctrl.model.state import ClusterState
    from ctrl.runtime.agent import Agent
    from ctrl.runtime.settings import Settings

    from .test_agent_maps import QueueSource

    src = QueueSource()
    programmed = Programmed(MapSizes(), maglev_size=1021)
    settings = Settings(min_sync_period=0.0, sync_period=PERIOD)
    agent = Agent(src, ClusterState("node-a"), programmed, Writer(maps), settings, clock=clock)
    ips = [f"198.18.30.{j + 1}" for j in range(4)]
    src.put(svc_event("lb", "198.19.0.50", externalIPs=["198.19.5.1"]), slice_event("lb-a", "lb", *ips))
    agent.step(timeout=0)
    return agent


def mgl_items(maps) -> dict:
    return dict(maps[map_name("sp_mgl")].items())


def mgl_ptrs(maps) -> dict[int, tuple[int, int]]:
    """svc_id -> (table id, M) of each Maglev pointer."""
    c = abi.codec("sp_mgl_ptr", ("table", "size"))
    return {abi.U32.unpack(k)[0]: c.unpack(v) for k, v in maps[map_name("sp_mglptr")].items()}


def mgl_view(maps) -> dict:
    """Per frontend id, the size and entries (backend addresses) of the
    table its pointer names (table ids may differ after a repair)."""
    key_c = abi.codec("sp_mgl_key", ("id", "chunk"))
    chunks = {key_c.unpack(k): abi.mgl_ids(v) for k, v in mgl_items(maps).items()}
    backends = read_contents(maps).backends
    out = {}
    for sid, (tid, size) in mgl_ptrs(maps).items():
        entries = [b for k in range(abi.mgl_chunks(size)) for b in chunks[tid, k]][:size]
        out[sid] = (size, [backends[b] for b in entries])
    return out


def _mgl(tid: int, chunk: int) -> bytes:
    return abi.pack("sp_mgl_key", id=tid, chunk=chunk)


def _table(maps) -> tuple[int, int]:
    """(frontend id, table id) of a pointer."""
    sid, (tid, _) = min(mgl_ptrs(maps).items())
    return sid, tid


def maglev_entry_changed(maps) -> str:
    _, tid = _table(maps)
    m = maps[map_name("sp_mgl")]
    ids = abi.mgl_ids(m.lookup(_mgl(tid, 0)))
    other = next(b for b in read_contents(maps).backends if b != ids[7])
    ids[7] = other
    m.update(_mgl(tid, 0), ids.tobytes())
    return f"Maglev table {tid} entry 7: backend {other}"


def maglev_chunk_deleted(maps) -> str:
    _, tid = _table(maps)
    assert maps[map_name("sp_mgl")].delete(_mgl(tid, 1))
    return "1 Maglev entries programmed are not in the map"


def maglev_pointer_deleted(maps) -> str:
    sid, _ = _table(maps)
    assert maps[map_name("sp_mglptr")].delete(abi.u32(sid))
    return "1 Maglev entries programmed are not in the map"


def maglev_size_changed(maps) -> str:
    sid, tid = _table(maps)
    maps[map_name("sp_mglptr")].update(abi.u32(sid), abi.pack("sp_mgl_ptr", table=tid, size=1000))
    return f"Maglev pointer of id {sid}: size 1000"


MAGLEV_EDITS = [maglev_entry_changed, maglev_chunk_deleted, maglev_pointer_deleted, maglev_size_changed]


def test_maglev_tables_as_written_pass_the_check(private_maps, caplog) -> None:  # noqa: F811
    clock = Clock()
    agent = maglev_agent(private_maps, clock)
    # One table (its chunks), a pointer per external frontend to it.
    assert len(mgl_items(private_maps)) == abi.mgl_chunks(1021)
    assert mgl_ptrs(private_maps) and {t for t, _ in mgl_ptrs(private_maps).values()} == {_table(private_maps)[1]}
    with caplog.at_level(logging.ERROR, logger="sliceproxy"):
        run_check(agent, clock)
    assert agent.checks == 1 and not agent.schedule.need_full, caplog.text


@pytest.mark.parametrize("edit", MAGLEV_EDITS, ids=[e.__name__ for e in MAGLEV_EDITS])
def test_a_maglev_edit_is_found_and_repaired(private_maps, caplog, edit) -> None:  # noqa: F811
    clock = Clock()
    agent = maglev_agent(private_maps, clock)
    before = mgl_view(private_maps)
    said = edit(private_maps)
    with caplog.at_level(logging.ERROR, logger="sliceproxy"):
        run_check(agent, clock)
    assert said in caplog.text, caplog.text
    agent.step(timeout=0)  # the full sync from the re-read maps
    assert mgl_view(private_maps) == before


def test_a_node_config_written_during_the_check_is_no_difference(private_maps, caplog, monkeypatch) -> None:  # noqa: F811
    """The Node's address changes while the check runs: the agent writes
    the new node config, and the check compares the config with that one."""
    from ctrl.k8s.events import Event
    from ctrl.k8s.objects import parse

    monkeypatch.setattr(verify, "CHUNK", 2)
    monkeypatch.setattr(agent_mod, "CHECK_SLICE", 0.0)
    clock = Clock()
    agent, src = program(private_maps, clock)

    def node(ip: str) -> Event:
        raw = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
        }
        return Event("upsert", "Node", "node-a", parse(raw))

    src.put(node("198.18.0.5"))
    agent.step(timeout=0)
    before = private_maps[map_name("sp_cfg")].lookup(abi.u32(0))
    clock.t += PERIOD
    agent.step(timeout=0)
    assert agent.check is not None and not agent.check.done
    src.put(node("198.18.0.6"))
    with caplog.at_level(logging.ERROR, logger="sliceproxy"):
        checks = agent.checks
        while agent.checks == checks:
            assert not agent.schedule.need_full, caplog.text
            agent.step(timeout=0)
    assert "differ" not in caplog.text, caplog.text
    assert private_maps[map_name("sp_cfg")].lookup(abi.u32(0)) != before
