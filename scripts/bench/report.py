"""The end of a run: one table (text for the terminal, Markdown for
docs/benchmarks.md) with every figure and the ratio peer/ours, the targets
met or missed, and the plots (only when matplotlib is installed)."""

from __future__ import annotations

from pathlib import Path

from .common import fmt_bytes, fmt_s

# The targets (docs/benchmarks.md, "Targets"; for this 2-core machine).
TARGET_FULL_S = {"S1": 0.3, "S2": 0.5, "S3": 1.0}
TARGET_FULL_RATIO = 25
TARGET_CHANGE_P99_S = 0.002
TARGET_PACKET_GROWTH = 1.20
TARGET_PEAK_RSS = 200 * 2**20  # S2 and S3


def peer_cell(r: dict | None, key: str) -> str:
    if not r:
        return "-"
    if r.get(key) is None:
        if r.get("full_s") is None and "timeout_s" in r:
            return f"> {r['timeout_s']:.0f} s (stopped)"
        return "-"
    runs = r.get("full_runs") if key == "full_s" else None
    if runs and len(runs) > 1:
        return f"{fmt_s(r[key])} (median of {len(runs)}: {fmt_s(min(runs))} to {fmt_s(max(runs))})"
    return fmt_s(r[key])


def ratio(peer: float | None, ours: float | None) -> str:
    if not peer or not ours:
        return ""
    return f"{peer / ours:,.0f}x" if peer / ours >= 10 else f"{peer / ours:.1f}x"


class _Ours:
    """Our figures of one scenario; every lookup None when that part failed."""

    def __init__(self, o: dict | None):
        self.o = o or {}

    def get(self, *path):
        v = self.o
        for k in path:
            if not isinstance(v, dict) or k not in v:
                return None
            v = v[k]
        return v


