"""Host clients: the cgroup socket programs (ebpf/host_sock.c) attached as
pinned BPF links, the node's network namespace written for them, and the
connected UDP sockets of removed backends destroyed.

Processes in the node's own network namespace (the kubelet, hostNetwork
pods, node agents) are served at connect() and sendmsg() time by programs
attached to a cgroup v2 directory: by default the root of the node's cgroup
v2 hierarchy, where every process lives. Each program is attached by a BPF
link pinned under `<pin dir>/links/`: the link, not the agent, holds the
attachment, so a stopped or killed agent leaves host clients served, and a
new agent adopts the pinned link and swaps its program in one step
(BPF_LINK_UPDATE: no moment without a program). `sliceproxy uninstall`
detaches and unpins them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass

from . import abi
from .libbpf import BPFError, check, ffi, lib
from .maps import Map

log = logging.getLogger("sliceproxy.host")

LINKS_DIR = "links"  # under the pin directory
SO_NETNS_COOKIE = 71  # include/uapi/asm-generic/socket.h
# Where the agent mounts a cgroup v2 hierarchy when the node has none mounted.
FALLBACK_CGROUP2 = "/run/sliceproxy/cgroup2"
CGROUP2_SUPER_MAGIC = 0x63677270
BPF_LINK_TYPE_CGROUP = 3

# Attach type numbers (enum bpf_attach_type) named for people.
ATTACH_NAMES = {
    10: "connect4",
    11: "connect6",
    14: "sendmsg4",
    15: "sendmsg6",
    19: "recvmsg4",
    20: "recvmsg6",
    29: "getpeername4",
    30: "getpeername6",
}


class HostClientsError(BPFError):
    """Host clients cannot be served here (no cgroup v2, a refused attach)."""


def netns_cookie() -> int:
    """The cookie of this process's network namespace: the one the programs
    compare a socket's with (bpf_get_netns_cookie)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int(struct.unpack("=Q", raw)[0])


def cgroup2_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points of cgroup v2 hierarchies, in mount order."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                out.append(left.split()[4].replace("\\040", " "))
    return out


