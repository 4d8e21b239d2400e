"""Tier 3: one agent per pin directory.

Two agents on one pin directory undo each other's writes: each one's full
sync prunes what the other programmed. The first agent locks the
directory; a second one exits at once, names the first one's pid and
changes nothing. `sliceproxy dump` still reads the maps while the agent
runs; `sliceproxy uninstall` refuses while it runs. The kernel drops the
lock with its holder, also when it is killed.
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest

from scripts.harness.topo import Topology

from .agent import SLICEPROXY, AgentProc, SourceDir, dump, endpoint_slice, frontends, our_filters, service
from .conftest import BACKENDS, SLICE_PORTS, THREE, WEB_PORTS, Agents, assert_spread, http

pytestmark = pytest.mark.root


def other_source(base: Path) -> SourceDir:
    """A directory without web: an agent serving it prunes web's entries."""
    s = SourceDir(base / "other")
    s.write("service.yaml", service("other", "198.19.0.20", WEB_PORTS))
    s.write("slice.yaml", endpoint_slice("other-a", "other", SLICE_PORTS, [BACKENDS["backend-4"]]))
    return s


def ids(doc: dict) -> dict[str, tuple[int, list[str]]]:
    return {f: (s["svc_id"], s["backends"]) for f, s in frontends(doc).items()}


def test_a_second_agent_on_one_pin_directory_refuses_to_start(topo: Topology, agents: Agents, tmp_path: Path) -> None:
    first = agents.start_ready()
    before = ids(dump(topo, agents.pin_dir))  # dump reads while the agent runs

    # Its own ports, as a second instance would be given: only the pin
    # directory is shared.
    ports = ("--metrics-bind-address", "127.0.0.1:10250", "--healthz-bind-address", "127.0.0.1:10257")
    second = AgentProc(topo, other_source(tmp_path).path, agents.pin_dir, ports)
    agents.started.append(second)  # stopped at teardown if it did start
    try:
        rc = second.proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"a second agent runs on the first one's pin directory; the maps now hold "
            f"{sorted(frontends(dump(topo, agents.pin_dir)))}:\n{second.log_tail()}"
        )
    second.terminate()
    assert rc == 1, f"the second agent exited {rc}:\n{second.log_tail()}"
    msg = "\n".join(second.log())
    assert f"pin directory {agents.pin_dir} is in use by pid {first.pid} (" in msg, msg
    assert re.search(rf"pid {first.pid} \([^)]*sliceproxy run ", msg), msg
    assert "give this one its own --pin-dir" in msg and "Nothing was changed" in msg

    first.check_alive()
    assert ids(dump(topo, agents.pin_dir)) == before
    assert "other" not in str(before)
    assert_spread(http(topo), THREE)
    # The first agent saw no one else's writes: it synced once, at start.
    assert len(first.matching(r"sync \(full\)")) == 1, first.log_tail()


def test_uninstall_refuses_while_an_agent_runs(topo: Topology, agents: Agents) -> None:
    agent = agents.start_ready()
    argv = [str(SLICEPROXY), "uninstall", "--pin-dir", str(agents.pin_dir), "--interfaces", topo.iface_glob]
    cp = topo.exec_in("node", argv, timeout=60)
    assert cp.returncode == 1, (cp.returncode, cp.stderr)
    assert f"is in use by pid {agent.pid} (" in cp.stderr and "stop that agent first" in cp.stderr, cp.stderr
    assert agents.pin_dir.is_dir() and any(agents.pin_dir.iterdir())
    for pod in topo.pods.values():
        assert len(our_filters(topo, pod.host_if)) == 1
    assert_spread(http(topo), THREE)

    # Once the agent is stopped, uninstall does its job.
    assert agent.terminate() == 0
    cp = topo.exec_in("node", argv, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert not agents.pin_dir.exists()


def test_the_lock_dies_with_its_holder(topo: Topology, agents: Agents) -> None:
    first = agents.start_ready()
    assert first.kill() == -signal.SIGKILL  # no shutdown path: the kernel drops the lock
    second = agents.start_ready()
    # Ready as soon as attached (the maps were programmed by the first);
    # its first sync says it is past start-up, signal handlers included.
    second.wait_log(r"sync \(full\)")
    assert_spread(http(topo), THREE)
    # And --cleanup-on-exit uninstalls under the agent's own lock.
    assert second.terminate() == 0
    third = agents.start_ready(extra=("--cleanup-on-exit",))
    third.wait_log(r"sync \(full\)")
    assert third.terminate() == 0
    assert not agents.pin_dir.exists(), third.log_tail()
