"""`sliceproxy run`: the agent built from its settings, the programs loaded
and attached, the source started; and --dry-run's rendering."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable

from ..dataplane.abi import map_name as mn
from ..runtime.settings import Settings
from .parser import globs, settings
from .uninstall import uninstall

log = logging.getLogger("sliceproxy")


def build_agent(
    opts: Settings,
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
    from ..dataplane import native
    from ..dataplane.abi import read_contents
    from ..dataplane.programmed import Programmed
    from ..k8s import slicejson
    from ..model.state import ClusterState
    from ..runtime.agent import Agent

    programmed = Programmed(
        opts.sizes, drain_period=0.0 if opts.dry_run else opts.drain_period, maglev_size=opts.maglev_size
    )
    # Slices' endpoints read from their JSON in C where the library is
    # (msgspec otherwise: the same slices, slower).
    slicejson.use_endpoint_scan(native.scan_endpoints if native.library() is not None else None)
    if opts.maglev_size:
        why = native.missing()
        if why:
            log.warning("--external-lb=maglev: %s, about 20 ms a table instead of under 1 ms", why)
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
        from ..runtime import metrics as metrics_mod

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
        opts,
        refresh_interfaces=refresh_interfaces,
        metrics=metrics,
    )
    if opts.dry_run:
        return agent

    from ..runtime.health import Health
    from ..runtime.healthcheck import HealthCheckServers

    health = Health(agent.status, opts.healthz_stale_after, metrics)
    agent.health_checks = HealthCheckServers(opts.node_name, lambda: health.status(count=False)[0] == 200)
    if opts.healthz_bind_address:
        from ..runtime.health import serve

        try:
            serve(health, opts.healthz_bind_address)
        except OSError as e:
            raise SystemExit(f"sliceproxy run: cannot serve /healthz on {opts.healthz_bind_address}: {e}") from None
    return agent


def cmd_run(args) -> int:
    opts = settings(args)
    source = make_source(args)

    if args.dry_run:
        source.start()
        if getattr(source, "slice_mode", None) is not None:
            source.slice_mode.start()
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

    from ..dataplane import attach, loader, migrate
    from ..dataplane.apply import Writer

    patterns = globs(args.interfaces)
    ext_patterns = globs(args.external_interfaces)
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
        dp = _load(args, opts)
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
    host = _host_clients(args, opts, dp)
    writer = Writer(dp.maps, destroy_host_udp=host is not None)
    attacher = attach.Attacher(patterns, dp.prog_fd, dp.egress_fd, exclude=ext_patterns) if patterns else None
    ext_attacher = (
        attach.Attacher(
            ext_patterns,
            dp.ext_fd,
            dp.ext_egress_fd,
            xdp_fd=dp.xdp_fd,
            xdp_mode=opts.xdp,
            uplinks=dp.maps[mn("sp_uplinks")],
        )
        if ext_patterns
        else None
    )
    agent = build_agent(
        opts, source, writer, dp.maps, _refresher(attacher, ext_attacher, trace_state=(args.pin_dir, dp.maps))
    )
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
    if getattr(source, "slice_mode", None) is not None:
        source.slice_mode.start()

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
    if host is not None:
        log.info("host clients served: programs attached to cgroup %s", host)
    agent.run()
    source.stop()
    dp.close()
    if args.cleanup_on_exit:
        uninstall((patterns + ext_patterns) or ["*"], args.pin_dir, lock)
    lock.release()
    return 0


def _load(args, opts):
    """Load the programs; with --host-clients auto, without the host
    clients' programs when the kernel refuses them (one line says why)."""
    from ..dataplane import loader
    from ..dataplane.libbpf import BPFError

    want = opts.host_clients != "off"
    try:
        return loader.load(
            args.bpf_object, args.pin_dir, opts.sizes, opts.hairpin, host_clients=want, xdp_forward=opts.xdp_forward
        )
    except BPFError as e:
        if opts.host_clients != "auto" or not want:
            raise
        log.warning("host clients off: this kernel refused their cgroup socket programs (%s)", e)
        return loader.load(
            args.bpf_object, args.pin_dir, opts.sizes, opts.hairpin, host_clients=False, xdp_forward=opts.xdp_forward
        )


def _host_clients(args, opts, dp) -> str | None:
    """Serve host clients as --host-clients and --cgroup say: the node's
    network namespace written for the programs and their links attached
    (pinned links of an earlier agent adopted). The cgroup served, or None
    (off: links an earlier agent pinned are detached)."""
    from ..dataplane import hostclients

    if not dp.host_progs:
        n = hostclients.detach_links(args.pin_dir)
        hostclients.write_host_config(dp.maps, 0)
        if opts.host_clients == "off":
            log.info("host clients off (--host-clients off)%s", f": detached {n} links" if n else "")
        return None
    try:
        cgroup = opts.cgroup or hostclients.default_cgroup()
        hostclients.write_host_config(dp.maps, hostclients.netns_cookie())
        done = hostclients.attach_links(args.pin_dir, cgroup, dp.host_progs)
    except OSError as e:
        if opts.host_clients == "on":
            raise SystemExit(f"sliceproxy run: --host-clients on: {e}") from None
        log.warning("host clients off: attaching their programs failed (%s)", e)
        hostclients.detach_links(args.pin_dir)
        hostclients.write_host_config(dp.maps, 0)
        return None
    how = sorted(set(done.values()))
    log.info("host clients: %d links on cgroup %s (%s)", len(done), cgroup, ", ".join(how))
    return cgroup


