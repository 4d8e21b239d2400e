"""Tier 5: a handful of Kubernetes' own Service e2e tests (e2e.test of the
pinned module, tests/node/e2e-quick.txt) against the session's node running
sliceproxy's DaemonSet, so a regression in Service semantics fails `make
test`. The whole list runs with `make e2e` (docs/conformance.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .e2e_run import read_list, run_e2e
from .kubenode import NodeCluster

pytestmark = pytest.mark.root

QUICK = Path(__file__).with_name("e2e-quick.txt")


def test_upstream_service_e2e_subset_passes(kube: NodeCluster, tmp_path: Path) -> None:
    names = read_list(QUICK)
    results = run_e2e(kube, names, tmp_path / "e2e", timeout=1800)
    bad = {n: r for n, r in results.items() if r["status"] != "passed"}
    assert not bad, "\n\n".join(f"{r['status']}: {n}\n{r['message'][:1500]}" for n, r in bad.items())
    assert set(results) == set(names)
