"""The agent's settings: one object, built from `sliceproxy run`'s flags by
ctrl.cli.parser (checked there) and handed down, instead of a keyword
argument per setting. The defaults are the flags' defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..dataplane.abi import Hairpin, MapSizes


@dataclass(frozen=True)
class Settings:
    node_name: str | None = None  # --node-name: the Node whose addresses and zone apply
    sizes: MapSizes = field(default_factory=MapSizes)  # --max-*
    hairpin: Hairpin = field(default_factory=Hairpin)  # loaded into the programs (ctrl.dataplane.loader)
    nodeport_cidrs: tuple[str, ...] = ()  # --nodeport-addresses
    snat_ports: tuple[int, int] = (61000, 65535)  # --snat-port-range
    snat_reclaim: int = 600  # seconds
    snat_reclaim_closed: int = 10  # seconds
    drain_period: float = 60.0  # seconds a backend that left every Service keeps its flows
    # When to sync (ctrl.runtime.schedule): at most one sync per
    # min_sync_period (None: auto, from what the last sync took), a check
    # of the maps every sync_period (0: never), a
    # failed sync retried after retry_period (a failed Service first after
    # it too, doubling up to retry_max), interfaces looked at again every
    # interface_period.
    min_sync_period: float | None = None
    sync_period: float = 60.0
    retry_period: float = 5.0
    retry_max: float = 60.0
    interface_period: float = 1.0
    metrics_bind_address: str = "127.0.0.1:10249"  # empty: no /metrics
    healthz_bind_address: str = "0.0.0.0:10256"  # empty: no /healthz
    healthz_stale_after: float = 60.0
    dry_run: bool = False  # plan and print, touch no kernel state
    # --host-clients: serve the node's own sockets with the cgroup socket
    # programs (auto: when the kernel loads and attaches them), attached to
    # --cgroup (None: the root of the node's cgroup v2 hierarchy).
    host_clients: Literal["auto", "on", "off"] = "auto"
    cgroup: str | None = None
    # --external-lb: how a new flow to an external frontend picks its
    # backend: "random" (a random slot) or "maglev" (the frontend's Maglev
    # table, the same on every node; docs/semantics.md, "Maglev"), with
    # tables of maglev_table_size entries (a prime: ctrl.model.maglev).
    external_lb: Literal["random", "maglev"] = "random"
    maglev_table_size: int = 16381

    # --xdp: the XDP program on the external interfaces (auto: native,
    # else generic, else none with a logged reason; off: none, and ours
    # removed where an earlier agent left it); --xdp-forward: it also sends
    # flows to other nodes' backends back out itself (docs/semantics.md, "XDP").
    xdp: Literal["auto", "native", "generic", "off"] = "auto"
    xdp_forward: bool = False

    @property
    def maglev_size(self) -> int:
        """The table size the dataplane builds tables of; 0: random mode."""
        return self.maglev_table_size if self.external_lb == "maglev" else 0