def rows(res: dict) -> list[tuple[str, str, str, str, str]]:
    """(figure, sliceproxy, peer, peer figure, peer/ours)."""
    out: list[tuple[str, str, str, str, str]] = []
    for key, sc in res["scenarios"].items():
        o = _Ours(sc.get("ours"))
        title = f"{key}: {sc['label']} endpoints ({sc['total']:,})"
        if sc.get("internal_traffic_policy", "Cluster") != "Cluster":
            title += f", internalTrafficPolicy {sc['internal_traffic_policy']}"
        out.append((f"**{title}**", "", "", "", ""))
        if not sc.get("ours"):
            out.append(("sliceproxy: this scenario failed (see the errors)", "", "", "", ""))
        full = o.get("full", "median_s")
        out.append(("full sync from the list JSON to the maps", fmt_s(full), "", "", ""))
        out.append(("  of which decoding the JSON and parsing it", fmt_s(o.get("full", "list_decode_s")), "", "", ""))
        out.append(("  then the events into the agent's model", fmt_s(o.get("full", "state_s")), "", "", ""))
        for stage, what in (
            ("plan", "planning"),
            ("diff", "the diff with what is programmed"),
            ("write", "map writes"),
        ):
            out.append((f"  then {what}", fmt_s(o.get("full", "stages", stage)), "", "", ""))
        idx, gcs = o.get("full", "stages", "index"), o.get("full", "stages", "gc")
        if idx is not None:
            out.append(
                (
                    "at the first quiet turn after it: indexes for the next change, collection",
                    f"{fmt_s(idx)}, {fmt_s(gcs)}",
                    "",
                    "",
                    "",
                )
            )
        ipt, iptn, nf = sc.get("iptables_legacy"), sc.get("iptables_nft"), sc.get("nft")
        if ipt:
            out.append(
                (
                    "  peer: first load",
                    "",
                    "iptables-legacy-restore",
                    peer_cell(ipt, "full_s"),
                    ratio(ipt.get("full_s"), full),
                )
            )
        if iptn:
            label = "iptables-nft-restore"
            same = iptn["endpoints"] == sc["total"] and iptn["services"] == sc["services"]
            if not same:
                label += f" at {iptn['services']:,} x {iptn['endpoints'] // max(iptn['services'], 1):,}"
            out.append(
                (
                    "  peer: first load",
                    "",
                    label,
                    peer_cell(iptn, "full_s"),
                    ratio(iptn.get("full_s"), full) if same else "",
                )
            )
        if nf:
            out.append(
                (
                    "  peer: first load",
                    "",
                    "nft -f (nftables mode)",
                    peer_cell(nf, "full_s"),
                    ratio(nf.get("full_s"), full),
                )
            )
        p50, p99, n = o.get("change", "p50"), o.get("change", "p99"), o.get("change", "n")
        out.append((f"one slice ({sc['slice_size']} endpoints) replaced, p50", fmt_s(p50), "", "", ""))
        out.append((f"one slice replaced, p99 (of {n or 0} changes)", fmt_s(p99), "", "", ""))
        if ipt and ipt.get("full_s") is not None:
            out.append(
                (
                    "  peer: whole table restored",
                    "",
                    "iptables-legacy-restore",
                    peer_cell(ipt, "change_full_s"),
                    ratio(ipt.get("change_full_s"), p50),
                )
            )
            out.append(
                (
                    "  peer: partial restore (kube-proxy >= 1.28)",
                    "",
                    "iptables-legacy-restore",
                    peer_cell(ipt, "change_partial_s"),
                    ratio(ipt.get("change_partial_s"), p50),
                )
            )
        if nf and nf.get("full_s") is not None:
            out.append(
                (
                    "  peer: the Service's chains rewritten",
                    "",
                    "nft -f (nftables mode)",
                    peer_cell(nf, "change_s"),
                    ratio(nf.get("change_s"), p50),
                )
            )
        g = o.get("growth") or []
        if len(g) > 1:
            steps = ", ".join(f"{x['total']:,}: {fmt_s(x['change']['p99'])}" for x in g)
            out.append(("one slice replaced, p99, as the cluster grows (endpoints: p99)", steps, "", "", ""))
        rl = o.get("rolling")
        if rl:
            if rl["stopped"]:
                proj = rl["s"] / max(rl["done"], 1) * rl["slices"]
                val = f"> {fmt_s(rl['s'])} (stopped at {rl['done']:,} of {rl['slices']:,}; ~{fmt_s(proj)} projected)"
            else:
                ps = rl["per_slice"]
                val = f"{fmt_s(rl['s'])} (p50 {fmt_s(ps['p50'])}, p99 {fmt_s(ps['p99'])} a slice)"
            out.append((f"rolling update: all {rl['slices']:,} slices replaced one by one", val, "", "", ""))
        m = o.get("memory")
        if m:
            out.append(
                (
                    "agent memory: peak RSS (RSS before the list / after the sync)",
                    f"{fmt_bytes(m['rss_peak'])} ({fmt_bytes(m['rss_before'])} / {fmt_bytes(m['rss_after'])})",
                    "",
                    "",
                    "",
                )
            )
            sizes = o.get("map_sizes") or {}
            out.append(
                (
                    f"kernel memory of the maps (memlock; preallocated for {sizes.get('backends', 0):,} backends)",
                    fmt_bytes(m["maps_total"]),
                    "",
                    "",
                    "",
                )
            )
        p = o.get("packet")
        if p:
            po, ps = p["one"], p["scaled"]
            for k, label in (
                ("est", f"per packet, service hit, 1 Service -> {ps['services']:,}: established flow"),
                ("new", "  new flow (backend picked, 2 conntrack entries written)"),
                ("new_spread", "  new flows spread over all Services (working set grows)"),
            ):
                out.append((label, f"{po[k]:.0f} -> {ps[k]:.0f} ns ({ps[k] / po[k]:.2f}x)", "", "", ""))
            pr = p.get("probe")
            if pr:
                a, b = pr["sizes"]
                for kind, label in (
                    ("full", f"  control: slot and backend lookups, 2 conntrack inserts alone, {a:,} -> {b:,} slots"),
                    ("no_backend", "  control without the backend lookup (a slot holding its backend)"),
                ):
                    x, y = pr[kind][str(a)], pr[kind][str(b)]
                    out.append((label, f"{x:.0f} -> {y:.0f} ns ({y / x:.2f}x)", "", "", ""))
    x = res.get("xdp")
    if x:
        ns = x["ns"]
        out.append(("**external packets, BPF_PROG_TEST_RUN: XDP vs tc (ns per packet)**", "", "", "", ""))
        for label, ours_k, peer, peer_k in (
            ("source-range drop", "xdp_drop", "tc ingress", "tc_drop"),
            ("established flow to another node (XDP: DNAT, SNAT, FIB, XDP_TX)", "xdp_forward",
             "tc ingress DNAT + egress SNAT", "tc_forward"),
        ):  # fmt: skip
            out.append((label, f"{ns[ours_k]:.0f} ns", peer, f"{ns[peer_k]:.0f} ns", ratio(ns[peer_k], ns[ours_k])))
        d = x["drops_per_s"]
        out.append(
            ("source-range drops per second, one core", f"{d['xdp'] / 1e6:.1f} M", "tc", f"{d['tc'] / 1e6:.1f} M", "")
        )
        out.append(("XDP in front of a flow tc serves (handed on)", f"+{ns['xdp_pass']:.0f} ns", "", "", ""))
    out += _shape_rows(res.get("shapes"))
    out += _load_rows(res.get("xdp_load"))
    lat = res.get("latency")
    if lat:
        out += _latency_rows(
            lat,
            f"**first-packet latency: connect() p50 / p99, {lat['count']} new connections**",
            "no Service (straight to the pod)",
            "connect_us",
            mean=False,
        )
        host = lat.get("host")
        if host:
            out += _latency_rows(
                host,
                f"**host client: connect() + 1 byte echoed + close(), p50 / p99 (mean), {host['count']} new "
                "connections**",
                "no Service (straight to the backend pod)",
                "total_us",
                mean=True,
            )
            # Its first part alone: where the dataplanes differ (the rest is
            # the server's and the client's wake-ups, the same for all).
            out += _latency_rows(
                host,
                "  of which connect() alone, p50 / p99 (mean)",
                "  no Service",
                "connect_us",
                mean=True,
                indent="  ",
            )
    return out


