"""Tier 3: the agent's loop on real kernel maps, in this process.

No namespaces or traffic here: the agent (ctrl.runtime.agent.Agent) is driven one
turn at a time (Agent.step) from a queue of source events, with a clock the
test moves, and writes real BPF maps: private ones (loader.load with no pin
directory), or pinned ones in a directory of this test's own when a restart
is what is tested. Nothing ages by sleeping: every deadline is reached by
moving the clock.
"""

from __future__ import annotations

import logging
import queue
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctrl.dataplane import abi, loader
from ctrl.dataplane import maps as maps_mod
from ctrl.dataplane.abi import MapSizes, map_base, map_name, read_contents
from ctrl.dataplane.apply import STREAM_ROWS, Writer
from ctrl.dataplane.changeset import ChangeSet
from ctrl.dataplane.libbpf import BPFError
from ctrl.dataplane.maps import Map
from ctrl.dataplane.programmed import Programmed
from ctrl.k8s.events import Event
from ctrl.k8s.objects import parse
from ctrl.model.plan import Frontend, FrontendFlag, Scope
from ctrl.model.state import ClusterState
from ctrl.runtime.agent import Agent
from ctrl.runtime.settings import Settings
from ctrl.util.addrs import addr16

from .agent import endpoint_slice, service

pytestmark = pytest.mark.root

PORTS = [("http", 80, "TCP", 8080)]
SLICE_PORTS = [("http", 8080, "TCP")]


class Clock:
    """CLOCK_MONOTONIC as the agent reads it, moved by the test."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class QueueSource:
    """What the agent reads of a source: a queue of event lists, listed."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.synced = True

    def put(self, *events: Event) -> None:
        self.events.put(list(events))


def svc_event(name: str, ip: str, ports=PORTS, **spec) -> Event:
    raw = service(name, ip, ports)
    raw["spec"].update(spec)
    return Event("upsert", "Service", f"default/{name}", parse(raw))


def slice_event(name: str, svc: str, *ips: str) -> Event:
    return Event("upsert", "EndpointSlice", f"default/{name}", parse(endpoint_slice(name, svc, SLICE_PORTS, ips)))


def delete_event(kind: str, name: str) -> Event:
    return Event("delete", kind, f"default/{name}")


def kernel_backends(maps) -> set[str]:
    """Backend addresses in the backend map (IPv4)."""
    return {".".join(str(b) for b in be[0][12:]) for be in read_contents(maps).backends.values()}


@pytest.fixture
def private_maps() -> Iterator[dict]:
    dp = loader.load(pin_dir=None)
    try:
        yield dp.maps
    finally:
        dp.close()


def make_agent(maps, clock: Clock, sizes: MapSizes | None = None, **kw) -> tuple[Agent, QueueSource]:
    src = QueueSource()
    programmed = Programmed(sizes or MapSizes(), drain_period=kw.pop("drain_period", 0.0))
    settings = Settings(min_sync_period=0.0, sync_period=kw.pop("sync_period", 60.0))
    agent = Agent(src, ClusterState("node-a"), programmed, Writer(maps), settings, clock=clock, **kw)
    return agent, src


# -- drains -------------------------------------------------------------------


def test_a_drained_backend_goes_although_a_repair_rereads_the_maps(private_maps, caplog) -> None:
    """--sync-period 2 / --drain-period 2: the periodic checks run during the
    drain, and one finds an entry added by hand, so the agent re-reads the
    kernel maps; the drain deadline must come back with them, so the
    backend goes at the end of its drain instead of never."""
    clock = Clock()
    agent, src = make_agent(private_maps, clock, drain_period=2.0, sync_period=2.0)
    src.put(svc_event("web", "198.19.0.10"), slice_event("web-a", "web", "198.18.1.11", "198.18.1.12"))
    agent.step(timeout=0)
    assert kernel_backends(private_maps) == {"198.18.1.11", "198.18.1.12"}

    clock.t += 0.5
    src.put(slice_event("web-a", "web", "198.18.1.11"))
    agent.step(timeout=0)
    (drain_end,) = read_contents(private_maps).draining.values()
    assert drain_end == pytest.approx(1002.5)
    stray = abi.pack("sp_slot_key", svc_id=4242, slot=0)
    private_maps[map_name("sp_slot")].update(stray, abi.pack("sp_slot_val", backend_id=1))

    gone_at = None
    with caplog.at_level(logging.ERROR, logger="sliceproxy"):
        while clock.t < 1012.0:
            clock.t += 0.5
            for _ in range(100):  # a check completes within a few turns
                agent.step(timeout=0)
                if agent.check is None:
                    break
            if gone_at is None and "198.18.1.12" not in kernel_backends(private_maps):
                gone_at = clock.t
    assert "slot 0 of id 4242: in the map" in caplog.text  # found, so the maps were re-read
    assert private_maps[map_name("sp_slot")].lookup(stray) is None  # and the full sync removed it
    assert gone_at == 1002.5, f"the drained backend went at {gone_at} (due at 1002.5)"
    assert kernel_backends(private_maps) == {"198.18.1.11"}
    assert agent.checks >= 4


