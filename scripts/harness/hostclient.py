#!/usr/bin/env python3
"""A host-network client for tests: run in the node's network namespace, it
first moves itself into a test cgroup (--cgroup: the one the host clients'
programs are attached to), then talks to a Service with real sockets and
reports what it saw as JSON.

  hostclient.py --cgroup DIR cookie
      {"netns_cookie": N}: this network namespace's cookie (SO_NETNS_COOKIE).
  hostclient.py --cgroup DIR http --target IP:PORT --count N
      N HTTP GETs to servers.py, each on a new TCP connection; "peers" are
      what getpeername() said for each.
  hostclient.py --cgroup DIR udp --target IP:PORT --count N
      N datagrams, each from a new connected UDP socket (getpeername too).
  hostclient.py --cgroup DIR udp-unconnected --target IP:PORT --count N
      N datagrams from ONE unconnected socket (sendto/recvfrom): "sources"
      are the addresses the answers came from, as recvfrom() gave them.
  hostclient.py --cgroup DIR resolver --target IP:PORT --count N [--interval S]
      A resolver: ONE connected UDP socket, a request and its answer per
      round; on an error it records the error, connects a new socket and
      goes on. "answers" lists who answered each round, "errors" the
      errors in order.
  hostclient.py --cgroup DIR connect --target IP:PORT
      One TCP connect(): {"errno": "ECONNREFUSED"} or {"errno": null}.

http and resolver stop after N requests, or when --stop-file exists, and
append each answer to --progress-file as it comes. Answers are counted by the name servers.py puts in them ("counts");
errors by errno name ("errors", "error_samples"). Stdlib only.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import struct
import sys
import time
from collections import Counter
from typing import Any

SO_NETNS_COOKIE = 71


def parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def fam(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def err_name(e: BaseException) -> str:
    if isinstance(e, socket.timeout | TimeoutError):
        return "timeout"
    if isinstance(e, OSError) and e.errno is not None:
        return errno.errorcode.get(e.errno, str(e.errno))
    return type(e).__name__


def shown(addr: tuple[Any, ...]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Report:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self.peers: Counter[str] = Counter()

    def as_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "errors": len(self.errors),
            "error_samples": self.errors[:10],
            "peers": dict(self.peers),
        }


class Progress:
    """--progress-file: one line per answer, who gave it, as it comes (a
    test follows a running client); --stop-file: stop once it exists; both
    bounded by --max-seconds."""

    def __init__(self, progress_file: str | None, stop_file: str | None, max_seconds: float) -> None:
        self.f = open(progress_file, "a", buffering=1) if progress_file else None  # noqa: SIM115
        self.stop_file = stop_file
        self.deadline = time.monotonic() + max_seconds

    def answered(self, name: str) -> None:
        if self.f is not None:
            self.f.write(name + "\n")

    def stop(self) -> bool:
        return bool(self.stop_file and os.path.exists(self.stop_file)) or time.monotonic() > self.deadline


def run_http(host: str, port: int, count: int, timeout: float, progress: Progress) -> dict[str, Any]:
    r = Report()
    for _ in range(count):
        if progress.stop():
            break
        try:
            with socket.socket(fam(host), socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect((host, port))
                r.peers[shown(s.getpeername())] += 1
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            body = data.split(b"\r\n\r\n", 1)[1].decode().strip()
            r.counts[body] += 1
            progress.answered(body)
        except (OSError, IndexError) as e:
            r.errors.append(err_name(e))
    return r.as_dict()


def run_udp(host: str, port: int, count: int, timeout: float) -> dict[str, Any]:
    r = Report()
    for i in range(count):
        try:
            with socket.socket(fam(host), socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.connect((host, port))
                r.peers[shown(s.getpeername())] += 1
                s.send(f"q{i}".encode())
                r.counts[s.recv(2048).decode().split()[0]] += 1
        except OSError as e:
            r.errors.append(err_name(e))
    return r.as_dict()


def run_udp_unconnected(host: str, port: int, count: int, timeout: float) -> dict[str, Any]:
    r = Report()
    sources: Counter[str] = Counter()
    with socket.socket(fam(host), socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for i in range(count):
            try:
                s.sendto(f"q{i}".encode(), (host, port))
                data, src = s.recvfrom(2048)
                sources[shown(src)] += 1
                r.counts[data.decode().split()[0]] += 1
            except OSError as e:
                r.errors.append(err_name(e))
    return r.as_dict() | {"sources": dict(sources)}


def run_resolver(
    host: str, port: int, count: int, timeout: float, interval: float, progress: Progress
) -> dict[str, Any]:
    answers: list[str] = []
    errors: list[str] = []
    sockets = 0
    s: socket.socket | None = None
    try:
        for i in range(count):
            if progress.stop():
                break
            try:
                if s is None:
                    s = socket.socket(fam(host), socket.SOCK_DGRAM)
                    s.settimeout(timeout)
                    s.connect((host, port))
                    sockets += 1
                s.send(f"q{i}".encode())
                answers.append(s.recv(2048).decode().split()[0])
                progress.answered(answers[-1])
            except OSError as e:
                errors.append(err_name(e))
                if s is not None:
                    s.close()
                s = None
            time.sleep(interval)
    finally:
        if s is not None:
            s.close()
    return {"answers": answers, "errors": errors, "sockets": sockets}


def run_connect(host: str, port: int, timeout: float) -> dict[str, Any]:
    with socket.socket(fam(host), socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
        except OSError as e:
            return {"errno": err_name(e)}
        return {"errno": None, "peer": shown(s.getpeername())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cgroup", help="cgroup v2 directory to move this process into first")
    ap.add_argument("mode", choices=("cookie", "http", "udp", "udp-unconnected", "resolver", "connect"))
    ap.add_argument("--target", type=parse_target)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--interval", type=float, default=0.05, help="resolver: seconds between rounds")
    ap.add_argument("--stop-file", help="http, resolver: stop once this file exists")
    ap.add_argument("--progress-file", help="http, resolver: append who answered, a line per answer")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="http, resolver: stop after this long at most")
    args = ap.parse_args(argv)
    if args.cgroup:
        with open(os.path.join(args.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    if args.mode == "cookie":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            out: dict[str, Any] = {
                "netns_cookie": struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
            }
    elif args.target is None:
        ap.error("--target is required")
    else:
        host, port = args.target
        progress = Progress(args.progress_file, args.stop_file, args.max_seconds)
        if args.mode == "http":
            out = run_http(host, port, args.count, args.timeout, progress)
        elif args.mode == "udp":
            out = run_udp(host, port, args.count, args.timeout)
        elif args.mode == "udp-unconnected":
            out = run_udp_unconnected(host, port, args.count, args.timeout)
        elif args.mode == "resolver":
            out = run_resolver(host, port, args.count, args.timeout, args.interval, progress)
        else:
            out = run_connect(host, port, args.timeout)
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
