"""Fixtures for tier 3 (docs/architecture.md, "Test tiers"): real connections between
network namespaces, with the agent attached to the node side of the pods'
veths as in production.

Every test gets its own topology (node + pods, made in well under a second),
its own YAML source directory and its own bpffs pin directory, so no test can
lean on conntrack entries, filters or pins another one left. Teardown runs
also when a test fails: the agents are stopped, the pin directory is removed
and the namespaces are deleted (which destroys the veths and the filters on
them). A session killed outright is cleaned up by the next one.

These tests need root (namespaces, BPF); without it they fail, on purpose,
instead of skipping: a skipped tier reads as a passing one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.harness.topo import Topology, exit_on_signals

from .agent import (
    BPFFS,
    PIN_PREFIX,
    SLICEPROXY,
    AgentProc,
    SourceDir,
    endpoint_slice,
    has_backends,
    service,
    stale_pin_dirs,
    wait_dump,
)

CLIENT_IP = "198.18.1.2"
BACKENDS = {
    "backend-1": "198.18.1.11",
    "backend-2": "198.18.1.12",
    "backend-3": "198.18.1.13",
    "backend-4": "198.18.1.14",
}
VIP = "198.19.0.10"
HTTP = f"{VIP}:80/TCP"
DNS = f"{VIP}:53/UDP"
ECHO = f"{VIP}:8081/TCP"

# The web Service: servers.py answers HTTP on 8080, line echo on 8081 and
# UDP echo on 5353 in every backend pod.
WEB_PORTS = [("http", 80, "TCP", 8080), ("dns", 53, "UDP", 5353), ("echo", 8081, "TCP", 8081)]
SLICE_PORTS = [("http", 8080, "TCP"), ("dns", 5353, "UDP"), ("echo", 8081, "TCP")]


def web_backends(*pods: str) -> dict[str, set[str]]:
    """What the dump shows for web's frontends when ``pods`` serve it."""
    ips = [BACKENDS[p] for p in pods]
    return {
        HTTP: {f"{ip}:8080" for ip in ips},
        DNS: {f"{ip}:5353" for ip in ips},
        ECHO: {f"{ip}:8081" for ip in ips},
    }


def web_slice(name: str, *pods: str) -> dict:
    return endpoint_slice(name, "web", SLICE_PORTS, [BACKENDS[p] for p in pods])


N = 200
THREE = ("backend-1", "backend-2", "backend-3")


def http(topo: Topology, target: str = f"{VIP}:80", count: int = N, timeout: float = 1.0) -> dict:
    return topo.client("client", "http", "--target", target, "--count", str(count), "--timeout", str(timeout))


def udp(topo: Topology, target: str = f"{VIP}:53", count: int = N, timeout: float = 1.0) -> dict:
    return topo.client("client", "udp", "--target", target, "--count", str(count), "--timeout", str(timeout))


def assert_spread(res: dict, pods: tuple[str, ...] | list[str]) -> None:
    """Every request answered, by exactly ``pods``, each at least once."""
    assert res["errors"] == 0, f"{res['errors']} of {res['requests']} failed: {res['error_samples']}"
    assert set(res["counts"]) == set(pods), f"answers came from {res['counts']}, expected all of {sorted(pods)}"
    assert sum(res["counts"].values()) == res["requests"]