def test_a_draining_backend_keeps_its_deadline_across_a_restart(pin_dir: Path) -> None:
    """A new agent adopting pinned maps reads each drain's end from the
    backend map: it neither restarts the drain nor forgets it."""
    dp = loader.load(pin_dir=str(pin_dir))
    try:
        clock = Clock(500.0)
        agent, src = make_agent(dp.maps, clock, drain_period=30.0)
        src.put(svc_event("web", "198.19.0.10"), slice_event("web-a", "web", "198.18.1.11", "198.18.1.12"))
        agent.step(timeout=0)
        clock.t = 501.0
        src.put(slice_event("web-a", "web", "198.18.1.11"))
        agent.step(timeout=0)
        (gone_id,) = read_contents(dp.maps).draining
    finally:
        dp.close()

    # The restart: the same pins, a new mirror, a clock that moved on.
    dp = loader.load(pin_dir=str(pin_dir))
    try:
        clock = Clock(520.0)
        agent, src = make_agent(dp.maps, clock, drain_period=30.0)
        read_contents(dp.maps).adopt_into(agent.programmed)
        assert agent.programmed.draining == {gone_id: pytest.approx(531.0)}
        src.put(svc_event("web", "198.19.0.10"), slice_event("web-a", "web", "198.18.1.11"))
        agent.step(timeout=0)  # the first, full sync: the drain goes on
        assert agent.programmed.next_drain_end() == pytest.approx(531.0)
        assert "198.18.1.12" in kernel_backends(dp.maps)
        clock.t = 530.5
        agent.step(timeout=0)
        assert "198.18.1.12" in kernel_backends(dp.maps)
        clock.t = 531.0
        agent.step(timeout=0)
        assert kernel_backends(dp.maps) == {"198.18.1.11"}
    finally:
        dp.close()


# -- names ----------------------------------------------------------------------


def frontend_ids(programmed: Programmed) -> dict[tuple, tuple[int, str, str]]:
    return {k: (st.svc_id, st.owner, st.name) for k, st in programmed.frontends.items()}


def test_the_longest_kubernetes_names_survive_a_restart_with_their_ids(pin_dir: Path) -> None:
    """A 63-character namespace, Service name and port name (Kubernetes'
    longest): the owner is read back from the names map after a restart, so
    the frontends keep their ids and nothing is rewritten."""
    ns, name, port = "n" * 63, "s" * 63, "p" * 63
    raw_svc = service(name, "198.19.0.10", [(port, 80, "TCP", 8080), ("dns", 53, "UDP", 5353)], namespace=ns)
    raw_slice = endpoint_slice("x" * 253, name, [(port, 8080, "TCP"), ("dns", 5353, "UDP")], ["198.18.1.11"],
                               namespace=ns)  # fmt: skip
    events = [
        Event("upsert", "Service", f"{ns}/{name}", parse(raw_svc)),
        Event("upsert", "EndpointSlice", f"{ns}/{'x' * 253}", parse(raw_slice)),
    ]
    dp = loader.load(pin_dir=str(pin_dir))
    try:
        agent, src = make_agent(dp.maps, Clock())
        src.put(*events)
        agent.step(timeout=0)
        before = frontend_ids(agent.programmed)
        assert len(before) == 2 and {o for _, o, _ in before.values()} == {f"{ns}/{name}"}
        assert {n for _, _, n in before.values()} == {f"{ns}/{name}:{port}/TCP", f"{ns}/{name}:dns/UDP"}
    finally:
        dp.close()
    dp = loader.load(pin_dir=str(pin_dir))
    try:
        agent, src = make_agent(dp.maps, Clock())
        read_contents(dp.maps).adopt_into(agent.programmed)
        assert frontend_ids(agent.programmed) == before
        agent.take(events)
        cs = agent.sync()  # the first, full sync of the new agent
        assert cs is not None and len(cs) == 0, cs
        assert frontend_ids(agent.programmed) == before
    finally:
        dp.close()


