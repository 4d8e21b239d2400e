"""Attach the tc program to interfaces with netlink (pyroute2).

One clsact qdisc per interface and one bpf filter at ingress with a fixed
priority and handle that belong to sliceproxy: attaching again replaces our
filter in place (a restart swaps the program without a gap and never stacks
a second copy); filters of other tools are left alone.
"""

from __future__ import annotations

import errno
import fnmatch
import logging

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("sliceproxy.attach")

# clsact ingress: TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
INGRESS_PARENT = 0xFFFFFFF2
PRIO = 0x5350  # "SP": our slot among tc filters on the hook
HANDLE = 1
FILTER_NAME = "sliceproxy"


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


def attach(ifname: str, prog_fd: int) -> None:
    """Attach (or replace) our program at the interface's tc ingress."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        ipr.tc(
            "replace-filter",
            "bpf",
            idx,
            HANDLE,
            fd=prog_fd,
            name=FILTER_NAME,
            parent=INGRESS_PARENT,
            classid=1,
            direct_action=True,
            prio=PRIO,
        )


def attached_program(ifname: str) -> str | None:
    """Name of the program our filter runs on this interface, or None."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        try:
            filters = ipr.get_filters(idx, parent=INGRESS_PARENT)
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
    """Remove our filter; the clsact qdisc stays if others use it."""
    with IPRoute() as ipr:
        try:
            idx = _index(ipr, ifname)
            ipr.tc("del-filter", "bpf", idx, HANDLE, parent=INGRESS_PARENT, prio=PRIO)
        except (NetlinkError, LookupError) as e:
            if isinstance(e, LookupError) or e.code in (errno.ENOENT, errno.EINVAL):
                return False
            raise
    return True


class Attacher:
    """Keeps the program attached to every interface matching the patterns,
    including interfaces that appear later (pods come and go)."""

    def __init__(self, patterns: list[str], prog_fd: int):
        self.patterns = patterns
        self.prog_fd = prog_fd
        self.done: set[tuple[str, int]] = set()

    def refresh(self) -> list[str]:
        """Attach to new matching interfaces; returns the ones attached now."""
        new = []
        with IPRoute() as ipr:
            links = [(link.get_attr("IFLA_IFNAME"), link["index"]) for link in ipr.get_links()]
        live = {(n, i) for n, i in links if n in match_interfaces(self.patterns, [n for n, _ in links])}
        for name, idx in sorted(live - self.done):
            try:
                attach(name, self.prog_fd)
            except (NetlinkError, LookupError) as e:
                log.error("attaching to interface %s failed: %s", name, e)
                continue
            log.info("attached to interface %s", name)
            self.done.add((name, idx))
            new.append(name)
        self.done &= live
        return new