def _shape_rows(shapes: dict | None) -> list[tuple[str, str, str, str, str]]:
    """S1's Service in each shape: its full sync and one slice replaced."""
    if not shapes:
        return []
    first = next(iter(shapes.values()))
    n = first["entries"]["sp_be"] if first.get("entries") else None
    out = [
        (f"**one Service of {n:,} endpoints by shape: full sync; one slice change p50 / p99**" if n else
         "**one Service by shape: full sync; one slice change p50 / p99**", "", "", "", ""),
    ]  # fmt: skip
    for shape, x in shapes.items():
        c = x["change"]
        out.append(
            (
                f"{shape} ({x['what']}; {x['frontends']} frontend{'s' if x['frontends'] != 1 else ''})",
                f"{fmt_s(x['full_s'])}; {fmt_s(c['p50'])} / {fmt_s(c['p99'])}",
                "",
                "",
                "",
            )
        )
    return out


def _load_rows(x: dict | None) -> list[tuple[str, str, str, str, str]]:
    """External traffic under load: frames per second the node finished,
    ours next to each peer; the ratio is ours/peer (the peer's time per
    frame over ours, as for the other figures)."""
    if not x:
        return []
    pps, beyond = x["pps"], x["ns_beyond_floor"]

    def cell(m: str) -> str:
        return f"{pps[m] / 1e6:.2f} M/s ({beyond[m]:.0f} ns)"

    out = [
        ("**external traffic under load, UDP flood, one core: frames per second (ns a frame beyond the floor)**",
         "", "", "", ""),
        ("floor: sender, veth, an XDP program dropping all", f"{pps['floor'] / 1e6:.2f} M/s", "", "", ""),
    ]  # fmt: skip
    for label, ours, peers in (
        ("source-range drop: XDP", "xdp_drop",
         (("tc (TC_ACT_SHOT)", "tc_drop"), ("iptables (kube-proxy)", "iptables_drop"),
          (f"iptables, {x.get('many', 1000):,} other Services", "iptables_drop_many"))),
        ("established flow to another node: XDP forward", "xdp_forward",
         (("tc (DNAT, routing, SNAT)", "tc_forward"), ("iptables (DNAT, MASQUERADE)", "iptables_forward"))),
    ):  # fmt: skip
        for i, (peer, k) in enumerate(peers):
            out.append((label if i == 0 else "", cell(ours) if i == 0 else "", peer, cell(k), ratio(pps[ours], pps[k])))
    return out


