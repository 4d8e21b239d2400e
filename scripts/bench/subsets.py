#!/usr/bin/env python3
"""EndpointSlice subsetting, measured on a real API server (docs/subsetting.md).

A control plane (scripts/harness/controlplane.py: etcd, kube-apiserver,
kube-controller-manager on loopback), Nodes in three zones, one Service
with trafficDistribution PreferClose (the EndpointSlice controller hints
each endpoint to its zone) and `sliceproxy subsetter` running. For each
zone, two watches of EndpointSlices stand for an agent of that zone: the
originals (what an agent watches with --subsets=off) and the zone's
subsets with `all` (--subsets=auto). Then a rolling update replaces every
Pod, one after the other (a new Pod Ready, the old one deleted), and the
watches count what the API server sends them: bytes and events. Two
rollouts, each on a fresh control plane: 10 Pods a second, where the
EndpointSlice controller writes each change on its own; and as fast as
the API server takes them, where it falls behind and batches changes of
several zones into one write (docs/subsetting.md says what that does to
the events ratio).

Also: how long after each new Pod turns Ready its address reaches each
watch (the part of network programming latency the subset path adds: the
subsetter's reaction and its coalescing), and the subsetter's cost: CPU
seconds (its /proc stat) and subset slice writes per original slice
change (its /metrics).

Figures are printed, and written as JSON with --json. Run by `make bench`
(scripts/bench.py --only subsets) or alone:
    .venv/bin/python scripts/bench/subsets.py [--pods 300] [--rate 10 0] [--quick]
Needs the binaries of `make k8s`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ctrl.k8s.kube import ORIGINALS_SELECTOR, PROXY_SELECTOR, Client, subsets_selector  # noqa: E402
from scripts.harness.controlplane import ControlPlane, free_port, wait_until  # noqa: E402

ZONES = ("zone-1", "zone-2", "zone-3")
SMP = "application/strategic-merge-patch+json"
NS = "bench-subsets"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"


class Watch(threading.Thread):
    """One watch of EndpointSlices with a label selector: bytes and events
    received, and when each address was first seen ready."""

    def __init__(self, client: Client, selector: str):
        super().__init__(daemon=True)
        self.client, self.selector = client, selector
        self.bytes = self.events = 0
        self.seen: dict[str, float] = {}
        self.gone: dict[str, float] = {}  # address -> when first missing from a slice that had it
        # Slice name -> its addresses, from a list: the watch goes on from it.
        listed = client.get_json(SLICES, labelSelector=selector)
        self.rv = listed["metadata"]["resourceVersion"]
        self.held: dict[str, set[str]] = {
            sl["metadata"]["name"]: {e["addresses"][0] for e in sl.get("endpoints") or []}
            for sl in listed.get("items") or []
        }
        self.stop = threading.Event()
        self.resp = None

    def opened(self, r) -> None:
        self.resp = r

    def run(self) -> None:
        try:
            for line in self.client.stream(
                SLICES, read_timeout=600, on_open=self.opened, watch=1, resourceVersion=self.rv,
                labelSelector=self.selector, allowWatchBookmarks="false", timeoutSeconds=590,
            ):  # fmt: skip
                if self.stop.is_set():
                    return
                now = time.monotonic()
                self.bytes += len(line) + 1
                ev = json.loads(line)
                self.events += 1
                obj = ev.get("object") or {}
                addrs = set()
                for ep in obj.get("endpoints") or []:
                    addrs.add(ep["addresses"][0])
                    if (ep.get("conditions") or {}).get("ready", True):
                        self.seen.setdefault(ep["addresses"][0], now)
                name = (obj.get("metadata") or {}).get("name", "")
                if ev.get("type") == "DELETED":
                    addrs = set()
                for a in self.held.get(name, set()) - addrs:
                    self.gone.setdefault(a, now)
                self.held[name] = addrs
        except Exception:  # cut at the end
            if not self.stop.is_set():
                raise

    def close(self) -> None:
        self.stop.set()
        if self.resp is not None:
            try:
                self.resp.shutdown()
            except Exception:
                pass


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_sum(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def pod(cp: ControlPlane, name: str, node: str, ip: str) -> None:
    cp.ok(
        "POST",
        f"/api/v1/namespaces/{NS}/pods",
        {
            "metadata": {"name": name, "labels": {"app": "web"}},
            "spec": {
                "nodeName": node,
                "automountServiceAccountToken": False,
                "containers": [{"name": "web", "image": "registry.invalid/web:1"}],
            },
        },
    )
    cp.ok(
        "PATCH",
        f"/api/v1/namespaces/{NS}/pods/{name}/status",
        {
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
            }
        },
        content_type=SMP,
    )


def ip_of(i: int) -> str:
    return f"198.18.{100 + i // 250}.{1 + i % 250}"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run(pods: int, nodes_per_zone: int, cp: ControlPlane, write_period: float = 0.05, rate: float = 10.0) -> dict:
    nodes = {f"bench-{z[-1]}{k}": z for z in ZONES for k in range(nodes_per_zone)}
    for name, zone in nodes.items():
        cp.ok("POST", "/api/v1/nodes", {"metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}})
        cp.ok("PATCH", f"/api/v1/nodes/{name}/status", {"status": {"allocatable": {"cpu": "4"}}}, content_type=SMP)
    cp.ok("POST", "/api/v1/namespaces", {"metadata": {"name": NS}})
    cp.wait_service_account(NS)
    spec = {
        "selector": {"app": "web"},
        "trafficDistribution": "PreferClose",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
    }
    cp.ok("POST", f"/api/v1/namespaces/{NS}/services", {"metadata": {"name": "web"}, "spec": spec})
    node_list = list(nodes)
    where = {}
    for i in range(pods):
        node = node_list[i % len(node_list)]
        where[f"web-{i}"] = (node, ip_of(i))
        pod(cp, f"web-{i}", node, ip_of(i))

    def hinted() -> bool:
        body = cp.ok(
            "GET",
            f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices?labelSelector=kubernetes.io/service-name%3Dweb",
        )
        eps = [e for s in body["items"] for e in s.get("endpoints") or []]
        return len(eps) == pods and all((e.get("hints") or {}).get("forZones") for e in eps)

    wait_until(hinted, 120, what=f"{pods} hinted endpoints")

    port = free_port()
    sub = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "sliceproxy"),
            "subsetter",
            "--kubeconfig",
            cp.kubeconfig,
            "--lease-namespace",
            NS,
            "--metrics-bind-address",
            f"127.0.0.1:{port}",
            "--lease-duration",
            "6",
            "--renew-period",
            "2",
            "--write-period",
            str(write_period),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        lease = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/sliceproxy-subsetter"
        wait_until(
            lambda: (cp.request("GET", lease)[1] or {}).get("metadata", {}).get("annotations"),
            60,
            what="subsets synced",
        )
        client = Client(cp.server, cp.ca_file, token=cp.token)
        watches = {}
        for z in ZONES:
            watches[z, "originals"] = Watch(client, ORIGINALS_SELECTOR)
            watches[z, "subsets"] = Watch(client, f"{subsets_selector(z)},{PROXY_SELECTOR}")
        for w in watches.values():
            w.start()
        cpu0 = cpu_seconds(sub.pid)
        writes0 = metric_sum(port, "sliceproxy_subsetter_writes_total")
        changes0 = metric_sum(port, "sliceproxy_subsetter_original_changes_total")
        lag0 = (
            metric_sum(port, "sliceproxy_subsetter_lag_seconds_sum"),
            metric_sum(port, "sliceproxy_subsetter_lag_seconds_count"),
        )
        ready_at: dict[str, tuple[float, str]] = {}
        deleted_at: dict[str, tuple[float, str]] = {}  # the old Pods' addresses
        t0 = time.monotonic()
        for i in range(pods):
            # Rolling update, maxSurge 1: the new Pod Ready, then the old one gone;
            # `rate` steps a second, or as fast as the API server takes them.
            if rate > 0:
                time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            old = f"web-{i}"
            node, _ = where[old]
            ip = ip_of(pods + i)
            pod(cp, f"web-v2-{i}", node, ip)
            ready_at[ip] = (time.monotonic(), nodes[node])
            deleted_at[where[old][1]] = (time.monotonic(), nodes[node])
            cp.ok("DELETE", f"/api/v1/namespaces/{NS}/pods/{old}?gracePeriodSeconds=0")
        rollout = time.monotonic() - t0

        def caught_up() -> bool:
            return all(
                ip in watches[z, "subsets"].seen and ip in watches[z, "originals"].seen
                for ip, (_, z) in ready_at.items()
            ) and all(
                ip in watches[z, "subsets"].gone and ip in watches[z, "originals"].gone
                for ip, (_, z) in deleted_at.items()
            )

        wait_until(caught_up, 120, what="every new address in every watch")
        # Deletions trail: let the subsetter's last coalesced writes land.
        time.sleep(3)
        cpu = cpu_seconds(sub.pid) - cpu0
        writes = metric_sum(port, "sliceproxy_subsetter_writes_total") - writes0
        changes = metric_sum(port, "sliceproxy_subsetter_original_changes_total") - changes0
        lag_n = metric_sum(port, "sliceproxy_subsetter_lag_seconds_count") - lag0[1]
        lag = (metric_sum(port, "sliceproxy_subsetter_lag_seconds_sum") - lag0[0]) / lag_n if lag_n else float("nan")
        for w in watches.values():
            w.close()
    finally:
        sub.terminate()
        sub.wait(15)

    per_zone = {}
    for z in ZONES:
        o, s = watches[z, "originals"], watches[z, "subsets"]
        lat_o = [o.seen[ip] - t for ip, (t, zz) in ready_at.items() if zz == z]
        lat_s = [s.seen[ip] - t for ip, (t, zz) in ready_at.items() if zz == z]
        per_zone[z] = {
            "originals": {"bytes": o.bytes, "events": o.events},
            "subsets": {"bytes": s.bytes, "events": s.events},
            "bytes_ratio": s.bytes / o.bytes,
            "events_ratio": s.events / o.events,
            "latency_originals_p50_s": pct(lat_o, 0.5),
            "latency_originals_p95_s": pct(lat_o, 0.95),
            "latency_subsets_p50_s": pct(lat_s, 0.5),
            "latency_subsets_p95_s": pct(lat_s, 0.95),
        }
        gone_o = [o.gone[ip] - t for ip, (t, zz) in deleted_at.items() if zz == z]
        gone_s = [s.gone[ip] - t for ip, (t, zz) in deleted_at.items() if zz == z]
        per_zone[z]["removal_originals_p50_s"] = pct(gone_o, 0.5)
        per_zone[z]["removal_subsets_p50_s"] = pct(gone_s, 0.5)
        per_zone[z]["removal_originals_p95_s"] = pct(gone_o, 0.95)
        per_zone[z]["removal_subsets_p95_s"] = pct(gone_s, 0.95)
        per_zone[z]["removal_ratio_p50"] = pct(gone_s, 0.5) / pct(gone_o, 0.5)
        # The subset path's own part: from the original reaching its watch
        # to the subset reaching the zone's.
        hop = [s.seen[ip] - o.seen[ip] for ip, (_, zz) in ready_at.items() if zz == z]
        per_zone[z]["hop_p50_s"] = pct(hop, 0.5)
        per_zone[z]["hop_p95_s"] = pct(hop, 0.95)
        per_zone[z]["latency_ratio_p50"] = per_zone[z]["latency_subsets_p50_s"] / per_zone[z]["latency_originals_p50_s"]
        per_zone[z]["latency_ratio_p95"] = per_zone[z]["latency_subsets_p95_s"] / per_zone[z]["latency_originals_p95_s"]
    return {
        "pods": pods,
        "rate": rate,
        "write_period_s": write_period,
        "zones": len(ZONES),
        "nodes": len(nodes),
        "rollout_seconds": rollout,
        "per_zone": per_zone,
        "bytes_ratio_mean": statistics.mean(v["bytes_ratio"] for v in per_zone.values()),
        "events_ratio_mean": statistics.mean(v["events_ratio"] for v in per_zone.values()),
        "latency_ratio_p50_max": max(v["latency_ratio_p50"] for v in per_zone.values()),
        "latency_ratio_p95_max": max(v["latency_ratio_p95"] for v in per_zone.values()),
        "removal_ratio_p50_max": max(v["removal_ratio_p50"] for v in per_zone.values()),
        "subsetter_cpu_seconds": cpu,
        "subsetter_writes": writes,
        "original_slice_changes": changes,
        "writes_per_original_change": writes / changes if changes else float("nan"),
        "subsetter_lag_mean_s": lag,
    }


def report(r: dict) -> str:
    lines = [
        f"rolling update of {r['pods']} Pods of one hinted Service, {r['zones']} zones, {r['nodes']} nodes, "
        + (f"{r['rate']:g} Pods a second" if r["rate"] > 0 else "as fast as the API server takes them")
        + f" ({r['rollout_seconds']:.1f} s); subsetter --write-period {r['write_period_s']:g}",
        f"{'zone':8} {'originals B':>12} {'ev':>5} {'subsets B':>10} {'ev':>5} {'bytes':>6} {'events':>6} "
        f"{'p50 orig':>9} {'p50 sub':>8} {'p95 orig':>9} {'p95 sub':>8} {'hop p50':>8} {'p95':>6}",
    ]
    for z, v in r["per_zone"].items():
        lines.append(
            f"{z:8} {v['originals']['bytes']:>12} {v['originals']['events']:>5} {v['subsets']['bytes']:>10} "
            f"{v['subsets']['events']:>5} {v['bytes_ratio']:>6.2f} {v['events_ratio']:>6.2f} "
            f"{v['latency_originals_p50_s'] * 1000:>7.0f}ms {v['latency_subsets_p50_s'] * 1000:>6.0f}ms "
            f"{v['latency_originals_p95_s'] * 1000:>7.0f}ms {v['latency_subsets_p95_s'] * 1000:>6.0f}ms "
            f"{v['hop_p50_s'] * 1000:>6.0f}ms {v['hop_p95_s'] * 1000:>4.0f}ms"
        )
    lines.append(
        f"per agent, subsets / originals: bytes {r['bytes_ratio_mean']:.2f}, events {r['events_ratio_mean']:.2f} "
        f"(target <= 0.33 with 3 zones)"
    )
    lines.append(
        f"latency, subsets / originals, worst zone: p50 {r['latency_ratio_p50_max']:.2f}x, "
        f"p95 {r['latency_ratio_p95_max']:.2f}x (target <= 2x)"
    )
    lines.append(
        "removals, Pod deleted to address gone, p50 originals / subsets: "
        + ", ".join(
            f"{z} {v['removal_originals_p50_s'] * 1000:.0f} / {v['removal_subsets_p50_s'] * 1000:.0f} ms"
            for z, v in r["per_zone"].items()
        )
        + f"; worst ratio {r['removal_ratio_p50_max']:.2f}x"
    )
    lines.append(
        f"subsetter: {r['subsetter_cpu_seconds']:.2f} CPU s, {r['subsetter_writes']:.0f} writes for "
        f"{r['original_slice_changes']:.0f} original slice changes ({r['writes_per_original_change']:.2f} a change), "
        f"mean lag from a change seen to written {r['subsetter_lag_mean_s'] * 1000:.0f} ms"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=300, help="Pods of the Service (default 300: 3 original slices)")
    ap.add_argument("--nodes-per-zone", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="30 Pods: the smoke size")
    ap.add_argument("--write-period", type=float, default=0.05, help="the subsetter's (default 0.05 s, its own)")
    ap.add_argument(
        "--rate",
        type=float,
        nargs="+",
        default=[10.0, 0.0],
        help="rolling update steps (Pods replaced) a second, one rollout per value; 0: as fast as the API server "
        "takes them (default: 10, then 0)",
    )
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON (a list, one per rate)")
    a = ap.parse_args(argv)
    pods = 30 if a.quick else a.pods
    out = []
    for rate in a.rate:
        # A control plane each: the second rollout starts from the same
        # state as the first, not from its leftovers.
        with ControlPlane() as cp:
            r = run(pods, a.nodes_per_zone, cp, a.write_period, rate)
        print(report(r), flush=True)
        out.append(r)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
