"""Attach the tc programs to interfaces with netlink (pyroute2).

One clsact qdisc per interface and one bpf filter at each of ingress (DNAT)
and egress (reverse NAT), with a fixed priority and handle that belong to
sliceproxy: attaching again replaces our filters in place (a restart swaps
the programs without a gap and never stacks a second copy); filters of
other tools are left alone.
"""

from __future__ import annotations

import errno
import fnmatch
import logging

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("sliceproxy.attach")

# clsact hooks: TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS)
INGRESS_PARENT = 0xFFFFFFF2
EGRESS_PARENT = 0xFFFFFFF3
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


class Attacher:
    """Keeps the program attached to every interface matching the patterns,
    including interfaces that appear later (pods come and go)."""

    def __init__(
        self, patterns: list[str], prog_fd: int, egress_fd: int | None = None, exclude: list[str] | None = None
    ):
        self.patterns = patterns
        self.prog_fd = prog_fd
        self.egress_fd = egress_fd
        # Interfaces another Attacher owns (the external ones): never ours,
        # even if our patterns match them too.
        self.exclude = exclude or []
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
        self.done &= live
        return new
