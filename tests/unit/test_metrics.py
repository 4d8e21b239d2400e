from datetime import UTC, datetime

import pytest
from prometheus_client import generate_latest

from ctrl.runtime.metrics import Metrics


def value(m: Metrics, name: str) -> float:
    return m.registry.get_sample_value(name) or 0.0


@pytest.mark.parametrize(
    "triggers,expect_count",
    [
        pytest.param(["2026-01-01T00:00:00Z"], 1, id="one-slice"),
        pytest.param(["2026-01-01T00:00:00Z", "not a time"], 1, id="bad-annotation-ignored"),
        pytest.param(["2099-01-01T00:00:00Z"], 0, id="future-ignored-clock-skew"),
        pytest.param([], 0, id="none"),
    ],
)
def test_network_programming_latency_from_trigger_time(triggers, expect_count):
    m = Metrics(started_at=datetime(2025, 12, 31, tzinfo=UTC).timestamp())
    at = datetime(2026, 1, 1, 0, 0, 3, tzinfo=UTC).timestamp()
    m.programmed(triggers, at)
    assert value(m, "kubeproxy_network_programming_duration_seconds_count") == expect_count
    if expect_count:
        assert value(m, "kubeproxy_network_programming_duration_seconds_sum") == pytest.approx(3.0)


def test_network_programming_latency_ignores_changes_from_before_the_start():
    # kube-proxy's rule (pkg/proxy EndpointsChangeTracker): a slice whose
    # trigger time is older than the process measures the restart, not the
    # change; a restarted agent relisting 1,000 slices must not put 1,000
    # observations of hours into the SLI. Changes after the start count,
    # and so does one stamped with the start's second (trigger times are
    # whole seconds: a Pod condition's lastTransitionTime).
    start = datetime(2026, 1, 1, 0, 0, 1, 500000, tzinfo=UTC).timestamp()
    m = Metrics(started_at=start)
    at = datetime(2026, 1, 1, 0, 0, 3, tzinfo=UTC).timestamp()
    m.programmed(["2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z", "2026-01-01T00:00:02.5Z"], at)
    assert value(m, "kubeproxy_network_programming_duration_seconds_count") == 2
    assert value(m, "kubeproxy_network_programming_duration_seconds_sum") == pytest.approx(2.0 + 0.5)


def test_kube_proxy_metric_names_are_exposed():
    m = Metrics()
    m.changes_seen("EndpointSlice", 2)
    m.synced(0.004, full=False, at=1000.0, rejected=0)
    text = generate_latest(m.registry).decode()
    for name in (
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds 1000.0",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total 2.0",
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    ):
        assert name in text, name
