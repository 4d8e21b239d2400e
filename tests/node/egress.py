"""The API server's way to the test nodes: an HTTP CONNECT proxy on a Unix
socket that dials inside one network namespace.

kube-apiserver reaches kubelets (logs, exec, port-forward) and pods (the
proxy subresource) at their addresses in 198.18.0.0/15, which exist only in
the test's namespaces; the API server itself stays on the machine's
loopback. Its egress selector ("cluster", HTTPConnect over a Unix socket)
sends those connections here, and this process opens them from inside the
given namespace (the nodes' shared LAN), so no route or address is ever
added to the machine's own namespace.

Run as a process: `python egress.py SOCKET NETNS_PATH`. Prints `ready` once
listening. Refuses targets outside the test ranges.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
from pathlib import Path

ALLOWED = (ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:db8::/32"))

# Run as a script: the cluster tier's forwarder gives setns and the byte pump.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.harness.nsforward import pump, setns  # noqa: E402


def read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    """The request head up to the blank line, and whatever followed it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk or len(buf) > 65536:
            raise OSError("no complete CONNECT request")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def serve(conn: socket.socket, netns_fd: int, lock: threading.Lock) -> None:
    try:
        head, rest = read_head(conn)
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        host, _, port = target.rpartition(":")
        addr = ipaddress.ip_address(host.strip("[]"))
        if method != "CONNECT" or not any(addr in net for net in ALLOWED):
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            conn.close()
            return
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        # A socket belongs to the namespace it is created in: switch, make
        # it, switch back (one thread at a time: setns is per thread, but
        # the lock keeps the dance simple to reason about).
        with lock:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                setns(netns_fd)
                up = socket.socket(family, socket.SOCK_STREAM)
            finally:
                setns(home)
                os.close(home)
        up.settimeout(10)
        up.connect((str(addr), int(port)))
        up.settimeout(None)
    except (OSError, ValueError) as e:
        try:
            conn.sendall(f"HTTP/1.1 502 Bad Gateway\r\n\r\n{e}".encode())
        except OSError:
            pass
        conn.close()
        return
    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    if rest:
        up.sendall(rest)
    for a, b in ((conn, up), (up, conn)):
        threading.Thread(target=pump, args=(a, b), daemon=True).start()


def main(sock_path: str, ns_path: str) -> None:
    netns_fd = os.open(ns_path, os.O_RDONLY)
    lock = threading.Lock()
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(128)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn, netns_fd, lock), daemon=True).start()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