@pytest.fixture(scope="session", autouse=True)
def netns_preconditions() -> None:
    """Fail (not skip) with a clear message when the tier cannot run."""
    if os.geteuid() != 0:
        pytest.fail(
            "tests/netns need root (network namespaces, BPF, tc): run `sudo make netns` "
            "or `sudo .venv/bin/python -m pytest tests/netns`",
            pytrace=False,
        )
    missing = [tool for tool in ("ip", "tc", "nsenter", "ss") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"tests/netns need {', '.join(missing)} in PATH (iproute2, util-linux)", pytrace=False)
    if not SLICEPROXY.exists():
        pytest.fail(f"{SLICEPROXY} not found: run `make` to build the venv", pytrace=False)
    default_obj = Path(__file__).resolve().parents[2] / "build" / "sliceproxy_tc.bpf.o"
    obj = Path(os.environ.get("SLICEPROXY_BPF_OBJECT") or default_obj)
    if not obj.exists():
        pytest.fail(f"{obj} not found: run `make` to build the BPF object", pytrace=False)
    with open("/proc/mounts") as f:
        if not any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in f):
            pytest.fail(f"no bpf filesystem at {BPFFS}: run `make bpffs`", pytrace=False)
    # SIGTERM/SIGHUP unwind through fixture teardown instead of killing
    # pytest with namespaces and agents left behind.
    exit_on_signals()
    # Leftovers of sessions that were SIGKILLed (never a live run's).
    Topology.cleanup_stale()
    for d in stale_pin_dirs():
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def topo() -> Iterator[Topology]:
    """A node, a client pod and four backend pods running servers.py."""
    with Topology() as t:
        t.add_pod("client", CLIENT_IP)
        for name, ip in BACKENDS.items():
            t.add_pod(name, ip)
        for name in BACKENDS:
            t.start_server(name)
        yield t


@pytest.fixture
def src(tmp_path: Path) -> SourceDir:
    """The YAML the agent serves: default/web on 198.19.0.10 (http 80,
    dns 53/UDP, echo 8081) with backend-1..3 in two slices, like
    examples/web. backend-4 runs but is not in the service."""
    s = SourceDir(tmp_path)
    s.write("service.yaml", service("web", VIP, WEB_PORTS))
    s.write("slice-a.yaml", web_slice("web-a", "backend-1", "backend-2"))
    s.write("slice-b.yaml", web_slice("web-b", "backend-3"))
    return s


class Agents:
    """Starts agents for one test on one pin directory, and tears them all
    down (and the pins) at the end, whatever happened."""

    def __init__(self, topo: Topology, src: SourceDir) -> None:
        self.topo = topo
        self.src = src
        self.pin_dir = BPFFS / f"{PIN_PREFIX}{topo.prefix}"
        self.started: list[AgentProc] = []

    def start(self, extra: tuple[str, ...] = ()) -> AgentProc:
        a = AgentProc(self.topo, self.src.path, self.pin_dir, extra)
        self.started.append(a)
        return a

    def start_ready(self, expected: dict[str, set[str]] | None = None, extra: tuple[str, ...] = ()) -> AgentProc:
        """Start an agent and wait until the dump shows ``expected`` (web
        with backend-1..3 by default) and every pod veth is attached."""
        a = self.start(extra)
        self.wait_ready(a, expected)
        return a

    def wait_ready(self, a: AgentProc, expected: dict[str, set[str]] | None = None) -> None:
        want = expected if expected is not None else web_backends("backend-1", "backend-2", "backend-3")
        wait_dump(self.topo, self.pin_dir, has_backends(want), f"frontends {sorted(want)}", agent=a)
        a.wait_attached(p.host_if for p in self.topo.pods.values())
        a.check_alive()

    def wait(self, expected: dict[str, set[str]], agent: AgentProc | None = None) -> dict:
        return wait_dump(self.topo, self.pin_dir, has_backends(expected), f"{expected}", agent=agent)

    def teardown(self) -> None:
        for a in self.started:
            if a.alive():
                a.terminate()
        shutil.rmtree(self.pin_dir, ignore_errors=True)


@pytest.fixture
def agents(topo: Topology, src: SourceDir) -> Iterator[Agents]:
    ag = Agents(topo, src)
    try:
        yield ag
    finally:
        ag.teardown()


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    """A bpffs directory of the test's own, for maps it loads in-process.
    A topology (only its node namespace) makes the name unique and marks
    it live, so the stale-pin cleanup of a parallel session leaves it
    alone; removed at the end, also when the test fails."""
    with Topology() as t:
        d = BPFFS / f"{PIN_PREFIX}{t.prefix}"
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    # A failing test's report carries the log of every agent it started:
    # usually the quickest way to see why the dataplane disagreed.
    rep = yield
    ag = getattr(item, "funcargs", {}).get("agents")
    if rep.when == "call" and rep.failed and isinstance(ag, Agents):
        for a in ag.started:
            rep.sections.append((f"sliceproxy run (pid {a.pid}) log", "\n".join(a.log()[-150:])))
    return rep
