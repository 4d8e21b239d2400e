"""A cgroup v2 directory of a test's own, for the host clients' programs.

Tests never attach anything to the machine's root cgroup, where every
process of the machine lives: each makes a child cgroup named after its
topology (`sliceproxy-test-<prefix>-<random>`), attaches the programs
there (`sliceproxy run --cgroup`), and runs its host clients in it
(scripts/harness/hostclient.py moves itself in). At the end the processes
left in it are killed and the directory removed, also when the test fails;
a session killed outright is cleaned up by the next one (cleanup_stale),
never a live run's.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import time
from pathlib import Path

from .topo import Topology

PREFIX = "sliceproxy-test-"
_STALE_RE = re.compile(re.escape(PREFIX) + r"(sp[0-9a-f]{6})-[0-9a-f]+$")


def cgroup2_root() -> Path:
    """The machine's cgroup v2 mount point (the first in mountinfo)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return Path(left.split()[4])
    raise RuntimeError("no cgroup v2 hierarchy is mounted: the host client tests need one")


class TestCgroup:
    """A child cgroup of the cgroup v2 root, removed by cleanup()."""

    __test__ = False  # not a pytest class

    def __init__(self, owner: str) -> None:
        self.path = cgroup2_root() / f"{PREFIX}{owner}-{secrets.token_hex(3)}"
        self.path.mkdir()

    def __enter__(self) -> TestCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def cleanup(self) -> None:
        remove(self.path)


def remove(path: Path, timeout: float = 10.0) -> None:
    """Kill what runs in the cgroup, then remove it."""
    if not path.exists():
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # the killed processes are leaving the cgroup


def cleanup_stale() -> list[Path]:
    """Remove test cgroups whose topology's owner is gone (killed runs)."""
    out = []
    try:
        root = cgroup2_root()
    except RuntimeError:
        return out
    for d in root.glob(PREFIX + "sp*"):
        m = _STALE_RE.match(d.name)
        if m and d.is_dir() and not Topology.prefix_is_live(m.group(1)):
            remove(d)
            out.append(d)
    return out
