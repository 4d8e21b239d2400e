"""healthCheckNodePort servers, as kube-proxy runs them.

A LoadBalancer Service with externalTrafficPolicy Local gets an HTTP server
on its spec.healthCheckNodePort: the cloud load balancer asks every node and
sends traffic only to nodes that answer 200, which they do while they have
a local ready endpoint (and the proxy itself is healthy). The body is
kube-proxy's: {"service": {"namespace", "name"}, "localEndpoints": N,
"serviceProxyHealthy": bool}, with the X-Load-Balancing-Endpoint-Weight
header set to N.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..k8s.objects import EndpointSlice, Service
from ..model.planner import follow_slices

log = logging.getLogger("sliceproxy.healthcheck")


def wanted(svc: Service | None) -> int | None:
    """The health check port this Service asks for, or None."""
    if svc is None or svc.type != "LoadBalancer" or svc.external_traffic_policy != "Local":
        return None
    return svc.health_check_node_port or None


class LocalReady:
    """How many distinct ready endpoint addresses one Service has on this
    node (the health check's localEndpoints), kept across its changes: a
    slice's local ready addresses are found when that slice changes (by
    identity, as the planner finds changed slices), so a one-slice change
    of a Service of 100,000 endpoints costs that slice, not a pass over all
    of them (7 ms a change). An address listed by two slices counts once."""

    def __init__(self, node_name: str | None):
        self.node_name = node_name
        self.slices: dict[str, EndpointSlice] = {}
        self.of: dict[str, list[bytes]] = {}  # slice name -> its local ready addresses
        self.uses: dict[bytes, int] = {}  # address -> slices that list it
        self.count = 0

    def update(self, slices: dict[str, EndpointSlice]) -> int:
        old, new = follow_slices(self.slices, slices)
        uses = self.uses
        for name in old:
            for a in self.of.pop(name, ()):
                n = uses[a] - 1
                if n:
                    uses[a] = n
                else:
                    del uses[a]
                    self.count -= 1
        node_name = self.node_name
        for name, sl in new.items():
            mine = list({ep.addr for ep in sl.endpoints if ep.ready and ep.node_name == node_name})
            self.of[name] = mine
            for a in mine:
                n = uses.get(a, 0)
                uses[a] = n + 1
                if not n:
                    self.count += 1
        return self.count


class _Server:
    def __init__(self, port: int, address: str, owner: str, healthy: Callable[[], bool], node_name: str | None):
        self.owner = owner
        self.count = 0
        self.local = LocalReady(node_name)
        ns, name = owner.split("/", 1)
        me = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                ok = healthy()
                n = me.count
                body = json.dumps(
                    {"service": {"namespace": ns, "name": name}, "localEndpoints": n, "serviceProxyHealthy": ok},
                    indent=2,
                ).encode()
                self.send_response(200 if n and ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("X-Load-Balancing-Endpoint-Weight", str(n))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args) -> None:
                log.debug("healthcheck %s: " + fmt, owner, *args)

        self.srv = ThreadingHTTPServer((address, port), Handler)
        self.srv.daemon_threads = True
        threading.Thread(target=self.srv.serve_forever, name=f"hc-{port}", daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


class HealthCheckServers:
    """One server per healthCheckNodePort; opened, updated and closed as the
    Services change. A port that cannot be bound is logged with the Service's
    name and retried at the next change."""

    def __init__(self, node_name: str | None, healthy: Callable[[], bool], address: str = "0.0.0.0"):
        self.node_name = node_name
        self.healthy = healthy
        self.address = address
        self.servers: dict[int, _Server] = {}
        # The port each Service's server is on (servers[port].owner is it):
        # a sync finds its own, not by walking every server (a full sync
        # of thousands of Services with health checks).
        self.port_of: dict[str, int] = {}

    def sync(self, owner: str, svc: Service | None, slices: dict[str, EndpointSlice]) -> None:
        """Open, close or update the server of owner's health check; slices:
        the Service's, by name (a slice object is replaced on every change)."""
        port = wanted(svc)
        held = self.port_of.get(owner)
        if held is not None and held != port:
            self.servers.pop(held).close()
            del self.port_of[owner]
            log.info("%s Service: health check port %d closed", owner, held)
        if port is None:
            return
        existing = self.servers.get(port)
        if existing is not None and existing.owner != owner:
            log.error("%s Service: spec.healthCheckNodePort %d is already served for %s", owner, port, existing.owner)
            return
        if existing is None:
            try:
                existing = _Server(port, self.address, owner, self.healthy, self.node_name)
            except OSError as e:
                log.error("%s Service: spec.healthCheckNodePort %d cannot be served: %s", owner, port, e)
                return
            self.servers[port] = existing
            self.port_of[owner] = port
            log.info("%s Service: serving its health check on port %d", owner, port)
        existing.count = existing.local.update(slices)

    def sync_all(
        self, owners: Iterable[str], services: Mapping[str, Service], slices: Mapping[str, dict[str, EndpointSlice]]
    ) -> None:
        """sync each owner (the state's Services and slices by owner),
        those with no server that want none passed over at once."""
        port_of = self.port_of
        for owner in owners:
            svc = services.get(owner)
            if owner in port_of or wanted(svc) is not None:
                self.sync(owner, svc, slices.get(owner, {}))

    def close(self) -> None:
        for srv in self.servers.values():
            srv.close()
        self.servers.clear()
        self.port_of.clear()