def _latency_rows(
    lat: dict, title: str, direct: str, key: str, mean: bool, indent: str = ""
) -> list[tuple[str, str, str, str, str]]:
    """A latency figure's rows: the floor, then per number of Services ours
    next to each peer, the ratio of the p50s."""

    def cell(r):
        if not r:
            return "-"
        f = r[key]
        return f"{f['p50']:.0f} / {f['p99']:.0f} µs" + (f" ({f['mean']:.0f})" if mean else "")

    out = [(title, "", "", "", ""), (direct, cell(lat.get("direct")), "", "", "")]

    def against_peers(label: str, k: str) -> None:
        o = lat["ours"].get(k)
        for name, peer in (("iptables", "iptables (legacy)"), ("nft", "nftables")):
            r = lat[name].get(k)
            first = name == "iptables"
            out.append(
                (
                    f"{indent}{label}" if first else "",
                    cell(o) if first else "",
                    peer,
                    cell(r),
                    ratio(r[key]["p50"], o[key]["p50"]) if r and o else "",
                )
            )

    for n in lat["services"]:
        against_peers(f"{n:,} Services", str(n))
    if lat.get("wide"):
        against_peers(f"1 Service of {lat['wide']:,} endpoints", "wide")
    return out


def text_table(res: dict) -> str:
    rs = [("figure", "sliceproxy", "peer", "peer figure", "peer/ours")] + rows(res)
    widths = [max(len(r[i].replace("**", "")) for r in rs) for i in range(5)]
    lines = []
    for r in rs:
        lines.append("  ".join(r[i].replace("**", "").ljust(widths[i]) for i in range(5)).rstrip())
    return "\n".join(lines)


