"""Destroy the node's connected UDP sockets to a backend that went away.

A host client's connected UDP socket (a resolver) was given its backend at
connect() time (ebpf/host_sock.c): nothing on the way translates its
datagrams, so when the backend leaves, the socket would keep sending into
the void. kube-proxy clears netfilter's UDP conntrack entries of a removed
endpoint for the same reason. Here the socket itself is destroyed with
sock_diag's SOCK_DESTROY (the kernel's CONFIG_INET_DIAG_DESTROY): its next
send or receive fails with ECONNABORTED, and a client that connects again
gets a serving backend.

The sockets are found with a sock_diag dump of connected UDP sockets in the
agent's network namespace (the node's: this netlink socket's), filtered by
destination address and port, then destroyed one by one by their full
identity (addresses, ports, interface, cookie), as `ss -K` does.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Iterable

log = logging.getLogger("sliceproxy.host")

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_ESTABLISHED = 1  # a connected UDP socket's state

_NLMSG = struct.Struct("=IHHII")
# struct inet_diag_req_v2: family, protocol, ext, pad, states, then
# struct inet_diag_sockid: sport, dport (network order), src[16], dst[16],
# if, cookie[2].
_REQ = struct.Struct("=BBBxI")
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_REST = struct.Struct("=I8s")  # interface, cookie: host order
SOCKID_LEN = _SOCKID.size + _SOCKID_REST.size
# struct inet_diag_msg: family, state, timer, retrans, then the sockid.
_MSG = struct.Struct("=BBBB")


def _request(msg_type: int, flags: int, family: int, states: int, sockid: bytes, seq: int) -> bytes:
    body = _REQ.pack(family, socket.IPPROTO_UDP, 0, states) + sockid
    return _NLMSG.pack(_NLMSG.size + len(body), msg_type, flags, seq, 0) + body


def _messages(data: bytes):
    off = 0
    while off + _NLMSG.size <= len(data):
        length, mtype, _, seq, _ = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size:
            return
        yield mtype, seq, data[off + _NLMSG.size : off + length]
        off += (length + 3) & ~3


def _dump(sk: socket.socket, family: int, seq: int) -> list[bytes]:
    """The identities (raw sockids) of the connected UDP sockets of family."""
    sk.send(
        _request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, family, 1 << TCP_ESTABLISHED, bytes(SOCKID_LEN), seq)
    )
    out: list[bytes] = []
    while True:
        data = sk.recv(1 << 16)
        for mtype, mseq, payload in _messages(data):
            if mseq != seq:
                continue
            if mtype == NLMSG_DONE:
                return out
            if mtype == NLMSG_ERROR:
                err = -struct.unpack_from("=i", payload)[0]
                raise OSError(err, f"sock_diag dump: {os.strerror(err)}")
            if mtype == SOCK_DIAG_BY_FAMILY and len(payload) >= _MSG.size + SOCKID_LEN:
                out.append(payload[_MSG.size : _MSG.size + SOCKID_LEN])


def _dest(family: int, sockid: bytes) -> tuple[bytes, int]:
    """A dumped socket's destination in map form (16 bytes, IPv4-mapped)."""
    _, dport, _, dst = _SOCKID.unpack_from(sockid)
    if family == socket.AF_INET:
        return b"\0" * 10 + b"\xff\xff" + dst[:4], dport
    return dst, dport


def destroy_udp(backends: Iterable[tuple[bytes, int]]) -> int:
    """Destroy every connected UDP socket of this network namespace whose
    destination is one of backends ((address in map form, port)); returns
    how many were destroyed. Raises OSError when sock_diag is unusable."""
    wanted = set(backends)
    if not wanted:
        return 0
    families = {socket.AF_INET6}  # an AF_INET6 socket can reach either family
    if any(a[:12] == b"\0" * 10 + b"\xff\xff" for a, _ in wanted):
        families.add(socket.AF_INET)
    n = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as sk:
        seq = 1
        for family in sorted(families):
            seq += 1
            doomed = [sid for sid in _dump(sk, family, seq) if _dest(family, sid) in wanted]
            for sid in doomed:
                seq += 1
                sk.send(_request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, family, 0xFFFFFFFF, sid, seq))
                err = _ack(sk, seq)
                if err == 0:
                    n += 1
                elif err != errno.ENOENT:  # closed meanwhile: nothing to do
                    raise OSError(err, f"sock_diag destroy: {os.strerror(err)}")
    return n


def _ack(sk: socket.socket, seq: int) -> int:
    while True:
        for mtype, mseq, payload in _messages(sk.recv(1 << 16)):
            if mseq == seq and mtype == NLMSG_ERROR:
                return -struct.unpack_from("=i", payload)[0]
