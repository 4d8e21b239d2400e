"""A coordination.k8s.io/v1 Lease: leader election for the subsetter, and
the agents' reading of whether the subsetter is alive (docs/subsetting.md).

Time on a Lease is another machine's wall clock. Both sides judge it by
what they see change, on their own monotonic clock, as client-go's leader
election does: a holder is gone when its record (holder, renewTime) has
not changed for leaseDurationSeconds since this process first saw it.
Only a record seen for the first time is judged by its renewTime against
this machine's wall clock (an agent starting while the subsetter is long
dead should not wait a whole timeout to know it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from .kube import Client, _one_line

log = logging.getLogger("sliceproxy.lease")

LEASES = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
# Set by the leader once every subset slice has been written since it took
# the lease: agents switch to subsets only then (a new leader's first pass
# may still be writing).
SYNCED_ANNOTATION = "sliceproxy.io/subsets-synced"


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: object) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class Record:
    holder: str
    renew_time: str
    duration: float
    synced_by: str
    resource_version: str
    transitions: int

    @classmethod
    def from_doc(cls, doc: dict) -> Record:
        def mapping(v: object) -> dict:
            return v if isinstance(v, dict) else {}

        def text(v: object) -> str:
            return v if isinstance(v, str) else ""

        def integer(v: object) -> int:
            return v if isinstance(v, int) and not isinstance(v, bool) else 0

        spec, meta = mapping(doc.get("spec")), mapping(doc.get("metadata"))
        return cls(
            holder=text(spec.get("holderIdentity")),
            renew_time=text(spec.get("renewTime")),
            duration=float(integer(spec.get("leaseDurationSeconds"))),
            synced_by=text(mapping(meta.get("annotations")).get(SYNCED_ANNOTATION)),
            resource_version=text(meta.get("resourceVersion")),
            transitions=integer(spec.get("leaseTransitions")),
        )


class Observer:
    """When a Lease's record last changed, on this process's clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.clock, self.wall = clock, wall
        self.record: Record | None = None
        self.changed_at: float | None = None

    def see(self, rec: Record | None) -> None:
        if rec == self.record:
            return
        now = self.clock()
        prev = self.record
        if prev is None and rec is not None:
            # First sight: as old as its renewTime says, by our wall clock.
            renewed = _parse_time(rec.renew_time)
            age = max(0.0, self.wall() - renewed) if renewed is not None else float("inf")
            self.changed_at = now - age
        elif rec is None or prev is None or (rec.holder, rec.renew_time) != (prev.holder, prev.renew_time):
            self.changed_at = now
        self.record = rec

    def age(self) -> float:
        """Seconds since the holder last renewed (inf: never seen)."""
        if self.record is None or self.changed_at is None or not self.record.holder:
            return float("inf")
        return self.clock() - self.changed_at


class LeaseReader:
    """The agents' side: is the subsetter holding its Lease, renewing it,
    and done writing? One GET per check."""

    def __init__(
        self, client: Client, namespace: str, name: str, stale_after: float, clock: Callable[[], float] = time.monotonic
    ):
        self.client = client
        self.path = f"{LEASES.format(ns=namespace)}/{name}"
        self.stale_after = stale_after
        self.observer = Observer(clock)
        self.why = "not read yet"

    def check(self) -> bool:
        try:
            status, doc = self.client.send("GET", self.path, timeout=10)
        except Exception as e:  # network: the same as a lease not renewed
            self.why = f"reading the subsetter's Lease failed: {_one_line(e)}"
            return self.observer.age() <= self.stale_after and self._synced()
        if status == 404:
            self.observer.see(None)
            self.why = f"no Lease {self.path}: no subsetter"
            return False
        if status != 200 or not isinstance(doc, dict):
            self.why = f"reading the subsetter's Lease failed: HTTP {status}"
            return self.observer.age() <= self.stale_after and self._synced()
        self.observer.see(Record.from_doc(doc))
        age = self.observer.age()
        if age > self.stale_after:
            self.why = f"the subsetter's Lease was not renewed for {age:.0f} s (limit {self.stale_after:.0f} s)"
            return False
        if not self._synced():
            self.why = "the subsetter's leader has not written every subset yet"
            return False
        self.why = ""
        return True

    def _synced(self) -> bool:
        rec = self.observer.record
        return rec is not None and bool(rec.holder) and rec.synced_by == rec.holder


