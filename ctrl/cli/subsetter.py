"""`sliceproxy subsetter`: the controller that writes subset slices
(docs/subsetting.md), with leader election; run as a Deployment."""

from __future__ import annotations

import logging
import os
import signal
import socket

from ..subset.controller import Options, build

log = logging.getLogger("sliceproxy")


def cmd_subsetter(args) -> int:
    from ..k8s.kube import Client

    for flag, v in (
        ("--lease-duration", args.lease_duration),
        ("--renew-period", args.renew_period),
        ("--write-period", args.write_period),
    ):
        if not v > 0:
            raise SystemExit(f"sliceproxy subsetter: {flag}: {v} is not a number of seconds above 0")
    if not args.write_qps >= 0:
        raise SystemExit(f"sliceproxy subsetter: --write-qps: {args.write_qps} is not a rate of 0 (no bound) or more")
    if args.write_burst < 1:
        raise SystemExit(f"sliceproxy subsetter: --write-burst: {args.write_burst} is not a count of 1 or more")
    if args.renew_period >= args.lease_duration * 2 / 3:
        raise SystemExit("sliceproxy subsetter: --renew-period must be below 2/3 of --lease-duration")
    in_cluster = args.in_cluster or (not args.kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"))
    if not args.kubeconfig and not in_cluster:
        raise SystemExit("sliceproxy subsetter: give --kubeconfig PATH or --in-cluster")
    try:
        client = Client.from_config(None if in_cluster else args.kubeconfig)
    except Exception as e:  # the kubernetes package raises several kinds
        raise SystemExit(f"sliceproxy subsetter: cannot read the Kubernetes client configuration: {e}") from None
    opts = Options(
        lease_namespace=args.lease_namespace,
        lease_name=args.lease_name,
        identity=args.identity or f"{socket.gethostname()}_{os.getpid()}",
        lease_duration=args.lease_duration,
        renew_period=args.renew_period,
        write_period=args.write_period,
        write_qps=args.write_qps,
        write_burst=args.write_burst,
    )
    metrics = None
    if args.metrics_bind_address:
        from ..subset import metrics as metrics_mod

        metrics = metrics_mod.Metrics()
        try:
            metrics_mod.serve(metrics, args.metrics_bind_address)
        except OSError as e:
            raise SystemExit(
                f"sliceproxy subsetter: cannot serve /metrics on {args.metrics_bind_address}: {e}"
            ) from None
    sub = build(client, opts, metrics)

    def on_signal(signum, frame):
        log.info("signal %s: stopping", signal.Signals(signum).name)
        sub.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("subsetter %s: lease %s/%s", opts.identity, opts.lease_namespace, opts.lease_name)
    sub.source.start()
    sub.run()
    sub.source.stop()
    sub.elector.release()
    return 0
