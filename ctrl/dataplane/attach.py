"""Attach the tc programs to interfaces with netlink (pyroute2), and the
XDP program to the external ones (libbpf).

One clsact qdisc per interface and one bpf filter at each of ingress (DNAT)
and egress (reverse NAT), with a fixed priority and handle that belong to
sliceproxy: attaching again replaces our filters in place (a restart swaps
the programs without a gap and never stacks a second copy); filters of
other tools are left alone.

An interface holds one XDP program: ours (named sp_ext_xdp) is replaced in
place, in the mode asked for; another tool's is left alone, and the
interface keeps tc alone (docs/semantics.md, "XDP"). Like the tc filters,
an attached XDP program outlives the agent; `sliceproxy uninstall`, or a
start with --xdp off, removes it. The interfaces that run it in native
mode are listed in the device map sp_uplinks (by ifindex): where the XDP
program may redirect a frame whose route leaves by another of them. A
generic-mode interface is left out: a frame redirected from a native hook
is handed to the target driver's own XDP transmit path, which a driver
without native XDP lacks (the frame would be lost), so flows towards it
stay with tc.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import abi
from .libbpf import ffi, lib
from .maps import Map

log = logging.getLogger("sliceproxy.attach")

# clsact hooks: TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS)
INGRESS_PARENT = 0xFFFFFFF2
EGRESS_PARENT = 0xFFFFFFF3
PRIO = 0x5350  # "SP": our slot among tc filters on the hook
HANDLE = 1
FILTER_NAME = "sliceproxy"

# XDP attach modes (XDP_FLAGS_* of linux/if_link.h): the driver's own hook
# (native), or the kernel's generic one after the skb is built.
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
XDP_PROG_NAME = "sp_ext_xdp"  # the kernel keeps the first 15 bytes of a name


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"interface {ifname} does not exist")
    return found[0]


def list_interfaces() -> list[str]:
    with IPRoute() as ipr:
        return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]


def match_interfaces(patterns: list[str], names: list[str] | None = None) -> list[str]:
    """Interfaces whose name matches any glob pattern (never lo)."""
    names = list_interfaces() if names is None else names
    return sorted(n for n in names if n != "lo" and any(fnmatch.fnmatchcase(n, p) for p in patterns))


def attach(ifname: str, prog_fd: int, egress_fd: int | None = None) -> None:
    """Attach (or replace) our programs at the interface's tc ingress and,
    given egress_fd, egress. Egress first: a reply must never meet a DNATed
    flow's interface without its reverse NAT."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        hooks = ([(EGRESS_PARENT, egress_fd)] if egress_fd is not None else []) + [(INGRESS_PARENT, prog_fd)]
        for parent, fd in hooks:
            ipr.tc(
                "replace-filter",
                "bpf",
                idx,
                HANDLE,
                fd=fd,
                name=FILTER_NAME,
                parent=parent,
                classid=1,
                direct_action=True,
                prio=PRIO,
            )