def test_a_name_too_long_for_the_names_map_is_refused_and_cannot_corrupt_adoption(pin_dir: Path) -> None:
    """A 253-character Service name (the file source refuses it; another
    source might not): never cut into the names map, where a restart would
    read a wrong or no owner out of it. The Service is refused by name,
    the others are programmed and adopted whole."""
    long_owner = "default/" + "l" * 253
    vip, vip2 = addr16("198.19.0.10"), addr16("198.19.0.11")
    be1 = (addr16("198.18.1.11"), 8080, 6)

    def desired() -> dict[str, list[Frontend]]:
        return {
            "default/web": [Frontend(vip, 80, 6, Scope.INTERNAL, "default/web:http/TCP", (be1,))],
            long_owner: [Frontend(vip2, 80, 6, Scope.INTERNAL, f"{long_owner}:http/TCP", (be1,))],
        }

    dp = loader.load(pin_dir=str(pin_dir))
    try:
        p = Programmed()
        cs = p.sync(desired(), prune_except=set(desired()))
        assert set(cs.refused) == {long_owner} and "names map holds 199" in cs.refused[long_owner]
        Writer(dp.maps).apply(cs)
        before = frontend_ids(p)
    finally:
        dp.close()
    dp = loader.load(pin_dir=str(pin_dir))
    try:
        q = Programmed()
        read_contents(dp.maps).adopt_into(q)
        assert frontend_ids(q) == before and q.owners() == {"default/web"}
        cs = q.sync(desired(), prune_except=set(desired()))
        assert len(cs) == 0 and set(cs.refused) == {long_owner}
    finally:
        dp.close()


def test_a_name_without_its_end_gives_no_owner(private_maps, caplog) -> None:
    """A names entry that fills its array (not written by this control
    plane, which never cuts a name) is not parsed for an owner."""
    p = Programmed()
    Writer(private_maps).apply(
        p.sync({"default/web": [Frontend(addr16("198.19.0.10"), 80, 6, Scope.INTERNAL, "default/web:http/TCP", ())]})
    )
    (svc_id,) = read_contents(private_maps).names
    full = ("default/web:" + "x" * 200).encode()[: private_maps[map_name("sp_names")].value_size]
    private_maps[map_name("sp_names")].update(svc_id.to_bytes(4, "little"), full)
    q = Programmed()
    with caplog.at_level(logging.WARNING, logger="sliceproxy.apply"):
        read_contents(private_maps).adopt_into(q)
    assert [st.owner for st in q.frontends.values()] == [""]
    assert [r.getMessage() for r in caplog.records] == [
        f"map {map_name('sp_names')}: the name of id {svc_id} has no end; its owner is unknown"
    ]


# -- capacity ------------------------------------------------------------------


