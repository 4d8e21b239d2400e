"""Prometheus metrics on /metrics (default 127.0.0.1:10249, like kube-proxy).

Control-plane metrics keep kube-proxy's names where the meaning is the
same, so existing dashboards and alerts work unchanged. Dataplane metrics
are read from the kernel at scrape time: packet and byte counters per
verdict (summed over CPUs), entries and capacity of every map, conntrack
entries.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..dataplane.abi import counters, handoffs
from ..dataplane.abi import map_name as mn

# kube-proxy exports no *_created series; neither do we.
disable_created_metrics()

log = logging.getLogger("sliceproxy.metrics")

# kube-proxy's buckets: 1 ms doubling to about 16 s.
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# kube-proxy's network programming buckets: 0.25 s .. 5 min.
NPL_BUCKETS = (
    (0.25, 0.5)
    + tuple(float(s) for s in range(1, 60))
    + tuple(float(s) for s in range(60, 120, 5))
    + tuple(float(s) for s in range(120, 301, 30))
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, started_at: float | None = None):
        self.registry = registry or CollectorRegistry()
        # Wall-clock start, against which trigger times are compared.
        self.started_at = time.time() if started_at is None else started_at
        r = self.registry
        self.slice_mode = Gauge(
            "sliceproxy_endpointslice_mode",
            "1 for the EndpointSlices this agent watches: originals, or subsets of its zone " "(docs/subsetting.md)",
            ["mode"],
            registry=r,
        )
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.full_sync_duration = Histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.partial_sync_duration = Histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            registry=r,
        )
        self.last_queued = Gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            registry=r,
        )
        self.endpoint_changes = Counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes", "Cumulative proxy rules Endpoint changes", registry=r
        )
        self.endpoint_pending = Gauge(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes", registry=r
        )
        self.service_changes = Counter(
            "kubeproxy_sync_proxy_rules_service_changes", "Cumulative proxy rules Service changes", registry=r
        )
        self.service_pending = Gauge(
            "kubeproxy_sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes", registry=r
        )
        self.programming = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            buckets=NPL_BUCKETS,
            registry=r,
        )
        self.sync_failures = Counter(
            "sliceproxy_sync_failures",
            "Syncs whose batched map writes failed (the change is then written Service by Service)",
            registry=r,
        )
        self.map_differences = Counter(
            "sliceproxy_map_differences",
            "Map entries the periodic check found to differ from what the agent wrote (each check that finds"
            " some re-reads the maps and syncs in full)",
            registry=r,
        )
        self.rejected = Gauge(
            "sliceproxy_services_rejected",
            "Services not programmed because a map is full or a name does not fit",
            registry=r,
        )
        self.write_failing = Gauge(
            "sliceproxy_service_write_failing",
            "1 for each Service whose map writes failed and are retried with backoff",
            ["service"],
            registry=r,
        )
        self._failing: set[str] = set()
        self.no_local = Gauge(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of service ports with a Local traffic policy and no local endpoints",
            ["traffic_policy"],
            registry=r,
        )
        self.healthz = Counter("kubeproxy_proxy_healthz", "Cumulative proxy healthz HTTP status", ["code"], registry=r)

    # -- what the agent reports ---------------------------------------------
    def changes_seen(self, kind: str, n: int = 1) -> None:
        if kind == "EndpointSlice":
            self.endpoint_changes.inc(n)
        elif kind == "Service":
            self.service_changes.inc(n)

    def pending(self, endpoints: int, services: int, queued_at: float | None) -> None:
        self.endpoint_pending.set(endpoints)
        self.service_pending.set(services)
        if queued_at is not None:
            self.last_queued.set(queued_at)

    def synced(self, seconds: float, full: bool, at: float, rejected: int) -> None:
        self.sync_duration.observe(seconds)
        (self.full_sync_duration if full else self.partial_sync_duration).observe(seconds)
        self.last_sync.set(at)
        self.rejected.set(rejected)

    def failing(self, services: set[str]) -> None:
        """The Services whose writes fail now: a series each, gone when
        they are written again."""
        for s in self._failing - services:
            self.write_failing.remove(s)
        for s in services - self._failing:
            self.write_failing.labels(service=s).set(1)
        self._failing = set(services)

    def programmed(self, trigger_times: list[str], at: float) -> None:
        """Network programming latency of slices now in the maps, from the
        EndpointSlice controller's last-change-trigger-time annotation.

        As kube-proxy counts it: only changes made after the agent started
        (this registry's start, made with the agent: an older trigger time, listed
        after a restart, would measure the restart, not the change), and
        none from the future (clock skew). Compared to the second: the
        trigger time is a Pod condition's lastTransitionTime, which the API
        keeps in whole seconds, so a change in the second the agent started
        counts."""
        since = math.floor(self.started_at)
        for t in trigger_times:
            try:
                ts = datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
            if since <= ts <= at:
                self.programming.observe(at - ts)


class DataplaneCollector:
    """Reads the kernel maps at scrape time."""

    def __init__(self, maps: dict):
        self.maps = maps

    def collect(self):
        pk = CounterMetricFamily(
            "sliceproxy_packets", "Packets seen by the tc program, per verdict", labels=["verdict"]
        )
        by = CounterMetricFamily("sliceproxy_bytes", "Bytes seen by the tc program, per verdict", labels=["verdict"])
        try:
            for verdict, c in counters(self.maps).items():
                pk.add_metric([verdict], c["packets"])
                by.add_metric([verdict], c["bytes"])
        except OSError as e:
            log.warning("reading the counters failed: %s", e)
        yield pk
        yield by
        ho = CounterMetricFamily(
            "sliceproxy_xdp_handoffs",
            "Packets the external interfaces' tc ingress translated as the XDP program decided (its handoff)",
        )
        try:
            ho.add_metric([], handoffs(self.maps)["packets"])
        except OSError as e:
            log.warning("reading the handoff counter failed: %s", e)
        yield ho
        entries = GaugeMetricFamily("sliceproxy_map_entries", "Entries in each BPF map", labels=["map"])
        cap = GaugeMetricFamily("sliceproxy_map_capacity", "max_entries of each BPF map", labels=["map"])
        ct = None
        for name, m in sorted(self.maps.items()):
            if name in (mn("sp_sock"), mn("sp_trace"), mn("sp_events")):
                # Socket-local storage: neither listable nor sized; the
                # trace's per-CPU state and ring buffer: no entries to count.
                continue
            cap.add_metric([name], m.max_entries)
            if name in (mn("sp_stats"), mn("sp_handoff")):
                continue
            try:
                n = m.count()
            except OSError as e:
                log.warning("counting map %s failed: %s", name, e)
                continue
            entries.add_metric([name], n)
            if name == mn("sp_ct"):
                ct = n
        yield entries
        yield cap
        if ct is not None:
            g = GaugeMetricFamily("sliceproxy_conntrack_entries", "Flows in the conntrack map (both directions)")
            g.add_metric([], ct)
            yield g


def serve(metrics: Metrics, address: str, maps: dict | None) -> None:
    host, _, port = address.rpartition(":")
    if maps is not None:
        metrics.registry.register(DataplaneCollector(maps))
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=metrics.registry)
    log.info("serving /metrics on %s", address)
