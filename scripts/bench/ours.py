"""sliceproxy's figures, each scenario in a subprocess of its own.

The parent writes what the API server would send into a scratch directory:
the list responses page by page (limit=500, as ctrl.k8s.kube asks) and
the watch lines of the changes. The worker (`scripts/bench.py --worker
ours ...`) starts clean, so its peak RSS is the agent's own, and runs the
production code on them. Its agent is built by ctrl.cli.run.build_agent from
`sliceproxy run`'s own flag parser, as `sliceproxy run` builds it: default
flags (metrics and /healthz served, on ephemeral loopback ports here),
logging at the default level (into a file of the scratch directory), the
map sizes an operator would pass for the scenario:

  full     ctrl.k8s.kube.KubeSource.list_all on every page (the client's JSON decoder and
           ctrl.k8s.objects.parse, exactly as in the agent) -> Agent.take ->
           Agent.sync (plan, diff, batch writes), into freshly loaded maps.
           The clock stops when the last map write returns; then every map
           is read back and counted.
  change   one watch line (a slice replaced by fresh endpoints) through
           KubeSource.watch -> Agent.take -> Agent.sync; one sync each.
  rolling  every slice replaced once, one after another, one sync each.
  packet   BPF_PROG_TEST_RUN of the tc program on the maps the full sync
           wrote, and on maps holding 1 Service, interleaved.
  memory   the worker's peak RSS (VmHWM), its RSS before and after, and the
           kernel memory charged to each map (memlock in fdinfo).

The Service shapes (measure_shapes) run full and change on S1's Service
made a NodePort, a LoadBalancer and so on (common.SHAPES), the agent run
with the flags a shape needs (--external-lb=maglev).

The only stand-in is the HTTP transport: a Replay client hands
KubeSource the bytes from the files instead of from a socket.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import io
import json
import logging
import pstats
import queue
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from .common import (
    NODE,
    NODE_LIST,
    ROOT,
    SHAPE_HEALTH_PORT,
    SHAPES,
    Cluster,
    Scenario,
    inet_csum,
    progress,
    summary,
    taken,
    vip,
)

# -- parent side -------------------------------------------------------------------


def prepare(scn: Scenario, d: Path, changes: int, rolling: bool) -> dict:
    """Write the list pages and the watch lines for scenario `scn` into d."""
    cl = Cluster(scn)
    (d / "expect.json").parent.mkdir(parents=True, exist_ok=True)
    # Entries the full sync must leave in the frontend, slot and backend maps.
    backends, slots = cl.taken()
    frontends = scn.services * sum(scn.frontends)
    (d / "expect.json").write_text(json.dumps({"backends": backends, "slots": slots, "frontends": frontends}))
    d.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for kind, tag in (("Service", "svc"), ("EndpointSlice", "slices")):
        total = 0
        for k, page in enumerate(cl.list_pages(kind)):
            (d / f"{tag}-{k}.json").write_bytes(page)
            total += len(page)
        sizes[tag] = total
    (d / "nodes-0.json").write_bytes(NODE_LIST)
    with open(d / "changes.jsonl", "wb") as f:
        for i, j in cl.change_plan(changes):
            cl.replace(i, j)
            f.write(cl.watch_line(i, j) + b"\n")
    if rolling:
        with open(d / "rolling.jsonl", "wb") as f:
            for i, j in cl.rolling_plan():
                cl.replace(i, j)
                f.write(cl.watch_line(i, j) + b"\n")
    return {"list_bytes": sizes["svc"] + sizes["slices"], "slice_list_bytes": sizes["slices"]}


def run_worker(scn: Scenario, d: Path, steps: list[str], opts: dict, timeout: float) -> dict:
    argv = [
        sys.executable,
        str(ROOT / "scripts" / "bench.py"),
        "--worker",
        "ours",
        "--dir",
        str(d),
        "--services",
        str(scn.services),
        "--endpoints",
        str(scn.endpoints),
        "--slice-max",
        str(scn.slice_max),
        "--internal-traffic-policy",
        scn.internal_traffic_policy,
        "--shape",
        scn.shape,
        "--steps",
        ",".join(steps),
    ]
    for k, v in opts.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is None else [str(v)])
    r = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"bench worker for {scn.key} ({scn.label}) failed with status {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- worker side -------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def rss_now() -> int:
    return _status_kib("VmRSS:")


def peak_rss() -> int:
    """The worker's own high-water RSS (VmHWM, which starts afresh with
    the address space execve gives it). Not ru_maxrss: Linux carries that
    over execve from the forking parent, so the worker would report the
    bench's own RSS at the fork, hundreds of MiB of generated scenario
    data, whenever that is the larger."""
    return _status_kib("VmHWM:")


def memlock(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("memlock:"):
            return int(line.split()[1])
    return 0


class Replay:
    """ctrl.k8s.kube.Client's two calls, answered from the files: the
    bytes are decoded with the same function the real client uses."""

    PATHS = {
        "/api/v1/services": "svc",
        "/apis/discovery.k8s.io/v1/endpointslices": "slices",
        "/api/v1/nodes": "nodes",
    }

    def __init__(self, d: Path):
        self.d = d
        self.pending: list[bytes] = []
        # The real client's decoding (ctrl.k8s.kube), so the figure
        # follows what the agent does.
        from ctrl.k8s import kube

        self.loads = kube._loads

    def get_bytes(self, path: str, timeout: float = 60, **params) -> bytes:
        k = int(params.get("continue") or 0)
        return (self.d / f"{self.PATHS[path]}-{k}.json").read_bytes()

    def get_json(self, path: str, timeout: float = 60, **params) -> dict:
        return self.loads(self.get_bytes(path, timeout, **params))

    def stream(self, path: str, read_timeout: float, **params):
        while self.pending:
            yield self.pending.pop(0)


def free_port() -> int:
    """A TCP port free on loopback now (the agent binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_packet(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    """Ethernet + IPv4 + TCP with valid checksums (SYN 0x02, ACK 0x10)."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0 if flags == 0x02 else 1, 5 << 4, flags, 64240, 0, 0)
    tcp = tcp[:16] + struct.pack("!H", inet_csum(s + d + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, s, d)
    ip = ip[:10] + struct.pack("!H", inet_csum(ip)) + ip[12:]
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + ip + tcp


class Worker:
    def __init__(self, a: argparse.Namespace):
        sys.path.insert(0, str(ROOT))
        from ctrl.cli import parser as cli
        from ctrl.cli.run import build_agent
        from ctrl.dataplane import loader
        from ctrl.dataplane.abi import MapSizes
        from ctrl.dataplane.apply import Writer
        from ctrl.k8s.kube import KubeSource
        from ctrl.util.logs import setup_logging

        self.a = a
        self.loader = loader
        self.scn = Scenario("-", a.services, a.endpoints, a.slice_max, a.internal_traffic_policy, a.shape)
        self.local = a.internal_traffic_policy == "Local"
        self.expect = json.loads((Path(a.dir) / "expect.json").read_text())
        # `sliceproxy run` with its defaults, but for the HTTP servers'
        # ports (free ones, on loopback: several benches may run at once)
        # and the map sizes (below).
        self.ports = {"metrics": free_port(), "healthz": free_port()}
        flags = [
            "--node-name", NODE,
            "--metrics-bind-address", f"127.0.0.1:{self.ports['metrics']}",
            "--healthz-bind-address", f"127.0.0.1:{self.ports['healthz']}",
        ]  # fmt: skip
        if a.drain_period is not None:
            flags += ["--drain-period", str(a.drain_period)]
        if a.shape == "Maglev":
            flags += ["--external-lb", "maglev"]
        parser = cli.build_parser()
        drain_period = parser.parse_args(["run", *flags]).drain_period
        # The agent's default map sizes (what a user runs with, and what the
        # kernel memory figure is about) where the scenario fits: replaced
        # backends stay in the backend map for the drain period, so during
        # the changes and the rolling update it holds up to twice the
        # endpoints; raised to the next power of two where that does not fit
        # (an operator's --max-backends / --max-slots).
        d = MapSizes()
        total = a.endpoints * a.services
        need_slots = int(self.expect["slots"] * 1.05)
        need_be = 2 * total + 400 * self.scn.slice_size if drain_period > 0 else total + 2 * self.scn.slice_size
        sizes = MapSizes(
            services=max(d.services, 1 << int(a.services * 1.1).bit_length()),
            backends=d.backends if need_be <= d.backends else 1 << need_be.bit_length(),
            slots=d.slots if need_slots <= d.slots else 1 << need_slots.bit_length(),
            conntrack=d.conntrack,
        )
        for flag, v, default in (
            ("--max-services", sizes.services, d.services),
            ("--max-backends", sizes.backends, d.backends),
            ("--max-slots", sizes.slots, d.slots),
        ):
            if v != default:
                flags += [flag, str(v)]
        run_args = parser.parse_args(["run", *flags])
        setup_logging(run_args.log_level, run_args.log_format)
        log_file = open(Path(a.dir) / "agent.log", "a")  # noqa: SIM115 - lives as long as the worker
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler):
                h.setStream(log_file)
        opts = cli.settings(run_args)
        self.sizes = opts.sizes
        self.dp = loader.load(pin_dir=None, sizes=self.sizes, hairpin=opts.hairpin)

        last_write = [0.0]

        class TimedWriter(Writer):
            def apply(self, cs):  # noqa: ANN001
                w = super().apply(cs)
                last_write[0] = time.perf_counter()
                return w

        self.last_write = last_write
        self.writer = TimedWriter(self.dp.maps)
        self.client = Replay(Path(a.dir))
        self.source = KubeSource(self.client, NODE)
        self.agent = build_agent(opts, self.source, self.writer, self.dp.maps)
        if self.agent.metrics is None or self.agent.health_checks is None:
            raise RuntimeError("the bench's agent lacks the metrics or health checks `sliceproxy run` has")
        # A healthCheckNodePort (the LoadBalancer-Local shape) served on
        # loopback only, as the metrics and /healthz are here.
        self.agent.health_checks.address = "127.0.0.1"
        self.out: dict = {
            "services": a.services,
            "endpoints": a.endpoints,
            "total": self.scn.total,
            "internal_traffic_policy": a.internal_traffic_policy,
            "drain_period_s": opts.drain_period,
            "agent_flags": ["sliceproxy", "run", *flags],
            "map_sizes": {
                "services": self.sizes.services,
                "backends": self.sizes.backends,
                "slots": self.sizes.slots,
                "conntrack": self.sizes.conntrack,
            },
        }

    def scrape(self) -> None:
        """What the agent's own /metrics and /healthz say after the steps:
        the proof that the servers `sliceproxy run` starts ran all along."""
        import urllib.request

        def get(port: int, path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, ""

        _, text = get(self.ports["metrics"], "/metrics")
        values = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in (
                "kubeproxy_sync_proxy_rules_duration_seconds_count",
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            ):
                values[name] = float(value)
        self.out["scraped"] = {
            "syncs": values.get("kubeproxy_sync_proxy_rules_duration_seconds_count"),
            "endpoint_changes": values.get("kubeproxy_sync_proxy_rules_endpoint_changes_total"),
            "healthz": get(self.ports["healthz"], "/healthz")[0],
        }
        if self.scn.shape == "LoadBalancer-Local":
            code, body = get(SHAPE_HEALTH_PORT, "/")
            self.out["scraped"]["health_check"] = {"code": code, "body": json.loads(body) if body else None}

    def _drain(self) -> None:
        while True:
            try:
                self.agent.take(self.source.events.get_nowait())
            except queue.Empty:
                return

    def full(self) -> None:
        gc.collect()
        base = rss_now()
        t0 = time.perf_counter()
        for kind in ("Service", "EndpointSlice", "Node"):
            self.source.list_all(kind)
        t_list = time.perf_counter()
        self._drain()
        t_take = time.perf_counter()
        cs = self.agent.sync()
        # What the agent's loop does at its first quiet turn after this
        # sync (Agent.after_sync): the indexes for the next change, and
        # the collection a full sync makes due.
        self.agent.after_sync()
        t_end = time.perf_counter()
        t_written = self.last_write[0]
        peak = peak_rss()
        steady = rss_now()
        if cs is None or cs.rejected:
            raise RuntimeError(f"full sync failed or rejected services: {cs and cs.rejected}")
        from ctrl.dataplane.abi import map_base

        # By base name: map names carry the layout version (sp_svc_v5...).
        counts = (
            {}
            if self.a.profile
            else {map_base(n): len(m.items()) for n, m in self.dp.maps.items() if map_base(n) != "sp_stats"}
        )
        want = {"sp_svc": self.expect["frontends"], "sp_slot": self.expect["slots"], "sp_be": self.expect["backends"]}
        for name, n in want.items():
            if counts and counts[name] != n:
                raise RuntimeError(f"after the full sync {name} holds {counts[name]} entries, expected {n}")
        self.out["full"] = {
            "s": t_written - t0,
            "list_decode_s": t_list - t0,
            "state_s": t_take - t_list,
            "plan_diff_write_s": t_written - t_take,
            # The rest of the sync (its freeze) and the first quiet turn's
            # work: indexes, gc.collect and gc.freeze.
            "after_write_s": t_end - t_written,
            "entries": counts,
            # The agent's own split of its sync (plan, diff, write; index
            # and gc come after the write): a regression names its stage.
            "stages": dict(self.agent.stages),
        }
        self.out["memory"] = {
            "rss_before": base,
            "rss_peak": peak,
            "rss_after": steady,
            "maps": {
                name: {"memlock": memlock(m.fd), "max_entries": m.max_entries} for name, m in self.dp.maps.items()
            },
        }
        self.out["memory"]["maps_total"] = sum(v["memlock"] for v in self.out["memory"]["maps"].values())

    def _expected(self, line: bytes) -> tuple[int, int]:
        """Backends a change must add and slots it must set: the new
        slice's endpoints that NODE takes, over the Service's frontends."""
        eps = json.loads(line)["object"]["endpoints"]
        return taken(self.scn, [e.get("nodeName") for e in eps], [e.get("zone") for e in eps])

    def _one(self, line: bytes) -> tuple[float, dict]:
        self.client.pending.append(line)
        t0 = time.perf_counter()
        self.source.watch("EndpointSlice")
        self._drain()
        cs = self.agent.sync()
        dt = time.perf_counter() - t0
        if cs is None or cs.rejected:
            raise RuntimeError(f"a change failed or was rejected: {cs and cs.rejected}")
        return dt, cs.summary()

    def _lines(self, name: str):
        with open(Path(self.a.dir) / name, "rb") as f:
            for line in f:
                yield line.rstrip(b"\n")

    def change(self) -> None:
        lat = []
        budget_end = time.monotonic() + self.a.change_budget
        for k, line in enumerate(self._lines("changes.jsonl")):
            dt, s = self._one(line)
            n, n_slots = self._expected(line)
            # Exactly one slot per backend added, in the one slot table of
            # the frontends, where every frontend takes every endpoint. Under a Local policy (a removed
            # local backend's slot takes the last one's backend) or topology
            # hints (a slice's count in this zone changes) slots may move.
            exact = not self.local and not self.scn.frontends[1] and self.scn.shape != "Hints"
            if s["backends_added"] != n or (exact and s["slots_set"] != n_slots):
                raise RuntimeError(f"change {k}: expected {n} backends and {n_slots} slots written, got {s}")
            lat.append(dt)
            if len(lat) >= 20 and time.monotonic() > budget_end:
                break
        self.out["change"] = summary(lat)

    def rolling(self) -> None:
        lat = []
        t0 = time.monotonic()
        stopped = False
        for line in self._lines("rolling.jsonl"):
            lat.append(self._one(line)[0])
            if time.monotonic() - t0 > self.a.rolling_budget:
                stopped = True
                break
        tenth = max(1, len(lat) // 10)
        self.out["rolling"] = {
            "slices": self.scn.slices,
            "done": len(lat),
            "s": sum(lat),
            "stopped": stopped,
            "per_slice": summary(lat),
            # Mean time a slice in each tenth of the run: flat when a sync
            # costs the same at the end of the update as at its start.
            "per_slice_by_tenth": [
                sum(lat[k : k + tenth]) / len(lat[k : k + tenth])
                for k in range(0, tenth * 10, tenth)
                if lat[k : k + tenth]
            ],
        }

    def packet(self) -> None:
        from ctrl.dataplane.apply import Writer
        from ctrl.dataplane.programmed import Programmed
        from ctrl.k8s.objects import parse
        from ctrl.model.plan import plan_service

        one = self.loader.load(pin_dir=None, sizes=self.sizes)
        n = min(self.scn.endpoints, 100)
        svc = parse(
            {
                "kind": "Service",
                "metadata": {"name": "one", "namespace": "bench"},
                "spec": {"clusterIP": vip(0), "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
            }
        )
        sl = parse(
            {
                "kind": "EndpointSlice",
                "metadata": {"name": "one-a", "namespace": "bench", "labels": {"kubernetes.io/service-name": "one"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": [f"198.18.200.{k + 1}"]} for k in range(n)],
            }
        )
        Writer(one.maps).apply(Programmed(self.sizes).sync({svc.key: plan_service(svc, [sl])[0]}))

        flows = self.a.flows
        nsvc = self.scn.services
        mid = vip(nsvc // 2)
        # "one": every new flow to the same Service (the middle one), each
        # from a source port never used before: the cost of a service hit
        # with 1 or with nsvc Services programmed. "spread": new flows to
        # Services all over the map, so the working set (frontend, slot and
        # backend entries) grows with the cluster: cache misses included.
        targets = {
            "one": {"one": [vip(0)] * flows, "spread": [vip(0)] * flows},
            "scaled": {"one": [mid] * flows, "spread": [vip((k * 7919) % nsvc) for k in range(flows)]},
        }
        keys = ("est", "new", "new_spread", "est_spread")
        res: dict[str, dict[str, list[float]]] = {k: {x: [] for x in keys} for k in targets}
        sport = 1024

        def run(dp, pkts: list[bytes], what: str) -> float:
            ns = []
            for p in pkts:
                ret, out, d = dp.test_run(p)
                if ret != 0 or out[30:34] == p[30:34]:
                    raise RuntimeError(f"per-packet: {what}: the service hit was not DNATed (verdict {ret})")
                ns.append(d)
            return sorted(ns)[len(ns) // 2]

        for _rnd in range(self.a.packet_rounds):
            for name, dp in (("one", one), ("scaled", self.dp)):
                t = targets[name]
                hot = tcp_packet("198.18.255.2", t["one"][0], 40000, 80, 0x10)
                run(dp, [hot], f"{name} established")
                res[name]["est"].append(dp.test_run(hot, repeat=self.a.packet_repeat)[2])
                new = [tcp_packet("198.18.255.3", t["one"][k], sport + k, 80, 0x02) for k in range(flows)]
                res[name]["new"].append(run(dp, new, f"{name} new flow"))
                spread = [tcp_packet("198.18.255.4", t["spread"][k], sport + k, 80, 0x02) for k in range(flows)]
                res[name]["new_spread"].append(run(dp, spread, f"{name} new flow, spread"))
                res[name]["est_spread"].append(run(dp, spread, f"{name} established, spread"))
            sport += flows
        one.close()
        # Least disturbed round: noise from the other core only adds time.
        self.out["packet"] = {
            name: {k: min(v) for k, v in r.items()} | {"flows": flows, "repeat": self.a.packet_repeat}
            for name, r in res.items()
        }
        self.out["packet"]["one"]["services"] = 1
        self.out["packet"]["one"]["endpoints"] = n
        self.out["packet"]["scaled"]["services"] = nsvc
        self.out["packet"]["scaled"]["endpoints"] = self.scn.endpoints
        # The control: what the lookups and inserts that grow with the
        # cluster cost alone, at this one's slot count and at this scenario's
        # (scripts/bench/probe.py).
        from . import probe

        sizes = [n, self.scn.total]
        self.out["packet"]["probe"] = {
            "sizes": sizes,
            **probe.measure(sizes, flows, self.a.packet_rounds),
        }


def profile_top(prof: cProfile.Profile, n: int = 14) -> list[dict]:
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (fname, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        short = fname.replace(str(ROOT) + "/", "")
        if "/lib/python" in short:
            short = "stdlib:" + Path(short).name
        rows.append({"func": f"{short}:{line}({func})", "calls": nc, "tottime": tt, "cumtime": ct})
    rows.sort(key=lambda r: r["tottime"], reverse=True)
    return rows[:n]


def worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench.py --worker ours")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--services", type=int, required=True)
    ap.add_argument("--endpoints", type=int, required=True)
    ap.add_argument("--slice-max", type=int, default=100)
    ap.add_argument("--steps", default="full,change,rolling,packet")
    ap.add_argument("--change-budget", type=float, default=30)
    ap.add_argument("--rolling-budget", type=float, default=120)
    ap.add_argument("--packet-repeat", type=int, default=100_000)
    ap.add_argument("--packet-rounds", type=int, default=5)
    ap.add_argument("--flows", type=int, default=1000)
    ap.add_argument("--internal-traffic-policy", choices=("Cluster", "Local"), default="Cluster")
    ap.add_argument("--shape", choices=tuple(SHAPES), default="ClusterIP")
    ap.add_argument("--drain-period", type=float, help="the agent's --drain-period (default: its default)")
    ap.add_argument("--profile", action="store_true", help="cProfile the full sync and the changes instead")
    a = ap.parse_args(argv)
    w = Worker(a)
    steps = a.steps.split(",")
    if a.profile:
        out = {}
        for step in steps:
            prof = cProfile.Profile()
            prof.enable()
            getattr(w, step)()
            prof.disable()
            out[step] = profile_top(prof)
        print(json.dumps(out))
        return 0
    for step in steps:
        getattr(w, step)()
    w.scrape()
    w.dp.close()
    print(json.dumps(w.out))
    return 0


def scratch_for(base: Path, scn: Scenario) -> Path:
    return base / f"{scn.key}-{scn.services}x{scn.endpoints}"


def measure(scn: Scenario, base: Path, quick: bool, timeout: float, ladder: bool = True) -> dict:
    """Every figure of ours for one scenario, plus the growth ladder."""
    d = scratch_for(base, scn)
    changes = 50 if quick else 300
    progress(f"ours {scn.key}: writing the list responses and watch lines for {scn.label} endpoints")
    sizes = prepare(scn, d, changes, rolling=True)
    progress(f"ours {scn.key}: full sync, {changes} one-slice changes, rolling update, per-packet cost")
    opts = {
        "change_budget": 10 if quick else 25,
        "rolling_budget": 20 if quick else 60,
        "packet_repeat": 10_000 if quick else 100_000,
        "packet_rounds": 3 if quick else 5,
        "flows": 200 if quick else 1000,
    }
    # The per-packet figures need every Service to have a backend here,
    # which internalTrafficPolicy Local does not give.
    steps = ["full", "change", "rolling"] + (["packet"] if scn.internal_traffic_policy == "Cluster" else [])
    res = run_worker(scn, d, steps, opts, timeout)
    res.update(sizes)
    # Two more full syncs in fresh processes: the figure is the median
    # round, with its own breakdown.
    rounds = [res["full"]]
    for _ in range(0 if quick else 2):
        rounds.append(run_worker(scn, d, ["full"], {}, timeout)["full"])
    med = sorted(rounds, key=lambda r: r["s"])[len(rounds) // 2]
    res["full"] = {**med, "rounds": [r["s"] for r in rounds], "median_s": med["s"]}
    # Growth: the same shape at 1/10, 1/100... of the size.
    growth = []
    for rung in scn.ladder()[:-1] if ladder else []:
        rd = scratch_for(base, rung)
        prepare(rung, rd, changes, rolling=False)
        progress(f"ours {scn.key}: growth rung {rung.label} ({rung.total:,} endpoints)")
        r = run_worker(rung, rd, ["full", "change"], {"change_budget": 5 if quick else 15}, timeout)
        growth.append(
            {
                "services": rung.services,
                "endpoints": rung.endpoints,
                "total": rung.total,
                "full_s": r["full"]["s"],
                "change": r["change"],
            }
        )
    growth.append(
        {
            "services": scn.services,
            "endpoints": scn.endpoints,
            "total": scn.total,
            "full_s": res["full"]["s"],
            "change": res["change"],
        }
    )
    res["growth"] = growth
    return res


def measure_shapes(scn: Scenario, base: Path, quick: bool, timeout: float) -> dict:
    """S1's one Service in each of SHAPES: its full sync, and one slice
    replaced (p50, p99), with the agent's own split of each."""
    out = {}
    for shape, (what, _) in SHAPES.items():
        sh = dataclasses.replace(scn, key=f"shape-{shape}", shape=shape)
        d = scratch_for(base, sh)
        progress(f"ours: {scn.label} endpoints as {shape} ({what})")
        prepare(sh, d, 50 if quick else 300, rolling=False)
        try:
            r = run_worker(sh, d, ["full", "change"], {"change_budget": 5 if quick else 15}, timeout)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        out[shape] = {
            "what": what,
            "scraped": r["scraped"],
            "frontends": sum(sh.frontends),
            "full_s": r["full"]["s"],
            "stages": r["full"]["stages"],
            "entries": r["full"]["entries"],
            "change": r["change"],
        }
    return out


def profile(scn: Scenario, base: Path, timeout: float) -> dict:
    d = scratch_for(base, scn)
    if not (d / "changes.jsonl").exists():
        prepare(scn, d, 50, rolling=False)
    progress(f"ours {scn.key}: cProfile of the full sync and the changes")
    return run_worker(scn, d, ["full", "change"], {"profile": None, "change_budget": 10}, timeout)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
