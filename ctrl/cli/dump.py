"""`sliceproxy dump`: what the kernel holds, read from the pinned maps.

It reads the maps, not the agent, so it works while the agent is down and
shows what packets actually see.
"""

from __future__ import annotations

import json
import time
from array import array

from ..dataplane import abi
from ..dataplane.abi import ct_codecs, idle_ns, read_config, read_contents
from ..dataplane.abi import map_name as mn
from ..dataplane.maps import Map
from ..model.plan import PROTO_NAMES, Scope
from ..util.addrs import addr_str, hostport, is_v4


def conntrack(maps: dict[str, Map], svc_ids: set[int] | None = None, now: int | None = None) -> list[dict]:
    """Forward conntrack entries (one per flow): client, frontend, backend,
    and how long the flow has been idle at `now` (the programs' clock,
    CLOCK_MONOTONIC in ns: by default the current time)."""
    m = maps.get(mn("sp_ct"))
    if m is None:
        return []
    kc, vc = ct_codecs()
    forward = abi.CT_FORWARD
    if now is None:
        now = time.monotonic_ns()  # the clock of bpf_ktime_get_ns
    flows = []
    for k, v in m.items():
        saddr, daddr, sport, dport, proto, direction = kc.unpack(k)
        if direction != forward:
            continue
        nat_addr, nat_port, be_id, svc_id, last_seen, snat_addr, snat_port, _ = vc.unpack(v)
        if svc_ids is not None and svc_id not in svc_ids:
            continue
        flows.append(
            {
                "proto": PROTO_NAMES.get(proto, str(proto)),
                "client": hostport(saddr, sport),
                "frontend": hostport(daddr, dport),
                "backend": hostport(nat_addr, nat_port),
                # A masqueraded external flow: the source it has on the wire.
                "snat": hostport(snat_addr, snat_port) if snat_port else None,
                "backend_id": be_id,
                "svc_id": svc_id,
                "idle_seconds": round(idle_ns(now, last_seen) / 1e9, 1),
            }
        )
    flows.sort(key=lambda f: (f["frontend"], f["client"]))
    return flows


def maglev_summary(chunks: dict[int, array], size: int, backends: dict) -> dict:
    """A frontend's Maglev table (sp_mgl_v5, in chunks of abi.MGL_CHUNK
    entries) for people: its size M (from the frontend's pointer), the
    entries each backend holds, and entries missing or naming no backend
    (a table being written, or maps that disagree)."""
    shares: dict[str, int] = {}
    missing = 0
    step = abi.MGL_CHUNK
    for k in range(abi.mgl_chunks(size)):
        ids = chunks.get(k)
        n = min(step, size - k * step)
        if ids is None:
            missing += n
            continue
        for bid in ids[:n]:
            b = backends.get(bid)
            if b is None:
                missing += 1
            else:
                hp = hostport(b[0], b[1])
                shares[hp] = shares.get(hp, 0) + 1
    return {"size": size, "entries": dict(sorted(shares.items())), "missing": missing}


def collect(maps: dict[str, Map], service: str | None = None, with_conntrack: bool = False) -> dict:
    """Frontends with their backends; service "namespace/name" filters."""
    mc = read_contents(maps)
    services = []
    for key, (svc_id, count, flags, timeout, slots_id) in sorted(
        mc.svc.items(), key=lambda kv: (mc.names.get(kv[1][0], ""), kv[0])
    ):
        if service is not None and mc.names.get(svc_id, "").split(":", 1)[0] != service:
            continue
        addr, port, proto, scope = key
        backends = []
        for i in range(count):
            bid = mc.slots.get((slots_id, i))
            b = mc.backends.get(bid) if bid is not None else None
            backends.append(hostport(b[0], b[1]) if b else f"<slot {i} missing>")
        entry: dict[str, object] = {
            "name": mc.names.get(svc_id, ""),
            "frontend": f"{hostport(addr, port)}/{PROTO_NAMES.get(proto, str(proto))}",
            "scope": "external" if scope == Scope.EXTERNAL else "internal",
            "svc_id": svc_id,
            "slots_id": slots_id,
            "count": count,
            "flags": flags,
            "affinity_timeout": timeout,
            "source_ranges": sorted(f"{addr_str(a)}/{n - 96 if is_v4(a) else n}" for a, n in mc.ranges.get(svc_id, ())),
            "backends": backends,
        }
        ptr = mc.maglev_ptr.get(svc_id)
        if ptr is not None:
            tid, size = ptr
            entry["maglev"] = {"table": tid, **maglev_summary(mc.maglev.get(tid, {}), size, mc.backends)}
        services.append(entry)
    ct = maps.get(mn("sp_ct"))
    out = {
        "services": services,
        "backends": len(mc.backends),
        "conntrack_entries": ct.count() if ct is not None else 0,
        "counters": abi.counters(maps),
        "xdp_handoffs": abi.handoffs(maps)["packets"],
    }
    cfg = read_config(maps)
    if cfg is not None:
        out["config"] = cfg.as_dict()
    if with_conntrack:
        ids = {int(str(s["svc_id"])) for s in services} if service is not None else None
        out["conntrack"] = conntrack(maps, ids)
    return out