def markdown_table(res: dict) -> str:
    lines = ["| figure | sliceproxy | peer | peer figure | peer/ours |", "| --- | --- | --- | --- | --- |"]
    for r in rows(res):
        cells = [c.replace("|", "\\|") for c in r]
        cells[0] = cells[0].replace("  ", "&nbsp;&nbsp;", 1) if cells[0].startswith("  ") else cells[0]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(res: dict) -> list[tuple[str, bool | None, str]]:
    """(target, met?, what was measured)."""
    out: list[tuple[str, bool | None, str]] = []
    for key, limit in TARGET_FULL_S.items():
        sc = res["scenarios"].get(key)
        full = _Ours(sc and sc.get("ours")).get("full", "median_s")
        if not full:
            continue
        out.append(
            (
                f"{key} full sync under {fmt_s(limit)}",
                full < limit,
                f"{fmt_s(full)} ({full / limit:.1f}x the target)",
            )
        )
        ipt = (sc.get("iptables_legacy") or {}).get("full_s") if key == "S1" else None
        if ipt:
            out.append(
                (
                    f"S1 full sync at least {TARGET_FULL_RATIO}x faster than iptables-legacy-restore",
                    ipt / full >= TARGET_FULL_RATIO,
                    f"{ipt / full:.1f}x",
                )
            )
    for key in ("S2", "S3"):
        sc = res["scenarios"].get(key)
        peak = _Ours(sc and sc.get("ours")).get("memory", "rss_peak")
        if peak:
            out.append(
                (
                    f"{key} peak RSS at most {fmt_bytes(TARGET_PEAK_RSS)}",
                    peak <= TARGET_PEAK_RSS,
                    fmt_bytes(peak),
                )
            )
    pts = [
        (x["change"]["p99"], k, x["total"])
        for k, sc in res["scenarios"].items()
        for x in _Ours(sc.get("ours")).get("growth") or []
    ]
    if pts:
        p99, k, n = max(pts)
        what = f"worst {fmt_s(p99)} ({k} at {n:,} endpoints)"
        if p99 >= TARGET_CHANGE_P99_S:
            what += f", {p99 / TARGET_CHANGE_P99_S:.0f}x the target"
        out.append(
            (
                f"one slice change under {TARGET_CHANGE_P99_S * 1000:.0f} ms p99 at every size",
                p99 < TARGET_CHANGE_P99_S,
                what,
            )
        )
    shapes = res.get("shapes") or {}
    if shapes:
        worst = max(shapes, key=lambda k: shapes[k]["change"]["p99"])
        p99 = shapes[worst]["change"]["p99"]
        over = [k for k, x in shapes.items() if x["change"]["p99"] >= TARGET_CHANGE_P99_S]
        out.append(
            (
                f"one slice change under {TARGET_CHANGE_P99_S * 1000:.0f} ms p99 in every Service shape (S1's size)",
                not over,
                f"worst {fmt_s(p99)} ({worst})" + (f"; over it: {', '.join(over)}" if over else ""),
            )
        )
    for k, sc in res["scenarios"].items():
        p = _Ours(sc.get("ours")).get("packet")
        if not p:
            continue
        g_new = p["scaled"]["new"] / p["one"]["new"]
        g_est = p["scaled"]["est"] / p["one"]["est"]
        out.append(
            (
                f"per-packet cost at {k}'s size within 20% of 1 Service of 100 endpoints ({k})",
                max(g_new, g_est) <= TARGET_PACKET_GROWTH,
                f"established flow {g_est:.2f}x, new flow {g_new:.2f}x "
                f"(new flows spread over all Services: {p['scaled']['new_spread'] / p['one']['new_spread']:.2f}x)",
            )
        )
    return out


def targets_text(res: dict) -> str:
    return "\n".join(
        f"  [{'met' if ok else 'MISSED' if ok is False else '?'}] {name}: {what}" for name, ok, what in targets(res)
    )


def load_text(res: dict) -> str:
    ld = res["load"]
    return (
        f"machine: {res['machine']['cpu']}, {ld['cores']} cores; during the run the machine was busy "
        f"{ld['busy_cores']:.2f} cores on average, the bench {ld['bench_cores']:.2f} of them, others "
        f"{ld['others_cores']:.2f} (load average {ld['loadavg_start'][0]:.2f} at the start, "
        f"{ld['loadavg_end'][0]:.2f} at the end)"
    )


