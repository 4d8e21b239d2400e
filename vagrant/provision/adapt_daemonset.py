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
- the `kubelet-conf` volume: k3s's kubelet kubeconfig
  (/var/lib/rancher/k3s/agent/kubelet.kubeconfig) instead of kubeadm's
  /etc/kubernetes/kubelet.conf. The agent reads the API server's address
  from it (`--api-server-from`): the `kubernetes` Service's ClusterIP is
  served by the agent itself, so on the VM's first start nothing would.
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
KUBELET_CONF_VOLUME = "kubelet-conf"


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


def adapt(ds: dict, image: str, interfaces: str, kubelet_conf: str) -> dict:
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

    volumes = out["spec"]["template"]["spec"].get("volumes") or []
    confs = [v for v in volumes if v.get("name") == KUBELET_CONF_VOLUME and "hostPath" in v]
    if len(confs) != 1:
        raise AdaptError(f"DaemonSet {name}: expected one hostPath volume named {KUBELET_CONF_VOLUME!r}")
    confs[0]["hostPath"]["path"] = kubelet_conf

    c.setdefault("securityContext", {})["appArmorProfile"] = {"type": "Unconfined"}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", required=True)
    p.add_argument("--interfaces", required=True, help="glob list for sliceproxy --interfaces")
    p.add_argument("--kubelet-kubeconfig", required=True, metavar="PATH", help="the node's kubelet kubeconfig")
    args = p.parse_args(argv)
    try:
        ds = json.load(sys.stdin)
        out = adapt(ds, args.image, args.interfaces, args.kubelet_kubeconfig)
    except (AdaptError, json.JSONDecodeError) as e:
        print(f"adapt_daemonset: {e}", file=sys.stderr)
        return 1
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
