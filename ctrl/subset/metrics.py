"""The subsetter's /metrics (prometheus-client, as the agent's): subset
slices written, how far they lag behind the originals, whether this
replica leads. CPU time is prometheus-client's process_cpu_seconds_total."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

log = logging.getLogger("sliceproxy.subsetter")

LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        ProcessCollector(registry=r)
        self.writes = Counter(
            "sliceproxy_subsetter_writes_total",
            "Subset EndpointSlices written, by operation (create, update, delete)",
            ["op"],
            registry=r,
        )
        self.original_changes = Counter(
            "sliceproxy_subsetter_original_changes_total",
            "Changes of original EndpointSlices seen (adds, updates, relists)",
            registry=r,
        )
        self.lag = Histogram(
            "sliceproxy_subsetter_lag_seconds",
            "From a change of a Service's originals (or Nodes) being seen to its subset slices written",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.lag_now = Gauge(
            "sliceproxy_subsetter_pending_lag_seconds",
            "Age of the oldest change not yet written to subset slices (0: caught up)",
            registry=r,
        )
        self.leader = Gauge("sliceproxy_subsetter_leader", "1 while this replica holds the Lease", registry=r)


def serve(metrics: Metrics, address: str) -> None:
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=metrics.registry)
    log.info("serving /metrics on %s", address)
