#!/usr/bin/env python3
"""A tiny client for netns tests and the demo: counts which backend answered.

  client.py http --target IP:PORT --count N [--timeout S]
      N sequential HTTP GETs, each on a NEW TCP connection (so each one is a
      new flow the load balancer places afresh).
  client.py udp --target IP:PORT --count N [--timeout S] [--size BYTES]
      N datagrams, each from a NEW socket (so a new source port, a new flow).
  client.py echo --target IP:PORT --count N [--interval S] [--timeout S]
      N lines over ONE TCP connection to the servers.py line-echo port, a
      line every S seconds: an established flow, for "keeps its backend
      while the service changes" tests. After an error it reconnects, so the
      report shows how many lines failed and how many connections it took.

Prints one JSON object on stdout (the default; --json says so explicitly):

  {"counts": {"backend-1": 97, ...}, "errors": 0, "error_samples": [...],
   "mode": "http", "target": "198.19.0.10:80", "requests": 300,
   "client_ips_seen": ["198.18.1.2"]}

``client_ips_seen`` (http only) is the source address each backend saw, to
check that service NAT kept the client's address. ``--text`` prints a
readable histogram instead. Timeouts are short (1 s) so a black-holed flow
is counted as an error, never a hang. Exit status is 0 whenever the run
happened, whatever the errors; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections import Counter
from typing import Any

MAX_SAMPLES = 5


def parse_target(text: str) -> tuple[str, int, socket.AddressFamily]:
    """'198.19.0.10:80' or '[2001:db8::10]:80' -> (host, port, family)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        fam = socket.AF_INET6
    else:
        host, sep, port = text.rpartition(":")
        fam = socket.AF_INET
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"target {text!r} is not IP:PORT or [IPv6]:PORT")
    return host, int(port), fam


class Tally:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.errors = 0
        self.samples: list[str] = []
        self.client_ips: set[str] = set()

    def error(self, i: int, what: str) -> None:
        self.errors += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(f"request {i}: {what}")


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def recv_all(sock: socket.socket, deadline: float) -> bytes:
    """Read until the server closes, bounded by a deadline for the whole
    response (a per-recv timeout alone could be extended by a trickle)."""
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("response not complete before the deadline")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def run_http(host: str, port: int, fam: socket.AddressFamily, count: int, timeout: float) -> Tally:
    t = Tally()
    hostport = f"[{host}]:{port}" if fam == socket.AF_INET6 else f"{host}:{port}"
    request = f"GET / HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n".encode()
    for i in range(count):
        deadline = time.monotonic() + timeout
        try:
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect((host, port))
                s.sendall(request)
                raw = recv_all(s, deadline)
        except OSError as e:
            t.error(i, describe(e))
            continue
        head, sep, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if not sep or len(status) < 2 or status[1] != "200":
            t.error(i, f"bad response {raw[:80]!r}")
            continue
        name = body.decode(errors="replace").strip()
        if not name:
            t.error(i, "empty body")
            continue
        t.counts[name] += 1
        for line in lines[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "x-peer":
                # "ip:port" or "::ffff:ip:port": drop the port, unmap v4.
                ip = value.strip().rsplit(":", 1)[0].removeprefix("::ffff:")
                t.client_ips.add(ip)
    return t


def run_udp(host: str, port: int, fam: socket.AddressFamily, count: int, timeout: float, size: int = 0) -> Tally:
    t = Tally()
    for i in range(count):
        # --size: padded to that many bytes (a big datagram leaves in fragments).
        payload = f"req-{i}".encode().ljust(size, b".")
        try:
            # A new socket per datagram: a new source port, hence a new flow.
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                # connect() so an ICMP unreachable surfaces as an error here
                # right away, and replies from any other address are ignored.
                s.connect((host, port))
                s.send(payload)
                reply = s.recv(65536)
        except OSError as e:
            t.error(i, describe(e))
            continue
        name, _, echoed = reply.partition(b" ")
        if echoed != payload:
            t.error(i, f"reply {reply[:80]!r} does not echo {payload!r}")
            continue
        t.counts[name.decode(errors="replace")] += 1
    return t


def run_echo(
    host: str, port: int, fam: socket.AddressFamily, count: int, timeout: float, interval: float
) -> tuple[Tally, int]:
    t = Tally()
    sock: socket.socket | None = None
    rfile = None
    connections = 0
    try:
        for i in range(count):
            if i:
                time.sleep(interval)
            line = f"line-{i}"
            try:
                if sock is None:
                    sock = socket.create_connection((host, port), timeout=timeout)
                    sock.settimeout(timeout)
                    rfile = sock.makefile("rb")
                    connections += 1
                assert rfile is not None
                sock.sendall(line.encode() + b"\n")
                reply = rfile.readline()
                if not reply:
                    raise ConnectionError("connection closed by peer")
            except OSError as e:
                t.error(i, describe(e))
                # Reconnect for the next line: the count of connections in
                # the report shows whether the flow survived.
                if sock is not None:
                    sock.close()
                sock = rfile = None
                continue
            name, _, echoed = reply.decode(errors="replace").rstrip("\n").partition(" ")
            if echoed != line:
                t.error(i, f"reply {reply[:80]!r} does not echo {line!r}")
                continue
            t.counts[name] += 1
    finally:
        if sock is not None:
            sock.close()
    return t, connections


def histogram(counts: dict[str, int], total: int, width: int = 40) -> str:
    """Readable bars; also used by the demo, so keep the format stable."""
    if not counts:
        return "  (no answers)"
    top = max(counts.values()) or 1
    namew = max(len(n) for n in counts)
    rows = []
    for name in sorted(counts):
        n = counts[name]
        bar = "#" * round(width * n / top)
        pct = 100.0 * n / total if total else 0.0
        rows.append(f"  {name:<{namew}}  {n:>5}  {pct:5.1f}%  {bar}".rstrip())
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("http", "udp", "echo"))
    ap.add_argument("--target", required=True, type=parse_target, help="IP:PORT or [IPv6]:PORT")
    ap.add_argument("--count", type=int, default=1, help="number of requests (default 1)")
    ap.add_argument("--timeout", type=float, default=1.0, help="seconds per request (default 1)")
    ap.add_argument("--size", type=int, default=0, help="udp mode: pad each datagram to this many bytes")
    ap.add_argument("--interval", type=float, default=0.1, help="echo mode: seconds between lines (default 0.1)")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON (the default)")
    out.add_argument("--text", action="store_true", help="print a readable histogram instead of JSON")
    args = ap.parse_args(argv)
    if args.count < 0:
        ap.error("--count must be >= 0")
    host, port, fam = args.target

    shown = f"[{host}]:{port}" if fam == socket.AF_INET6 else f"{host}:{port}"
    result: dict[str, Any] = {"mode": args.mode, "target": shown, "requests": args.count}
    if args.mode == "http":
        t = run_http(host, port, fam, args.count, args.timeout)
        result["client_ips_seen"] = sorted(t.client_ips)
    elif args.mode == "udp":
        t = run_udp(host, port, fam, args.count, args.timeout, args.size)
    else:
        t, connections = run_echo(host, port, fam, args.count, args.timeout, args.interval)
        result["connections"] = connections
    result.update(counts=dict(sorted(t.counts.items())), errors=t.errors, error_samples=t.samples)

    if args.text:
        print(f"{args.mode} {result['target']}: {args.count} requests, {t.errors} errors")
        print(histogram(result["counts"], args.count))
        for s in t.samples:
            print(f"  error: {s}")
    else:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
