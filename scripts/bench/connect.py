#!/usr/bin/env python3
"""Client and server for the first-packet latency figure; stdlib only, run
inside the pods' namespaces.

  connect.py serve --ports 8080-8089
      Listen on every port; accept, send one byte, close. Prints "ready".
  connect.py connect --target IP:PORT --count N [--warmup W]
      N new TCP connections one after another; for each, the time connect()
      took (SYN out, SYN-ACK back: the first packet of a flow through the
      service NAT and its reply) and the time to the server's first byte.
      Each socket closes with RST (SO_LINGER 0) so no TIME_WAIT piles up.
      Prints JSON: {"connect_us": [...], "ttfb_us": [...], "errors": n}.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import struct
import sys
import time


def serve(ports: list[int]) -> None:
    sel = selectors.DefaultSelector()
    for p in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", p))
        s.listen(1024)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            try:
                c, _ = key.fileobj.accept()  # type: ignore[union-attr]
            except OSError:
                continue
            try:
                c.send(b"x")
            except OSError:
                pass
            c.close()


def connect(host: str, port: int, count: int, warmup: int, timeout: float) -> dict:
    conn, ttfb, errors, samples = [], [], 0, []
    streak = 0
    linger = struct.pack("ii", 1, 0)
    for k in range(warmup + count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.settimeout(timeout)
        try:
            t0 = time.perf_counter_ns()
            s.connect((host, port))
            t1 = time.perf_counter_ns()
            if not s.recv(1):
                raise ConnectionError("closed before the first byte")
            t2 = time.perf_counter_ns()
            if k >= warmup:
                conn.append((t1 - t0) / 1000)
                ttfb.append((t2 - t0) / 1000)
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
            s.close()
    return {"connect_us": conn, "ttfb_us": ttfb, "errors": errors, "error_samples": samples}


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
    a = ap.parse_args()
    if a.cmd == "serve":
        lo, _, hi = a.ports.partition("-")
        serve(list(range(int(lo), int(hi or lo) + 1)))
        return 0
    host, _, port = a.target.rpartition(":")
    print(json.dumps(connect(host, int(port), a.count, a.warmup, a.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