def plots(res: dict, out_dir: Path) -> list[Path]:
    """sync-vs-endpoints.png and packet-vs-services.png; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    # 1. Full sync time versus endpoints, every scenario, ours and peers.
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[tuple[int, float, str]]] = {
        "sliceproxy (list JSON to maps)": [],
        "iptables-legacy-restore": [],
        "iptables-nft-restore": [],
        "nft -f (nftables mode)": [],
    }
    stopped: list[tuple[str, int, float]] = []
    for k, sc in res["scenarios"].items():
        for g in _Ours(sc.get("ours")).get("growth") or []:
            series["sliceproxy (list JSON to maps)"].append((g["total"], g["full_s"], k))
        for name, rk in (
            ("iptables-legacy-restore", "iptables_legacy"),
            ("iptables-nft-restore", "iptables_nft"),
            ("nft -f (nftables mode)", "nft"),
        ):
            r = sc.get(rk)
            if not r:
                continue
            if r.get("full_s") is not None:
                series[name].append((r["endpoints"], r["full_s"], k))
            else:
                stopped.append((name, r["endpoints"], r["timeout_s"]))
    markers = {"S1": "o", "S1b": "o", "S2": "s", "S3": "^"}
    colors = dict(zip(series, ["tab:green", "tab:red", "tab:orange", "tab:blue"], strict=False))
    for name, pts in series.items():
        for shape in sorted({p[2] for p in pts}):
            sub = sorted((x, y) for x, y, k in pts if k == shape)
            ax.plot(
                [x for x, _ in sub],
                [y for _, y in sub],
                marker=markers.get(shape, "o"),
                color=colors[name],
                label=name if shape == sorted({p[2] for p in pts})[0] else None,
                linestyle="-" if len(sub) > 1 else "",
            )
    for name, x, t in stopped:
        ax.scatter([x], [t], marker="x", color=colors[name], s=80)
        ax.annotate("stopped", (x, t), textcoords="offset points", xytext=(5, 5), fontsize=8, color=colors[name])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("endpoints (o: 1 Service, s: Services x 10, ^: Services x 50)")
    ax.set_ylabel("full sync (s)")
    ax.set_title("Full sync time versus endpoints (peers: restore of pre-generated rules)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    p1 = out_dir / "sync-vs-endpoints.png"
    fig.tight_layout()
    fig.savefig(p1, dpi=110)
    plt.close(fig)
    written.append(p1)

    # 2. Per-packet cost versus Services.
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    pts_new, pts_est, pts_spread = [], [], []
    for _k, sc in res["scenarios"].items():
        p = _Ours(sc.get("ours")).get("packet")
        if not p:
            continue
        for side in ("one", "scaled"):
            pts_new.append((p[side]["services"], p[side]["new"]))
            pts_est.append((p[side]["services"], p[side]["est"]))
            pts_spread.append((p[side]["services"], p[side]["new_spread"]))
    for pts, label, mk in (
        (pts_new, "new flow, one Service", "o"),
        (pts_est, "established flow", "s"),
        (pts_spread, "new flows over all Services", "^"),
    ):
        best: dict[int, float] = {}
        for x, y in pts:
            best[x] = min(y, best.get(x, y))
        xs = sorted(best)
        a1.plot(
            xs,
            [best[x] for x in xs],
            marker=mk,
            label=label,
            color={"o": "tab:green", "s": "tab:olive", "^": "tab:cyan"}[mk],
        )
    a1.set_xscale("log")
    a1.set_ylim(bottom=0)
    a1.set_xlabel("Services programmed")
    a1.set_ylabel("ns per packet (BPF_PROG_TEST_RUN)")
    a1.set_title("sliceproxy tc program, per packet")
    a1.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=8)
    lat = res.get("latency")
    if lat:
        xs = lat["services"]
        for name, color, label in (
            ("ours", "tab:green", "sliceproxy"),
            ("iptables", "tab:red", "iptables (legacy)"),
            ("nft", "tab:blue", "nftables"),
        ):
            ys = [(x, ((lat[name].get(str(x)) or {}).get("connect_us") or {}).get("p50")) for x in xs]
            ys = [(x, y) for x, y in ys if y is not None]
            a2.plot([x for x, _ in ys], [y for _, y in ys], marker="o", color=color, label=label)
        if lat.get("direct"):
            a2.axhline(lat["direct"]["connect_us"]["p50"], color="gray", linestyle="--", label="no Service")
        a2.set_xscale("log")
        a2.set_ylim(bottom=0)
        a2.set_xlabel("Services")
        a2.set_ylabel("connect() p50 (µs)")
        a2.set_title("First packet of a new connection, between namespaces")
        a2.grid(True, which="both", alpha=0.3)
        a2.legend(fontsize=8)
    p2 = out_dir / "packet-vs-services.png"
    fig.tight_layout()
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    written.append(p2)
    return written
