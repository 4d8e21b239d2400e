"""Addresses in the 16-byte form the maps store (ebpf/sliceproxy.h): IPv4
as ::ffff:a.b.c.d, so one key layout serves both families. The Kubernetes
objects carry it (an endpoint's address is converted once, when its slice
is parsed) and the dataplane writes it as it is."""

from __future__ import annotations

import socket

V4_PREFIX = b"\x00" * 10 + b"\xff\xff"


def addr16(ip: str) -> bytes:
    """16-byte map form of an address: IPv4 as ::ffff:a.b.c.d. Raises ValueError."""
    if ":" in ip:
        return socket.inet_pton(socket.AF_INET6, ip)
    return V4_PREFIX + socket.inet_pton(socket.AF_INET, ip)


def addr_str(a: bytes) -> str:
    """Inverse of addr16, for people."""
    if a[:12] == V4_PREFIX:
        return socket.inet_ntop(socket.AF_INET, a[12:])
    return socket.inet_ntop(socket.AF_INET6, a)


def is_v4(a: bytes) -> bool:
    return a[:12] == V4_PREFIX


def hostport(addr: bytes, port: int) -> str:
    """198.18.1.1:80, or [2001:db8::1]:80, for people."""
    a = addr_str(addr)
    return f"{a}:{port}" if is_v4(addr) else f"[{a}]:{port}"