def host_clients(pin_dir: str, maps: dict[str, Map]) -> dict:
    """Whether host clients are served: the network namespace the programs
    serve (its cookie; 0: none), the links pinned under the pin directory
    and the cgroup they are attached to."""
    from ..dataplane import hostclients

    links = hostclients.list_links(pin_dir)
    cookie = hostclients.read_host_config(maps)
    cgroups = sorted({link.cgroup_id for link in links})
    return {
        "served": bool(links) and cookie != 0,
        "netns_cookie": cookie,
        "cgroups": [{"id": c, "path": hostclients.cgroup_path(c)} for c in cgroups],
        "links": [
            {
                "pin": link.program,
                "link_id": link.link_id,
                "prog_id": link.prog_id,
                "program": link.prog_name,
                "attach_type": link.attach_type,
                "cgroup_id": link.cgroup_id,
            }
            for link in links
        ],
    }


def render_table(data: dict) -> str:
    rows: list[tuple[str, ...]] = [("SERVICE", "FRONTEND", "ID", "SLOTS", "BACKENDS")]
    for s in data["services"]:
        # No backend: kube-proxy's REJECT (no endpoint anywhere) or DROP.
        empty = "(none: rejected)" if int(str(s["flags"])) & abi.const("SP_SVC_F_REJECT") else "(none: dropped)"
        bes = ", ".join(s["backends"]) if s["backends"] else empty
        front = s["frontend"] + (" (external)" if s.get("scope") == "external" else "")
        if s.get("source_ranges"):
            bes += "  [from " + ", ".join(s["source_ranges"]) + "]"
        if s.get("maglev"):
            bes += f"  [maglev table {s['maglev']['table']} of {s['maglev']['size']}]"
        rows.append((s["name"] or "<unnamed>", front, str(s["svc_id"]), str(s.get("slots_id", s["svc_id"])), bes))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    lines.append("")
    lines.append(
        f"{len(data['services'])} frontends, {data['backends']} backends, "
        f"{data['conntrack_entries']} conntrack entries"
    )
    cfg = data.get("config")
    if cfg:
        addrs = ", ".join(a for a in (cfg["addr4"], cfg["addr6"]) if a) or "none"
        lines.append(
            f"masquerade: from {addrs}, ports {cfg['snat_port_min']}-{cfg['snat_port_max']}, "
            f"reclaim {cfg['snat_reclaim']}s (closed {cfg['snat_reclaim_closed']}s)"
        )
    host = data.get("host_clients")
    if host is not None:
        if host["served"]:
            where = ", ".join(c["path"] or f"id {c['id']}" for c in host["cgroups"])
            kinds = " ".join(link["attach_type"] for link in host["links"])
            lines.append(f"host clients: served on cgroup {where} ({len(host['links'])} links: {kinds})")
        else:
            lines.append("host clients: not served")
    nz = {k: v["packets"] for k, v in data["counters"].items() if v["packets"]}
    if nz:
        lines.append("packets: " + ", ".join(f"{k}={v}" for k, v in nz.items()))
    if data.get("xdp_handoffs"):
        lines.append(f"taken from XDP's handoff at tc: {data['xdp_handoffs']} packets")
    if "conntrack" in data:
        lines.append("")
        rows = [("PROTO", "CLIENT", "FRONTEND", "BACKEND", "IDLE")]
        rows += [
            (f["proto"], f["client"], f["frontend"], f["backend"], f"{f['idle_seconds']}s") for f in data["conntrack"]
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines += ["  ".join(r[i].ljust(widths[i]) for i in range(5)).rstrip() for r in rows]
    return "\n".join(lines)


def render_json(data: dict) -> str:
    return json.dumps(data, indent=2)


def cmd_dump(args) -> int:
    from ..dataplane import loader

    maps = loader.open_pinned(args.pin_dir)
    data = collect(maps, service=args.service, with_conntrack=args.conntrack)
    data["host_clients"] = host_clients(args.pin_dir, maps)
    print(render_json(data) if args.json else render_table(data))
    return 0
