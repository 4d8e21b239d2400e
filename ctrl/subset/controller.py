"""`sliceproxy subsetter`: keeps every Service's subset slices equal to what
ctrl.subset.compute derives from its original slices and the Nodes' zones
(docs/subsetting.md).

It watches Services, the original EndpointSlices, the subset slices it
owns and the Nodes through ctrl.k8s.kube's list and watch, and, while it
holds the Lease (ctrl.k8s.lease.Elector), creates, updates and deletes
subset slices so that they match. Writes are coalesced: a slice written
less than `write_period` ago waits for the rest of that period, and then
gets the latest content (changes to one slice faster than that cost one
write per period), unless the write gives the zone an endpoint to use
(compute.gains: a new Pod's address is not held back, and carries the
removals waiting with it); and all writes together are bounded by a token bucket
(`write_qps`, `write_burst`), so a hint rebalance that touches every
subset slice at once is spread out, not sent in one burst. After its first complete pass
as leader it marks the Lease synced: agents switch to subsets only then.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..k8s.events import Event
from ..k8s.kube import ORIGINALS_SELECTOR, PROXY_SELECTOR, SLICES_PATH, Client, KubeSource, Resource
from ..k8s.lease import Elector
from ..k8s.objects import MANAGED_BY_LABEL, SUBSET_MANAGER, Endpoint, EndpointSlice, Node, Service, parse
from .compute import Group, gains, holds, render, subset_plan, zones_of

log = logging.getLogger("sliceproxy.subsetter")

OWNED_SELECTOR = f"{MANAGED_BY_LABEL}={SUBSET_MANAGER}"


def watched() -> list[Resource]:
    return [
        Resource("Service", "/api/v1/services", PROXY_SELECTOR),
        Resource("EndpointSlice", SLICES_PATH, ORIGINALS_SELECTOR, name="originals"),
        Resource("EndpointSlice", SLICES_PATH, OWNED_SELECTOR, name="subsets"),
        Resource("Node", "/api/v1/nodes"),
    ]


@dataclass
class Options:
    lease_namespace: str = "kube-system"
    lease_name: str = "sliceproxy-subsetter"
    identity: str = ""
    lease_duration: float = 15.0
    renew_period: float = 5.0
    write_period: float = 0.05  # removals: at most one write per subset slice this often
    write_qps: float = 50.0  # writes a second, all slices together (0: no bound)
    write_burst: int = 100  # ... after this many at once


class Budget:
    """A token bucket over all the subsetter's writes: `burst` at once, then
    `rate` a second. The per-slice write period coalesces a hot slice; this
    bounds what a hint rebalance (every subset slice of many Services at
    once) asks of the API server, as client-go's QPS and burst do for
    Kubernetes' own controllers."""

    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst = rate, max(1, burst)
        self.tokens, self.stamp = float(self.burst), now

    def _fill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> bool:
        if self.rate <= 0:
            return True
        self._fill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def ready_at(self, now: float) -> float:
        """When take() will next succeed."""
        self._fill(now)
        return now + max(0.0, 1.0 - self.tokens) / self.rate


