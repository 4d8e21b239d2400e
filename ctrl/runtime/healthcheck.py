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
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..k8s.objects import EndpointSlice, Service

log = logging.getLogger("sliceproxy.healthcheck")


def wanted(svc: Service | None) -> int | None:
    """The health check port this Service asks for, or None."""
    if svc is None or svc.type != "LoadBalancer" or svc.external_traffic_policy != "Local":
        return None
    return svc.health_check_node_port or None


def local_ready_endpoints(slices: list[EndpointSlice], node_name: str | None) -> int:
    """Distinct ready endpoint addresses of the Service on this node."""
    return len({ep.addr for sl in slices for ep in sl.endpoints if ep.ready and ep.node_name == node_name})


class _Server:
    def __init__(self, port: int, address: str, owner: str, healthy: Callable[[], bool]):
        self.owner = owner
        self.count = 0
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

    def sync(self, owner: str, svc: Service | None, slices: list[EndpointSlice]) -> None:
        port = wanted(svc)
        for p, srv in list(self.servers.items()):
            if srv.owner == owner and p != port:
                srv.close()
                del self.servers[p]
                log.info("%s Service: health check port %d closed", owner, p)
        if port is None:
            return
        existing = self.servers.get(port)
        if existing is not None and existing.owner != owner:
            log.error("%s Service: spec.healthCheckNodePort %d is already served for %s", owner, port, existing.owner)
            return
        if existing is None:
            try:
                existing = _Server(port, self.address, owner, self.healthy)
            except OSError as e:
                log.error("%s Service: spec.healthCheckNodePort %d cannot be served: %s", owner, port, e)
                return
            self.servers[port] = existing
            log.info("%s Service: serving its health check on port %d", owner, port)
        existing.count = local_ready_endpoints(slices, self.node_name)

    def close(self) -> None:
        for srv in self.servers.values():
            srv.close()
        self.servers.clear()