class Elector:
    """Leader election on one Lease (client-go's algorithm, by resourceVersion):
    take it when absent or when its holder's record has not changed for its
    duration; renew it every renew_period; lead only while the last renewal
    is younger than renew_deadline, so two replicas never both write."""

    def __init__(
        self,
        client: Client,
        namespace: str,
        name: str,
        identity: str,
        duration: float = 15.0,
        renew_period: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.client = client
        self.namespace, self.name, self.identity = namespace, name, identity
        self.path = f"{LEASES.format(ns=namespace)}/{name}"
        self.duration, self.renew_period = duration, renew_period
        self.renew_deadline = duration * 2 / 3
        self.clock = clock
        self.observer = Observer(clock)
        self.renewed_at: float | None = None  # our last successful write
        self.synced = False  # set by the controller after a full pass as leader
        self._synced_written = False

    @property
    def leader(self) -> bool:
        return self.renewed_at is not None and self.clock() - self.renewed_at < self.renew_deadline

    def step(self) -> bool:
        """One attempt to take or renew; whether we lead afterwards."""
        was = self.leader
        try:
            self._try()
        except Exception as e:  # network, API: we keep leading until the deadline
            log.warning("lease %s/%s: %s", self.namespace, self.name, _one_line(e))
        now = self.leader
        if was and not now:
            log.warning(
                "lease %s/%s: lost (not renewed within %.0f s); writing stops",
                self.namespace,
                self.name,
                self.renew_deadline,
            )
            self.synced = self._synced_written = False
        return now

    def _body(self, rec: Record | None, rv: str | None) -> dict:
        now = _now_rfc3339()
        ours = rec is not None and rec.holder == self.identity
        meta: dict = {"name": self.name, "namespace": self.namespace}
        if rv:
            meta["resourceVersion"] = rv
        if self.synced:
            meta["annotations"] = {SYNCED_ANNOTATION: self.identity}
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.duration)),
            "renewTime": now,
            "acquireTime": now,
            "leaseTransitions": (rec.transitions if rec else 0) + (0 if ours or rec is None else 1),
        }
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    def _try(self) -> None:
        status, doc = self.client.send("GET", self.path, timeout=10)
        if status == 404:
            self.observer.see(None)
            st, _ = self.client.send("POST", LEASES.format(ns=self.namespace), self._body(None, None), timeout=10)
            if st == 201:
                self._took(None)
            return
        if status != 200 or not isinstance(doc, dict):
            raise RuntimeError(f"GET {self.path}: HTTP {status}")
        rec = Record.from_doc(doc)
        self.observer.see(rec)
        ours = rec.holder == self.identity
        if not ours and rec.holder and self.observer.age() < (rec.duration or self.duration):
            if self.renewed_at is not None:
                self.renewed_at = None  # someone else holds it: we do not lead
            return
        body = self._body(rec, rec.resource_version)
        if ours:
            body["spec"]["acquireTime"] = doc.get("spec", {}).get("acquireTime") or body["spec"]["acquireTime"]
        st, _ = self.client.send("PUT", self.path, body, timeout=10)
        if st == 200:
            if not ours:
                self._took(rec)
            else:
                self.renewed_at = self.clock()
                self._synced_written = self.synced
        elif st == 409:
            pass  # another replica wrote first: read again next time

    def _took(self, prev: Record | None) -> None:
        self.renewed_at = self.clock()
        self.synced = self._synced_written = False
        log.info(
            "lease %s/%s: acquired as %s%s",
            self.namespace,
            self.name,
            self.identity,
            f" (from {prev.holder})" if prev is not None and prev.holder else "",
        )

    def release(self) -> None:
        """Give the lease up at a clean exit: a replica takes over at once."""
        if not self.leader:
            return
        try:
            status, doc = self.client.send("GET", self.path, timeout=5)
            if status == 200 and isinstance(doc, dict) and Record.from_doc(doc).holder == self.identity:
                doc["spec"]["holderIdentity"] = ""
                doc.get("metadata", {}).get("annotations", {}).pop(SYNCED_ANNOTATION, None)
                self.client.send("PUT", self.path, doc, timeout=5)
        except Exception as e:
            log.warning("lease %s/%s: release failed: %s", self.namespace, self.name, _one_line(e))
        self.renewed_at = None
