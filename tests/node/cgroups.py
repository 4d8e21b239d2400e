"""Removing the cgroups a test's processes made (podman's conmon and
containers, the kubelet's kubepods tree) from every hierarchy.

The machine has the cgroup v1 hybrid layout: one tree per v1 controller
plus the unified one, and runc, conmon and the kubelet each make their
directories in all of them. A directory is removed children first, once no
process is left in it; a tree still holding processes is reported, not
forced.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def hierarchies() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 controllers and unified)."""
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            _dev, mnt, fstype, *_ = line.split()
            if fstype in ("cgroup", "cgroup2"):
                out.append(Path(mnt))
    return out


def remove_tree(rel: str, timeout: float = 20.0) -> list[str]:
    """rmdir ``rel`` (relative to each hierarchy's root) and everything under
    it, deepest first, retrying while processes finish exiting. Returns the
    directories that could not be removed (empty when all went)."""
    rel = rel.strip("/")
    if not rel or ".." in rel.split("/"):
        raise ValueError(f"refusing to remove cgroup {rel!r}")
    deadline = time.monotonic() + timeout
    while True:
        left: list[str] = []
        for h in hierarchies():
            top = h / rel
            if not top.is_dir():
                continue
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
                try:
                    os.rmdir(dirpath)
                except FileNotFoundError:
                    pass
                except OSError:
                    left.append(dirpath)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)