class Subsetter:
    def __init__(
        self,
        client: Client,
        source,
        elector: Elector,
        opts: Options,
        metrics=None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.client, self.source, self.elector, self.opts = client, source, elector, opts
        self.metrics = metrics
        self.clock = clock
        self.services: dict[str, Service] = {}
        self.originals: dict[str, dict[str, EndpointSlice]] = {}  # service key -> name -> slice
        self.owned: dict[str, dict[str, EndpointSlice]] = {}  # service key -> name -> subset slice
        self.nodes: dict[str, Node] = {}
        self.zones: dict[str, frozenset[str]] = {}
        self.dirty: set[str] = set()
        self.slice_home: dict[str, tuple[str, str]] = {}  # "ns/name" -> ("owned"|"originals", service key)
        self.held_until: dict[str, float] = {}  # service key -> its next write may not be before
        self.dirty_since: dict[str, float] = {}  # service key -> first unwritten change
        self.last_write: dict[str, float] = {}  # "ns/name" -> when
        self.wake_at: float | None = None
        self.stop_event = threading.Event()
        self.synced_once = False
        self.writes = 0
        self.budget = Budget(opts.write_qps, opts.write_burst, clock())

    # -- what the watches say ---------------------------------------------
    def take(self, events: list[Event]) -> None:
        now = self.clock()
        nodes_changed = False
        for ev in events:
            if ev.kind == "Service":
                if ev.op == "delete":
                    self.services.pop(ev.key, None)
                else:
                    assert isinstance(ev.obj, Service)
                    self.services[ev.key] = ev.obj
                self._dirty(ev.key, now)
            elif ev.kind == "Node":
                nodes_changed = True
                if ev.op == "delete":
                    self.nodes.pop(ev.key, None)
                else:
                    assert isinstance(ev.obj, Node)
                    self.nodes[ev.key] = ev.obj
            elif ev.kind == "EndpointSlice":
                self._slice(ev, now)
        if nodes_changed:
            zones = zones_of(self.nodes.values())
            if zones != self.zones:
                self.zones = zones
                for key in set(self.services) | set(self.owned):
                    self._dirty(key, now)

    def _slice(self, ev: Event, now: float) -> None:
        # One "ns/name" is an original or ours, filed under one Service:
        # take it out of where it was, then file it where its labels say.
        home = self.slice_home.pop(ev.key, None)
        name = ev.key.split("/", 1)[1]
        if home is not None:
            index = self.owned if home[0] == "owned" else self.originals
            names = index.get(home[1], {})
            names.pop(name, None)
            if not names:
                index.pop(home[1], None)
            self._dirty(home[1], now)
        if ev.op == "delete":
            return
        sl = ev.obj
        assert isinstance(sl, EndpointSlice)
        if sl.labels.get(MANAGED_BY_LABEL) == SUBSET_MANAGER:
            key = sl.subset_service_key
            if key is not None:
                self.owned.setdefault(key, {})[sl.name] = sl
                self.slice_home[ev.key] = ("owned", key)
                self._dirty(key, now)
            return
        if sl.service_key is not None:
            self.originals.setdefault(sl.service_key, {})[sl.name] = sl
            self.slice_home[ev.key] = ("originals", sl.service_key)
            self._dirty(sl.service_key, now)
            if self.metrics is not None:
                self.metrics.original_changes.inc()

    def _wake(self, at: float) -> None:
        self.wake_at = at if self.wake_at is None else min(self.wake_at, at)

    def _dirty(self, key: str, now: float) -> None:
        self.dirty.add(key)
        self.dirty_since.setdefault(key, now)

    # -- writing ------------------------------------------------------------
    def reconcile(self) -> bool:
        """Write what the dirty Services need, as far as coalescing allows;
        True when nothing is left to write."""
        now = self.clock()
        self.wake_at = None
        done = True
        if len(self.last_write) > 4096:  # forget writes too old to hold anything back
            self.last_write = {k: t for k, t in self.last_write.items() if now - t < self.opts.write_period}
        for key in sorted(self.dirty):
            due = self.held_until.get(key)
            if due is not None and now < due and not self._gains(key):
                # Written less than write_period ago: its changes gather
                # until then (one write per slice per period).
                self._wake(due)
                done = False
                continue
            self.held_until.pop(key, None)
            if self._reconcile(key, now):
                self.dirty.discard(key)
                since = self.dirty_since.pop(key, None)
                if since is not None and self.metrics is not None:
                    self.metrics.lag.observe(max(0.0, self.clock() - since))
            else:
                done = False
        if self.metrics is not None:
            oldest = min(self.dirty_since.values(), default=None)
            self.metrics.lag_now.set(0.0 if oldest is None else self.clock() - oldest)
        return done

    def _gains(self, key: str) -> bool:
        """Whether a held Service's subsets now gain an endpoint (then its
        write goes now, see compute.gains); cheap next to the write."""
        svc = self.services.get(key)
        if svc is None or not svc.uid:
            return False
        have = self.owned.get(key, {})
        mine = [s for s in have.values() if svc.uid in s.owner_uids]
        want = subset_plan(svc, self.originals.get(key, {}).values(), self.zones, mine)
        return any(gains(have.get(name), eps) for name, (_, eps) in want.items())

    def _reconcile(self, key: str, now: float) -> bool:
        svc = self.services.get(key)
        have = self.owned.get(key, {})
        if svc is None or not svc.uid:
            want: dict[str, tuple[Group, list[Endpoint]]] = {}
        else:
            # Slices of an older Service of the same name are not ours to
            # pack around: their ownerReference names another uid.
            mine = [s for s in have.values() if svc.uid in s.owner_uids]
            want = subset_plan(svc, self.originals.get(key, {}).values(), self.zones, mine)
        ns = key.split("/", 1)[0]
        complete = True
        for name in sorted(set(want) | set(have)):
            planned = want.get(name)
            cur = have.get(name)
            if planned is not None and cur is not None and svc is not None and holds(cur, svc, *planned):
                continue
            full = f"{ns}/{name}"
            last = self.last_write.get(full)
            urgent = planned is not None and gains(cur, planned[1])
            if last is not None and now - last < self.opts.write_period and not urgent:
                due = last + self.opts.write_period
                self.held_until[key] = max(self.held_until.get(key, due), due)
                self._wake(due)
                complete = False
                continue
            if not self.elector.leader:
                return False
            if not self.budget.take(self.clock()):
                due = self.budget.ready_at(self.clock())
                self.held_until[key] = max(self.held_until.get(key, due), due)
                self._wake(due)
                return False
            raw = None if planned is None or svc is None else render(svc, planned[0], name, planned[1])
            if not self._write(ns, name, raw, cur, key):
                complete = False
            self.last_write[full] = now
        return complete

    def _write(self, ns: str, name: str, raw: dict | None, cur: EndpointSlice | None, key: str) -> bool:
        path = f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
        try:
            if raw is None:
                op = "delete"
                status, doc = self.client.send("DELETE", f"{path}/{name}")
                ok = status in (200, 202, 404)
            elif cur is None:
                op = "create"
                status, doc = self.client.send("POST", path, raw)
                if status == 409:  # there already, not seen yet
                    op = "update"
                    status, doc = self.client.send("PUT", f"{path}/{name}", raw)
                ok = status in (200, 201)
            else:
                op = "update"
                status, doc = self.client.send("PUT", f"{path}/{name}", raw)
                if status == 404:
                    op = "create"
                    status, doc = self.client.send("POST", path, raw)
                ok = status in (200, 201)
        except Exception as e:  # network: retried with the next pass
            log.warning("%s EndpointSlice %s: writing failed: %s", key, name, e)
            self._wake(self.clock() + 1.0)
            return False
        if not ok:
            msg = doc.get("message") if isinstance(doc, dict) else doc
            log.error("%s Service: subset slice %s: %s failed: HTTP %s %s", key, name, op, status, msg)
            self._wake(self.clock() + 1.0)
            return False
        self.writes += 1
        if self.metrics is not None:
            self.metrics.writes.labels(op=op).inc()
        bucket = self.owned.setdefault(key, {})
        if op == "delete":
            bucket.pop(name, None)
            if not bucket:
                self.owned.pop(key, None)
        elif isinstance(doc, dict):
            bucket[name] = parse(doc | {"kind": "EndpointSlice"})  # type: ignore[assignment]
        log.debug("%s Service: subset slice %s: %s", key, name, op)
        return True

    # -- the loop -------------------------------------------------------------
    def run(self) -> None:
        next_renew = 0.0
        while not self.stop_event.is_set():
            now = self.clock()
            if now >= next_renew:
                was = self.elector.leader
                leading = self.elector.step()
                if self.metrics is not None:
                    self.metrics.leader.set(1 if leading else 0)
                if leading and not was:
                    # A new leader checks every Service once: what the last
                    # one left half written is finished.
                    self.synced_once = False
                    self.dirty |= set(self.services) | set(self.owned)
                next_renew = now + self.opts.renew_period
            timeout = max(0.0, min(next_renew, self.wake_at or next_renew) - self.clock())
            try:
                self.take(self.source.events.get(timeout=min(timeout, 0.5)))
                while True:
                    self.take(self.source.events.get_nowait())
            except queue.Empty:
                pass
            if not self.source.synced or not self.elector.leader:
                continue
            if not self.dirty:
                continue
            complete = self.reconcile()
            if complete and not self.synced_once:
                self.synced_once = True
                self.elector.synced = True
                log.info("every subset slice written (%d Services); marking the Lease synced", len(self.services))
                next_renew = 0.0  # say so now, not at the next renewal

    def stop(self) -> None:
        self.stop_event.set()


def build(client: Client, opts: Options, metrics=None) -> Subsetter:
    source = KubeSource(client, "", watched=watched())
    elector = Elector(
        client, opts.lease_namespace, opts.lease_name, opts.identity, opts.lease_duration, opts.renew_period
    )
    return Subsetter(client, source, elector, opts, metrics)
