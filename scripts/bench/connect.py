#!/usr/bin/env python3
"""Client and server for the latency figures; stdlib only, run inside the
test's namespaces (a pod's, or the node's for a host client).

  connect.py serve --ports 8080-8089
      Listen on every port; on accept, send one byte (the digit of the
      port's place in the range: which backend answered), then echo what
      the client sends until it closes. Prints "ready".
  connect.py connect --target IP:PORT --count N [--warmup W] [--echo] [--cgroup DIR]
      N new TCP connections one after another; for each, the time connect()
      took (SYN out, SYN-ACK back: the first packet of a flow through the
      service NAT and its reply) and the time to the server's first byte.
      With --echo (the host clients' figure), the client then sends one
      byte and waits for it back, and closes: "echo_us" is connect() to the
      echoed byte, "total_us" to the return of close(). Each socket closes
      with RST (SO_LINGER 0) so no TIME_WAIT piles up. --cgroup: move into
      that cgroup v2 directory first (where the host clients' programs
      are attached). Prints JSON: {"connect_us": [...], "ttfb_us": [...],
      "echo_us": [...], "total_us": [...], "backends": {digit: n},
      "errors": n}.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import struct
import sys
import time


def serve(ports: list[int]) -> None:
    sel = selectors.DefaultSelector()
    for k, p in enumerate(ports):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", p))
        s.listen(1024)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, str(k % 10).encode())
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if key.data is None:  # an accepted connection: echo until the client closes
                try:
                    data = sock.recv(4096)  # type: ignore[union-attr]
                    if data:
                        sock.send(data)  # type: ignore[union-attr]
                        continue
                except OSError:
                    pass
                sel.unregister(sock)
                sock.close()
                continue
            try:
                c, _ = sock.accept()  # type: ignore[union-attr]
            except OSError:
                continue
            try:
                c.send(key.data)
            except OSError:
                c.close()
                continue
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ, None)


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def connect(host: str, port: int, count: int, warmup: int, timeout: float, echo: bool) -> dict:
    conn: list[float] = []
    ttfb: list[float] = []
    echoed: list[float] = []
    total: list[float] = []
    backends: dict[str, int] = {}
    errors, samples, streak = 0, [], 0
    linger = struct.pack("ii", 1, 0)
    for k in range(warmup + count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.settimeout(timeout)
        closed = False
        try:
            t0 = time.perf_counter_ns()
            s.connect((host, port))
            t1 = time.perf_counter_ns()
            first = _recv_exactly(s, 1)
            t2 = time.perf_counter_ns()
            if echo:
                s.sendall(b"e")
                if _recv_exactly(s, 1) != b"e":
                    raise ConnectionError("the server echoed something else")
                t3 = time.perf_counter_ns()
                s.close()
                closed = True
                t4 = time.perf_counter_ns()
            if k >= warmup:
                conn.append((t1 - t0) / 1000)
                ttfb.append((t2 - t0) / 1000)
                if echo:
                    echoed.append((t3 - t0) / 1000)
                    total.append((t4 - t0) / 1000)
                b = first.decode(errors="replace")
                backends[b] = backends.get(b, 0) + 1
            streak = 0
        except OSError as e:
            errors += 1
            streak += 1
            if len(samples) < 3:
                samples.append(f"{type(e).__name__}: {e}")
            if streak >= 5:  # the path is broken: say so now, not after N timeouts
                samples.append(f"stopped after {streak} failures in a row")
                break
        finally:
            if not closed:
                s.close()
    return {
        "connect_us": conn,
        "ttfb_us": ttfb,
        "echo_us": echoed,
        "total_us": total,
        "backends": backends,
        "errors": errors,
        "error_samples": samples,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--ports", required=True, help="first-last")
    c = sub.add_parser("connect")
    c.add_argument("--target", required=True)
    c.add_argument("--count", type=int, default=500)
    c.add_argument("--warmup", type=int, default=20)
    c.add_argument("--timeout", type=float, default=2.0)
    c.add_argument("--echo", action="store_true", help="send a byte, wait for its echo, close: all timed")
    c.add_argument("--cgroup", help="cgroup v2 directory to move into first")
    a = ap.parse_args()
    if a.cmd == "serve":
        lo, _, hi = a.ports.partition("-")
        serve(list(range(int(lo), int(hi or lo) + 1)))
        return 0
    if a.cgroup:
        with open(f"{a.cgroup}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
    host, _, port = a.target.rpartition(":")
    print(json.dumps(connect(host, int(port), a.count, a.warmup, a.timeout, a.echo)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
