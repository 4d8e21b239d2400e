#!/usr/bin/env python3
"""A tiny backend for netns tests and the demo: it says who it is.

  * HTTP on --tcp-port (8080): any GET gets ``200`` with body ``NAME\\n``,
    so a client counting bodies sees how the load balancer spread requests.
    Headers X-Backend (NAME) and X-Peer (the client address as seen here)
    let a test also check that the client's source address survived.
  * Line echo on --echo-port (default tcp-port + 1, 8081): one long-lived
    TCP connection; each line ``L`` gets ``NAME L\\n``. For "an established
    connection keeps its backend while the service changes" tests.
  * UDP on --udp-port (5353): each datagram ``P`` gets ``NAME P``.

Prints ``ready`` on stdout once every socket listens, so callers can wait for
it instead of sleeping. Exits 0 on SIGTERM or SIGINT.

Stdlib only: it runs inside bare test namespaces with whatever python3 the
host has.
"""

from __future__ import annotations

import argparse
import signal
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def family_for(bind: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in bind else socket.AF_INET


class _DualStackMixin:
    """Bound to '::', also accept IPv4 (as ::ffff:a.b.c.d) so one server
    serves both families; the kernel default for V6ONLY varies by sysctl."""

    address_family: int
    socket: socket.socket

    def _dual_stack(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)

    def server_bind(self) -> None:
        self._dual_stack()
        super().server_bind()  # type: ignore[misc]


def make_http_handler(name: str) -> type[BaseHTTPRequestHandler]:
    body = f"{name}\n".encode()

    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 framing with Content-Length, but we still close after one
        # answer: the client opens a new connection per request on purpose
        # (each one is a new flow for the load balancer to place).
        protocol_version = "HTTP/1.1"
        server_version = "sliceproxy-test-backend"

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Backend", name)
            self.send_header("X-Peer", f"{self.client_address[0]}:{self.client_address[1]}")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            # Hundreds of requests per test: stay quiet.
            pass

    return Handler


def make_echo_handler(name: str) -> type[socketserver.StreamRequestHandler]:
    prefix = f"{name} ".encode()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            try:
                for line in self.rfile:
                    self.wfile.write(prefix + line.rstrip(b"\r\n") + b"\n")
                    self.wfile.flush()
            except (ConnectionResetError, BrokenPipeError):
                # A client dropped mid-stream (or the dataplane reset it):
                # that is for the test to judge, not a server crash.
                pass

    return Handler


def make_udp_handler(name: str) -> type[socketserver.BaseRequestHandler]:
    prefix = f"{name} ".encode()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            sock.sendto(prefix + data, self.client_address)

    return Handler


class HTTPServer(_DualStackMixin, ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # http.server's own server_bind resolves the host name (getfqdn),
        # which in a namespace without DNS can stall; nothing here needs it.
        self._dual_stack()
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class EchoServer(_DualStackMixin, socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class UDPServer(_DualStackMixin, socketserver.UDPServer):
    # Sequential handling is fine for UDP: each reply is one sendto.
    allow_reuse_address = True
    # The largest UDP datagram: big ones (fragmented on the way) are read
    # and echoed whole, not cut at socketserver's default of 8192 bytes.
    max_packet_size = 65535


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="what this backend answers with")
    ap.add_argument("--tcp-port", type=int, default=8080, help="HTTP port (default 8080)")
    ap.add_argument("--echo-port", type=int, default=None, help="line-echo TCP port (default tcp-port + 1)")
    ap.add_argument("--udp-port", type=int, default=5353, help="UDP echo port (default 5353)")
    ap.add_argument("--bind", default="0.0.0.0", help="address to listen on; '::' serves IPv4 and IPv6")
    args = ap.parse_args(argv)
    echo_port = args.echo_port if args.echo_port is not None else args.tcp_port + 1

    fam = family_for(args.bind)
    servers: list[socketserver.BaseServer] = []
    for cls, port, handler in (
        (HTTPServer, args.tcp_port, make_http_handler(args.name)),
        (EchoServer, echo_port, make_echo_handler(args.name)),
        (UDPServer, args.udp_port, make_udp_handler(args.name)),
    ):
        # Subclass per instance to set the family before the socket exists.
        srv_cls = type(cls.__name__, (cls,), {"address_family": fam})
        try:
            servers.append(srv_cls((args.bind, port), handler))
        except OSError as e:
            print(f"servers.py {args.name}: cannot listen on {args.bind} port {port}: {e}", file=sys.stderr)
            for s in servers:
                s.server_close()
            return 1

    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True) for s in servers]
    for t in threads:
        t.start()
    # The sockets are already listening (bound in the constructors), so a
    # connection made right after 'ready' is queued, never refused.
    print("ready", flush=True)

    # Event.wait in slices: keeps the main thread able to run the signal
    # handler promptly on every Python version.
    while not stop.wait(0.5):
        pass
    for s in servers:
        s.shutdown()
        s.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
