"""The `sliceproxy` command: run, dump, uninstall."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

from . import __version__
from .layout import map_name as mn
from .libbpf import BPFError
from .loader import DEFAULT_PIN_DIR, Hairpin
from .logs import setup_logging
from .sizes import MapSizes

log = logging.getLogger("sliceproxy")

# Hairpin source addresses (docs/semantics.md, "Hairpin"): addresses no
# one else uses. IPv4: in 169.254.255.0/24, the link-local block's last 256
# addresses, which RFC 3927 (2.1) bars hosts from picking for themselves,
# away from the link-local addresses operators do use (169.254.169.254
# metadata, 169.254.20.10 node-local DNS, 169.254.1.1 Calico's gateway).
# IPv6: a link-local address would be resolved on the pod's link (neighbour
# discovery, which nothing answers), so an address of the discard-only
# block 100::/64 (RFC 6666), which no host may use and pods route to their
# gateway like any global address.
DEFAULT_HAIRPIN4 = "169.254.255.1"
DEFAULT_HAIRPIN6 = "100::1"


def _patterns(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(p for p in v.split(",") if p)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sliceproxy", description="eBPF service proxy for Kubernetes nodes")
    p.add_argument("--version", action="version", version=f"sliceproxy {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="program the dataplane from a source and keep it in sync")
    src = run.add_mutually_exclusive_group()
    src.add_argument("--source", metavar="DIR", help="directory of Kubernetes YAML to serve (no cluster needed)")
    src.add_argument("--kubeconfig", metavar="PATH", help="watch the Kubernetes API with this kubeconfig")
    src.add_argument(
        "--in-cluster",
        action="store_true",
        help="watch the Kubernetes API as the Pod's ServiceAccount (the default in a Pod)",
    )
    run.add_argument(
        "--source-max-file-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="with --source: files larger than this are not read (an error names them and they keep "
        "their previous objects); default 2 MiB (2097152)",
    )
    run.add_argument(
        "--interfaces",
        action="append",
        metavar="GLOB[,GLOB]",
        help="interfaces (glob patterns) whose tc ingress gets the program; new matching "
        "interfaces are picked up while running",
    )
    run.add_argument(
        "--external-interfaces",
        action="append",
        metavar="GLOB[,GLOB]",
        help="interfaces (glob patterns) that face outside the cluster (the node's uplink): their tc "
        "ingress serves NodePorts, LoadBalancer IPs and externalIPs, their egress masquerades",
    )
    run.add_argument(
        "--nodeport-addresses",
        action="append",
        metavar="CIDR[,CIDR]",
        help="serve NodePorts only on the node's addresses inside these CIDRs, or 'primary' "
        "(kube-proxy's flag; default: every InternalIP and ExternalIP of the Node)",
    )
    run.add_argument(
        "--snat-port-range",
        default="61000-65535",
        metavar="LOW-HIGH",
        help="source ports of masqueraded flows; keep it out of net.ipv4.ip_local_port_range "
        "(default 32768-60999) so the node's own sockets never meet them",
    )
    run.add_argument(
        "--snat-reclaim",
        type=int,
        default=600,
        metavar="SECONDS",
        help="an SNAT port whose flow was idle this long may be given to a new flow; 0: never",
    )
    run.add_argument(
        "--snat-reclaim-closed",
        type=int,
        default=10,
        metavar="SECONDS",
        help="the same for a TCP flow that closed: reset, or both FINs with the client's first "
        "(one whose backend sent the first FIN keeps its port 60 s, the backend's TIME_WAIT); "
        "0: close not tracked, --snat-reclaim applies",
    )
    run.add_argument(
        "--hairpin-ipv4",
        default=DEFAULT_HAIRPIN4,
        metavar="ADDRESS",
        help="source address of a pod's packets that its own Service sends back to it (hairpin; "
        f"docs/semantics.md); pods must route it to their gateway; empty: off (default {DEFAULT_HAIRPIN4})",
    )
    run.add_argument(
        "--hairpin-ipv6",
        default=DEFAULT_HAIRPIN6,
        metavar="ADDRESS",
        help=f"the same for IPv6; empty: off (default {DEFAULT_HAIRPIN6})",
    )
    run.add_argument(
        "--pin-dir", default=DEFAULT_PIN_DIR, help=f"bpffs directory for this instance's maps ({DEFAULT_PIN_DIR})"
    )
    run.add_argument("--node-name", default=os.environ.get("NODE_NAME") or socket.gethostname())
    run.add_argument(
        "--min-sync-period",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="at most one sync this often: a burst of changes within it becomes one sync "
        "(kube-proxy's --min-sync-period)",
    )
    run.add_argument(
        "--drain-period",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a backend that leaves every Service keeps its established flows this long "
        "before they are moved; new flows never pick it",
    )
    run.add_argument(
        "--sync-period",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="full reconcile against the kernel maps this often (repairs changes made behind our back); 0: never",
    )
    run.add_argument("--bpf-object", help="compiled tc program (default: build/sliceproxy_tc.bpf.o)")
    run.add_argument(
        "--healthz-bind-address",
        default="0.0.0.0:10256",
        metavar="HOST:PORT",
        help="serve /healthz here, as kube-proxy does; empty: off",
    )
    run.add_argument(
        "--metrics-bind-address",
        default="127.0.0.1:10249",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics here, as kube-proxy does; empty: off",
    )
    run.add_argument(
        "--healthz-stale-after",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="/healthz answers 503 when changes wait and no sync succeeded for this long",
    )
    run.add_argument(
        "--dry-run", action="store_true", help="print the desired map contents and exit; touches no kernel state"
    )
    run.add_argument(
        "--cleanup-on-exit",
        action="store_true",
        help="on SIGTERM/SIGINT detach the program and remove the pins, as `sliceproxy uninstall` "
        "(default: leave the dataplane serving the last state)",
    )
    run.add_argument("--output", choices=("text", "json"), default="text", help="format of --dry-run")
    sizes = MapSizes()
    run.add_argument(
        "--max-services", type=int, default=sizes.services, help="frontend map capacity (and the names map's)"
    )
    run.add_argument("--max-backends", type=int, default=sizes.backends, help="backend map capacity")
    run.add_argument(
        "--max-slots", type=int, default=sizes.slots, help="slot map capacity (sum of backends over frontends)"
    )
    run.add_argument("--max-conntrack", type=int, default=sizes.conntrack, help="conntrack map capacity")
    run.add_argument(
        "--max-source-ranges",
        type=int,
        default=sizes.source_ranges,
        help="source range map capacity (loadBalancerSourceRanges entries, summed over frontends)",
    )
    _log_args(run)

    dump = sub.add_parser("dump", help="services and backends as the kernel maps hold them")
    dump.add_argument("--pin-dir", default=DEFAULT_PIN_DIR)
    dump.add_argument("--json", action="store_true")
    dump.add_argument("--service", metavar="NAMESPACE/NAME", help="only this Service's frontends (and flows)")
    dump.add_argument("--conntrack", action="store_true", help="also list the tracked flows")

    un = sub.add_parser("uninstall", help="detach the program and remove the pinned maps")
    un.add_argument("--pin-dir", default=DEFAULT_PIN_DIR)
    un.add_argument("--interfaces", action="append", metavar="GLOB[,GLOB]", help="default: every interface")
    un.add_argument("--external-interfaces", action="append", metavar="GLOB[,GLOB]", help="also detach from these")
    _log_args(un)
    return p


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", default="text", choices=("text", "json"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "log_level"):
        setup_logging(args.log_level, args.log_format)
    if getattr(args, "log_level", "info") != "debug":
        from .libbpf import quiet

        try:
            quiet()
        except BPFError:
            pass  # no libbpf at all: the command says so when it needs it
    try:
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "dump":
            return cmd_dump(args)
        if args.cmd == "uninstall":
            return cmd_uninstall(args)
    except BPFError as e:
        print(f"sliceproxy: {e.strerror}", file=sys.stderr)
        return 1
    except (FileNotFoundError, PermissionError) as e:
        print(f"sliceproxy: {e}", file=sys.stderr)
        return 1
    return 2


def _snat_ports(value: str) -> tuple[int, int]:
    try:
        lo_s, hi_s = value.split("-", 1)
        lo, hi = int(lo_s), int(hi_s)
    except ValueError:
        raise SystemExit(f"sliceproxy run: --snat-port-range: {value!r} is not LOW-HIGH") from None
    if not 1 <= lo <= hi <= 65535:
        raise SystemExit(f"sliceproxy run: --snat-port-range: {value!r} is not a range of ports (1-65535)")
    return lo, hi


def _cidrs(values: list[str] | None) -> tuple[str, ...]:
    import ipaddress

    out = []
    for c in _patterns(values):
        if c == "primary":
            out.append(c)
            continue
        try:
            out.append(str(ipaddress.ip_network(c, strict=False)))
        except ValueError:
            raise SystemExit(f"sliceproxy run: --nodeport-addresses: {c!r} is not a CIDR") from None
    return tuple(out)


def map_sizes(args) -> MapSizes:
    """The --max-* flags; a map holds at least one entry (BPF refuses 0)."""
    flags = {
        "--max-services": args.max_services,
        "--max-backends": args.max_backends,
        "--max-slots": args.max_slots,
        "--max-conntrack": args.max_conntrack,
        "--max-source-ranges": args.max_source_ranges,
    }
    for flag, v in flags.items():
        if v < 1:
            raise SystemExit(f"sliceproxy run: {flag}: {v} is not a map capacity (1 or more)")
    return MapSizes(*flags.values())


def _hairpin(args) -> Hairpin:
    """The hairpin addresses of --hairpin-ipv4 and --hairpin-ipv6 (map form)."""
    import ipaddress

    from .objects import addr16

    out: list[bytes | None] = []
    for flag, value, version in (("--hairpin-ipv4", args.hairpin_ipv4, 4), ("--hairpin-ipv6", args.hairpin_ipv6, 6)):
        if not value:
            out.append(None)
            continue
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            ip = None
        if ip is None or ip.version != version or ip.is_unspecified or ip.is_multicast or ip.is_loopback:
            raise SystemExit(f"sliceproxy run: {flag}: {value!r} is not a unicast IPv{version} address")
        out.append(addr16(str(ip)))
    return Hairpin(out[0], out[1])


@dataclass(frozen=True)
class RunOptions:
    """The flags of `sliceproxy run` that build its agent, checked."""

    node_name: str
    sizes: MapSizes
    nodeport_cidrs: tuple[str, ...]
    snat_ports: tuple[int, int]
    snat_reclaim: int
    snat_reclaim_closed: int
    drain_period: float
    min_sync_period: float
    sync_period: float
    metrics_bind_address: str
    healthz_bind_address: str
    healthz_stale_after: float
    dry_run: bool
    hairpin: Hairpin  # loaded into the programs (ctrl.loader), not the agent's


def run_options(args: argparse.Namespace) -> RunOptions:
    """Check the flags before anything touches the kernel; a bad one exits
    naming it."""
    snat_ports = _snat_ports(args.snat_port_range)
    for flag, v in (("--snat-reclaim", args.snat_reclaim), ("--snat-reclaim-closed", args.snat_reclaim_closed)):
        if not 0 <= v <= 0xFFFFFFFF:
            raise SystemExit(f"sliceproxy run: {flag}: {v} is not a number of seconds (0 or more)")
    sizes = map_sizes(args)
    return RunOptions(
        node_name=args.node_name,
        sizes=sizes,
        nodeport_cidrs=_cidrs(args.nodeport_addresses),
        snat_ports=snat_ports,
        snat_reclaim=args.snat_reclaim,
        snat_reclaim_closed=args.snat_reclaim_closed,
        drain_period=args.drain_period,
        min_sync_period=args.min_sync_period,
        sync_period=args.sync_period,
        metrics_bind_address=args.metrics_bind_address,
        healthz_bind_address=args.healthz_bind_address,
        healthz_stale_after=args.healthz_stale_after,
        dry_run=args.dry_run,
        hairpin=_hairpin(args),
    )


def build_agent(
    opts: RunOptions,
    source,
    writer=None,
    maps: dict | None = None,
    refresh_interfaces: Callable[[], object] | None = None,
):
    """The agent `sliceproxy run` runs, and what runs around it: what is
    pinned adopted (with a writer), /metrics and /healthz served (their
    addresses empty: off), health check node ports. A dry run gets no
    servers and no drain period. scripts/bench/ours.py builds its agent
    here too, so the bench measures what production runs."""
    from .agent import Agent
    from .apply import read_contents
    from .diff import Programmed
    from .state import ClusterState

    programmed = Programmed(opts.sizes, drain_period=0.0 if opts.dry_run else opts.drain_period)
    if writer is not None:
        mc = read_contents(writer.maps)
        mc.adopt_into(programmed)
        if mc.svc:
            log.info(
                "adopted %d frontends and %d backends pinned; pruning waits for the first full sync",
                len(mc.svc),
                len(mc.backends),
            )
    metrics = None
    if opts.metrics_bind_address and not opts.dry_run:
        from . import metrics as metrics_mod

        metrics = metrics_mod.Metrics()
        try:
            metrics_mod.serve(metrics, opts.metrics_bind_address, maps)
        except OSError as e:
            raise SystemExit(f"sliceproxy run: cannot serve /metrics on {opts.metrics_bind_address}: {e}") from None
    agent = Agent(
        source,
        ClusterState(opts.node_name),
        programmed,
        writer,
        refresh_interfaces=refresh_interfaces,
        min_sync_period=opts.min_sync_period,
        resync_period=opts.sync_period,
        metrics=metrics,
        nodeport_cidrs=opts.nodeport_cidrs,
        snat_ports=opts.snat_ports,
        snat_reclaim=opts.snat_reclaim,
        snat_reclaim_closed=opts.snat_reclaim_closed,
    )
    if opts.dry_run:
        return agent

    from .health import Health
    from .healthcheck import HealthCheckServers

    health = Health(agent, opts.healthz_stale_after, metrics)
    agent.health_checks = HealthCheckServers(opts.node_name, lambda: health.status(count=False)[0] == 200)
    if opts.healthz_bind_address:
        from .health import serve

        try:
            serve(health, opts.healthz_bind_address)
        except OSError as e:
            raise SystemExit(f"sliceproxy run: cannot serve /healthz on {opts.healthz_bind_address}: {e}") from None
    return agent


def cmd_run(args) -> int:
    opts = run_options(args)
    source = make_source(args)

    if args.dry_run:
        source.start()
        if not source.synced and not source.wait_synced(timeout=60):
            print("sliceproxy: the source did not deliver a full list within 60 s", file=sys.stderr)
            return 1
        source.stop()
        agent = build_agent(opts, source)
        agent._drain_nowait()
        cs = agent.sync()
        assert cs is not None
        print(render_changes(cs, args.output, agent.node_config()))
        return 0

    from . import attach, loader, migrate
    from .apply import Writer

    patterns = _patterns(args.interfaces)
    ext_patterns = _patterns(args.external_interfaces)
    if os.geteuid() != 0:
        log.warning("not running as root: loading BPF needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN")
    # Before anything is written: one agent per pin directory.
    try:
        lock = loader.lock_pin_dir(args.pin_dir)
    except loader.PinDirBusy as e:
        raise loader.PinDirBusy(
            e.errno,
            f"{e.strerror}: two agents on one pin directory undo each other's writes; stop that one "
            f"first, or give this one its own --pin-dir. Nothing was changed",
        ) from None
    try:
        dp = loader.load(args.bpf_object, args.pin_dir, opts.sizes, opts.hairpin)
    except BaseException:
        lock.discard()
        raise
    # An upgrade across a layout change, or maps resized by the flags: carry
    # the old maps' entries (ids, conntrack) into the new ones before the
    # new programs attach.
    carry = migrate.Carry(args.pin_dir, dp.maps)
    if migrate.old_pins(args.pin_dir, dp.maps):
        n = carry.copy()
        log.info("carried %d entries over from maps of another layout version or size", n)
    writer = Writer(dp.maps)
    attacher = attach.Attacher(patterns, dp.prog_fd, dp.egress_fd, exclude=ext_patterns) if patterns else None
    ext_attacher = attach.Attacher(ext_patterns, dp.ext_fd, dp.ext_egress_fd) if ext_patterns else None
    agent = build_agent(opts, source, writer, dp.maps, _refresher(attacher, ext_attacher))
    if attacher is not None:
        attacher.refresh()
    if ext_attacher is not None:
        ext_attacher.refresh()
    # The new programs are in place (or none was asked for): the old maps
    # have served their last packet through us.
    carry.finish()
    if not patterns:
        log.warning("no --interfaces given: maps are programmed but no interface gets the program")
    source.start()

    def on_signal(signum, frame):
        log.info("signal %s: stopping; programs stay attached and maps pinned", signal.Signals(signum).name)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "serving %s on interfaces %s, maps pinned in %s",
        args.source or args.kubeconfig or "the in-cluster API",
        ",".join(patterns) or "-",
        args.pin_dir,
    )
    if ext_patterns:
        log.info(
            "external interfaces %s: NodePorts, LoadBalancer IPs and externalIPs served there",
            ",".join(ext_patterns),
        )
    agent.run()
    source.stop()
    dp.close()
    if args.cleanup_on_exit:
        uninstall((patterns + ext_patterns) or ["*"], args.pin_dir, lock)
    lock.release()
    return 0


def _refresher(*attachers):
    live = [a for a in attachers if a is not None]
    if not live:
        return None

    def refresh() -> None:
        for a in live:
            a.refresh()

    return refresh


def make_source(args):
    """The file source, or the Kubernetes API (kubeconfig, or in-cluster)."""
    if args.source:
        from .source.files import DEFAULT_MAX_FILE_SIZE, FileSource

        max_size = DEFAULT_MAX_FILE_SIZE if args.source_max_file_size is None else args.source_max_file_size
        if max_size < 1:
            raise SystemExit("sliceproxy run: --source-max-file-size must be at least 1")
        return FileSource(args.source, max_file_size=max_size)
    in_cluster = args.in_cluster or (not args.kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"))
    if not args.kubeconfig and not in_cluster:
        raise SystemExit("sliceproxy run: give --source DIR, --kubeconfig PATH or --in-cluster")
    from .source.kube import Client, KubeSource

    try:
        client = Client.from_config(None if in_cluster else args.kubeconfig)
    except Exception as e:  # the kubernetes package raises several kinds
        raise SystemExit(f"sliceproxy run: cannot read the Kubernetes client configuration: {e}") from None
    return KubeSource(client, args.node_name)


def render_changes(cs, output: str, cfg=None) -> str:
    """The desired map contents of a dry run (all additions from empty maps),
    and the node config (sp_cfg) when given."""
    from .dump import hostport
    from .plan import PROTO_NAMES

    svc = [
        {
            "key": {"frontend": f"{hostport(k[0], k[1])}/{PROTO_NAMES.get(k[2], k[2])}", "scope": k[3]},
            "value": {"svc_id": v[0], "count": v[1], "flags": v[2], "affinity_timeout": v[3]},
        }
        for k, v in cs.svc_upd
    ]
    slots = [{"key": {"svc_id": s, "slot": i}, "value": {"backend_id": b}} for s, i, b in cs.slot_upd]
    bes = [
        {"key": i, "value": {"backend": hostport(a, p), "proto": PROTO_NAMES.get(pr, pr)}}
        for i, (a, p, pr) in cs.be_upd
    ]
    names = [{"key": i, "value": n} for i, n in cs.name_upd]
    from .objects import addr_str, is_v4

    src = [
        {"key": {"svc_id": i, "source": f"{addr_str(a)}/{n - 96 if is_v4(a) else n}"}, "value": {"allow": 1}}
        for i, a, n in cs.src_upd
    ]
    data = {mn("sp_svc"): svc, mn("sp_slot"): slots, mn("sp_be"): bes, mn("sp_names"): names, mn("sp_src"): src}
    if cfg is not None:
        data[mn("sp_cfg")] = [{"key": 0, "value": cfg.as_dict()}]
    if output == "json":
        return json.dumps(data, indent=2)
    lines = []
    for mapname, entries in data.items():
        lines.append(f"{mapname} ({len(entries)} entries)")
        for e in entries:
            lines.append(f"  {json.dumps(e['key'])} -> {json.dumps(e['value'])}")
    return "\n".join(lines)


def cmd_dump(args) -> int:
    from . import loader
    from .dump import collect, render_json, render_table

    maps = loader.open_pinned(args.pin_dir)
    data = collect(maps, service=args.service, with_conntrack=args.conntrack)
    print(render_json(data) if args.json else render_table(data))
    return 0


def cmd_uninstall(args) -> int:
    uninstall((_patterns(args.interfaces) + _patterns(args.external_interfaces)) or ["*"], args.pin_dir)
    return 0


def uninstall(patterns: list[str], pin_dir: str, lock=None) -> None:
    """Detach our filter from matching interfaces and remove the pins.
    Refused while an agent holds the pin directory (it would rewrite what
    was removed), unless `lock` is that agent's own (--cleanup-on-exit)."""
    from . import attach, loader

    own = None
    if lock is None and os.path.isdir(pin_dir):
        try:
            own = loader.lock_pin_dir(pin_dir, create=False)
        except loader.PinDirBusy as e:
            raise loader.PinDirBusy(
                e.errno, f"{e.strerror}: stop that agent first. Nothing was detached or removed"
            ) from None
    try:
        n = 0
        for ifname in attach.match_interfaces(patterns):
            if attach.detach(ifname):
                log.info("detached from %s", ifname)
                n += 1
        if os.path.isdir(pin_dir):
            # Unlinking a pin drops the map once no program uses it.
            shutil.rmtree(pin_dir)
            log.info("removed pins in %s", pin_dir)
        log.info("uninstalled: detached from %d interfaces", n)
    finally:
        if own is not None:
            own.release()


if __name__ == "__main__":
    sys.exit(main())
