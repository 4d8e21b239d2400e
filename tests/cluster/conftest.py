"""Fixtures for tier 4 (docs/architecture.md, "Test tiers"): one real control plane
(etcd, kube-apiserver, kube-controller-manager) on loopback per session.

The binaries come from `make k8s`. When they are missing the tests fail,
on purpose, instead of skipping: a skipped tier reads as a passing one.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from scripts.harness.controlplane import ControlPlane, ControlPlaneError

_ns_counter = itertools.count(1)


@pytest.fixture(scope="session")
def controlplane() -> Iterator[ControlPlane]:
    try:
        cp = ControlPlane()
        cp.start()
    except ControlPlaneError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def namespace(controlplane: ControlPlane) -> Iterator[str]:
    """A fresh namespace whose default ServiceAccount exists (so Pods are
    admitted), deleted after the test."""
    name = f"t{os.getpid()}-{next(_ns_counter)}"
    controlplane.ok("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    controlplane.wait_service_account(name)
    try:
        yield name
    finally:
        # No kubelet confirms a graceful Pod deletion, so Pods would sit
        # terminating (and the namespace with them) until the pod GC finds
        # their Node gone: delete them at once. The rest finishes in the
        # background (namespace controller); the next test uses another name.
        controlplane.request("DELETE", f"/api/v1/namespaces/{name}/pods?gracePeriodSeconds=0")
        controlplane.request("DELETE", f"/api/v1/namespaces/{name}")
