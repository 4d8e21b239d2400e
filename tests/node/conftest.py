"""Fixtures for tier 5 (DESIGN.md "Test tiers"): the container image, and a
real node (kubelet, containerd, CNI) running the DaemonSet from it.

Like the other root tiers it fails, never skips, when it cannot run: a
skipped tier reads as a passing one.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.netns.agent import stale_pin_dirs
from tests.netns.topo import Topology, exit_on_signals


@pytest.fixture(scope="session", autouse=True)
def node_preconditions() -> None:
    if os.geteuid() != 0:
        pytest.fail("tests/node need root (namespaces, BPF, containers): run `sudo make node`", pytrace=False)
    missing = [t for t in ("podman", "nsenter", "ip", "tc") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"tests/node need {', '.join(missing)}: run `make deps`", pytrace=False)
    exit_on_signals()
    Topology.cleanup_stale()
    for d in stale_pin_dirs():
        shutil.rmtree(d, ignore_errors=True)
