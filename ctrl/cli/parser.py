"""`sliceproxy`'s flags, and the run flags checked into the agent's settings
before anything touches the kernel (a bad one exits naming it)."""

from __future__ import annotations

import argparse
import os
import socket

from .. import __version__
from ..dataplane import abi
from ..dataplane.abi import Hairpin, MapSizes
from ..dataplane.loader import DEFAULT_PIN_DIR
from ..model import maglev
from ..runtime.settings import Settings

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


def globs(values: list[str] | None) -> list[str]:
    """Glob patterns of a repeatable, comma-separated flag."""
    out: list[str] = []
    for v in values or []:
        out.extend(p for p in v.split(",") if p)
    return out


def _min_sync_period(v: str) -> float | None:
    if v == "auto":
        return None
    try:
        f = float(v)
    except ValueError:
        f = -1.0
    if not f >= 0:
        raise argparse.ArgumentTypeError(f"{v!r} is not a number of seconds (0 or more) or auto")
    return f


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
        "--api-server-from",
        metavar="KUBECONFIG",
        help="in the cluster: reach the API server at the address this kubeconfig (the kubelet's) names, "
        "with the ServiceAccount's credentials, instead of the `kubernetes` Service's ClusterIP, which "
        "nothing serves on a node without kube-proxy before this agent's first sync",
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
        "--xdp",
        choices=("auto", "native", "generic", "off"),
        default="auto",
        help="the XDP program on the external interfaces, in front of their tc ingress: it drops what "
        "loadBalancerSourceRanges refuse before the kernel allocates anything and hands the rest to tc; "
        "auto: native mode where the driver has it, else generic, else none (one log line says why; tc "
        "serves alone); off: none, and one an earlier agent left is removed (default auto)",
    )
    run.add_argument(
        "--xdp-forward",
        action="store_true",
        help="with --xdp: flows from outside to a backend on another node are translated (DNAT, SNAT) "
        "and sent back out by XDP itself. The node's netfilter then sees only their replies: not where "
        'its rules drop conntrack INVALID packets (docs/semantics.md, "XDP")',
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
        "--host-clients",
        choices=("auto", "on", "off"),
        default="auto",
        help="serve the node's own sockets (host network: the kubelet, hostNetwork pods) at connect() and "
        "sendmsg() time with cgroup socket programs; auto: when the kernel loads and attaches them (one "
        "log line says why not); on: exit if it does not; off: detach them",
    )
    run.add_argument(
        "--cgroup",
        metavar="PATH",
        help="cgroup v2 directory the host clients' programs attach to (default: the root of the node's "
        "cgroup v2 hierarchy, found in /proc/self/mountinfo, mounted if none is)",
    )
    run.add_argument(
        "--pin-dir", default=DEFAULT_PIN_DIR, help=f"bpffs directory for this instance's maps ({DEFAULT_PIN_DIR})"
    )
    run.add_argument("--node-name", default=os.environ.get("NODE_NAME") or socket.gethostname())
    run.add_argument(
        "--min-sync-period",
        type=_min_sync_period,
        default=None,
        metavar="SECONDS|auto",
        help="at most one sync this often: a burst of changes within it becomes one sync "
        "(kube-proxy's --min-sync-period); auto (the default): as long as the last sync took, at most 1 s",
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
        help="check the kernel maps against what was written this often; a difference (a change made behind our "
        "back) re-reads them for a full sync; 0: never",
    )
    run.add_argument(
        "--subsets",
        choices=("auto", "on", "off"),
        default="off",
        help="with the Kubernetes API: watch only the subset slices of this node's zone "
        "(docs/subsetting.md): auto while the subsetter's Lease is fresh and the Node has a zone label, "
        "on whenever it has one, off never (default off)",
    )
    run.add_argument(
        "--subsets-lease",
        default="kube-system/sliceproxy-subsetter",
        metavar="NAMESPACE/NAME",
        help="the subsetter's Lease (default kube-system/sliceproxy-subsetter)",
    )
    run.add_argument(
        "--subsets-stale-after",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="with --subsets=auto: back to the original slices when the subsetter's Lease has not been "
        "renewed for this long (default 20)",
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
        "--max-slots",
        type=int,
        default=sizes.slots,
        help=(
            "slot map capacity (sum of backends over slot tables: one per Service port and family, "
            "two when a traffic policy is Local)"
        ),
    )
    run.add_argument("--max-conntrack", type=int, default=sizes.conntrack, help="conntrack map capacity")
    run.add_argument(
        "--max-source-ranges",
        type=int,
        default=sizes.source_ranges,
        help="source range map capacity (loadBalancerSourceRanges entries, summed over frontends)",
    )
    run.add_argument(
        "--max-maglev-entries",
        type=int,
        default=sizes.maglev,
        help="Maglev table capacity under --external-lb maglev, in table entries: M per table (one per Service "
        f"port and family), held in chunks of {abi.MGL_CHUNK} (default {sizes.maglev}: "
        f"{sizes.maglev_chunks // abi.mgl_chunks(maglev.DEFAULT_SIZE)} tables of the default M)",
    )
    run.add_argument(
        "--external-lb",
        choices=("random", "maglev"),
        default="random",
        help="how a new flow to an external frontend (NodePort, LoadBalancer IP, externalIP) picks its "
        "backend: random, or maglev: a Maglev table per frontend, the same on every node, so a flow an "
        "outside load balancer moves to another node keeps its backend (docs/semantics.md)",
    )
    run.add_argument(
        "--maglev-table-size",
        type=int,
        default=maglev.DEFAULT_SIZE,
        metavar="M",
        help=f"entries of each Maglev table: a prime from {maglev.MIN_SIZE} to {maglev.MAX_SIZE}, best "
        f"above 100 per backend (default {maglev.DEFAULT_SIZE})",
    )
    _log_args(run)

    sb = sub.add_parser("subsetter", help="write zone subsets of EndpointSlices (docs/subsetting.md)")
    ssrc = sb.add_mutually_exclusive_group()
    ssrc.add_argument("--kubeconfig", metavar="PATH", help="the Kubernetes API with this kubeconfig")
    ssrc.add_argument("--in-cluster", action="store_true", help="as the Pod's ServiceAccount (the default in a Pod)")
    sb.add_argument("--lease-namespace", default="kube-system", help="namespace of the leader election Lease")
    sb.add_argument("--lease-name", default="sliceproxy-subsetter", help="name of the leader election Lease")
    sb.add_argument("--identity", default="", help="this replica's name in the Lease (default: host name and pid)")
    sb.add_argument(
        "--lease-duration",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="a replica takes the Lease over when its holder has not renewed it this long",
    )
    sb.add_argument("--renew-period", type=float, default=5.0, metavar="SECONDS", help="the leader renews this often")
    sb.add_argument(
        "--write-period",
        type=float,
        default=0.05,
        metavar="SECONDS",
        help="a write that only removes or demotes endpoints waits until the subset slice's last write is this old, "
        "and changes in between are coalesced; a write that adds one goes at once (docs/subsetting.md)",
    )
    sb.add_argument(
        "--write-qps",
        type=float,
        default=50.0,
        metavar="RATE",
        help="all subset slice writes together, a second, after --write-burst at once; 0: no bound",
    )
    sb.add_argument(
        "--write-burst", type=int, default=100, metavar="N", help="writes at once before --write-qps applies"
    )
    sb.add_argument(
        "--metrics-bind-address",
        default="127.0.0.1:10251",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics here; empty: off",
    )
    _log_args(sb)

    dump = sub.add_parser("dump", help="services and backends as the kernel maps hold them")
    dump.add_argument("--pin-dir", default=DEFAULT_PIN_DIR)
    dump.add_argument("--json", action="store_true")
    dump.add_argument("--service", metavar="NAMESPACE/NAME", help="only this Service's frontends (and flows)")
    dump.add_argument("--conntrack", action="store_true", help="also list the tracked flows")

    tr = sub.add_parser(
        "trace",
        help="live flows through the dataplane, one line per packet event (bcc; docs/inspecting.md)",
    )
    tr.add_argument("--pin-dir", default=DEFAULT_PIN_DIR)
    tr.add_argument("--service", metavar="NAMESPACE/NAME", help="only this Service's flows")
    tr.add_argument("--frontend", metavar="IP:PORT", help="only flows to this frontend ([IPv6]:PORT)")
    tr.add_argument("--backend", metavar="IP", help="only flows to or from this backend")
    tr.add_argument(
        "--verdict",
        action="append",
        metavar="VERDICT[,VERDICT]",
        help="only these verdicts: a name (dnat_new, drop_source_range...) or a family (dnat, drop, reject, "
        "revnat, snat, unsnat, pass); default: every one but pass_*",
    )
    tr.add_argument(
        "--interfaces", action="append", metavar="GLOB[,GLOB]", help="default: every interface with our program"
    )
    tr.add_argument("--json", action="store_true", help="one JSON object per line")
    tr.add_argument(
        "--rate", type=int, default=100, help="at most this many events per second (each CPU its share; default 100)"
    )
    tr.add_argument("--count", type=int, default=0, metavar="N", help="stop after N events (default: at Ctrl-C)")
    _log_args(tr)

    un = sub.add_parser("uninstall", help="detach the program and remove the pinned maps")
    un.add_argument("--pin-dir", default=DEFAULT_PIN_DIR)
    un.add_argument("--interfaces", action="append", metavar="GLOB[,GLOB]", help="default: every interface")
    un.add_argument(
        "--external-interfaces",
        action="append",
        metavar="GLOB[,GLOB]",
        help="also detach from these (their XDP program too)",
    )
    _log_args(un)
    return p


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", default="text", choices=("text", "json"))


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
    for c in globs(values):
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
        "--max-maglev-entries": args.max_maglev_entries,
    }
    for flag, v in flags.items():
        if v < 1:
            raise SystemExit(f"sliceproxy run: {flag}: {v} is not a map capacity (1 or more)")
    return MapSizes(*flags.values())