def lb_event(name: str, lb_ip: str, *ranges: str) -> Event:
    raw = service(name, "198.19.0.20" if name == "lb-a" else "198.19.0.21", PORTS)
    raw["spec"].update(type="LoadBalancer", loadBalancerSourceRanges=list(ranges))
    raw["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
    return Event("upsert", "Service", f"default/{name}", parse(raw))


def names_in_kernel(maps) -> set[str]:
    return {n.split(":", 1)[0] for n in read_contents(maps).names.values()}


def test_a_full_source_range_map_refuses_one_service_and_the_others_go_on(caplog) -> None:
    """--max-source-ranges 4: a LoadBalancer IP has two frontends (pods and
    outside), each with its ranges. A Service whose ranges do not fit is
    refused by name; a Service added at the same time is programmed; once
    room is made the refused one follows."""
    dp = loader.load(pin_dir=None, sizes=MapSizes(source_ranges=4))
    try:
        clock = Clock()
        agent, src = make_agent(dp.maps, clock, sizes=MapSizes(source_ranges=4))
        src.put(lb_event("lb-a", "198.19.1.1", "198.18.0.0/24", "198.18.1.0/24"))
        agent.step(timeout=0)
        assert len(read_contents(dp.maps).ranges) == 2  # two frontends, two ranges each
        clock.t += 1
        with caplog.at_level(logging.ERROR, logger="sliceproxy.agent"):
            src.put(lb_event("lb-b", "198.19.1.2", "198.18.2.0/24"), svc_event("web", "198.19.0.10"))
            agent.step(timeout=0)
        assert names_in_kernel(dp.maps) == {"default/lb-a", "default/web"}
        (line,) = [r.getMessage() for r in caplog.records if "default/lb-b" in r.getMessage()]
        assert "--max-source-ranges" in line
        src.put(delete_event("Service", "lb-a"))
        for _ in range(120):  # retried (with backoff) until room is made
            clock.t += 1
            agent.step(timeout=0)
            if "default/lb-b" in names_in_kernel(dp.maps):
                break
        assert names_in_kernel(dp.maps) == {"default/lb-b", "default/web"}
        assert sum(len(r) for r in read_contents(dp.maps).ranges.values()) == 2
    finally:
        dp.close()


# -- one Service's failed write ---------------------------------------------------


def mirror(p: Programmed) -> tuple[dict, dict]:
    fronts = {k: (st.svc_id, st.owner, st.name, list(st.slots), st.flags, st.ranges) for k, st in p.frontends.items()}
    return fronts, dict(p.backends)


def assert_mirror_is_the_kernel(p: Programmed, maps) -> None:
    fresh = Programmed()
    read_contents(maps).adopt_into(fresh)
    assert mirror(p) == mirror(fresh)


def served(maps) -> dict[str, set[str]]:
    """Owner -> backend addresses its frontends' slots name, from the kernel."""
    mc = read_contents(maps)
    out: dict[str, set[str]] = {}
    for svc_id, count, _, _, slots_id in mc.svc.values():
        owner = mc.names[svc_id].split(":", 1)[0]
        for i in range(count):
            addr = mc.backends[mc.slots[(slots_id, i)]][0]
            out.setdefault(owner, set()).add(".".join(str(b) for b in addr[12:]))
    return out


def failing_metric(metrics) -> dict[str, float]:
    return {
        s.labels["service"]: s.value
        for fam in metrics.registry.collect()
        if fam.name == "sliceproxy_service_write_failing"
        for s in fam.samples
    }


@pytest.mark.parametrize("stream_rows", [STREAM_ROWS, 1])
def test_a_write_the_kernel_refuses_fails_one_service_and_the_others_are_written(caplog, stream_rows) -> None:
    """The backend map holds 5 entries, though the agent was told more (a
    map made too small behind its back). A Service growing past it fails
    alone: named in the log and a metric, left as the kernel has it, and
    retried after 5 s, 10 s...; a Service changed and one added in the
    same sync are written; the mirror matches the kernel; once room is
    made, the retry succeeds. The same when each Service's new backends
    are streamed to the kernel during the diff (stream_rows 1): the
    failed stream leaves the error to the write."""
    from ctrl.runtime.metrics import Metrics

    dp = loader.load(pin_dir=None, sizes=MapSizes(backends=5))
    try:
        clock = Clock()
        agent, src = make_agent(dp.maps, clock, metrics=Metrics())
        assert agent.writer is not None
        agent.writer.stream_rows = stream_rows
        src.put(
            svc_event("a", "198.19.0.10"),
            slice_event("a-1", "a", "198.18.1.11", "198.18.1.12"),
            svc_event("b", "198.19.0.11"),
            slice_event("b-1", "b", "198.18.1.13"),
        )
        agent.step(timeout=0)
        assert served(dp.maps) == {"default/a": {"198.18.1.11", "198.18.1.12"}, "default/b": {"198.18.1.13"}}

        clock.t += 1  # 1001
        with caplog.at_level(logging.WARNING, logger="sliceproxy.agent"):
            src.put(
                slice_event("a-1", "a", "198.18.1.11", "198.18.1.12", "198.18.1.14", "198.18.1.15", "198.18.1.16"),
                slice_event("b-1", "b", "198.18.1.13", "198.18.1.11"),
                svc_event("c", "198.19.0.12"),
                slice_event("c-1", "c", "198.18.1.12"),
            )
            agent.step(timeout=0)
        assert served(dp.maps) == {
            "default/a": {"198.18.1.11", "198.18.1.12"},  # as before
            "default/b": {"198.18.1.13", "198.18.1.11"},
            "default/c": {"198.18.1.12"},
        }
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and errors[0].startswith("default/a Service: writing its map entries failed")
        assert "retried in 5 s" in errors[0]
        assert failing_metric(agent.metrics) == {"default/a": 1.0}
        assert_mirror_is_the_kernel(agent.programmed, dp.maps)

        # Retried after 5 s, not sooner; still no room: 10 s.
        caplog.clear()
        syncs = agent.syncs
        clock.t = 1005.9
        agent.step(timeout=0)
        assert agent.syncs == syncs
        clock.t = 1006.0
        with caplog.at_level(logging.ERROR, logger="sliceproxy.agent"):
            agent.step(timeout=0)
        assert agent.syncs == syncs + 1
        assert ["retried in 10 s" in r.getMessage() for r in caplog.records] == [True]

        # b goes, and its backend with it: room for a at its next retry.
        src.put(delete_event("Service", "b"))
        agent.step(timeout=0)
        assert "default/b" not in served(dp.maps) and failing_metric(agent.metrics) == {"default/a": 1.0}
        clock.t = 1016.0
        agent.step(timeout=0)
        assert served(dp.maps) == {
            "default/a": {"198.18.1.11", "198.18.1.12", "198.18.1.14", "198.18.1.15", "198.18.1.16"},
            "default/c": {"198.18.1.12"},
        }
        assert failing_metric(agent.metrics) == {}
        assert_mirror_is_the_kernel(agent.programmed, dp.maps)
    finally:
        dp.close()


def test_a_key_the_kernel_refuses_fails_its_service_only(private_maps) -> None:
    """A source range the LPM trie refuses (a prefix longer than its key):
    that Service's frontend, which would point at it, is not written; the
    other Service's write goes through."""
    vip, vip2 = addr16("198.19.0.10"), addr16("198.19.0.11")
    be1 = (addr16("198.18.1.11"), 8080, 6)
    bad = Frontend(
        vip, 80, 6, Scope.EXTERNAL, "default/bad:http/TCP", (be1,), flags=FrontendFlag.SRC_RANGES,
        source_ranges=((addr16("198.18.0.0"), 200),),
    )  # fmt: skip
    good = Frontend(vip2, 80, 6, Scope.INTERNAL, "default/good:http/TCP", (be1,))
    p = Programmed()
    cs = p.sync({"default/bad": [bad], "default/good": [good]})
    w = Writer(private_maps)
    with pytest.raises(BPFError):
        w.apply(cs)
    failed, rest_error = w.apply_each(cs)
    assert set(failed) == {"default/bad"} and rest_error is None
    mc = read_contents(private_maps)
    assert [k[0] for k in mc.svc] == [vip2] and list(mc.backends.values()) == [be1]
    assert mc.ranges == {}


def test_more_source_ranges_than_one_packing_chunk_are_written_and_deleted(private_maps):
    """The source range map is an LPM trie, written entry by entry from the
    packed batch; past abi.PACK_CHUNK entries that batch is a bytearray,
    whose slices the per-entry calls must take as they take bytes."""
    n = abi.PACK_CHUNK + 100
    ranges = tuple((addr16(f"198.18.{i // 250}.{i % 250}"), 128) for i in range(n))
    f = Frontend(
        addr16("198.19.0.30"), 80, 6, Scope.EXTERNAL, "default/wide:http/TCP", ((addr16("198.18.100.1"), 8080, 6),),
        flags=FrontendFlag.SRC_RANGES, source_ranges=ranges,
    )  # fmt: skip
    p = Programmed()
    w = Writer(private_maps)
    w.apply(p.sync({"default/wide": [f]}))
    mc = read_contents(private_maps)
    assert len(next(iter(mc.ranges.values()))) == n
    w.apply(p.sync({"default/wide": []}))  # the Service's frontends gone
    assert read_contents(private_maps).ranges == {}


# -- the writer's stream: a large sync's bulk written during its diff --------


def frontend(owner: int, *backends: int) -> Frontend:
    return Frontend(
        addr16(f"198.19.0.{10 + owner}"), 80, 6, Scope.INTERNAL, f"default/s{owner}:http/TCP",
        tuple((addr16(f"198.18.{owner}.{b}"), 8080, 6) for b in backends),
    )  # fmt: skip


def test_new_backends_and_slots_reach_the_kernel_during_the_diff_and_go_once(private_maps, monkeypatch):
    """With stream_rows 1 the writer sends each Service's new backends and
    slots once its diff is done: at the diff's end they are all in the
    kernel while no frontend names them yet, and the write then adds
    only the frontends and their names. No entry goes to the kernel twice."""
    written: Counter[str] = Counter()
    update_batch = Map.update_batch

    def counting(self, keys, vals, chunk=0, **kw):
        written[map_base(self.name)] += len(keys) // self.key_size
        return update_batch(self, keys, vals, chunk, **kw)

    monkeypatch.setattr(Map, "update_batch", counting)
    p = Programmed()
    w = Writer(private_maps)
    w.stream_rows = 1
    cs = p.sync({f"default/s{i}": [frontend(i, 1, 2, 3)] for i in range(4)}, stream=w.stream)
    assert w._stream is not None
    w._stream.wait()  # what the thread was sent is in the kernel
    mc = read_contents(private_maps)
    assert len(mc.backends) == 12 and len(mc.slots) == 12 and mc.svc == {} and mc.names == {}
    w.apply(cs)
    assert cs.written == (12, 12)
    assert written == {"sp_be": 12, "sp_slot": 12, "sp_svc": 4, "sp_names": 4}
    assert_mirror_is_the_kernel(p, private_maps)


def test_nothing_is_streamed_once_a_draining_backend_serves_again(private_maps):
    """Clearing a backend's draining flag comes before any slot naming it
    again, in the write's first batch: from the Service that brings one
    back, the rest of the sync goes in the write, in its order."""
    p = Programmed(drain_period=10.0)
    w = Writer(private_maps)
    w.stream_rows = 1
    cs = p.sync({"default/s1": [frontend(1, 1, 2)]}, now=0.0, stream=w.stream)
    w.apply(cs)
    assert cs.written == (2, 2)
    w.apply(p.sync({"default/s1": [frontend(1, 1)]}, now=1.0, stream=w.stream))
    assert list(read_contents(private_maps).draining) == [p.backend_ids[frontend(1, 2).backends[0]]]
    cs = p.sync({"default/s1": [frontend(1, 1, 2)], "default/s2": [frontend(2, 1)]}, now=2.0, stream=w.stream)
    assert cs.be_mark and len(cs.be_upd) == 1
    w.apply(cs)
    assert cs.written == (0, 0)
    assert read_contents(private_maps).draining == {}
    assert served(private_maps) == {"default/s1": {"198.18.1.1", "198.18.1.2"}, "default/s2": {"198.18.2.1"}}
    assert_mirror_is_the_kernel(p, private_maps)


def test_a_streamed_batch_that_fails_is_written_by_the_write(private_maps, monkeypatch):
    """Whatever a streamed batch raises, the stream stops and the write
    writes every row itself: the kernel ends up as the mirror says."""
    update_batch = Map.update_batch

    def failing_when_streamed(self, keys, vals, chunk=0, **kw):
        if chunk:  # the stream's one-syscall batches
            raise RuntimeError("lost")
        return update_batch(self, keys, vals, chunk, **kw)

    monkeypatch.setattr(Map, "update_batch", failing_when_streamed)
    p = Programmed()
    w = Writer(private_maps)
    w.stream_rows = 1
    cs = p.sync({f"default/s{i}": [frontend(i, 1, 2)] for i in range(3)}, stream=w.stream)
    w.apply(cs)
    assert cs.written == (0, 0)
    assert served(private_maps) == {f"default/s{i}": {f"198.18.{i}.1", f"198.18.{i}.2"} for i in range(3)}
    assert_mirror_is_the_kernel(p, private_maps)


# -- large batches of distinct keys, written by two threads -----------------


def halves(monkeypatch) -> list[tuple[str, str, int, int]]:
    """Record (map, thread, first row, end) of every run of rows a batch
    update writes; batches of 8 distinct keys and more are split."""
    monkeypatch.setattr(maps_mod, "PARALLEL_ROWS", 8)
    monkeypatch.setattr(maps_mod, "_cpus", lambda: 2)  # split on a one-CPU machine too
    runs: list[tuple[str, str, int, int]] = []
    rows = Map._update_rows

    def recording(self, kb, vb, start, end, n, step):
        runs.append((map_base(self.name), threading.current_thread().name, start, end))
        return rows(self, kb, vb, start, end, n, step)

    monkeypatch.setattr(Map, "_update_rows", recording)
    return runs


def test_a_large_sync_writes_its_new_backends_and_slots_in_two_halves_at_once(private_maps, monkeypatch):
    """A sync's new backends and its slots (each slot named once) are
    batches of distinct keys: with PARALLEL_ROWS 8, each is written as
    two halves, one by a thread of its own; the kernel is the mirror."""
    runs = halves(monkeypatch)
    p = Programmed()
    cs = p.sync({f"default/s{i}": [frontend(i, *range(1, 11))] for i in range(3)})
    assert cs.slot_tables is not None and len(cs.slot_tables) == 3
    Writer(private_maps).apply(cs)
    for name in ("sp_be", "sp_slot"):
        mine = sorted((a, b) for m, _, a, b in runs if m == name)
        assert mine == [(0, 15), (15, 30)], name
        assert len({t for m, t, _, _ in runs if m == name}) == 2, name
    assert [(a, b) for m, _, a, b in runs if m == "sp_svc"] == [(0, 3)]  # small, and not known distinct
    assert served(private_maps) == {f"default/s{i}": {f"198.18.{i}.{b}" for b in range(1, 11)} for i in range(3)}
    assert_mirror_is_the_kernel(p, private_maps)


def test_streamed_batches_of_distinct_keys_are_written_in_two_halves_too(private_maps, monkeypatch):
    """The writer's stream sends each Service's new backends and slots as
    it goes (stream_rows 1): with PARALLEL_ROWS 8 each batch of 10 is two
    halves of 5, written at once; the kernel is the mirror."""
    runs = halves(monkeypatch)
    p = Programmed()
    w = Writer(private_maps)
    w.stream_rows = 1
    cs = p.sync({f"default/s{i}": [frontend(i, *range(1, 11))] for i in range(2)}, stream=w.stream)
    w.apply(cs)
    assert cs.written == (20, 20)
    for name in ("sp_be", "sp_slot"):
        assert sorted((a, b) for m, _, a, b in runs if m == name) == [(0, 5), (0, 5), (5, 10), (5, 10)], name
    assert_mirror_is_the_kernel(p, private_maps)


def test_rows_not_known_distinct_keep_their_order(private_maps, monkeypatch):
    """A change set whose slot rows may name a slot twice (rows not from
    one pass per table: here given by hand) and backends with draining
    marks are written in order, by one thread: the later row of a slot
    wins, as the kernel's batch gives it."""
    runs = halves(monkeypatch)
    p = Programmed()
    w = Writer(private_maps)
    w.apply(p.sync({"default/s1": [frontend(1, *range(1, 11))]}))
    (sid,) = {st.table.tid for st in p.frontends.values()}
    ids = sorted(p.bids.backends)
    first, last = ids[0], ids[-1]
    runs.clear()
    rows = [(sid, i, first) for i in range(10)] + [(sid, i, last) for i in range(10)]
    w.apply(ChangeSet(slot_upd=rows))
    assert [(m, a, b) for m, _, a, b in runs] == [("sp_slot", 0, 20)]
    assert {k: v for k, v in read_contents(private_maps).slots.items() if k[0] == sid} == {
        (sid, i): last for i in range(10)
    }


def test_a_half_that_fails_on_its_thread_fails_the_batch(pin_dir, monkeypatch):
    """The half written by the other thread fails (its keys are new to a
    full hash map) while the caller's half succeeds (its keys are there):
    the batch raises that error, naming the map and the half's rows."""
    monkeypatch.setattr(maps_mod, "PARALLEL_ROWS", 8)
    monkeypatch.setattr(maps_mod, "_cpus", lambda: 2)
    pin_dir.mkdir(parents=True, exist_ok=True)
    path = pin_dir / "full"
    subprocess.run(
        [
            "bpftool",
            "map",
            "create",
            str(path),
            "type",
            "hash",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "10",
            "name",
            "full",
        ],
        check=True,
        timeout=30,
    )
    m = Map.open_pinned(str(path))
    try:
        keys = b"".join(i.to_bytes(4, "little") for i in range(20))
        vals = bytes(4 * 20)
        m.update_batch(keys[40:], vals[40:])  # keys 10-19: the map is full
        with pytest.raises(BPFError, match=r"map full: batch update of entries 0 to 10 of 20 failed after 0"):
            m.update_batch(keys, vals, distinct=True)
        assert sorted(int.from_bytes(k, "little") for k, _ in m.items()) == list(range(10, 20))
    finally:
        m.close()
