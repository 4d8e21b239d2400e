"""Forward a TCP port from inside a network namespace to the same port on
this namespace's loopback, so an agent running in a test's node namespace
reaches the kube-apiserver the test started on the machine's 127.0.0.1.

Run as a process: `python nsforward.py /run/netns/NODE PORT`. It creates
its listening socket inside the node namespace, then switches back, so the
connections it opens go to the real loopback; a socket keeps the namespace
it was created in. Prints `ready` once listening. Only loopback on both
sides: nothing leaves the machine.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


T = TypeVar("T")


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def in_netns(path: str, fn: Callable[[], T]) -> T:
    """fn() in a thread of its own that entered the network namespace at
    path (setns moves only the calling thread, which then ends: never back
    in the machine's namespace by mistake); its result, or its exception
    raised again here."""
    box: dict[str, Any] = {}

    def body() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            setns(fd)
            box["r"] = fn()
        except BaseException as e:  # raised again in the caller's thread
            box["e"] = e
        finally:
            os.close(fd)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["r"]


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main(ns_path: str, port: int) -> None:
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(ns_path, os.O_RDONLY)
    setns(target)
    lo = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lo.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lo.bind(("127.0.0.1", port))
    lo.listen(64)
    setns(home)
    print("ready", flush=True)
    while True:
        conn, _ = lo.accept()
        try:
            up = socket.create_connection(("127.0.0.1", port), timeout=5)
            up.settimeout(None)
        except OSError:
            conn.close()  # apiserver down (a restart test): the client retries
            continue
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
