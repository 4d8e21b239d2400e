"""`sliceproxy uninstall`: detach the programs (tc filters, the XDP
program of external interfaces, the taps of `sliceproxy trace`, the host
clients' cgroup links) and remove the pins."""

from __future__ import annotations

import logging
import os
import shutil

from .parser import globs

log = logging.getLogger("sliceproxy")


def cmd_uninstall(args) -> int:
    uninstall((globs(args.interfaces) + globs(args.external_interfaces)) or ["*"], args.pin_dir)
    return 0


def uninstall(patterns: list[str], pin_dir: str, lock=None) -> None:
    """Detach our filter from matching interfaces and remove the pins.
    Refused while an agent holds the pin directory (it would rewrite what
    was removed), unless `lock` is that agent's own (--cleanup-on-exit)."""
    from ..dataplane import attach, hostclients, loader, trace

    own = None
    if lock is None and os.path.isdir(pin_dir):
        try:
            own = loader.lock_pin_dir(pin_dir, create=False)
        except loader.PinDirBusy as e:
            raise loader.PinDirBusy(
                e.errno, f"{e.strerror}: stop that agent first. Nothing was detached or removed"
            ) from None
    try:
        # Host clients first: their links live in the pin directory.
        links = hostclients.detach_links(pin_dir)
        if links:
            log.info("detached %d host client links", links)
        # A trace's taps (one killed outright leaves them): they name this
        # pin directory and read its maps.
        taps = trace.detach_taps(pin_dir, patterns)
        if taps:
            log.info("detached %d trace taps", taps)
        n = 0
        for ifname in attach.match_interfaces(patterns):
            # XDP first: it hands packets on to the tc filters.
            if attach.xdp_detach(ifname):
                log.info("detached the XDP program from %s", ifname)
            if attach.detach(ifname):
                log.info("detached from %s", ifname)
                n += 1
        if os.path.isdir(pin_dir):
            # Unlinking a pin drops the map once no program uses it.
            shutil.rmtree(pin_dir)
            log.info("removed pins in %s", pin_dir)
        log.info("uninstalled: detached from %d interfaces", n)
    finally:
        if own is not None:
            own.release()