def _hairpin(args) -> Hairpin:
    """The hairpin addresses of --hairpin-ipv4 and --hairpin-ipv6 (map form)."""
    import ipaddress

    from ..util.addrs import addr16

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


def settings(args: argparse.Namespace) -> Settings:
    """The agent's settings from `sliceproxy run`'s flags, checked before
    anything touches the kernel; a bad one exits naming it."""
    snat_ports = _snat_ports(args.snat_port_range)
    for flag, v in (("--snat-reclaim", args.snat_reclaim), ("--snat-reclaim-closed", args.snat_reclaim_closed)):
        if not 0 <= v <= 0xFFFFFFFF:
            raise SystemExit(f"sliceproxy run: {flag}: {v} is not a number of seconds (0 or more)")
    sizes = map_sizes(args)
    try:
        maglev.check_size(args.maglev_table_size)
    except maglev.TableSizeError as e:
        raise SystemExit(f"sliceproxy run: {e}") from None
    return Settings(
        external_lb=args.external_lb,
        maglev_table_size=args.maglev_table_size,
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
        host_clients=args.host_clients,
        cgroup=_cgroup(args.cgroup),
        xdp=args.xdp,
        xdp_forward=args.xdp_forward,
    )


def _cgroup(value: str | None) -> str | None:
    """--cgroup: an existing directory (that it is cgroup v2 is checked
    when the programs attach)."""
    if value is None:
        return None
    if not os.path.isdir(value):
        raise SystemExit(f"sliceproxy run: --cgroup: {value!r} is not a directory")
    return os.path.abspath(value)