def _mount_cgroup2(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    os.makedirs(path, exist_ok=True)
    if libc.mount(b"cgroup2", path.encode(), b"cgroup2", 0, None) != 0:
        err = ctypes.get_errno()
        raise HostClientsError(err, f"mounting a cgroup v2 hierarchy at {path}: {os.strerror(err)}")


def default_cgroup() -> str:
    """The root of the node's cgroup v2 hierarchy: its mount point (found in
    /proc/self/mountinfo), or, with none mounted, one mounted now at
    FALLBACK_CGROUP2. Logged either way."""
    mounts = cgroup2_mounts()
    if mounts:
        log.info("host clients: cgroup v2 hierarchy mounted at %s", mounts[0])
        return mounts[0]
    _mount_cgroup2(FALLBACK_CGROUP2)
    log.info("host clients: no cgroup v2 hierarchy was mounted; mounted one at %s", FALLBACK_CGROUP2)
    return FALLBACK_CGROUP2


def check_cgroup(path: str) -> int:
    """A cgroup v2 directory's id (its inode), or HostClientsError naming
    the path: the programs attach to cgroup v2 only."""
    if not os.path.isdir(path):
        raise HostClientsError(errno.ENOENT, f"--cgroup {path}: no such directory")
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(120)  # struct statfs
    if libc.statfs(path.encode(), buf) != 0:
        err = ctypes.get_errno()
        raise HostClientsError(err, f"--cgroup {path}: {os.strerror(err)}")
    if struct.unpack_from("=q", buf.raw)[0] != CGROUP2_SUPER_MAGIC:
        raise HostClientsError(errno.EINVAL, f"--cgroup {path} is not in a cgroup v2 hierarchy")
    return os.stat(path).st_ino


def write_host_config(maps: dict[str, Map], cookie: int) -> None:
    """sp_host: the network namespace whose sockets the programs serve (0:
    none; the programs then leave every socket alone)."""
    maps[abi.map_name("sp_host")].update(abi.u32(0), abi.pack("sp_host_cfg", netns_cookie=cookie))


def read_host_config(maps: dict[str, Map]) -> int:
    m = maps.get(abi.map_name("sp_host"))
    raw = m.lookup(abi.u32(0)) if m is not None else None
    return int(abi.unpack("sp_host_cfg", raw)["netns_cookie"]) if raw else 0


# -- links -------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkInfo:
    program: str  # the pin's name: the program it was made for
    link_id: int
    prog_id: int
    prog_name: str
    attach_type: str
    cgroup_id: int


def links_dir(pin_dir: str) -> str:
    return os.path.join(pin_dir, LINKS_DIR)


def _link_info(fd: int) -> tuple[int, int, int, int]:
    """(link id, program id, cgroup id, attach type) of a cgroup link."""
    info = ffi.new("struct bpf_link_info_cgroup *")
    size = ffi.new("__u32 *", ffi.sizeof("struct bpf_link_info_cgroup"))
    check(lib().bpf_obj_get_info_by_fd(fd, info, size), "reading a link's info")
    if info.type != BPF_LINK_TYPE_CGROUP:
        raise HostClientsError(errno.EINVAL, f"link {info.id} is not a cgroup link")
    return info.id, info.prog_id, info.cgroup_id, info.attach_type


def _prog_name(prog_id: int) -> str:
    fd = lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return ""
    try:
        info = ffi.new("struct bpf_prog_info_head *")
        size = ffi.new("__u32 *", ffi.sizeof("struct bpf_prog_info_head"))
        if lib().bpf_obj_get_info_by_fd(fd, info, size) < 0:
            return ""
        return ffi.string(info.name).decode(errors="replace")
    finally:
        os.close(fd)


def create_link(prog_fd: int, attach_type: int, cgroup_fd: int, what: str) -> int:
    """A new BPF link of the program to the cgroup: its fd (the link lives
    while an fd or a pin holds it)."""
    fd = lib().bpf_link_create(prog_fd, cgroup_fd, attach_type, ffi.NULL)
    if fd < 0:
        err = -fd if fd != -1 else ffi.errno
        raise HostClientsError(err, f"attaching {what}: {os.strerror(err)}")
    return int(fd)


def attach_links(pin_dir: str, cgroup: str, progs: dict[str, tuple[int, int]]) -> dict[str, str]:
    """Attach each program (name -> (fd, attach type)) to cgroup by a
    link pinned as <pin dir>/links/<name>, in the order given (the reverse
    translations first). A link already pinned there on this cgroup is
    adopted: its program is swapped for the new one in place. One pinned on
    another cgroup (--cgroup changed) is replaced: the new link is made
    first, then the old one detached, so a socket in both is never without
    one. Returns what was done per program ("adopted", "attached",
    "moved")."""
    cg_id = check_cgroup(cgroup)
    d = links_dir(pin_dir)
    os.makedirs(d, exist_ok=True)
    done = {}
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name, (prog_fd, attach_type) in progs.items():
            path = os.path.join(d, name)
            old = lib().bpf_obj_get(path.encode()) if os.path.exists(path) else -1
            try:
                if old >= 0:
                    _, _, old_cg, old_type = _link_info(old)
                    if old_cg == cg_id and old_type == attach_type:
                        check(lib().bpf_link_update(old, prog_fd, ffi.NULL), f"updating the link {path}")
                        done[name] = "adopted"
                        continue
                new = create_link(prog_fd, attach_type, cg_fd, f"{name} to cgroup {cgroup}")
                try:
                    if old >= 0:
                        lib().bpf_link_detach(old)
                        os.unlink(path)
                    check(lib().bpf_obj_pin(new, path.encode()), f"pinning the link {path}")
                finally:
                    os.close(new)  # the pin holds the link now
                done[name] = "moved" if old >= 0 else "attached"
            finally:
                if old >= 0:
                    os.close(old)
    finally:
        os.close(cg_fd)
    return done


# The pins of links, detached in this order: the programs that hand out
# backends first, so no socket gets one that could not be named back.
def _detach_order(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: (0 if ("connect" in n or "sendmsg" in n) else 1, n))


def detach_links(pin_dir: str) -> int:
    """Detach every link pinned under <pin dir>/links and remove the pins;
    returns how many."""
    d = links_dir(pin_dir)
    if not os.path.isdir(d):
        return 0
    n = 0
    for name in _detach_order(os.listdir(d)):
        path = os.path.join(d, name)
        fd = lib().bpf_obj_get(path.encode())
        if fd >= 0:
            try:
                lib().bpf_link_detach(fd)
            finally:
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        n += 1
    with contextlib.suppress(OSError):
        os.rmdir(d)
    return n


def list_links(pin_dir: str) -> list[LinkInfo]:
    """The links pinned under <pin dir>/links, as the kernel has them."""
    d = links_dir(pin_dir)
    out = []
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else ():
        fd = lib().bpf_obj_get(os.path.join(d, name).encode())
        if fd < 0:
            continue
        try:
            link_id, prog_id, cg_id, at = _link_info(fd)
        except BPFError:
            continue
        finally:
            os.close(fd)
        out.append(LinkInfo(name, link_id, prog_id, _prog_name(prog_id), ATTACH_NAMES.get(at, str(at)), cg_id))
    return out


def cgroup_path(cgroup_id: int, roots: list[str] | None = None) -> str | None:
    """The directory of a cgroup v2 id (its inode) under the mounted
    hierarchies, or None."""
    for root in roots if roots is not None else cgroup2_mounts():
        with contextlib.suppress(OSError):
            if os.stat(root).st_ino == cgroup_id:
                return root
        for top, dirs, _ in os.walk(root):
            for dname in dirs:
                p = os.path.join(top, dname)
                with contextlib.suppress(OSError):
                    if os.stat(p).st_ino == cgroup_id:
                        return p
    return None
