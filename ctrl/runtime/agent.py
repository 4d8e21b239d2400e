"""The run loop: source events -> state -> plan -> diff -> apply.

What a sync does lives here; when one is due is ctrl.runtime.schedule's
(coalescing bursts, retries with backoff, the periodic reconcile, drain
deadlines). The first sync after start is a full one and the only place
where entries nobody owns are pruned: it runs after the source's first full
list, so a restarted agent never drops what a previous one programmed
before it knows the whole picture.

Failures are per Service: when a batch write fails, the change set is
written again Service by Service (ctrl.dataplane.apply.Writer.apply_each),
the mirror is re-read from the kernel, and each Service that could not be
written (or did not fit a map) is planned again after a delay that doubles
with every failure, while the others go on. Only a failure that belongs to
no Service (the node config, the maps unreadable) falls back to a full sync
from the re-read maps.

After each sync (and each change taken) the agent publishes its status
(ctrl.runtime.health.SyncStatus): /healthz reads that, never the agent.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable

from ..dataplane.abi import NodeConfig, read_contents
from ..dataplane.apply import Writer
from ..dataplane.changeset import ChangeSet
from ..dataplane.libbpf import BPFError
from ..dataplane.programmed import Programmed
from ..dataplane.verify import Verifier
from ..k8s.events import Event
from ..model.plan import NodeAddresses, frontend_str, nodeport_addresses
from ..model.planner import ServicePlanner
from ..model.state import ClusterState
from ..util.addrs import addr16
from ..util.gcpause import paused_gc
from .health import StatusBoard, SyncStatus
from .schedule import Schedule
from .settings import Settings

log = logging.getLogger("sliceproxy.agent")

# Seconds between full garbage collections at the latest (see Agent.sync).
COLLECT_EVERY = 600.0
# Seconds a due collection waits for a quiet loop turn at most: an agent
# that syncs without a pause collects at the end of a sync after that.
COLLECT_WAIT_MAX = 5.0


# Seconds of the periodic check per loop turn: what a change arriving
# meanwhile may wait for it (ctrl.dataplane.verify).
CHECK_SLICE = 0.005


class Agent:
    def __init__(
        self,
        source,
        state: ClusterState,
        programmed: Programmed,
        writer: Writer | None,
        settings: Settings | None = None,
        refresh_interfaces: Callable[[], object] | None = None,
        metrics=None,
        health_checks=None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.source = source
        self.settings = settings = settings or Settings()
        # CLOCK_MONOTONIC seconds: drain deadlines go into the backend map
        # in this clock (ctrl.dataplane.abi.to_ns), so a test can pass its
        # own clock to age them, but a real agent must keep time.monotonic.
        self.clock = clock
        self.state = state
        self.programmed = programmed
        # Remembers each Service's last plan: a change to one of its slices
        # is planned (and diffed) in time proportional to the slice.
        self.planner = ServicePlanner()
        self.writer = writer
        self.refresh_interfaces = refresh_interfaces
        self.metrics = metrics
        self.health_checks = health_checks  # ctrl.runtime.healthcheck.HealthCheckServers
        self.schedule = Schedule(
            clock,
            min_sync_period=settings.min_sync_period,
            resync_period=settings.sync_period,
            retry_period=settings.retry_period,
            retry_max=settings.retry_max,
            interface_period=settings.interface_period,
        )
        self.status = StatusBoard()
        self._config_written: NodeConfig | None = None
        # Changes taken since the last successful sync, for the pending
        # gauges and network programming latency.
        self._pending = {"EndpointSlice": 0, "Service": 0}
        self._queued_at: float | None = None
        self._triggers: list[str] = []
        # kube-proxy's no_local_endpoints gauges, kept per change: the
        # Services counting in them, and their sums.
        self._no_local: dict[str, tuple[int, int]] = {}  # owner -> (internal, external), nonzero only
        self._no_local_sum = [0, 0]
        self.stop_event = threading.Event()
        self.syncs = 0
        self.last_sync_ok: float | None = None
        self._refused: set[str] = set()  # Services refused as they are (retried when they change)
        self._collected_at = clock()  # the last full collection
        self._collect_due: float | None = None  # since when a collection waits for a quiet turn
        self._after_pending = False  # indexes or a collection left for a quiet turn (after_sync)
        self.stages: dict[str, float] = {}  # seconds, per stage of the last sync (see _sync)
        self.check: Verifier | None = None  # the periodic check of the maps, while it runs
        self.checks = 0  # periodic checks completed

    def take(self, events: list[Event]) -> None:
        seen = dict.fromkeys(self._pending, 0)  # changes per kind, counted once at the end
        apply = self.state.apply
        dirty: set[str] = set()  # told to the schedule once at the end
        # The collector paused, as while the source decoded these events:
        # a collection here would walk every object the model gains (30 ms
        # for a list of 10,000 Services and their slices) on the way to
        # the sync, which leaves them frozen anyway.
        with paused_gc():
            try:
                for ev in events:
                    touched = apply(ev)
                    if not touched:
                        continue
                    dirty |= touched
                    if ev.kind not in seen:
                        continue
                    seen[ev.kind] += 1
                    if self._queued_at is None:
                        self._queued_at = time.time()
                    # A deleted slice's trigger time is its last update's,
                    # not the deletion's: kube-proxy ignores it, and so do we.
                    trigger = getattr(ev.obj, "trigger_time", None) if ev.op != "delete" else None
                    if trigger:
                        self._triggers.append(trigger)
            finally:
                self.schedule.changed(dirty)
                for kind, n in seen.items():
                    self._pending[kind] += n
                    if n and self.metrics is not None:
                        self.metrics.changes_seen(kind, n)
        if self.metrics is not None:
            self.metrics.pending(self._pending["EndpointSlice"], self._pending["Service"], self._queued_at)
        self._publish()

    def _publish(self) -> None:
        self.status.publish(SyncStatus(self.last_sync_ok, self.schedule.pending()))
        mode = getattr(self.source, "slice_mode", None)
        if self.metrics is not None and mode is not None and mode.current is not None:
            for m in ("originals", "subsets"):
                self.metrics.slice_mode.labels(mode=m).set(1 if mode.current == m else 0)

    def node_addresses(self) -> NodeAddresses:
        """This node's addresses for NodePorts (--nodeport-addresses
        applied) and source ranges; none before its Node object arrives."""
        node = self.state.node
        if node is None:
            return NodeAddresses()
        return NodeAddresses(nodeport_addresses(node.ips, self.settings.nodeport_cidrs), node.ips)

    def node_config(self) -> NodeConfig:
        """The masquerade address per family: the Node's first InternalIP of
        it, else its first ExternalIP."""
        node = self.state.node
        ips = node.ips if node is not None else ()
        v4 = next((addr16(ip) for ip in ips if ":" not in ip), None)
        v6 = next((addr16(ip) for ip in ips if ":" in ip), None)
        s = self.settings
        return NodeConfig(v4, v6, s.snat_ports, s.snat_reclaim, s.snat_reclaim_closed)

    def plan(self, owners: Iterable[str]) -> dict:
        """The frontends of each owner, planned in the order given."""
        desired = {}
        addrs = self.node_addresses()
        state, planner = self.state, self.planner
        node = state.node
        node_name, zone = state.node_name, node.zone if node is not None else None
        services, slices, touched = state.services, state.slices, state.take_touched
        plan, no_local = planner.plan, planner.no_local if self.metrics is not None else None
        for owner in owners:
            try:
                fronts, notes = plan(
                    owner, services.get(owner), slices.get(owner, {}), node_name, zone, addrs, touched(owner)
                )
            except BaseException:
                # The names it was given are spent: plan it in full next.
                planner.forget(owner)
                raise
            for note in notes:
                log.warning("%s", note)
            desired[owner] = fronts
            if no_local is not None:
                # From what planning found, not by merging the Service's
                # slices again (that cost 100 ms a change at 100,000
                # endpoints while the change itself is planned in 1 ms).
                counts = no_local(owner)
                if counts != (0, 0) or owner in self._no_local:
                    self._set_no_local(owner, counts)
        return desired

    def _set_no_local(self, owner: str, counts: tuple[int, int]) -> None:
        old = self._no_local.pop(owner, (0, 0))
        if counts != (0, 0):
            self._no_local[owner] = counts
        self._no_local_sum[0] += counts[0] - old[0]
        self._no_local_sum[1] += counts[1] - old[1]

    def sync(self) -> ChangeSet | None:
        """Plan and write what changed; a full sync plans everything."""
        full = self.schedule.need_full
        t_start = time.perf_counter()
        # What a sync builds (plans, the diff's mirror, the planner's
        # indexes) lives until a later sync replaces it. Frozen, the
        # collector never walks it again: otherwise each collection between
        # changes walks every young container, milliseconds at 100,000
        # endpoints. Freezing is O(1); frozen objects are still freed by
        # reference counting, only a reference cycle among them would wait.
        # So after a full sync (the first one, every --sync-period), or
        # COLLECT_EVERY seconds after the last collection (with
        # --sync-period 0), everything is unfrozen and collected once.
        # That, and the indexes a large Service's next change needs, wait
        # for the loop's first quiet turn (after_sync): at 100,000
        # endpoints they take 0.1-0.3 s, which a change arriving right
        # after the sync would otherwise wait for. (Its own Service's
        # index is built when it needs it.)
        with paused_gc():
            cs = self._sync()
            now = self.clock()
            if full or now - self._collected_at >= COLLECT_EVERY:
                if self._collect_due is None:
                    self._collect_due = now
            self._after_pending = True
            collect_now = self._collect_due is not None and now - self._collect_due >= COLLECT_WAIT_MAX
            if not collect_now:
                # Before the collector runs again: the sync's objects are
                # all still in the youngest generation, which its next
                # collection would walk (0.1 s at 250,000 endpoints).
                gc.freeze()
        if collect_now:
            self.after_sync()  # no quiet turn for that long
        self.schedule.sync_took(self.clock(), time.perf_counter() - t_start, full)
        return cs

    def after_sync(self) -> None:
        """What the syncs since the last call left for a quiet moment: the
        indexes of the large Services planned in full (for their next
        change) and, when due, the full collection; everything frozen
        again after. Seconds each in stages["index"] and stages["gc"]."""
        t0 = time.perf_counter()
        with paused_gc():
            self.planner.index_pending()
            self.programmed.index_pending()
            if self._collect_due is None:
                gc.freeze()
        t1 = time.perf_counter()
        if self._collect_due is not None:
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self._collected_at = self.clock()
            self._collect_due = None
        self.stages["index"] = t1 - t0
        self.stages["gc"] = time.perf_counter() - t1
        self._after_pending = False

    def _sync(self) -> ChangeSet | None:
        t0 = time.perf_counter()
        sched = self.schedule
        full = sched.need_full
        owners = set(self.state.services) | self.programmed.owners() if full else set(sched.dirty)
        # Seconds each stage of the last sync took (docs/metrics.md: the
        # sync log line; the bench prints them so a regression names its
        # stage).
        self.stages = stages = dict.fromkeys(("plan", "diff", "write", "index", "gc"), 0.0)
        ordered = sorted(owners)
        desired = self.plan(ordered)
        if self.health_checks is not None:
            self.health_checks.sync_all(ordered, self.state.services, self.state.slices)
        t_plan = time.perf_counter()
        stages["plan"] = t_plan - t0
        cs = self.programmed.sync(
            desired,
            prune_except=set(self.state.services) if full else None,
            now=self.clock(),
            stream=self.writer.stream if self.writer is not None else None,
        )
        stages["diff"] = time.perf_counter() - t_plan
        if self.check is not None:
            self.check.touched(cs)
        for owner, why in sorted(cs.rejected.items()):
            log.error("%s Service: not programmed, its previous entries are kept: %s", owner, why)
        for owner, why in sorted(cs.refused.items()):
            log.error("%s Service: not programmed, its previous entries are kept: %s", owner, why)
        for owner, holder, key in cs.conflicts:
            log.error(
                "%s Service: frontend %s is already %s Service's: not programmed while that one has it "
                "(its other frontends are)",
                owner,
                frontend_str(key),
                holder,
            )
        try:
            cfg = self.node_config()
            if self.writer is not None and cfg != self._config_written:
                self.writer.write_config(cfg)
                self._config_written = cfg
                if self.check is not None:  # what the check compares from now on
                    self.check.config = cfg.packed()
        except BPFError as e:
            self._failed(f"writing the node config failed: {e}")
            return None
        t_write = 0.0
        if self.writer is not None and len(cs):
            try:
                t_write = self.writer.apply(cs)
            except BPFError as e:
                t1 = time.perf_counter()
                if not self._write_each(cs, e):
                    return None
                t_write = time.perf_counter() - t1
        stages["write"] = t_write
        # Services waiting for a frontend this sync freed get it next.
        sched.synced(self.clock(), owners, cs.rejected, cs.failed, cs.resync)
        self._refused = (self._refused - owners) | set(cs.refused)
        self.syncs += 1
        self.last_sync_ok = time.time()
        self._publish()
        if self.metrics is not None:
            rejected = sched.rejected() | self._refused
            self.metrics.synced(time.perf_counter() - t0, full, self.last_sync_ok, len(rejected))
            self.metrics.failing(sched.failing())
            self.metrics.no_local.labels(traffic_policy="internal").set(self._no_local_sum[0])
            self.metrics.no_local.labels(traffic_policy="external").set(self._no_local_sum[1])
            self.metrics.programmed(self._triggers, self.last_sync_ok)
            self.metrics.pending(0, 0, None)
        self._pending = {"EndpointSlice": 0, "Service": 0}
        self._queued_at = None
        self._triggers = []
        if len(cs) or full:
            s = cs.summary()
            # Under --external-lb=maglev, the Maglev chunks and pointers written and deleted.
            mgl = (
                f", maglev +{s['maglev_set']}/-{s['maglev_deleted']}" if s["maglev_set"] or s["maglev_deleted"] else ""
            )
            log.info(
                "sync%s: %d services changed, frontends +%d/-%d, slots +%d/-%d, backends +%d/-%d%s "
                "in %.1f ms (plan %.1f, diff %.1f, write %.1f ms)",
                " (full)" if full else "",
                s["services"],
                s["frontends_set"],
                s["frontends_deleted"],
                s["slots_set"],
                s["slots_deleted"],
                s["backends_added"],
                s["backends_deleted"],
                mgl,
                (time.perf_counter() - t0) * 1000,
                stages["plan"] * 1000,
                stages["diff"] * 1000,
                t_write * 1000,
            )
        return cs

    def _failed(self, why: str) -> None:
        """A failure that belongs to no Service: re-read the maps and
        retry everything with a full sync after retry_period."""
        if self.metrics is not None:
            self.metrics.sync_failures.inc()
        log.error("%s; re-reading the maps for a full sync", why)
        self._readopt()
        self.schedule.sync_failed(self.clock())
        self._publish()

    def _write_each(self, cs: ChangeSet, batch_error: BPFError) -> bool:
        """The batch write of cs failed: write it Service by Service, name
        the Services that failed (log, metric) and retry them with backoff,
        then make the mirror the kernel's contents again (the failed
        Services' entries are what the kernel kept). False when something
        that belongs to no Service failed too (then a full sync follows)."""
        assert self.writer is not None
        if self.metrics is not None:
            self.metrics.sync_failures.inc()
        log.warning("writing the maps in batches failed (%s); writing them Service by Service", batch_error)
        try:
            failed, rest_error = self.writer.apply_each(cs)
        except BPFError as e:
            failed, rest_error = {}, e
        cs.failed = failed
        now = self.clock()
        for owner, why in sorted(failed.items()):
            delay = self.schedule.service_failed(owner, now)
            log.error(
                "%s Service: writing its map entries failed, it keeps what the maps hold and is retried in "
                "%.0f s (the other Services are written): %s",
                owner,
                delay,
                why,
            )
        if rest_error is not None:
            self._failed(f"writing the maps failed outside any one Service: {rest_error}")
            return False
        self._readopt(full=False)
        return True

    def _readopt(self, full: bool = True) -> None:
        """Rebuild the mirror from the kernel maps; with full, the next sync
        plans every Service against them."""
        self._config_written = None  # rewritten by the next sync
        self.check = None  # it compared against the mirror being replaced
        if self.writer is not None:
            self.writer.settle()  # a failed sync's streamed writes, if any, land first
            try:
                mc = read_contents(self.writer.maps)
                mc.adopt_into(self.programmed)
            except BPFError as e:
                log.error("re-reading the maps failed: %s", e)
                full = True
        if full:
            self.schedule.full_needed()

    def run(self) -> None:
        """Until stop(). Nothing is written before the source's first full
        list of every resource (source.synced); then a full sync, then only
        what changes, plus a full reconcile every sync_period."""
        while not self.stop_event.is_set():
            self.step()

    def step(self, timeout: float = 0.2) -> None:
        """One turn of the run loop: wait up to `timeout` for source
        events, then sync if the schedule says anything is due (changes, a
        retry, the end of a drain, the periodic reconcile)."""
        sched = self.schedule
        now = self.clock()
        if sched.reconcile_due(now):
            # Look for what changed behind our back (a map edited by hand,
            # a write lost), a chunk at a time between syncs.
            self._start_check()
        if self.check is not None:
            timeout = 0.0  # the check goes on at the end of this turn
        if self.refresh_interfaces is not None and sched.interfaces_due(now):
            try:
                self.refresh_interfaces()
            except Exception as e:  # netlink trouble must not stop the proxy
                log.error("refreshing interfaces failed: %s", e)
        try:
            events = self.source.events.get(timeout=timeout)
        except queue.Empty:
            events = None
        if events:
            self.take(events)
            # A change after a quiet spell syncs at once; within
            # min_sync_period of the last sync, wait and take the rest of
            # the burst into one sync.
            while (left := sched.burst_left(self.clock())) > 0:
                try:
                    self.take(self.source.events.get(timeout=left))
                except queue.Empty:
                    break
        if not self.source.synced:
            return
        # A source queues a resource's list before it reports it synced:
        # take everything queued so far before the first (pruning) sync.
        self._drain_nowait()
        if sched.due(self.clock(), self.programmed.next_drain_end()):
            self.sync()
        elif not events and self._after_pending:
            self.after_sync()  # a quiet turn: no event came, nothing is due
        if self.check is not None:
            self._check_some()

    def _start_check(self) -> None:
        if self.writer is None:
            return
        if self.check is not None:  # longer than a period: begin again, with what is written now
            log.warning("the check of the maps took longer than --sync-period; starting it again")
        cfg = self._config_written
        self.check = Verifier(self.writer.maps, self.programmed, cfg.packed() if cfg is not None else None)

    def _check_some(self) -> None:
        """Go on with the periodic check for about CHECK_SLICE seconds (a
        change waits at most that long for it). When complete, repair what
        it found: re-read the maps and sync in full."""
        check = self.check
        assert check is not None
        end = time.perf_counter() + CHECK_SLICE
        try:
            while not check.step() and time.perf_counter() < end:
                pass
        except BPFError as e:
            self.check = None
            self._failed(f"reading the maps for the periodic check failed: {e}")
            return
        if not check.done:
            return
        self.check = None
        self.checks += 1
        if not check.found:
            log.debug("periodic check: %d map entries as written", check.entries)
            return
        if self.metrics is not None:
            self.metrics.map_differences.inc(check.found)
        log.error(
            "periodic check: %d map entries differ from what was written (%s%s); re-reading the maps for a full sync",
            check.found,
            "; ".join(check.differences),
            "; ..." if check.found > len(check.differences) else "",
        )
        self._readopt()
        self.programmed.tables.distrust()
        self.schedule.repair_needed()

    def _drain_nowait(self) -> None:
        while True:
            try:
                self.take(self.source.events.get_nowait())
            except queue.Empty:
                return

    def stop(self) -> None:
        self.stop_event.set()
