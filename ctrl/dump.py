"""`sliceproxy dump`: what the kernel holds, read from the pinned maps.

It reads the maps, not the agent, so it works while the agent is down and
shows what packets actually see.
"""

from __future__ import annotations

import json

from . import layout
from .apply import read_contents
from .maps import Map
from .objects import addr_str, is_v4
from .plan import PROTO_NAMES, SCOPE_EXTERNAL

VERDICTS = [
    "pass_not_ip",
    "pass_truncated",
    "pass_fragment",
    "pass_other_proto",
    "pass_no_service",
    "dnat_new",
    "dnat_established",
    "revnat",
    "drop_no_backend",
    "drop_error",
]


def hostport(addr: bytes, port: int) -> str:
    a = addr_str(addr)
    return f"{a}:{port}" if is_v4(addr) else f"[{a}]:{port}"


def counters(maps: dict[str, Map]) -> dict[str, dict[str, int]]:
    """Packets and bytes per verdict, summed over CPUs."""
    m = maps.get("sp_stats_v1")
    if m is None:
        return {}
    c = layout.codec("sp_stat")
    out = {}
    for i, name in enumerate(VERDICTS):
        per_cpu = m.lookup_percpu(i.to_bytes(4, "little"))
        vals = [c.unpack(v) for v in per_cpu]
        out[name] = {"packets": sum(v[0] for v in vals), "bytes": sum(v[1] for v in vals)}
    return out


def collect(maps: dict[str, Map]) -> dict:
    mc = read_contents(maps)
    services = []
    for key, (svc_id, count, flags, timeout) in sorted(
        mc.svc.items(), key=lambda kv: (mc.names.get(kv[1][0], ""), kv[0])
    ):
        addr, port, proto, scope = key
        backends = []
        for i in range(count):
            bid = mc.slots.get((svc_id, i))
            b = mc.backends.get(bid) if bid is not None else None
            backends.append(hostport(b[0], b[1]) if b else f"<slot {i} missing>")
        services.append(
            {
                "name": mc.names.get(svc_id, ""),
                "frontend": f"{hostport(addr, port)}/{PROTO_NAMES.get(proto, str(proto))}",
                "scope": "external" if scope == SCOPE_EXTERNAL else "internal",
                "svc_id": svc_id,
                "count": count,
                "flags": flags,
                "affinity_timeout": timeout,
                "backends": backends,
            }
        )
    ct = maps.get("sp_ct_v1")
    return {
        "services": services,
        "backends": len(mc.backends),
        "conntrack_entries": len(ct.items()) if ct is not None else 0,
        "counters": counters(maps),
    }


def render_table(data: dict) -> str:
    rows = [("SERVICE", "FRONTEND", "ID", "BACKENDS")]
    for s in data["services"]:
        bes = ", ".join(s["backends"]) if s["backends"] else "(none: dropped)"
        rows.append((s["name"] or "<unnamed>", s["frontend"], str(s["svc_id"]), bes))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    lines.append("")
    lines.append(
        f"{len(data['services'])} frontends, {data['backends']} backends, "
        f"{data['conntrack_entries']} conntrack entries"
    )
    nz = {k: v["packets"] for k, v in data["counters"].items() if v["packets"]}
    if nz:
        lines.append("packets: " + ", ".join(f"{k}={v}" for k, v in nz.items()))
    return "\n".join(lines)


def render_json(data: dict) -> str:
    return json.dumps(data, indent=2)
