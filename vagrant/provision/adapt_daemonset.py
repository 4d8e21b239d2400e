#!/usr/bin/env python3
"""Adapt the repository's deploy/daemonset.yaml to the local VM at apply time.

Reads the DaemonSet as JSON on stdin (what `kubectl create --dry-run=client
-o json -f deploy/daemonset.yaml` prints) and writes it to stdout. Only the
container named `sliceproxy` changes, and only here:

- `image`: the one built in the VM and imported into k3s's containerd, with
  `imagePullPolicy: Never`. It is in no registry, so a missing import should
  fail at once (ErrImageNeverPull) instead of retrying pulls.
- `--interfaces`: the host sides of pod interfaces for the VM's CNI. k3s's
  flannel uses the bridge plugin, whose host-side veths are named `veth*`.
- `KUBERNETES_SERVICE_HOST`/`_PORT`: the API server's real address. The
  kubelet points them at the `kubernetes` Service's ClusterIP, which the
  agent's host client programs serve only once the agent has read it from
  the API server: on the VM's first start, with no kube-proxy ever, the
  agent would wait for a proxy that is itself.
- `securityContext.appArmorProfile: Unconfined`: the container runtime's
  default AppArmor profile denies writes under /sys/fs/ except cgroup, which
  includes creating the pin directory and the pins in /sys/fs/bpf.

Everything else is applied as the repository has it. Standard library only:
it runs with the VM's python3, and tests/vagrant imports it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

CONTAINER = "sliceproxy"
INTERFACES_FLAG = "--interfaces"
API_ENV = ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")


class AdaptError(Exception):
    pass


def _replace_interfaces(argv: list[str], interfaces: str, where: str) -> list[str]:
    """argv with its one --interfaces value replaced (`--interfaces=X` or `--interfaces X`)."""
    hits = [i for i, a in enumerate(argv) if a == INTERFACES_FLAG or a.startswith(INTERFACES_FLAG + "=")]
    if len(hits) != 1:
        raise AdaptError(f"{where}: expected one {INTERFACES_FLAG} argument, found {len(hits)}")
    out = list(argv)
    i = hits[0]
    if out[i] == INTERFACES_FLAG:
        if i + 1 >= len(out):
            raise AdaptError(f"{where}: {INTERFACES_FLAG} has no value")
        out[i + 1] = interfaces
    else:
        out[i] = f"{INTERFACES_FLAG}={interfaces}"
    return out


def adapt(ds: dict, image: str, interfaces: str, api_host: str, api_port: int) -> dict:
    """A copy of the DaemonSet ``ds`` with the VM's changes (module docstring)."""
    if ds.get("kind") != "DaemonSet":
        raise AdaptError(f"expected a DaemonSet, got kind {ds.get('kind')!r}")
    out = copy.deepcopy(ds)
    name = out.get("metadata", {}).get("name", "?")
    containers = out.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
    matches = [c for c in containers if c.get("name") == CONTAINER]
    if len(matches) != 1:
        raise AdaptError(f"DaemonSet {name}: expected one container named {CONTAINER!r}, found {len(matches)}")
    c = matches[0]
    where = f"DaemonSet {name} container {CONTAINER}"

    c["image"] = image
    c["imagePullPolicy"] = "Never"

    # The flag may sit in command or in args; exactly one of them holds it.
    holders = [
        k
        for k in ("command", "args")
        if any(a == INTERFACES_FLAG or a.startswith(INTERFACES_FLAG + "=") for a in c.get(k) or [])
    ]
    if len(holders) != 1:
        raise AdaptError(f"{where}: expected one {INTERFACES_FLAG} argument in command or args")
    c[holders[0]] = _replace_interfaces(c[holders[0]], interfaces, where)

    env = [e for e in c.get("env") or [] if e.get("name") not in API_ENV]
    env += [
        {"name": API_ENV[0], "value": api_host},
        {"name": API_ENV[1], "value": str(api_port)},
    ]
    c["env"] = env

    c.setdefault("securityContext", {})["appArmorProfile"] = {"type": "Unconfined"}
    return out


def _host_port(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{s!r} is not HOST:PORT")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", required=True)
    p.add_argument("--interfaces", required=True, help="glob list for sliceproxy --interfaces")
    p.add_argument("--api-server", required=True, type=_host_port, metavar="HOST:PORT")
    args = p.parse_args(argv)
    try:
        ds = json.load(sys.stdin)
        out = adapt(ds, args.image, args.interfaces, *args.api_server)
    except (AdaptError, json.JSONDecodeError) as e:
        print(f"adapt_daemonset: {e}", file=sys.stderr)
        return 1
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