def attached_program(ifname: str, parent: int = INGRESS_PARENT) -> str | None:
    """Name of the program our filter runs on this interface's hook, or None."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        try:
            filters = ipr.get_filters(idx, parent=parent)
        except NetlinkError as e:
            if e.code in (errno.EINVAL, errno.ENOENT):
                return None
            raise
        for f in filters:
            opts = f.get_attr("TCA_OPTIONS")
            if f.get_attr("TCA_KIND") == "bpf" and opts and (f["info"] >> 16) == PRIO:
                return opts.get_attr("TCA_BPF_NAME")
    return None


def detach(ifname: str) -> bool:
    """Remove our filters; the clsact qdisc stays if others use it."""
    removed = False
    with IPRoute() as ipr:
        try:
            idx = _index(ipr, ifname)
        except LookupError:
            return False
        # Ingress first: no new flow is DNATed while replies still are.
        for parent in (INGRESS_PARENT, EGRESS_PARENT):
            try:
                ipr.tc("del-filter", "bpf", idx, HANDLE, parent=parent, prio=PRIO)
                removed = True
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.EINVAL):
                    raise
    return removed


class XDPError(OSError):
    """The XDP program could not be attached: the reason in words."""


def _prog_name(prog_id: int) -> str:
    fd = lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return f"id {prog_id}"
    try:
        info = ffi.new("struct bpf_prog_info_head *")
        size = ffi.new("__u32 *", ffi.sizeof("struct bpf_prog_info_head"))
        if lib().bpf_obj_get_info_by_fd(fd, info, size) < 0:
            return f"id {prog_id}"
        return ffi.string(info.name).decode(errors="replace")
    finally:
        os.close(fd)


def xdp_attached(ifname: str) -> tuple[str, str] | None:
    """(program name, mode) of the XDP program on the interface, or None."""
    try:
        idx = socket.if_nametoindex(ifname)
    except OSError:
        return None
    for mode, flags in XDP_MODES.items():
        pid = ffi.new("__u32 *")
        if lib().bpf_xdp_query_id(idx, flags, pid) == 0 and pid[0]:
            return _prog_name(pid[0]), mode
    return None


def xdp_attach(ifname: str, prog_fd: int, mode: str) -> str:
    """Attach (or replace) our XDP program on the interface: mode "native",
    "generic", or "auto" (native, else generic). Returns the mode it runs
    in; raises XDPError saying why when it cannot run (another tool's
    program there, or neither mode accepted)."""
    try:
        idx = socket.if_nametoindex(ifname)
    except OSError as e:
        raise XDPError(e.errno, f"interface {ifname} does not exist") from None
    cur = xdp_attached(ifname)
    if cur is not None and cur[0] != XDP_PROG_NAME:
        raise XDPError(errno.EBUSY, f"another XDP program ({cur[0]}, {cur[1]}) is attached there")
    tries = ["native", "generic"] if mode == "auto" else [mode]
    errors = []
    for m in tries:
        if cur is not None and cur[1] != m:
            # One program per interface: ours in the other mode goes first.
            lib().bpf_xdp_detach(idx, XDP_MODES[cur[1]], ffi.NULL)
            cur = None
        ret = lib().bpf_xdp_attach(idx, prog_fd, XDP_MODES[m], ffi.NULL)
        if ret == 0:
            return m
        err = -ret if ret != -1 else ffi.errno
        errors.append(f"{m}: {os.strerror(err)}")
    raise XDPError(errno.EOPNOTSUPP, "the kernel refused it (" + "; ".join(errors) + ")")


def xdp_detach(ifname: str) -> bool:
    """Remove our XDP program from the interface (another tool's stays)."""
    cur = xdp_attached(ifname)
    if cur is None or cur[0] != XDP_PROG_NAME:
        return False
    idx = socket.if_nametoindex(ifname)
    return lib().bpf_xdp_detach(idx, XDP_MODES[cur[1]], ffi.NULL) == 0


class Attacher:
    """Keeps the program attached to every interface matching the patterns,
    including interfaces that appear later (pods come and go); for the
    external interfaces, with xdp_fd, the XDP program too (xdp_mode: auto,
    native, generic; off: ours removed where an earlier agent left it),
    and with uplinks (the sp_uplinks device map) the list of interfaces
    that run it in native mode kept there: exactly those, whatever an
    earlier agent left in it."""

    def __init__(
        self,
        patterns: list[str],
        prog_fd: int,
        egress_fd: int | None = None,
        exclude: list[str] | None = None,
        xdp_fd: int | None = None,
        xdp_mode: str = "off",
        uplinks: Map | None = None,
    ):
        self.patterns = patterns
        self.prog_fd = prog_fd
        self.egress_fd = egress_fd
        # Interfaces another Attacher owns (the external ones): never ours,
        # even if our patterns match them too.
        self.exclude = exclude or []
        self.xdp_fd = xdp_fd
        self.xdp_mode = xdp_mode
        self.xdp: dict[str, str] = {}  # interface -> the XDP mode it runs in
        self.uplinks = uplinks
        self.uplinks_written: set[int] | None = None  # what sp_uplinks holds, once synced
        self.done: set[tuple[str, int]] = set()

    def refresh(self) -> list[str]:
        """Attach to new matching interfaces; returns the ones attached now."""
        new = []
        with IPRoute() as ipr:
            links = [(link.get_attr("IFLA_IFNAME"), link["index"]) for link in ipr.get_links()]
        names = [n for n, _ in links]
        mine = set(match_interfaces(self.patterns, names)) - set(match_interfaces(self.exclude, names))
        live = {(n, i) for n, i in links if n in mine}
        for name, idx in sorted(live - self.done):
            try:
                attach(name, self.prog_fd, self.egress_fd)
            except (NetlinkError, LookupError) as e:
                log.error("attaching to interface %s failed: %s", name, e)
                continue
            log.info("attached to interface %s", name)
            self.done.add((name, idx))
            new.append(name)
            if self.xdp_fd is not None:
                self._xdp(name)
        self.done &= live
        self.xdp = {n: m for n, m in self.xdp.items() if n in mine}
        want = {i for n, i in live if self.xdp.get(n) == "native"}
        if self.uplinks is not None and want != self.uplinks_written:
            self._sync_uplinks(want)
        return new

    def _sync_uplinks(self, want: set[int]) -> None:
        """sp_uplinks holds exactly the interfaces (ifindexes) that run our
        XDP program in native mode: added after the program is attached
        there, removed when it is not (an interface no longer matched,
        --xdp off or generic); the kernel itself drops an interface that
        disappears."""
        assert self.uplinks is not None
        try:
            have = {abi.U32.unpack(k)[0] for k, _ in self.uplinks.items()}
            for idx in sorted(have - want):
                self.uplinks.delete(abi.u32(idx))
            for idx in sorted(want - have):
                self.uplinks.update(abi.u32(idx), abi.u32(idx))
        except OSError as e:
            # XDP still serves these interfaces; it hands to tc the flows
            # it could have redirected between them.
            log.error("writing the XDP interfaces into map %s failed: %s", self.uplinks.name, e)
            return
        self.uplinks_written = want

    def _xdp(self, name: str) -> None:
        """XDP on one interface as xdp_mode says, after its tc filters (tc
        serves everything XDP passes on, so it must be there first)."""
        assert self.xdp_fd is not None
        # An interface of this name seen before (deleted, made again) runs
        # our XDP program only once attached anew.
        self.xdp.pop(name, None)
        if self.xdp_mode == "off":
            if xdp_detach(name):
                log.info("XDP off: removed the XDP program an earlier agent left on %s", name)
            return
        try:
            mode = xdp_attach(name, self.xdp_fd, self.xdp_mode)
        except OSError as e:
            log.warning("no XDP on interface %s (tc serves it alone): %s", name, e.strerror or e)
            return
        self.xdp[name] = mode
        log.info("XDP attached to interface %s (%s mode)", name, mode)
