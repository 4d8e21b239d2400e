"""Tier 3: a ClusterIP service through the real dataplane.

A client pod talks to 198.19.0.10, an address on no interface: only the tc
program on the node side of the client's veth can turn it into a backend.
Backends are servers.py instances that say who they are and which client
address they saw; client.py counts the answers (see their docstrings).
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from scripts.harness.topo import Topology

from .agent import (
    SourceDir,
    dump,
    endpoint,
    endpoint_slice,
    finish_client,
    frontends,
    service,
    start_client,
)
from .conftest import (
    BACKENDS,
    CLIENT_IP,
    SLICE_PORTS,
    THREE,
    VIP,
    WEB_PORTS,
    Agents,
    N,
    assert_spread,
    http,
    udp,
    web_backends,
    web_slice,
)

pytestmark = pytest.mark.root


def test_tcp_reaches_every_backend_without_snat(topo: Topology, agents: Agents) -> None:
    agents.start_ready()
    res = http(topo)
    assert_spread(res, THREE)
    # No SNAT: every backend saw the client pod's own address.
    assert res["client_ips_seen"] == [CLIENT_IP]


def test_udp_reaches_every_backend_and_replies_come_from_the_clusterip(topo: Topology, agents: Agents) -> None:
    agents.start_ready()
    # client.py connect()s each new UDP socket to the VIP: the kernel only
    # delivers datagrams from 198.19.0.10:53 to it, so a reply that was not
    # reverse-NATed (source = the backend's own address) never arrives and
    # counts as a timeout error.
    res = udp(topo)
    assert_spread(res, THREE)


def test_established_connection_keeps_its_backend_while_others_change(
    topo: Topology, agents: Agents, src: SourceDir
) -> None:
    agent = agents.start_ready()
    lines = 150
    echo = start_client(
        topo, "client", "echo", "--target", f"{VIP}:8081", "--count", str(lines), "--interval", "0.05", "--timeout", "2"
    )
    try:
        own = backend_holding_connection(topo, echo)
        others = [p for p in THREE if p != own]
        gone = others[0]
        stays = [own, others[1], "backend-4"]
        # The connection's backend and one other stay, backend-4 joins and
        # `gone` (a backend other than the connection's) leaves.
        src.write("slice-a.yaml", web_slice("web-a", *stays))
        src.write("slice-b.yaml", web_slice("web-b"))
        agents.wait(web_backends(*stays), agent=agent)
        assert echo.poll() is None, (
            "the echo client finished before the change was programmed, so the test proved nothing; "
            "raise its line count"
        )
        # New connections see the change while the old one goes on.
        after = http(topo)
        assert after["counts"].get(gone, 0) == 0, f"{gone} was removed but got {after['counts'][gone]} requests"
        assert_spread(after, stays)
        res = finish_client(topo, echo, timeout=60)
    finally:
        if echo.poll() is None:
            topo.stop(echo)
    assert res["errors"] == 0, f"echo lines failed: {res['error_samples']}"
    assert res["connections"] == 1, f"the connection broke and was re-opened {res['connections'] - 1} times"
    assert res["counts"] == {own: lines}, f"echoes came from {res['counts']}, expected all {lines} from {own}"


def backend_holding_connection(topo: Topology, client: subprocess.Popen, timeout: float = 20.0) -> str:
    """The backend pod with an established connection from the client on the
    echo port (asked from the backends' side with ss, not the dataplane)."""
    deadline = time.monotonic() + timeout
    while True:
        holders = []
        for pod in BACKENDS:
            cp = topo.exec_in(pod, ["ss", "-Htn", "state", "established", "( sport = :8081 )"])
            if CLIENT_IP in cp.stdout:
                holders.append(pod)
        if len(holders) == 1:
            return holders[0]
        assert len(holders) < 2, f"several backends hold an echo connection: {holders}"
        assert client.poll() is None, f"echo client exited ({client.returncode}) before connecting"
        assert time.monotonic() < deadline, f"no backend saw the echo connection within {timeout:g}s"
        time.sleep(0.1)


@pytest.mark.parametrize(
    "how",
    ["slice-emptied", "slice-file-deleted", "endpoint-not-ready"],
)
def test_removed_backend_gets_no_new_connections(topo: Topology, agents: Agents, src: SourceDir, how: str) -> None:
    agent = agents.start_ready()
    # First it is reachable, so a 0 below means it was taken out.
    assert_spread(http(topo), THREE)
    if how == "slice-emptied":
        src.write("slice-b.yaml", web_slice("web-b"))
    elif how == "slice-file-deleted":
        src.remove("slice-b.yaml")
    else:
        src.write(
            "slice-b.yaml",
            endpoint_slice("web-b", "web", SLICE_PORTS, [endpoint(BACKENDS["backend-3"], ready=False)]),
        )
    agents.wait(web_backends("backend-1", "backend-2"), agent=agent)
    res = http(topo)
    assert res["counts"].get("backend-3", 0) == 0, f"backend-3 still got {res['counts']['backend-3']} of {N}"
    assert_spread(res, ["backend-1", "backend-2"])
    res = udp(topo)
    assert res["counts"].get("backend-3", 0) == 0, f"backend-3 still got {res['counts']['backend-3']} datagrams"
    assert_spread(res, ["backend-1", "backend-2"])


# -- bad input ---------------------------------------------------------------


def error_lines(agent, needle: str) -> list[str]:
    return [line for line in agent.log() if " ERROR " in line and needle in line]


def add_probe_service(agents: Agents, src: SourceDir, agent, name: str, ip: str) -> None:
    """Add a good service and wait until it is programmed. The file source
    scans the whole directory each pass, so once this shows up every file
    present before was seen at least once more: error lines that would be
    repeated have been by then."""
    src.write(
        f"{name}.yaml",
        service(name, ip, [("http", 80, "TCP", 8080)]),
        endpoint_slice(f"{name}-1", name, [("http", 8080, "TCP")], [BACKENDS["backend-4"]]),
    )
    agents.wait({f"{ip}:80/TCP": {f"{BACKENDS['backend-4']}:8080"}}, agent=agent)


def test_malformed_yaml_file_is_reported_once_and_the_rest_is_served(
    topo: Topology, agents: Agents, src: SourceDir
) -> None:
    agent = agents.start_ready()
    before = {f: (s["svc_id"], sorted(s["backends"])) for f, s in frontends(agents_dump(agents)).items()}
    bad = src.write_text("broken.yaml", "kind: Service\nmetadata: {name: broken\n  spec: [\n")
    agent.wait_log(re.escape(str(bad)))
    add_probe_service(agents, src, agent, "probe", "198.19.0.30")
    lines = error_lines(agent, str(bad))
    assert len(lines) == 1, f"expected one error line naming {bad}, got {lines}"
    assert re.search(rf"{re.escape(str(bad))} line \d+", lines[0]), f"the line number is missing: {lines[0]}"
    # Nothing of web moved, and it still answers.
    after = {f: (s["svc_id"], sorted(s["backends"])) for f, s in frontends(agents_dump(agents)).items()}
    assert {f: after[f] for f in before} == before
    assert_spread(http(topo), THREE)
    assert_spread(http(topo, "198.19.0.30:80", count=20), ["backend-4"])


def test_file_broken_by_an_edit_keeps_its_previous_objects(topo: Topology, agents: Agents, src: SourceDir) -> None:
    """A half-saved file must not take its services down."""
    agent = agents.start_ready()
    before = frontends(agents_dump(agents))
    path = src.write_text("service.yaml", src.file("service.yaml").read_text() + "  ports: [\n")
    agent.wait_log(re.escape(str(path)))
    add_probe_service(agents, src, agent, "probe", "198.19.0.30")
    assert len(error_lines(agent, str(path))) == 1, error_lines(agent, str(path))
    after = frontends(agents_dump(agents))
    for f, s in before.items():
        assert f in after, f"{f} was removed after its file broke"
        assert (after[f]["svc_id"], after[f]["backends"]) == (s["svc_id"], s["backends"])
    assert_spread(http(topo), THREE)
    assert_spread(udp(topo), THREE)


def test_object_with_bad_ip_is_named_and_the_rest_is_served(topo: Topology, agents: Agents, src: SourceDir) -> None:
    agent = agents.start_ready()
    # One file: a Service whose ClusterIP is not an address, a good Service,
    # and a slice for web with one bad endpoint address and one good one.
    path = src.write(
        "mixed.yaml",
        service("bad", "198.19.0.300", [("http", 80, "TCP", 8080)]),
        service("other", "198.19.0.31", [("http", 80, "TCP", 8080)]),
        endpoint_slice("other-1", "other", [("http", 8080, "TCP")], [BACKENDS["backend-1"]]),
        endpoint_slice("web-c", "web", SLICE_PORTS, ["198.18.1.256", BACKENDS["backend-4"]]),
    )
    # The rest of the file is used: other is served, backend-4 joins web.
    want = web_backends("backend-1", "backend-2", "backend-3", "backend-4")
    want["198.19.0.31:80/TCP"] = {f"{BACKENDS['backend-1']}:8080"}
    agents.wait(want, agent=agent)
    add_probe_service(agents, src, agent, "probe", "198.19.0.30")

    bad_svc = error_lines(agent, "default/bad Service")
    assert len(bad_svc) == 1, f"expected one error line for default/bad Service, got {bad_svc}"
    assert str(path) in bad_svc[0] and "clusterIP" in bad_svc[0] and "198.19.0.300" in bad_svc[0], bad_svc[0]
    bad_ep = error_lines(agent, "EndpointSlice web-c")
    assert len(bad_ep) == 1, f"expected one error line for EndpointSlice web-c, got {bad_ep}"
    assert str(path) in bad_ep[0] and "endpoints[0].addresses[0]" in bad_ep[0] and "198.18.1.256" in bad_ep[0]

    assert_spread(http(topo), ["backend-1", "backend-2", "backend-3", "backend-4"])
    assert_spread(http(topo, "198.19.0.31:80", count=20), ["backend-1"])


def test_bad_edit_of_a_programmed_service_keeps_it(topo: Topology, agents: Agents, src: SourceDir) -> None:
    """The web Service is edited to a ClusterIP that is not an address: the
    error names file, object and field, and what was programmed stays."""
    agent = agents.start_ready()
    before = frontends(agents_dump(agents))
    doc = service("web", "198.19.0.300", WEB_PORTS)
    path = src.write("service.yaml", doc)
    agent.wait_log(re.escape(f"{path}: default/web Service: spec.clusterIP"))
    add_probe_service(agents, src, agent, "probe", "198.19.0.30")
    lines = error_lines(agent, "default/web Service")
    assert len(lines) == 1, lines
    after = frontends(agents_dump(agents))
    for f, s in before.items():
        assert f in after, f"{f} was removed by an invalid edit of its Service"
        assert after[f]["backends"] == s["backends"]
    assert_spread(http(topo), THREE)


# -- no ready endpoint ----------------------------------------------------------


def test_service_without_ready_endpoints_rejects_and_others_are_unaffected(
    topo: Topology, agents: Agents, src: SourceDir
) -> None:
    """kube-proxy's REJECT: a Service whose only endpoint is neither ready
    nor serving (an evicted pod) has no endpoint; a TCP connect() to it is
    refused at once, and a connected UDP socket gets ECONNREFUSED on its
    next call, from the ICMP port unreachable the dataplane sends back
    (never a timeout: the client waits 5 s per request)."""
    src.write(
        "idle.yaml",
        service("idle", "198.19.0.20", [("http", 80, "TCP", 8080), ("dns", 53, "UDP", 5353)]),
        endpoint_slice(
            "idle-1",
            "idle",
            [("http", 8080, "TCP"), ("dns", 5353, "UDP")],
            # Not ready and not serving: no fallback endpoint either.
            [endpoint(BACKENDS["backend-4"], ready=False, serving=False)],
        ),
    )
    want = web_backends(*THREE) | {"198.19.0.20:80/TCP": set(), "198.19.0.20:53/UDP": set()}
    agents.start_ready(want)
    before = agents_dump(agents)["counters"]["reject_no_backend"]["packets"]

    tries = 3
    for res in (
        http(topo, "198.19.0.20:80", count=tries, timeout=5.0),
        udp(topo, "198.19.0.20:53", count=tries, timeout=5.0),
    ):
        assert res["counts"] == {} and res["errors"] == tries, res
        assert all("ConnectionRefusedError" in e for e in res["error_samples"]), res["error_samples"]

    # Answered by the dataplane (not passed on to the node, whose own
    # error would also refuse, but would not be ours).
    after = agents_dump(agents)["counters"]["reject_no_backend"]["packets"]
    assert after - before == 2 * tries, f"reject_no_backend moved by {after - before}, expected {2 * tries}"

    assert_spread(http(topo), THREE)
    assert_spread(udp(topo), THREE)


def agents_dump(agents: Agents) -> dict:
    return dump(agents.topo, agents.pin_dir)


def test_replies_are_valid_to_netfilter_conntrack(topo: Topology, agents: Agents) -> None:
    """Rulesets that drop packets netfilter's conntrack finds INVALID (Calico,
    kube-router, kube-proxy's own KUBE-FORWARD) must not drop our replies: the
    reverse NAT happens after netfilter saw the reply as the backend sent it."""
    rule = ["FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]
    cp = topo.exec_in("node", ["iptables-legacy", "-A", *rule])
    assert cp.returncode == 0, cp.stderr
    agents.start_ready()
    assert_spread(http(topo), THREE)
    res = udp(topo)
    assert res["errors"] == 0, res
    # The rule was there all along and saw the traffic.
    cp = topo.exec_in("node", ["iptables-legacy", "-L", "FORWARD", "-v", "-n", "-x"])
    assert "INVALID" in cp.stdout, cp.stdout


def node_obj(zone: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": zone}},
    }


def test_zone_change_of_the_node_refilters_backends(topo: Topology, agents: Agents) -> None:
    """Topology-aware routing: with zone hints on every ready endpoint, the
    node uses those for its zone; when its Node's zone label changes, the
    backends follow."""
    hinted = []
    for pod, zone in (("backend-1", "zone-a"), ("backend-2", "zone-a"), ("backend-3", "zone-b")):
        e = endpoint(BACKENDS[pod])
        e["hints"] = {"forZones": [{"name": zone}]}
        hinted.append(e)
    agents.src.write("slice-a.yaml", endpoint_slice("web-a", "web", SLICE_PORTS, hinted))
    agents.src.remove("slice-b.yaml")
    agents.src.write("node.yaml", node_obj("zone-a"))
    agents.start_ready(web_backends("backend-1", "backend-2"), extra=("--node-name", "node-a"))
    assert_spread(http(topo), ("backend-1", "backend-2"))

    agents.src.write("node.yaml", node_obj("zone-b"))
    agents.wait(web_backends("backend-3"))
    assert_spread(http(topo), ("backend-3",))


UDP_PEER = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.settimeout(1.0)\n"
    "s.connect((sys.argv[1], int(sys.argv[2])))\n"
    "for line in sys.stdin:\n"
    "    s.send(line.strip().encode())\n"
    "    try:\n"
    "        print(s.recv(512).decode().split()[0], flush=True)\n"
    "    except OSError as e:\n"
    "        print('error', e, flush=True)\n"
)


def test_udp_flow_of_a_removed_backend_moves_at_once(topo: Topology, agents: Agents) -> None:
    """kube-proxy clears the UDP conntrack entries of a backend that stops
    serving, so a client keeping its socket (a resolver) is not left talking
    to it: the next datagram of the same flow picks a serving backend."""
    import sys

    agents.start_ready()
    peer = topo.run_in(
        "client", [sys.executable, "-c", UDP_PEER, VIP, "53"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:

        def ask() -> str:
            peer.stdin.write("q\n")
            peer.stdin.flush()
            return peer.stdout.readline().strip()

        first = ask()
        assert first in THREE, first
        assert ask() == first  # the same flow keeps its backend
        rest = [p for p in THREE if p != first]
        agents.src.write("slice-a.yaml", web_slice("web-a", *rest))
        agents.src.remove("slice-b.yaml")
        agents.wait(web_backends(*rest))
        answers = {ask() for _ in range(3)}
        assert len(answers) == 1 and answers <= set(rest), answers
    finally:
        peer.stdin.close()
        topo.stop(peer)


def test_session_affinity_sticks_and_expires(topo: Topology, agents: Agents) -> None:
    """sessionAffinity ClientIP: every new connection of a client reaches one
    backend; after timeoutSeconds without a new connection the next one is
    balanced afresh."""
    svc = service("web", VIP, WEB_PORTS)
    svc["spec"]["sessionAffinity"] = "ClientIP"
    svc["spec"]["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 1}}
    agents.src.write("service.yaml", svc)
    agents.start_ready()
    doc = dump(topo, agents.pin_dir)
    assert frontends(doc)[f"{VIP}:80/TCP"]["affinity_timeout"] == 1

    res = http(topo, count=40)
    assert res["errors"] == 0 and len(res["counts"]) == 1, res
    # Expiry: a new connection 1.5 s after the last one is a fresh pick.
    # Ten fresh picks all on one of three backends: probability 3 * 3**-10.
    picks = []
    for _ in range(10):
        time.sleep(1.5)
        r = http(topo, count=1)
        assert r["errors"] == 0, r
        picks.extend(r["counts"])
    assert len(set(picks)) > 1, picks


HC_FETCH = (
    "import sys, json, urllib.request, urllib.error\n"
    "try:\n"
    "    r = urllib.request.urlopen(sys.argv[1], timeout=5)\n"
    "    code, body, w = r.status, r.read(), r.headers['X-Load-Balancing-Endpoint-Weight']\n"
    "except urllib.error.HTTPError as e:\n"
    "    code, body, w = e.code, e.read(), e.headers['X-Load-Balancing-Endpoint-Weight']\n"
    "except OSError as e:\n"
    "    code, body, w = 0, b'{}', None\n"
    "print(json.dumps({'code': code, 'body': json.loads(body), 'weight': w}))\n"
)


def test_health_check_node_port_reports_local_endpoints(topo: Topology, agents: Agents) -> None:
    """A LoadBalancer Service with externalTrafficPolicy Local gets kube-proxy's
    health check server on spec.healthCheckNodePort: 200 while this node has a
    local ready endpoint, 503 otherwise, with kube-proxy's JSON body."""
    import json
    import sys

    def probe() -> dict:
        cp = topo.exec_in("node", [sys.executable, "-c", HC_FETCH, "http://127.0.0.1:32100/"], timeout=15)
        return json.loads(cp.stdout)

    svc = service("web", VIP, WEB_PORTS)
    svc["spec"].update(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32100)
    for p in svc["spec"]["ports"]:
        p["nodePort"] = 30000 + p["port"]
    local = endpoint(BACKENDS["backend-1"])
    remote = endpoint(BACKENDS["backend-2"])
    remote["nodeName"] = "node-b"
    agents.src.write("service.yaml", svc)
    agents.src.write("slice-a.yaml", endpoint_slice("web-a", "web", SLICE_PORTS, [local, remote]))
    agents.src.remove("slice-b.yaml")
    agents.start_ready(web_backends("backend-1", "backend-2"), extra=("--node-name", "node-a"))

    r = probe()
    assert r["code"] == 200 and r["weight"] == "1", r
    assert r["body"] == {
        "service": {"namespace": "default", "name": "web"},
        "localEndpoints": 1,
        "serviceProxyHealthy": True,
    }

    local["conditions"]["ready"] = False
    agents.src.write("slice-a.yaml", endpoint_slice("web-a", "web", SLICE_PORTS, [local, remote]))
    agents.wait(web_backends("backend-2"))
    r = probe()
    assert r["code"] == 503 and r["body"]["localEndpoints"] == 0, r

    # Cluster policy: no health check server at all.
    svc["spec"]["externalTrafficPolicy"] = "Cluster"
    agents.src.write("service.yaml", svc)
    deadline = time.monotonic() + 30
    while probe()["code"] != 0:
        assert time.monotonic() < deadline, "the health check port stayed open"
        time.sleep(0.2)


@pytest.mark.parametrize("size", [2000, 8000])
def test_big_udp_datagrams_to_a_clusterip_are_echoed_whole(topo: Topology, agents: Agents, size: int) -> None:
    """Upstream's "should be able to handle large requests: udp": datagrams
    bigger than the pod's 1500-byte MTU leave the client in fragments;
    every fragment must reach the backend translated and every fragment of
    the echo come back from the ClusterIP, or the datagram is lost."""
    agents.start_ready()
    before = agents_dump(agents)["counters"]["fragment"]["packets"]
    res = topo.client("client", "udp", "--target", f"{VIP}:53", "--count", "30", "--timeout", "2", "--size", str(size))
    assert_spread(res, THREE)
    after = agents_dump(agents)["counters"]["fragment"]["packets"]
    # Both ways: at least one later fragment per datagram and per echo.
    assert after - before >= 2 * 30, f"fragment moved by {after - before}"
