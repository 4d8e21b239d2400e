"""Which EndpointSlices an agent watches: the originals, or the subset
slices of its zone and `all` (docs/subsetting.md).

--subsets=off: the originals. on: the subsets whenever the node has a zone
label. auto: the subsets while the node has a zone label and the
subsetter's Lease is held, renewed within stale_after, and marked synced
by its holder (ctrl.k8s.lease.LeaseReader); the originals otherwise.

The choice is made before the first list of slices (the agent never lists
the set it will not use) and again every `period`; a change switches the
source's selector (KubeSource.set_selector), whose next list replaces one
set with the other in one batch: the model never sees a Service without
its endpoints in between.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .kube import ORIGINALS_SELECTOR, PROXY_SELECTOR, KubeSource, subsets_selector
from .lease import LeaseReader
from .objects import Node

log = logging.getLogger("sliceproxy.source.kube")

MODES = ("auto", "on", "off")
ORIGINALS, SUBSETS = "originals", "subsets"


class SliceMode:
    def __init__(
        self,
        source: KubeSource,
        mode: str,
        node_name: str,
        lease: LeaseReader | None,
        period: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        assert mode in MODES
        self.source, self.mode, self.node_name, self.lease = source, mode, node_name, lease
        self.period = period
        self.clock = clock
        self.current: str | None = None  # ORIGINALS, SUBSETS; None before the first choice
        self.zone: str | None = None
        self._why = ""
        self._stop = threading.Event()
        source.gate("EndpointSlice")
        source.slice_mode = self  # read by the agent's metrics

    def start(self) -> None:
        threading.Thread(target=self._run, name="slice-mode", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.decide()
            except Exception as e:  # never stop choosing
                log.error("choosing the EndpointSlices to watch failed: %s", e)
            # Until the first choice the slices wait for it: look again soon.
            self._stop.wait(self.period if self.current is not None else 0.05)

    def decide(self) -> str | None:
        """Choose once; the mode now (None: the Node not listed yet)."""
        if not self.source.listed("Node"):
            return None  # its zone label decides: wait for it
        node = self.source.held("Node").get(self.node_name)
        zone = node.zone if isinstance(node, Node) else None
        want, why = ORIGINALS, ""
        if self.mode == "off":
            why = "--subsets=off"
        elif not zone:
            why = f"Node {self.node_name} has no topology.kubernetes.io/zone label"
        elif self.mode == "on":
            want = SUBSETS
        elif self.lease is not None and self.lease.check():
            want = SUBSETS
        else:
            why = self.lease.why if self.lease is not None else "no Lease to read"
        if want == SUBSETS:
            selector = f"{subsets_selector(zone)},{PROXY_SELECTOR}"  # type: ignore[arg-type]
        else:
            selector = ORIGINALS_SELECTOR
        if want != self.current or zone != self.zone:
            if want == SUBSETS:
                log.info("watching the subset slices of zone %s and %s", zone, "all")
            else:
                log.info("watching the original EndpointSlices: %s", why)
        self.current, self.zone = want, zone
        self.source.set_selector("EndpointSlice", selector)
        return want
