#!/usr/bin/env python3
"""Maglev tables (--external-lb=maglev, docs/semantics.md), measured.

  build       ctrl.model.maglev.build for N backends at M = 16381 (the
              default), the Python reference (cold: the backends'
              permutations hashed too; then the best and median of
              several builds, as a Service's next table); and the
              population alone (the M ln M probes), in Python and in the C
              the agent runs (ctrl.dataplane.native).
  disruption  one backend of N removed (and one added): the fraction of
              the M entries that change hands, the removed backend's own
              ones included (1/N is the least possible).
  memory      the kernel memory of the Maglev maps (memlock in fdinfo:
              the tables' chunks and the frontends' pointers) after a full
              sync of S LoadBalancer Services, per table.
  change      the one-slice change of the agent (the bench's other
              figures' step: one EndpointSlice of a Service replaced by
              fresh endpoints, then Agent.sync, plan to the last map
              write), p50 and p99, for S LoadBalancer Services x E
              endpoints, with --external-lb random and maglev side by side.

The agent is `sliceproxy run`'s own (ctrl.cli.run.build_agent from its
flag parser), writing into freshly loaded private maps; the objects are
the ones its sources would parse. Figures are printed, and written as JSON
with --json. Run as root:
    .venv/bin/python scripts/bench/maglev.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ctrl.dataplane import native  # noqa: E402
from ctrl.model import maglev  # noqa: E402

M = maglev.DEFAULT_SIZE
NODE = "node-0"
NODE_IP = "198.18.0.10"
SLICE = 100  # endpoints per EndpointSlice, as the controller packs them


def ep_addr(n: int) -> str:
    """Endpoint n's address: 198.18.0.0/15 past the node's, up to 131,000."""
    n += 256
    return f"198.{18 + n // 65536}.{n // 256 % 256}.{n % 256}"


def idents(n: int, start: int = 0) -> list[tuple[bytes, int]]:
    from ctrl.util.addrs import addr16

    return [(addr16(ep_addr(i)), 8080) for i in range(start, start + n)]


def time_build(n: int, repeat: int) -> dict:
    backends = idents(n)
    # Cold: the backends' permutations hashed too (a new Service); then
    # warm, as a Service's next table (mostly the same backends) is built.
    maglev.permutation.cache_clear()
    t0 = time.perf_counter()
    maglev.build_for(backends, M)
    cold = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        maglev.build_for(backends, M)
        times.append(time.perf_counter() - t0)
    # The population alone, in Python (the reference) and in C (what the
    # agent runs: ctrl.dataplane.native), from the same permutations.
    perms = [maglev.permutation(maglev.identity(a, p), M) for a, p in maglev.order(backends)]
    packed = [native.pack(o, k) for o, k in perms]
    ids = list(range(1, len(perms) + 1))
    fill_py, fill_c = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        maglev.fill(perms, M)
        fill_py.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        native.fill(packed, ids, M)
        fill_c.append(time.perf_counter() - t0)
    return {
        "backends": n,
        "size": M,
        "cold_s": cold,
        "best_s": min(times),
        "median_s": statistics.median(times),
        "fill_python_s": statistics.median(fill_py),
        "fill_c_s": statistics.median(fill_c),
        "native": native.missing() is None,
    }


def disruption(n: int) -> dict:
    backends = idents(n + 1)

    def owners(bs):
        ordered, table = maglev.build_for(bs, M)
        return [ordered[i] for i in table]

    base = owners(backends[:n])
    gone = backends[n // 2]
    removed = owners([b for b in backends[:n] if b != gone])
    added = owners(backends)
    moved_rm = sum(1 for a, b in zip(base, removed, strict=True) if a != b)
    moved_add = sum(1 for a, b in zip(base, added, strict=True) if a != b)
    return {
        "backends": n,
        "removal_moved": moved_rm / M,
        "removal_own": sum(1 for a in base if a == gone) / M,
        "addition_moved": moved_add / M,
        "ideal": 1 / n,
    }


class Bench:
    """An agent as `sliceproxy run` builds it, on private maps, fed the
    objects of S LoadBalancer Services of E endpoints each."""

    def __init__(self, services: int, endpoints: int, mode: str):
        from ctrl.cli import parser as cli
        from ctrl.cli.run import build_agent
        from ctrl.dataplane import loader
        from ctrl.dataplane.apply import Writer

        self.services, self.endpoints = services, endpoints
        flags = [
            "--node-name", NODE, "--metrics-bind-address", "", "--healthz-bind-address", "",
            "--external-lb", mode, "--max-maglev-entries", str(max(1, 2 * services) * (M + 2)),
        ]  # fmt: skip
        opts = cli.settings(cli.build_parser().parse_args(["run", *flags]))
        self.dp = loader.load(pin_dir=None, sizes=opts.sizes, hairpin=opts.hairpin)
        self.agent = build_agent(opts, None, Writer(self.dp.maps), self.dp.maps)
        self.next_ep = services * endpoints

    def close(self) -> None:
        self.dp.close()

    def events(self) -> list:
        from ctrl.k8s.events import Event
        from ctrl.k8s.objects import parse

        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE},
            "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]},
        }
        out = [Event("upsert", "Node", NODE, parse(node))]
        for s in range(self.services):
            svc = {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"svc-{s}", "namespace": "bench"},
                "spec": {
                    "type": "LoadBalancer",
                    "clusterIP": f"198.19.{s // 256}.{s % 256}",
                    "ports": [
                        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30000 + s}
                    ],
                },
                "status": {"loadBalancer": {"ingress": [{"ip": f"198.19.{128 + s // 256}.{s % 256}"}]}},
            }
            out.append(Event("upsert", "Service", f"bench/svc-{s}", parse(svc)))
            for j in range(-(-self.endpoints // SLICE)):
                first = s * self.endpoints + j * SLICE
                out.append(self.slice_event(s, j, range(first, first + min(SLICE, self.endpoints - j * SLICE))))
        return out

    def slice_event(self, s: int, j: int, eps) -> object:
        from ctrl.k8s.events import Event
        from ctrl.k8s.objects import parse

        raw = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"svc-{s}-{j}",
                "namespace": "bench",
                "labels": {"kubernetes.io/service-name": f"svc-{s}"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": [ep_addr(i)], "conditions": {"ready": True}, "nodeName": f"node-{i % 7 + 1}"} for i in eps
            ],
        }
        return Event("upsert", "EndpointSlice", f"bench/svc-{s}-{j}", parse(raw))

    def full(self) -> float:
        self.agent.take(self.events())
        t0 = time.perf_counter()
        cs = self.agent.sync()
        dt = time.perf_counter() - t0
        if cs is None or cs.rejected or cs.refused:
            raise RuntimeError(f"full sync failed: {cs and (cs.rejected or cs.refused)}")
        return dt

    def change(self, k: int) -> tuple[float, dict]:
        """Change k: one slice of Service k % S replaced by fresh endpoints."""
        s = k % self.services
        j = (k // self.services) % -(-self.endpoints // SLICE)
        n = min(SLICE, self.endpoints - j * SLICE)
        ev = self.slice_event(s, j, range(self.next_ep, self.next_ep + n))
        self.next_ep += n
        t0 = time.perf_counter()
        self.agent.take([ev])
        cs = self.agent.sync()
        dt = time.perf_counter() - t0
        if cs is None or cs.rejected:
            raise RuntimeError(f"change {k} failed: {cs and cs.rejected}")
        return dt, cs.summary()

    def memlock(self) -> int:
        from ctrl.dataplane.abi import map_name

        total = 0
        for name in ("sp_mgl", "sp_mglptr"):
            fd = self.dp.maps[map_name(name)].fd
            for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("memlock:"):
                    total += int(line.split()[1])
        return total


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]


def agent_run(services: int, endpoints: int, changes: int) -> dict:
    out: dict = {"services": services, "endpoints": endpoints}
    for mode in ("random", "maglev"):
        b = Bench(services, endpoints, mode)
        try:
            empty = b.memlock()
            full = b.full()
            mem = b.memlock() - empty
            lat, written = [], []
            for k in range(changes):
                dt, s = b.change(k)
                lat.append(dt)
                written.append(s["maglev_set"])
            out[mode] = {
                "full_s": full,
                "change_p50_s": pct(lat, 50),
                "change_p99_s": pct(lat, 99),
                "changes": changes,
                # Map entries written: a table's changed chunks (of
                # abi.MGL_CHUNK entries) and pointers.
                "maglev_writes_per_change": statistics.mean(written),
                "maglev_map_bytes": mem,
                "maglev_map_bytes_per_service": mem / services,
            }
        finally:
            b.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer builds and changes (the smoke test's size)")
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: run as root (it loads BPF programs)", file=sys.stderr)
        return 2
    repeat, changes = (2, 20) if a.quick else (7, 200)
    res: dict = {"table_size": M}
    res["build"] = [time_build(n, repeat) for n in (100, 1000)]
    res["disruption"] = [disruption(n) for n in (3, 10, 100, 1000)]
    res["agent"] = [agent_run(10, 1000, changes)] if not a.quick else [agent_run(2, 200, changes)]
    for b in res["build"]:
        print(
            f"build  N={b['backends']:>5}  M={M}: cold {b['cold_s'] * 1e3:.1f} ms; then best "
            f"{b['best_s'] * 1e3:.1f} ms, median {b['median_s'] * 1e3:.1f} ms (Python); the fill alone "
            f"{b['fill_python_s'] * 1e3:.1f} ms in Python, {b['fill_c_s'] * 1e3:.2f} ms in C"
            + ("" if b["native"] else " (no library: Python)")
        )
    for d in res["disruption"]:
        print(
            f"disruption N={d['backends']:>5}: one removed moves {d['removal_moved']:.2%} of the entries "
            f"(its own {d['removal_own']:.2%}; 1/N = {d['ideal']:.2%}), one added {d['addition_moved']:.2%}"
        )
    for r in res["agent"]:
        print(f"agent  {r['services']} LoadBalancer Services x {r['endpoints']} endpoints, one-slice change:")
        for mode in ("random", "maglev"):
            m = r[mode]
            print(
                f"  {mode:<7} full sync {m['full_s'] * 1e3:.0f} ms; change p50 {m['change_p50_s'] * 1e3:.1f} ms, "
                f"p99 {m['change_p99_s'] * 1e3:.1f} ms; Maglev map writes per change "
                f"{m['maglev_writes_per_change']:.1f}; Maglev maps {m['maglev_map_bytes'] / 1e6:.2f} MB "
                f"({m['maglev_map_bytes_per_service'] / 1e3:.0f} kB per Service)"
            )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
