"""Tier 3: the agent's life cycle around a dataplane that must not notice.

Attaching twice stacks nothing; a restart keeps ids and traffic; a killed
agent leaves a working dataplane and readable pins; uninstall removes our
filter and pins and nothing else.
"""

from __future__ import annotations

import signal
import subprocess

import pytest

from scripts.harness.topo import Topology

from .agent import SLICEPROXY, TrafficLoop, all_filters, dump, frontends, our_filters
from .conftest import CLIENT_IP, THREE, VIP, Agents, assert_spread, http, udp, web_backends

pytestmark = pytest.mark.root


def host_ifaces(topo: Topology) -> list[str]:
    return [p.host_if for p in topo.pods.values()]


def assert_one_filter_everywhere(topo: Topology) -> None:
    for ifname in host_ifaces(topo):
        for hook, prog in (("ingress", "sp_tc_ingress"), ("egress", "sp_tc_egress")):
            found = our_filters(topo, ifname, hook)
            assert len(found) == 1, f"{ifname}: expected exactly one sliceproxy filter at {hook}, found {found}"
            assert found[0]["options"]["prog"]["name"] == prog, found[0]


def ids(doc: dict) -> dict[str, tuple[int, list[str]]]:
    """svc_id and the backends in slot order, per frontend."""
    return {f: (s["svc_id"], s["backends"]) for f, s in frontends(doc).items()}


def test_restart_is_idempotent_and_keeps_ids_and_traffic(topo: Topology, agents: Agents) -> None:
    first = agents.start_ready()
    assert_one_filter_everywhere(topo)
    before = ids(dump(topo, agents.pin_dir))

    # Requests run back to back through the whole restart: the program and
    # the maps stay in the kernel while no agent runs.
    loop = TrafficLoop(topo, "client", "http", f"{VIP}:80").start()
    try:
        loop.wait_batches(1)
        rc = first.terminate()
        assert rc == 0, f"the agent exited {rc} on SIGTERM"
        first.wait_log("signal SIGTERM: stopping")
        # At least one whole batch with no agent at all (+2: the one running
        # now may have started before the agent stopped).
        loop.wait_batches(loop.done() + 2)
        second = agents.start()
        agents.wait_ready(second)
        # And a couple more once the new agent has taken over.
        loop.wait_batches(loop.done() + 2)
    finally:
        batches = loop.stop()

    errors = [s for b in batches for s in b["error_samples"]]
    assert sum(b["errors"] for b in batches) == 0, f"requests failed during the restart: {errors}"
    counts: dict[str, int] = {}
    for b in batches:
        for k, v in b["counts"].items():
            counts[k] = counts.get(k, 0) + v
    assert set(counts) == set(THREE), counts

    assert_one_filter_everywhere(topo)
    after = ids(dump(topo, agents.pin_dir))
    assert after == before, "service ids or backend slots changed across a restart"
    # The restarted agent found everything in place: its first full sync
    # wrote nothing.
    full = second.wait_log(r"sync \(full\):")
    assert "frontends +0/-0, slots +0/-0, backends +0/-0" in full[0], full[0]
    assert_spread(http(topo), THREE)


def test_dataplane_survives_sigkill_of_the_agent(topo: Topology, agents: Agents) -> None:
    agent = agents.start_ready()
    assert_spread(http(topo, count=20), THREE)
    before = dump(topo, agents.pin_dir)

    rc = agent.kill()
    assert rc == -signal.SIGKILL, f"expected death by SIGKILL, got {rc}"

    res = http(topo)
    assert_spread(res, THREE)
    assert res["client_ips_seen"] == [CLIENT_IP]
    assert_spread(udp(topo), THREE)
    after = dump(topo, agents.pin_dir)
    assert ids(after) == ids(before)
    # Served by the program: the new flows were DNATed while no agent ran.
    # (Not == 400: a client port reused from an earlier request finds that
    # flow's conntrack entry and counts as established.)
    moved = after["counters"]["dnat_new"]["packets"] - before["counters"]["dnat_new"]["packets"]
    assert moved >= 200, f"dnat_new moved by {moved} for 400 new flows"
    assert_one_filter_everywhere(topo)


