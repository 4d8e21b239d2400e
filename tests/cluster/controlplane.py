"""The cluster tier's control plane lives in scripts/harness/controlplane.py,
with the rest of the harness (docs/architecture.md), so that the bench
(scripts/bench/subsets.py) starts the same one; the tests import it from
here as before."""

from scripts.harness.controlplane import (  # noqa: F401
    SERVICE_CIDR,
    BinariesMissing,
    ControlPlane,
    ControlPlaneError,
    free_port,
    k8s_bin_dir,
    k8s_version,
    wait_until,
)
