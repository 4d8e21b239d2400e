"""The health check's local endpoint count, kept across changes, equals the
count from scratch (distinct ready addresses on this node over every slice)
on random sequences of slices added, replaced, left as they are and
removed, with addresses listed by two slices and endpoints without a node."""

import random
import socket

import pytest

from ctrl.k8s.objects import parse
from ctrl.runtime.healthcheck import HealthCheckServers, LocalReady

from .helpers import endpoint_slice, service

ME = "node-a"
POOL = [f"198.18.3.{i}" for i in range(1, 13)]


def from_scratch(slices) -> int:
    return len({ep.addr for sl in slices.values() for ep in sl.endpoints if ep.ready and ep.node_name == ME})


def rand_slice(rnd, name):
    eps = []
    for ip in rnd.sample(POOL, rnd.randrange(0, 6)):
        ep = {"addresses": [ip], "conditions": {"ready": rnd.random() < 0.7}}
        node = rnd.choice([ME, ME, "node-b", None])
        if node is not None:
            ep["nodeName"] = node
        eps.append(ep)
    return parse(endpoint_slice(name, endpoints=eps))


@pytest.mark.parametrize("seed", range(40))
def test_count_kept_across_changes_equals_count_from_scratch(seed):
    rnd = random.Random(seed)
    names = [f"web-{c}" for c in "abcde"]
    local = LocalReady(ME)
    slices: dict = {}
    seen = set()
    for _ in range(60):
        op = rnd.random()
        name = rnd.choice(names)
        if op < 0.5:
            slices[name] = rand_slice(rnd, name)  # added or replaced
        elif op < 0.7:
            slices.pop(name, None)
        elif op < 0.8:
            slices = dict(reversed(slices.items()))  # same slices, another order
        # else: nothing changed
        want = from_scratch(slices)
        assert local.update(dict(slices)) == want
        seen.add(want)
    # The sequences reach counts above one, so shared addresses matter.
    assert max(seen) > 1


def test_an_address_in_two_slices_counts_once_until_both_drop_it():
    a = parse(endpoint_slice("web-a", endpoints=[{"addresses": ["198.18.3.1"], "nodeName": ME}]))
    b = parse(endpoint_slice("web-b", endpoints=[{"addresses": ["198.18.3.1"], "nodeName": ME}]))
    local = LocalReady(ME)
    assert local.update({"web-a": a, "web-b": b}) == 1
    assert local.update({"web-b": b}) == 1
    assert local.update({}) == 0


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _lb_local(name, port):
    return parse(
        service(name=name, type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=port)
        if port
        else service(name=name)
    )


def _open(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_servers_follow_their_services_ports():
    """A Service's server moves with its healthCheckNodePort, a port another
    Service holds is not taken until it is let go, and every server closes
    with its Service (each Service finds its own server, not by walking
    all of them)."""
    p1, p2 = _free_ports(2)
    hc = HealthCheckServers(ME, lambda: True, "127.0.0.1")
    try:
        hc.sync("default/a", _lb_local("a", p1), {})
        hc.sync("default/b", _lb_local("b", p1), {})  # a's port: refused, logged
        assert hc.port_of == {"default/a": p1} and hc.servers[p1].owner == "default/a"
        hc.sync("default/a", _lb_local("a", p2), {})
        assert hc.port_of == {"default/a": p2} and set(hc.servers) == {p2}
        assert _open(p2)
        hc.sync("default/b", _lb_local("b", p1), {})  # free now
        assert hc.port_of == {"default/a": p2, "default/b": p1}
        assert hc.servers[p1].owner == "default/b" and _open(p1)
        # Through sync_all, as the agent calls it: a ClusterIP Service with
        # no server passed over; a ClusterIP now, one deleted: closed.
        services = {"default/a": _lb_local("a", None), "default/c": _lb_local("c", None)}
        hc.sync_all(["default/a", "default/b", "default/c"], services, {})
        assert hc.port_of == {} and hc.servers == {}
        assert not _open(p1) and not _open(p2)
    finally:
        hc.close()
