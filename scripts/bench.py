#!/usr/bin/env python3
"""`make bench`: how fast sliceproxy programs Services, next to kube-proxy's
iptables and nftables modes, on the same machine in the same run.

Scenarios (EndpointSlices packed as the EndpointSlice controller packs them,
up to 100 endpoints a slice):
  S1   1 Service x 100,000 endpoints (S1b: x 120,000)
  S2   10,000 Services x 10 endpoints
  S3   5,000 Services x 50 endpoints (250,000 endpoints)

Ours, per scenario, in a subprocess of its own (scripts/bench/ours.py):
full sync from the list JSON the API server would send to every map entry
in the kernel; one slice replaced (p50, p99, and how that grows from a
small cluster); a rolling update (every slice replaced, one by one); peak
RSS and the maps' kernel memory; the tc program's cost per packet for a
service hit (BPF_PROG_TEST_RUN) at 1 Service and at the scenario's size.

Service shapes: S1's one Service as a NodePort, a LoadBalancer with
externalTrafficPolicy Local and a health check, with ClientIP affinity,
with topology hints, and under --external-lb=maglev: its full sync and one
slice replaced, next to the ClusterIP of the scenarios.

Peers, same Services: kube-proxy's iptables ruleset restored with
iptables-legacy-restore (and iptables-nft-restore where it finishes) into a
throwaway namespace, full, after one slice change as a whole-table restore
and as kube-proxy >= 1.28's partial restore; its nftables ruleset loaded
with `nft -f`, full and incremental. The rules are generated before the
clock starts: the peers' figures are lower bounds of kube-proxy's syncs,
which also compute them.

First-packet latency: new TCP connections between namespaces through the
iptables and nftables rulesets and through our dataplane, at 10 and 10,000
Services; in the same topologies, a host client (a process in the node
namespace, in a cgroup the bench makes): connect(), one byte echoed and
close() through our cgroup socket programs and through the rulesets' nat
OUTPUT hooks.

External traffic (scripts/bench/xdp.py, xdpload.py): the XDP program
against the tc programs of an external interface per packet
(BPF_PROG_TEST_RUN), then under load: a sender namespace floods a node's
uplink with UDP frames for an LB IP, and the drops of a refused source and
the forwards to another node's backend are counted per second with XDP,
tc alone and kube-proxy's iptables rules.

Prints a progress line per step and a table at the end; --json, --markdown
and --plots write the figures, docs/benchmarks.md's table and its PNG plots
(the plots need matplotlib: the table is printed without it). Run as root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _worker(argv: list[str]) -> int:
    kind = argv[0]
    if kind == "ours":
        from bench import ours

        return ours.worker_main(argv[1:])
    if kind == "attach":
        from bench import latency

        return latency.attach_main(argv[1:])
    raise SystemExit(f"unknown worker {kind}")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return _worker(sys.argv[2:])

    from bench import common, iptables, latency, nft, ours, report, xdp, xdpload
    from bench.common import FULL_SCENARIOS, QUICK_SCENARIOS, Cluster, LoadMeter, progress

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="the same scenarios, small (well under a minute): the smoke test"
    )
    ap.add_argument("--backends", type=int, help="endpoints of S1's one Service (default 100,000; quick 2,000)")
    ap.add_argument(
        "--only", metavar="S1,S2...", help="run only these parts (S1, S1b, S2, S3, shapes, xdp, xdpload, latency)"
    )
    ap.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    ap.add_argument("--markdown", metavar="FILE", help="write the results section of docs/benchmarks.md")
    ap.add_argument("--plots", metavar="DIR", help="write the PNG plots there (needs matplotlib)")
    ap.add_argument(
        "--peer-timeout", type=float, default=300, metavar="S", help="stop one iptables-legacy-restore after S seconds"
    )
    ap.add_argument("--nft-timeout", type=float, default=200, metavar="S", help="the same for one nft -f")
    ap.add_argument(
        "--iptables-nft-timeout", type=float, default=60, metavar="S", help="the same for one iptables-nft-restore"
    )
    ap.add_argument("--no-peers", action="store_true", help="only our figures")
    ap.add_argument(
        "--internal-traffic-policy",
        choices=("Cluster", "Local"),
        default="Cluster",
        help="the Services' policy; Local: this node uses its own endpoints only (1 in 100), and only our "
        "syncs are measured (no peers, no per-packet figures, no latency)",
    )
    ap.add_argument(
        "--no-latency",
        action="store_true",
        help="skip the first-packet latency between namespaces (and the host client's)",
    )
    ap.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="cProfile S1's full sync and changes (auto: when a time target is missed, full runs only)",
    )
    ap.add_argument(
        "--from-json",
        nargs="+",
        metavar="FILE",
        help="measure nothing: merge these --json outputs (runs made part by part with --only) and print, "
        "write the table and the plots from them",
    )
    args = ap.parse_args()
    if args.from_json:
        return render(merge([json.loads(Path(f).read_text()) for f in args.from_json]), args)
    if os.geteuid() != 0:
        print("bench: run as root (it loads BPF programs and makes network namespaces)", file=sys.stderr)
        return 2
    # SIGTERM/SIGHUP unwind through the finally blocks: namespaces deleted.
    common.topology_class()
    from scripts.harness.topo import exit_on_signals

    exit_on_signals((signal.SIGTERM, signal.SIGHUP))
    for tool in ("nsenter", "iptables-legacy-restore", "iptables-nft-restore", "nft"):
        if not common.have(tool):
            print(f"bench: {tool} not found (make deps installs it)", file=sys.stderr)
            return 2

    scenarios = list(QUICK_SCENARIOS if args.quick else FULL_SCENARIOS)
    if args.internal_traffic_policy != "Cluster":
        # The peers' rulesets and the latency topology model Cluster only.
        scenarios = [dataclasses.replace(s, internal_traffic_policy=args.internal_traffic_policy) for s in scenarios]
        args.no_peers = args.no_latency = True
    if args.backends:
        scenarios = [s.scaled(endpoints=args.backends) if s.key == "S1" else s for s in scenarios]
    want = set(args.only.split(",")) if args.only else None
    # The Service shapes: S1's one Service, as sized for this run.
    shapes_of = next(s for s in scenarios if s.key == "S1")
    if want is not None:
        scenarios = [s for s in scenarios if s.key in want]
    worker_timeout = 900 if not args.quick else 300

    meter = LoadMeter()
    t_start = time.monotonic()
    res: dict = {
        "quick": args.quick,
        "command": " ".join(["scripts/bench.py", *sys.argv[1:]]),
        "machine": common.machine(),
        "scenarios": {},
    }
    base = common.scratch_dir()
    errors: list[str] = []

    def guarded(what: str, fn):
        """Run one part; a failure is reported and the rest still runs."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - every part is independent
            import traceback

            traceback.print_exc()
            progress(f"FAILED: {what}: {type(e).__name__}: {e}")
            errors.append(f"{what}: {type(e).__name__}: {e}")
            return None

    try:
        for scn in scenarios:
            sc = res["scenarios"][scn.key] = {
                "label": scn.label,
                "internal_traffic_policy": scn.internal_traffic_policy,
                "services": scn.services,
                "endpoints": scn.endpoints,
                "total": scn.total,
                "slice_size": scn.slice_size,
            }
            # S1b is S1 a fifth larger: no second growth ladder.
            sc["ours"] = guarded(
                f"ours {scn.key}", lambda scn=scn: ours.measure(scn, base, args.quick, worker_timeout, scn.key != "S1b")
            )
            shutil.rmtree(ours.scratch_for(base, scn), ignore_errors=True)
            if args.no_peers:
                continue
            change = Cluster(scn).change_plan(1)[0]
            sc["iptables_legacy"] = guarded(
                f"iptables-legacy {scn.key}",
                lambda scn=scn, change=change: iptables.measure(
                    Cluster(scn), change, "iptables-legacy-restore", common.throwaway_netns, args.peer_timeout
                ),
            )
            # The nf_tables backend of iptables-restore is far slower on big
            # tables: S1 at full size with a timeout, the others at a tenth.
            if scn.key != "S1b":
                if scn.key == "S1" or args.quick:
                    nscn = scn
                elif scn.services > 1:
                    nscn = scn.scaled(services=max(1, scn.services // 10))
                else:
                    nscn = scn.scaled(endpoints=scn.endpoints // 10)
                sc["iptables_nft"] = guarded(
                    f"iptables-nft {scn.key}",
                    lambda nscn=nscn: iptables.measure(
                        Cluster(nscn),
                        Cluster(nscn).change_plan(1)[0],
                        "iptables-nft-restore",
                        common.throwaway_netns,
                        args.iptables_nft_timeout,
                        resync=False,
                    ),
                )
            sc["nft"] = guarded(
                f"nft {scn.key}",
                lambda scn=scn, change=change: nft.measure(
                    Cluster(scn), change, common.throwaway_netns, args.nft_timeout
                ),
            )
        if args.internal_traffic_policy == "Cluster" and (want is None or "shapes" in want):
            res["shapes"] = guarded("shapes", lambda: ours.measure_shapes(shapes_of, base, args.quick, worker_timeout))
        if want is None or "xdp" in want:
            res["xdp"] = guarded(
                "xdp", lambda: xdp.measure(200 if args.quick else 2000, 10_000 if args.quick else 100_000)
            )
        if want is None or "xdp" in want or "xdpload" in want:
            # 3 rounds of 8 runs of 0.75 s of the sender's time: 30-45 s with
            # the set-up, on 2 cores (quick: 1 round of 0.2 s, about 10 s).
            res["xdp_load"] = guarded(
                "xdp load", lambda: xdpload.measure(0.2 if args.quick else 0.75, 1 if args.quick else 3)
            )
        if not args.no_latency and (want is None or "latency" in want):
            sizes = [10, 200] if args.quick else [10, 10_000]
            res["latency"] = guarded(
                "latency",
                # A host client's connection costs ~0.1-0.3 ms: 2,000 take
                # under a second, against the rulesets' minutes of loading.
                lambda: latency.measure(
                    sizes,
                    100 if args.quick else 500,
                    200 if args.quick else 2000,
                    args.nft_timeout,
                    errors,
                    wide=2_000 if args.quick else latency.WIDE,
                ),
            )
        profile_wanted = args.profile == "always" or (
            args.profile == "auto" and not args.quick and any(ok is False for _, ok, _ in report.targets(res))
        )
        if profile_wanted and "S1" in res["scenarios"]:
            s1 = next(s for s in scenarios if s.key == "S1")
            res["profile_S1"] = guarded("profile", lambda: ours.profile(s1, base, worker_timeout))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    res["errors"] = errors
    res["load"] = meter.report()
    res["wall_s"] = time.monotonic() - t_start
    return render(res, args)


def merge(parts: list[dict]) -> dict:
    """One result from runs made part by part (--only S1, --only latency...)."""
    res = {**parts[0], "scenarios": {}, "errors": [], "command": " ; ".join(p["command"] for p in parts)}
    for p in parts:
        res["scenarios"].update(p["scenarios"])
        res["errors"] += p.get("errors", [])
        for k in ("latency", "profile_S1", "xdp", "xdp_load", "shapes"):
            if p.get(k):
                res[k] = p[k]
    walls = [p["load"]["wall_s"] for p in parts]
    total = sum(walls)
    res["load"] = {
        **parts[0]["load"],
        "wall_s": total,
        **{
            k: sum(p["load"][k] * w for p, w in zip(parts, walls, strict=True)) / total
            for k in ("busy_cores", "bench_cores", "others_cores")
        },
        "loadavg_end": parts[-1]["load"]["loadavg_end"],
    }
    res["wall_s"] = sum(p.get("wall_s", 0) for p in parts)
    return res


def render(res: dict, args: argparse.Namespace) -> int:
    from bench import report
    from bench.common import progress

    errors = res.get("errors", [])
    print()
    print(report.text_table(res))
    print()
    print("Targets:")
    print(report.targets_text(res))
    print()
    print(report.load_text(res))
    print(
        "The peers' figures time iptables-restore / nft alone on rules generated before the clock started: "
        "lower bounds of kube-proxy's syncs, which also compute the rules."
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(report.markdown_table(res) + "\n")
    if args.plots:
        written = report.plots(res, Path(args.plots))
        if written:
            print("plots: " + ", ".join(str(p) for p in written))
        else:
            print("plots: matplotlib is not installed; none written (pip install matplotlib)")
    progress(f"done in {res['wall_s']:.0f} s")
    if errors:
        print("\nFAILED parts (their figures are missing above):\n  " + "\n  ".join(errors))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
