#!/usr/bin/env python3
"""`make bench`: how fast sliceproxy programs services, next to kube-proxy's
iptables mode on the same machine in the same run.

Figures (ours):
  full    one Service with N backends, from parsed EndpointSlice objects to
          every entry in the kernel maps (plan + diff + encode + batch writes)
  change  one Service's slice of 100 endpoints replaced, among N backends in
          N/100 services (state update + plan + diff + writes); p50 and p99
  packet  per-packet cost of the tc program for a service hit
          (BPF_PROG_TEST_RUN), with 1 service and with many programmed
Peer:
  iptables-restore of the ruleset kube-proxy's iptables mode writes for the
  same Service (KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-* with statistic
  probabilities and masquerade marks), into a throwaway network namespace.
  Generating the rules is not timed, so this is a lower bound of what
  kube-proxy spends per sync.

Prints a progress line per step, a table with peer/ours ratios at the end,
and with --json the figures as JSON. Run as root.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ctrl import loader  # noqa: E402
from ctrl.agent import paused_gc  # noqa: E402
from ctrl.apply import Writer  # noqa: E402
from ctrl.diff import Programmed  # noqa: E402
from ctrl.objects import parse  # noqa: E402
from ctrl.plan import plan_service  # noqa: E402
from ctrl.sizes import MapSizes  # noqa: E402
from ctrl.state import ClusterState, Event  # noqa: E402


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def backend_ip(i: int) -> str:
    # Backends from 198.18.0.0/15: 131,072 addresses, enough for the sizes here.
    return socket.inet_ntoa((0xC6120000 + 256 + i).to_bytes(4, "big"))


def vip(i: int) -> str:
    return socket.inet_ntoa((0xC6130000 + 1 + i).to_bytes(4, "big"))


def raw_service(name: str, ip: str) -> dict:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    }


def raw_slice(service: str, idx: int, ips: list[str]) -> dict:
    # Packed the way the EndpointSlice controller packs them: up to 100 a slice.
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": f"{service}-{idx:05d}", "namespace": "bench", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node-a"} for ip in ips],
    }


def capacity_for(n: int) -> tuple[MapSizes, MapSizes]:
    size = max(65536, 1 << (n * 2 - 1).bit_length())
    sizes = MapSizes(services=65536, backends=size, slots=size, conntrack=65536)
    return sizes, sizes


def bench_full(n: int, rounds: int) -> dict:
    progress(f"full sync: 1 Service, {n} backends, {rounds} rounds")
    svc = parse(raw_service("big", vip(0)))
    ips = [backend_ip(i) for i in range(n)]
    # What the API server sends for a list: one JSON document.
    body = json.dumps(
        {"kind": "EndpointSliceList", "items": [raw_slice("big", s, ips[s * 100 : (s + 1) * 100]) for s in range((n + 99) // 100)]}
    ).encode()
    t = time.perf_counter()
    slices = []
    for item in json.loads(body)["items"]:
        slices.append(parse(item))
    parse_s = time.perf_counter() - t
    sizes, cap = capacity_for(n)
    times, writes = [], []
    for _ in range(rounds):
        dp = loader.load(pin_dir=None, sizes=sizes)
        w = Writer(dp.maps)
        with paused_gc():  # as the agent's sync does
            t0 = time.perf_counter()
            fronts, _ = plan_service(svc, slices)
            cs = Programmed(cap).sync({"bench/big": fronts})
            write_s = w.apply(cs)
            times.append(time.perf_counter() - t0)
        writes.append(write_s)
        assert len(dp.maps["sp_slot_v1"].items()) == n
        dp.close()
    return {"n": n, "parse_s": parse_s, "full_s": min(times), "full_median_s": statistics.median(times), "write_s": min(writes)}


def bench_change(n: int, changes: int) -> dict:
    nsvc = max(1, n // 100)
    progress(f"one-slice change: {nsvc} Services x 100 backends, {changes} changes")
    sizes, cap = capacity_for(n + 100 * changes)
    dp = loader.load(pin_dir=None, sizes=sizes)
    w = Writer(dp.maps)
    st = ClusterState("node-a")
    prog = Programmed(cap)
    for s in range(nsvc):
        st.apply(Event("upsert", "Service", f"bench/s{s}", parse(raw_service(f"s{s}", vip(s)))))
        sl = parse(raw_slice(f"s{s}", 0, [backend_ip(s * 100 + i) for i in range(100)]))
        st.apply(Event("upsert", "EndpointSlice", f"bench/{sl.name}", sl))
    desired = {k: plan_service(st.services[k], st.slices_of(k))[0] for k in st.services}
    w.apply(prog.sync(desired, prune_except=set(st.services)))
    # Fresh addresses for the replacements, beyond the ones in use.
    spare = iter(range(n, n + 100 * changes + 100))
    lat = []
    for c in range(changes):
        s = (c * 7919) % nsvc
        raw = raw_slice(f"s{s}", 0, [backend_ip(next(spare)) for _ in range(100)])
        with paused_gc():
            t0 = time.perf_counter()
            sl = parse(raw)
            dirty = st.apply(Event("upsert", "EndpointSlice", f"bench/{sl.name}", sl))
            cs = prog.sync({k: plan_service(st.services[k], st.slices_of(k))[0] for k in dirty})
            w.apply(cs)
            lat.append(time.perf_counter() - t0)
        assert cs.summary()["slots_set"] == 100
    dp.close()
    lat.sort()
    return {
        "n": n,
        "services": nsvc,
        "p50_s": lat[len(lat) // 2],
        "p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "max_s": lat[-1],
    }


def bench_packet(nsvc: int, repeat: int) -> dict:
    """ns per packet for a service hit through a conntrack'd flow and a new one."""
    from scapy.all import IP, TCP, Ether  # test dependency, present in the venv

    progress(f"per-packet cost: {nsvc} Services programmed, repeat {repeat}")
    sizes, cap = capacity_for(nsvc * 2)
    dp = loader.load(pin_dir=None, sizes=sizes)
    w = Writer(dp.maps)
    prog = Programmed(cap)
    desired = {}
    for s in range(nsvc):
        svc = parse(raw_service(f"s{s}", vip(s)))
        sl = parse(raw_slice(f"s{s}", 0, [backend_ip(s), backend_ip(s + nsvc)]))
        desired[svc.key] = plan_service(svc, [sl])[0]
    w.apply(prog.sync(desired))
    pkt = bytes(Ether() / IP(src="198.18.255.2", dst=vip(nsvc // 2)) / TCP(sport=40000, dport=80, flags="A"))
    ret, _, _ = dp.test_run(pkt)  # creates the flow's conntrack entry
    samples = [dp.test_run(pkt, repeat=repeat)[2] for _ in range(7)]
    dp.close()
    # The least disturbed run: the other core's noise only ever adds time.
    return {"services": nsvc, "ns_per_packet": min(samples), "verdict": ret}


def kube_chain(prefix: str, text: str) -> str:
    # Chain names as kube-proxy makes them: a prefix and 16 base32 chars of
    # a SHA-256 of the service port (or endpoint) identity.
    digest = base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()
    return f"{prefix}{digest[:16]}"


def iptables_ruleset(n: int) -> str:
    """kube-proxy's iptables-mode nat table for one ClusterIP Service with n endpoints."""
    name = "bench/big:http"
    svc_chain = kube_chain("KUBE-SVC-", name + "tcp")
    seps = [(backend_ip(i), kube_chain("KUBE-SEP-", name + "tcp" + backend_ip(i) + ":8080")) for i in range(n)]
    out = ["*nat"]
    for ch in ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", svc_chain):
        out.append(f":{ch} - [0:0]")
    out += [f":{ch} - [0:0]" for _, ch in seps]
    out += [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
        f'-A KUBE-SERVICES -m comment --comment "{name} cluster IP" -m tcp -p tcp -d {vip(0)}/32 --dport 80 -j {svc_chain}',
        f'-A {svc_chain} -m comment --comment "{name} cluster IP" -m tcp -p tcp -d {vip(0)}/32 --dport 80 '
        f"! -s 198.18.0.0/15 -j KUBE-MARK-MASQ",
    ]
    for i, (ip, ch) in enumerate(seps):
        left = n - i
        if left > 1:
            out.append(
                f'-A {svc_chain} -m comment --comment "{name} -> {ip}:8080" -m statistic --mode random '
                f"--probability {1.0 / left:.10f} -j {ch}"
            )
        else:
            out.append(f'-A {svc_chain} -m comment --comment "{name} -> {ip}:8080" -j {ch}')
    for ip, ch in seps:
        out.append(f'-A {ch} -m comment --comment "{name}" -s {ip}/32 -j KUBE-MARK-MASQ')
        out.append(f'-A {ch} -m comment --comment "{name}" -m tcp -p tcp -j DNAT --to-destination {ip}:8080')
    out.append(
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule '
        'in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS'
    )
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def bench_iptables(tool: str, n: int, rounds: int, timeout: float) -> dict:
    """Time `tool` restoring kube-proxy's ruleset for n endpoints: the first
    load, then (rounds-1) full re-syncs of the same table, as kube-proxy does."""
    version = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip()
    progress(f"peer: {version}, 1 Service, {n} endpoints, {rounds} rounds")
    rules = iptables_ruleset(n)
    ns = f"spbench{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    times: list[float] = []
    timed_out = False
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".rules", delete=False) as f:
            f.write(rules)
            path = f.name
        for _ in range(rounds):
            t0 = time.perf_counter()
            try:
                # --noflush with every chain declared replaces their
                # contents: kube-proxy's full sync.
                subprocess.run(["ip", "netns", "exec", ns, tool, "--noflush", path], check=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                break
            times.append(time.perf_counter() - t0)
        os.unlink(path)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return {
        "tool": version,
        "n": n,
        "lines": rules.count("\n"),
        "first_s": times[0] if times else None,
        "resync_s": min(times[1:]) if len(times) > 1 else None,
        "timed_out_after_s": timeout if timed_out else None,
    }


def fmt_s(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10,000 backends, fewer rounds: a few seconds")
    ap.add_argument("--backends", type=int, help="backends of the big Service (default 100,000; quick 10,000)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--peer-timeout", type=float, default=300, metavar="SECONDS", help="stop a peer's restore after this")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: run as root (it loads BPF programs and makes a network namespace)", file=sys.stderr)
        return 2
    n = args.backends or (10_000 if args.quick else 100_000)
    rounds = 2 if args.quick else 5
    res = {
        "full": bench_full(n, rounds),
        "change": bench_change(n, 50 if args.quick else 300),
        "packet_1": bench_packet(1, 100_000 if not args.quick else 10_000),
        "packet_many": bench_packet(10_000 if not args.quick else 1_000, 100_000 if not args.quick else 10_000),
        # The legacy backend is what the published kube-proxy figures used;
        # the nf_tables backend of iptables-restore is far slower on large
        # rulesets, so it runs at a size that finishes.
        "iptables_legacy": bench_iptables("iptables-legacy-restore", n, 2, args.peer_timeout),
        "iptables_nft": bench_iptables("iptables-nft-restore", min(n, 10_000), 1, args.peer_timeout),
    }
    f, c, p1, pm = res["full"], res["change"], res["packet_1"], res["packet_many"]
    ipt, nft = res["iptables_legacy"], res["iptables_nft"]

    def peer(r: dict, key: str) -> str:
        if r[key] is None:
            return f"> {r['timed_out_after_s']:.0f} s (stopped)" if r["timed_out_after_s"] else "-"
        return fmt_s(r[key])

    def ratio(r: dict, key: str, ours: float) -> str:
        return f"{r[key] / ours:.1f}x" if r[key] else "-"

    rows = [
        ("figure", "sliceproxy", "kube-proxy iptables (peer)", "peer/ours"),
        (
            f"full sync, 1 Service x {n} endpoints, legacy iptables ({ipt['lines']} lines)",
            fmt_s(f["full_s"]),
            peer(ipt, "first_s"),
            ratio(ipt, "first_s", f["full_s"]),
        ),
        ("  re-sync of the same table", fmt_s(f["full_s"]), peer(ipt, "resync_s"), ratio(ipt, "resync_s", f["full_s"])),
        ("  of which kernel batch writes", fmt_s(f["write_s"]), "", ""),
        (
            f"full sync, 1 Service x {nft['n']} endpoints, iptables-nft",
            "",
            peer(nft, "first_s"),
            "",
        ),
        (f"  decoding the list JSON of {(n + 99) // 100:,} slices (before the full sync)", fmt_s(f["parse_s"]), "", ""),
        (f"one slice (100 endpoints) changed, p50, {c['services']} Services", fmt_s(c["p50_s"]), "", ""),
        ("one slice changed, p99", fmt_s(c["p99_s"]), "", ""),
        ("per-packet, 1 Service (established flow)", f"{p1['ns_per_packet']:.0f} ns", "", ""),
        (f"per-packet, {pm['services']} Services", f"{pm['ns_per_packet']:.0f} ns", "", f"{pm['ns_per_packet'] / max(p1['ns_per_packet'], 1):.2f}x of 1 Service"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    for r in rows:
        print("  ".join(r[i].ljust(widths[i]) for i in range(4)))
    print(
        "\nThe iptables figure times iptables-restore alone on a pre-generated ruleset: a lower bound of "
        "kube-proxy's sync, which also computes the rules."
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
