"""Fixtures for the node tier (docs/architecture.md, "Test tiers"): the container image, and a
real node (kubelet, containerd, CNI) running the DaemonSet from it.

Like the other root tiers it fails, never skips, when it cannot run: a
skipped tier reads as a passing one.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator

import pytest

from scripts.harness.topo import Topology, exit_on_signals
from tests.netns.agent import stale_pin_dirs

from .images import image
from .kubenode import NodeCluster


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


@pytest.fixture(scope="session")
def kube() -> Iterator[NodeCluster]:
    """The control plane, one kubelet node in its own network namespace, and
    sliceproxy's DaemonSet from the image, Ready on it. Torn down at the end
    of the session, also after a failure."""
    cluster = NodeCluster(nodes=1)
    try:
        cluster.start(["sliceproxy", "agnhost"])
        cluster.deploy_sliceproxy(image("sliceproxy").ref)
        cluster.wait_agents_ready()
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()


_ns_counter = itertools.count(1)


@pytest.fixture
def kns(kube: NodeCluster) -> Iterator[str]:
    """A namespace of the test's own (labelled for the session's teardown),
    deleted after it."""
    name = f"t{os.getpid()}-{next(_ns_counter)}"
    kube.kubectl("create", "namespace", name)
    kube.kubectl("label", "namespace", name, "sliceproxy-test=1")
    kube.cp.wait_service_account(name)
    try:
        yield name
    finally:
        kube.kubectl("delete", "namespace", name, "--wait=false", check=False)
