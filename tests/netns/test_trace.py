"""Tier 3: `sliceproxy trace` while real traffic runs.

The trace runs as operators run it: a `sliceproxy trace --json` process in
the node namespace, next to the agent, its bcc tap compiled and attached in
front of the agent's programs. The tests read its lines and check them
against what the clients saw: the tuples before and after translation, the
Service, the backend, the verdict. Killing it must leave no tap behind
(the next trace or `uninstall` removes what a SIGKILL left), and the
agent's traffic must not notice any of it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctrl.dataplane import abi
from ctrl.dataplane.maps import Map
from scripts.harness.topo import Topology

from .agent import SLICEPROXY, WAIT, AgentError, TrafficLoop
from .conftest import BACKENDS, CLIENT_IP, THREE, VIP, Agents, http
from .test_external import (
    CLIENT,
    FW_LB_IP,
    NODE1,
    OTHER,
    WEB1,
    WEB2,
    Cluster,
    fw_service,
    make_cluster,
    slice_of,
    start,
)

pytestmark = pytest.mark.root


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """test_external.py's two nodes, with tc alone on the uplinks (--xdp off)."""
    with make_cluster(tmp_path, xdp=False) as c:
        yield c


@pytest.fixture(params=[False, True], ids=["tc", "xdp"])
def either(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """The same, with the XDP program on the uplinks or not: a trace taps
    the tc hooks, and XDP hands them every packet while it runs
    (docs/inspecting.md)."""
    with make_cluster(tmp_path, xdp=request.param) as c:
        yield c


def trace_verdicts(pin_dir: Path) -> list[int]:
    """Each CPU's sp_trace verdict mask: all zero when no trace runs."""
    m = Map.open_pinned(str(pin_dir / abi.map_name("sp_trace")))
    try:
        c = abi.codec("sp_trace", ("verdicts",))
        return [c.unpack(v)[0] for v in m.lookup_percpu(abi.u32(0))]
    finally:
        m.close()


TAP_NAME = "sliceproxy-trace"  # TCA_BPF_NAME prefix of a tap (ctrl.dataplane.trace)


class TraceProc:
    """`sliceproxy trace --json` in a namespace: its events (stdout, one JSON
    object per line) and its messages (stderr) collected by threads."""

    def __init__(self, topo: Topology, pin_dir: Path, *flags: str, ns: str = "node") -> None:
        self.topo = topo
        argv = [str(SLICEPROXY), "trace", "--pin-dir", str(pin_dir), "--json", *flags]
        self.proc = topo.run_in(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events: list[dict[str, Any]] = []
        self.messages: list[str] = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.events, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.messages, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, into: list[Any], is_json: bool) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._cond:
                into.append(json.loads(line) if is_json else line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _wait(self, what: str, done: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._threads)):
                    raise AgentError(
                        f"trace ({'running' if self.proc.poll() is None else f'exited {self.proc.returncode}'}) "
                        f"did not {what} within {timeout:g}s; its messages: {self.messages[-20:]}"
                    )
                self._cond.wait(min(left, 0.2))

    def wait_message(self, pattern: str, timeout: float = WAIT) -> str:
        rx = re.compile(pattern)
        self._wait(f"say {pattern!r}", lambda: any(rx.search(m) for m in self.messages), timeout)
        return next(m for m in self.messages if rx.search(m))

    def wait_ready(self) -> int:
        """Wait for the tap to be attached; the number of hooks tapped."""
        m = self.wait_message(r"tapping \d+ hooks")
        return int(re.search(r"tapping (\d+) hooks", m).group(1))  # type: ignore[union-attr]

    def wait_events(self, n: int, verdict: str | None = None, timeout: float = WAIT) -> list[dict[str, Any]]:
        """Wait for n events (of this verdict)."""

        def done() -> bool:
            return sum(1 for e in self.events if verdict in (None, e["verdict"])) >= n

        self._wait(f"print {n} {verdict or ''} events", done, timeout)
        with self._cond:
            return list(self.events)

    def signal(self, sig: int) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(30)
        for t in self._threads:
            t.join(5)
        self.topo.stop(self.proc)
        return rc


def taps(topo: Topology, ifname: str, ns: str = "node") -> dict[str, list[dict[str, Any]]]:
    """Filters of a tap on an interface, per hook."""
    out = {}
    for hook in ("ingress", "egress"):
        cp = topo.exec_in(ns, ["tc", "-j", "filter", "show", "dev", ifname, hook], timeout=20)
        entries = json.loads(cp.stdout or "[]") if cp.returncode == 0 else []
        out[hook] = [e for e in entries if (e.get("options") or {}).get("bpf_name", "").startswith(TAP_NAME + " ")]
    return out


def tap_count(topo: Topology, ifnames: list[str], ns: str = "node") -> int:
    return sum(len(v) for i in ifnames for v in taps(topo, i, ns).values())


def ip_of(hostport: str) -> str:
    return hostport.rsplit(":", 1)[0]


def test_clusterip_flows_show_their_backend_and_reply_translation(topo: Topology, agents: Agents) -> None:
    """Every new connection to the ClusterIP is one dnat_new line naming the
    Service and the backend the client got; every reply into the client is
    revnat back to the ClusterIP."""
    agents.start_ready()
    tr = TraceProc(
        topo, agents.pin_dir, "--service", "default/web", "--frontend", f"{VIP}:80",
        "--verdict", "dnat_new,revnat", "--rate", "100000",
    )  # fmt: skip
    try:
        # Both hooks of five pod veths: the agent's programs on each.
        assert tr.wait_ready() == 2 * len(topo.pods)
        res = http(topo, count=20)
        assert res["errors"] == 0, res
        tr.wait_events(20, "dnat_new")
    finally:
        tr.signal(signal.SIGTERM)
    client_if = topo.pods["client"].host_if
    new = [e for e in tr.events if e["verdict"] == "dnat_new"]
    replies = [e for e in tr.events if e["verdict"] == "revnat"]
    # One new flow per HTTP request (client.py opens a connection for each).
    assert len(new) == res["requests"], [json.dumps(e) for e in tr.events]
    backends = {f"{BACKENDS[p]}:8080" for p in THREE}
    for e in new:
        assert (e["hook"], e["direction"], e["interface"], e["proto"]) == ("pod_ingress", "ingress", client_if, "TCP")
        assert ip_of(e["src"]) == CLIENT_IP and e["dst"] == f"{VIP}:80", e
        assert e["nat_src"] == e["src"] and e["nat_dst"] in backends, e  # DNAT: only the destination changes
        assert e["backend"] == e["nat_dst"] and e["frontend"] == f"{VIP}:80", e
        assert e["service"] == "default/web:http/TCP" and e["action"] == "ok" and e["reason"] is None, e
    # The backends in the lines are the ones that answered.
    assert {ip_of(e["backend"]) for e in new} == {BACKENDS[p] for p in res["counts"]}
    assert replies, "no revnat line"
    for e in replies:
        assert (e["hook"], e["interface"]) == ("pod_egress", client_if), e
        assert e["src"] in backends and e["nat_src"] == f"{VIP}:80" and e["nat_dst"] == e["dst"], e
        assert e["backend"] == e["src"] and ip_of(e["dst"]) == CLIENT_IP, e
    # Every reply belongs to a flow the trace saw start.
    assert {(e["dst"], e["src"]) for e in replies} <= {(e["src"], e["nat_dst"]) for e in new}


def test_nodeport_flows_show_dnat_and_masquerade(cluster: Cluster) -> None:
    """A NodePort reached from outside: the external interface's line names
    the NodePort, the Service and the pod picked; a flow to the other
    node's pod also shows its masquerade on the way out."""
    start(cluster)
    node = cluster.nodes[0]
    tr = TraceProc(
        node.topo, node.pin_dir, "--frontend", f"{NODE1}:30080", "--verdict", "dnat_new,snat", "--rate", "100000"
    )
    try:
        tr.wait_ready()
        res = cluster.client("client", "http", f"{NODE1}:30080", count=20)
        assert res["errors"] == 0, res
        tr.wait_events(20, "dnat_new")
    finally:
        tr.signal(signal.SIGINT)
    new = [e for e in tr.events if e["verdict"] == "dnat_new"]
    snat = [e for e in tr.events if e["verdict"] == "snat"]
    assert len(new) == 20, tr.events
    for e in new:
        assert (e["hook"], e["interface"]) == ("ext_ingress", node.uplink), e
        assert ip_of(e["src"]) == CLIENT and e["dst"] == f"{NODE1}:30080" and e["frontend"] == e["dst"], e
        assert e["nat_dst"] in {f"{WEB1}:8080", f"{WEB2}:8080"} and e["backend"] == e["nat_dst"], e
        assert e["service"] == "default/web:http/TCP", e
    to_other = {e["src"] for e in new if e["nat_dst"] == f"{WEB2}:8080"}
    assert to_other, "no flow went to the other node's pod"  # 20 flows over two pods
    # Each flow to node-2's pod leaves masqueraded, and only those.
    for e in snat:
        assert (e["hook"], e["interface"]) == ("ext_egress", node.uplink), e
        assert e["src"] in to_other and e["dst"] == f"{WEB2}:8080", e
        assert ip_of(e["nat_src"]) == NODE1 and e["nat_dst"] == e["dst"] and e["frontend"] == f"{NODE1}:30080", e
    assert {e["src"] for e in snat} == to_other


def test_refused_source_is_a_drop_with_its_reason(either: Cluster) -> None:
    """loadBalancerSourceRanges: the refused client's packets are dropped
    lines saying why; the admitted client's flows are no drop. With XDP on
    the uplink too: it drops them itself when no trace runs."""
    cluster = either
    cluster.write("fw.yaml", fw_service(), slice_of("fw", [("http", 8080, "TCP")]))
    cluster.start_agents()
    cluster.wait_external(f"{FW_LB_IP}:80/TCP", {f"{WEB1}:8080", f"{WEB2}:8080"})
    node = cluster.nodes[0]
    tr = TraceProc(node.topo, node.pin_dir, "--service", "default/fw", "--verdict", "drop")
    try:
        tr.wait_ready()
        ok = cluster.client("client", "http", f"{FW_LB_IP}:80", count=5)
        assert ok["errors"] == 0, ok
        refused = cluster.client("other", "http", f"{FW_LB_IP}:80", count=2)
        assert refused["errors"] == 2, refused
        tr.wait_events(2)
    finally:
        tr.signal(signal.SIGTERM)
    assert tr.events
    for e in tr.events:
        assert e["verdict"] == "drop_source_range" and e["action"] == "shot", e
        assert ip_of(e["src"]) == OTHER and e["dst"] == f"{FW_LB_IP}:80", e
        assert (e["hook"], e["interface"]) == ("ext_ingress", node.uplink), e
        assert e["service"] == "default/fw:http/TCP" and e["nat_src"] is None and e["backend"] is None, e
        assert "loadBalancerSourceRanges" in e["reason"], e
    assert set(trace_verdicts(node.pin_dir)) == {0}, "the trace's end leaves XDP to serve again"


def test_agent_clears_what_a_killed_trace_left(either: Cluster) -> None:
    """A trace killed outright leaves its taps and every CPU's entry asking
    for verdicts (XDP, if on, handing everything to tc). The agent clears
    both on its next look at the interfaces, and refused clients stay
    refused throughout."""
    cluster = either
    cluster.write("fw.yaml", fw_service(), slice_of("fw", [("http", 8080, "TCP")]))
    cluster.start_agents()
    cluster.wait_external(f"{FW_LB_IP}:80/TCP", {f"{WEB1}:8080", f"{WEB2}:8080"})
    node = cluster.nodes[0]
    assert node.agent is not None
    ifaces = [node.uplink, *(p.host_if for p in node.topo.pods.values())]
    tr = TraceProc(node.topo, node.pin_dir, "--verdict", "drop")
    hooks = tr.wait_ready()
    assert set(trace_verdicts(node.pin_dir)) != {0}
    refused = cluster.client("other", "http", f"{FW_LB_IP}:80", count=2)
    assert refused["errors"] == 2, refused
    tr.wait_events(2, "drop_source_range")
    tr.signal(signal.SIGKILL)
    node.agent.wait_log(rf"a trace of {re.escape(str(node.pin_dir))} was killed: removed its {hooks} taps")
    assert tap_count(node.topo, ifaces) == 0
    assert set(trace_verdicts(node.pin_dir)) == {0}
    refused = cluster.client("other", "http", f"{FW_LB_IP}:80", count=2)
    assert refused["errors"] == 2, refused
    ok = cluster.client("client", "http", f"{FW_LB_IP}:80", count=5)
    assert ok["errors"] == 0, ok


def test_killed_trace_leaves_no_tap_and_traffic_never_fails(topo: Topology, agents: Agents) -> None:
    """Taps come and go in front of the agent's programs while a client
    keeps making requests: not one fails. SIGTERM and SIGINT detach; a
    SIGKILL leaves the taps, which the agent removes, or with no agent
    running the next trace and `uninstall`."""
    agent = agents.start_ready()
    ifaces = [p.host_if for p in topo.pods.values()]
    hooks = 2 * len(ifaces)
    loop = TrafficLoop(topo, "client", "http", f"{VIP}:80", per_batch=20).start()
    try:
        loop.wait_batches(1)
        for sig in (signal.SIGTERM, signal.SIGINT):
            tr = TraceProc(topo, agents.pin_dir, "--verdict", "dnat")
            assert tr.wait_ready() == hooks
            assert tap_count(topo, ifaces) == hooks
            tr.wait_events(1)  # the loop's flows show
            assert tr.signal(sig) == 0
            assert tap_count(topo, ifaces) == 0, f"after {sig!r}"
        # The agent clears what a killed trace left on its next look at the
        # interfaces (each second).
        killed = TraceProc(topo, agents.pin_dir)
        killed.wait_ready()
        killed.signal(signal.SIGKILL)
        agent.wait_log(rf"a trace of .* was killed: removed its {hooks} taps")
        assert tap_count(topo, ifaces) == 0
        # With no agent running, the next trace clears them.
        agent.terminate()
        killed = TraceProc(topo, agents.pin_dir)
        killed.wait_ready()
        killed.signal(signal.SIGKILL)
        assert tap_count(topo, ifaces) == hooks  # nothing ran to detach them
        tr = TraceProc(topo, agents.pin_dir, "--verdict", "dnat")
        assert tr.wait_ready() == hooks
        tr.wait_message(rf"removed {hooks} taps a killed trace had left")
        assert tap_count(topo, ifaces) == hooks  # its own, not twice as many
        n = loop.done()
        loop.wait_batches(n + 1)  # a batch entirely under a trace
        assert tr.signal(signal.SIGTERM) == 0
        assert tap_count(topo, ifaces) == 0
        killed = TraceProc(topo, agents.pin_dir)
        killed.wait_ready()
        killed.signal(signal.SIGKILL)
        loop.wait_batches(loop.done() + 1)
    finally:
        batches = loop.stop()
    failed = [b["error_samples"] for b in batches if b["errors"]]
    assert not failed, f"{len(failed)} of {len(batches)} batches had failed requests: {failed[:3]}"
    assert sum(b["requests"] for b in batches) >= 3 * 20
    cp = topo.exec_in("node", [str(SLICEPROXY), "uninstall", "--pin-dir", str(agents.pin_dir)], timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert f"detached {hooks} trace taps" in cp.stderr + cp.stdout, cp.stderr
    assert tap_count(topo, ifaces) == 0
