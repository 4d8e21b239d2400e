"""Map capacities: what the loader sizes the maps to, and what the diff
checks a change against before writing it (a full map gets a clear error
and no half-written service). Every map the control plane fills has one:
the frontend, names, slot, backend and source range maps are checked per
Service; conntrack and affinity are LRU maps, where full means the oldest
entries go; counters and config are arrays of fixed size."""

from __future__ import annotations

from dataclasses import dataclass

# The flag that sizes each map, for the messages that tell an operator
# which one to raise.
FLAGS = {
    "sp_svc": "--max-services",
    "sp_names": "--max-services",
    "sp_be": "--max-backends",
    "sp_slot": "--max-slots",
    "sp_ct": "--max-conntrack",
    "sp_aff": "--max-conntrack",
    "sp_src": "--max-source-ranges",
}


@dataclass(frozen=True)
class MapSizes:
    services: int = 65536  # frontends; also the names map
    backends: int = 262144
    slots: int = 262144  # sum of backends over frontends
    conntrack: int = 262144  # LRU: full means the oldest flows go
    source_ranges: int = 65536  # loadBalancerSourceRanges entries, summed over frontends

    def for_map(self, name: str) -> int | None:
        """max_entries of one map (any layout version), None for maps of fixed size."""
        return {
            "sp_svc": self.services,
            "sp_names": self.services,
            "sp_be": self.backends,
            "sp_slot": self.slots,
            "sp_ct": self.conntrack,
            "sp_aff": self.conntrack,  # at most one entry per client and service
            "sp_src": self.source_ranges,
        }.get(name.rsplit("_v", 1)[0])