def _refresher(*attachers, trace_state=None):
    """The agent's periodic look at its interfaces: the attachers' (new
    interfaces get the programs), and what a killed trace of the pin
    directory left (trace_state: the pin directory and the maps)."""
    live = [a for a in attachers if a is not None]
    if not live:
        return None

    def refresh() -> None:
        for a in live:
            a.refresh()
        if trace_state is not None:
            _clear_killed_trace(*trace_state)

    return refresh


def _clear_killed_trace(pin_dir: str, maps) -> None:
    from ..dataplane import trace

    n = trace.clear_killed(pin_dir, maps[mn("sp_trace")])
    if n is not None:
        log.warning("a trace of %s was killed: removed its %d taps, and the XDP program serves again", pin_dir, n)


def make_source(args):
    """The file source, or the Kubernetes API (kubeconfig, or in-cluster)."""
    if args.source:
        from ..k8s.files import DEFAULT_MAX_FILE_SIZE, FileSource

        max_size = DEFAULT_MAX_FILE_SIZE if args.source_max_file_size is None else args.source_max_file_size
        if max_size < 1:
            raise SystemExit("sliceproxy run: --source-max-file-size must be at least 1")
        return FileSource(args.source, max_file_size=max_size)
    in_cluster = args.in_cluster or (not args.kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"))
    if not args.kubeconfig and not in_cluster:
        raise SystemExit("sliceproxy run: give --source DIR, --kubeconfig PATH or --in-cluster")
    from ..k8s.kube import Client, KubeconfigError, KubeSource, kubeconfig_server

    server = None
    if args.api_server_from:
        if not in_cluster:
            raise SystemExit("sliceproxy run: --api-server-from is for --in-cluster (a kubeconfig names its server)")
        try:
            server = kubeconfig_server(args.api_server_from)
        except KubeconfigError as e:
            raise SystemExit(f"sliceproxy run: --api-server-from: {e}") from None
        log.info("API server at %s, as %s names it", server, args.api_server_from)
    try:
        client = Client.from_config(None if in_cluster else args.kubeconfig, server=server)
    except Exception as e:  # the kubernetes package raises several kinds
        raise SystemExit(f"sliceproxy run: cannot read the Kubernetes client configuration: {e}") from None
    source = KubeSource(client, args.node_name)
    mode = getattr(args, "subsets", "off")
    if mode != "off":
        from ..k8s.lease import LeaseReader
        from ..k8s.slicemode import SliceMode

        ns, sep, name = args.subsets_lease.partition("/")
        if not sep or not ns or not name:
            raise SystemExit(f"sliceproxy run: --subsets-lease: {args.subsets_lease!r} is not NAMESPACE/NAME")
        if not args.subsets_stale_after > 0:
            raise SystemExit(f"sliceproxy run: --subsets-stale-after: {args.subsets_stale_after} is not above 0")
        lease = LeaseReader(client, ns, name, args.subsets_stale_after)
        # One GET of the Lease per period and agent: every 5 s at the
        # default (a thousand nodes read it 200 times a second), often
        # enough to notice a dead subsetter well within the stale time.
        period = min(5.0, args.subsets_stale_after / 4)
        SliceMode(source, mode, args.node_name, lease, period)
    return source


def render_changes(cs, output: str, cfg=None) -> str:
    """The desired map contents of a dry run (all additions from empty maps),
    and the node config (sp_cfg) when given."""
    from ..dataplane.abi import SCOPE_VALUE
    from ..model.plan import PROTO_NAMES
    from ..util.addrs import addr_str, hostport, is_v4

    svc = [
        {
            "key": {
                "frontend": f"{hostport(k[0], k[1])}/{PROTO_NAMES.get(k[2], k[2])}",
                "scope": SCOPE_VALUE[k[3]],  # as the frontend map holds it
            },
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
    src = [
        {"key": {"svc_id": i, "source": f"{addr_str(a)}/{n - 96 if is_v4(a) else n}"}, "value": {"allow": 1}}
        for i, a, n in cs.src_upd
    ]
    data = {mn("sp_svc"): svc, mn("sp_slot"): slots, mn("sp_be"): bes, mn("sp_names"): names, mn("sp_src"): src}
    if cs.mgl_upd:  # --external-lb=maglev: the tables' chunks and the frontends' pointers to them
        from ..dataplane.abi import mgl_ids

        data[mn("sp_mgl")] = [
            {"key": {"id": i, "chunk": k}, "value": {"backend": mgl_ids(b).tolist()}} for i, k, b in cs.mgl_upd
        ]
        data[mn("sp_mglptr")] = [{"key": i, "value": {"table": t, "size": m}} for i, t, m in cs.mgl_ptr_upd]
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