def test_uninstall_removes_our_filter_and_pins_only(topo: Topology, agents: Agents) -> None:
    agent = agents.start_ready()
    assert_one_filter_everywhere(topo)
    # Another tool's filter on one of the same hooks must survive (u32:
    # the classifier this kernel is sure to have; it matches nothing here).
    other = topo.pods["backend-1"].host_if
    u32 = ["u32", "match", "ip", "dst", "198.18.255.255/32"]
    cp = topo.exec_in("node", ["tc", "filter", "add", "dev", other, "ingress", "pref", "100", *u32])
    assert cp.returncode == 0, cp.stderr
    assert agent.terminate() == 0

    cp = topo.exec_in(
        "node",
        [str(SLICEPROXY), "uninstall", "--pin-dir", str(agents.pin_dir), "--interfaces", topo.iface_glob],
        timeout=60,
    )
    assert cp.returncode == 0, f"uninstall exited {cp.returncode}: {cp.stderr}"

    for ifname in host_ifaces(topo):
        for hook in ("ingress", "egress"):
            assert our_filters(topo, ifname, hook) == [], f"{ifname} still has our filter at {hook}"
    assert not agents.pin_dir.exists(), f"{agents.pin_dir} still exists"
    foreign = [f for f in all_filters(topo, other) if f["options"].get("match", {}).get("value") == "c612ffff"]
    assert len(foreign) == 1, f"uninstall touched another tool's filter on {other}: {all_filters(topo, other)}"

    # With the program gone nothing translates the ClusterIP any more.
    res = http(topo, count=3, timeout=0.5)
    assert res["counts"] == {} and res["errors"] == 3, res
    # A second uninstall has nothing left to do and says so without failing.
    cp = topo.exec_in(
        "node",
        [str(SLICEPROXY), "uninstall", "--pin-dir", str(agents.pin_dir), "--interfaces", topo.iface_glob],
        timeout=60,
        stderr=subprocess.STDOUT,
        stdout=subprocess.PIPE,
    )
    assert cp.returncode == 0, cp.stdout


def test_cleanup_on_exit_flag_uninstalls_on_sigterm(topo: Topology, agents: Agents) -> None:
    agent = agents.start_ready(extra=("--cleanup-on-exit",))
    assert_one_filter_everywhere(topo)
    assert agent.terminate() == 0
    for ifname in host_ifaces(topo):
        for hook in ("ingress", "egress"):
            assert our_filters(topo, ifname, hook) == [], f"{ifname} still has our filter at {hook}"
    assert not agents.pin_dir.exists()


def test_periodic_reconcile_repairs_maps_changed_behind_its_back(topo: Topology, agents: Agents) -> None:
    from ctrl.dataplane import abi
    from ctrl.dataplane.maps import Map
    from ctrl.util.addrs import addr16

    agent = agents.start_ready(extra=("--sync-period", "1"))
    svc = Map.open_pinned(str(agents.pin_dir / abi.map_name("sp_svc")))
    try:
        # Someone deletes the http frontend by hand (its traffic stops; the
        # agent may put it back before a dump here could show it gone)...
        key = abi.pack("sp_svc_key", addr=addr16(VIP), port=80, proto=6, scope=abi.SCOPE_INTERNAL)
        assert svc.delete(key)
    finally:
        svc.close()
    # ...until the next periodic check finds it missing, and the full sync
    # after it writes it back.
    agent.wait_log(r"periodic check: \d+ map entries differ from what was written \(1 frontends programmed are not")
    agents.wait(web_backends("backend-1", "backend-2", "backend-3"))
    assert_spread(http(topo), THREE)


def test_load_through_repeated_kills_and_source_changes(topo: Topology, agents: Agents) -> None:
    """Connections run back to back while the agent is SIGKILLed, the source
    changes while it is dead, and a new agent takes over; three rounds.
    Zero failed connections, and once a removal is programmed no new
    connection reaches the removed backend."""
    from .conftest import web_slice

    rounds = [
        ("backend-3", ("backend-1", "backend-2")),  # (removed, serving)
        ("backend-1", ("backend-2", "backend-4")),
        ("backend-2", ("backend-3", "backend-4")),
    ]
    agent = agents.start_ready()
    loop = TrafficLoop(topo, "client", "http", f"{VIP}:80", per_batch=25, max_batches=200, max_seconds=150).start()
    checks = []  # (first batch index that must avoid it, removed backend)
    try:
        loop.wait_batches(1)
        for removed, serving in rounds:
            agent.kill()
            agents.src.write("slice-a.yaml", web_slice("web-a", *serving))
            if (agents.src.path / "slice-b.yaml").exists():
                agents.src.remove("slice-b.yaml")
            loop.wait_batches(loop.done() + 1)  # a batch with no agent at all
            agent = agents.start()
            agents.wait_ready(agent, web_backends(*serving))
            checks.append((loop.done() + 1, removed))  # the batch running now may predate it
            loop.wait_batches(loop.done() + 2)
    finally:
        batches = loop.stop()
    failed = [b for b in batches if b["errors"]]
    assert not failed, [(b["errors"], b["error_samples"], b["counts"]) for b in failed][:3]
    for first, removed in checks:
        reached = [i for i, b in enumerate(batches[first : first + 2], first) if b["counts"].get(removed)]
        assert not reached, f"{removed} was removed but batches {reached} reached it"
