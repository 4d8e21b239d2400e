# ruff: noqa: E501 - ruleset lines are kept verbatim, whatever their length
"""The peer: kube-proxy's iptables mode, restored into a throwaway namespace.

The ruleset is what kube-proxy 1.28+ writes for ClusterIP Services (see
pkg/proxy/iptables/proxier.go): in the filter table its fixed chains; in the
nat table KUBE-SERVICES with one rule per service port, one KUBE-SVC-<hash>
chain per service port (a masquerade rule for traffic from outside the
cluster CIDR, then one jump per endpoint with `-m statistic --mode random
--probability 1/(n-i)`), and one KUBE-SEP-<hash> chain per endpoint (mark
for masquerade when the endpoint talks to itself, then DNAT). Chain names
are "KUBE-SVC-"/"KUBE-SEP-" + the first 16 base32 characters of a SHA-256,
as kube-proxy computes them. Over 1,000 endpoints kube-proxy is in "large
cluster mode" and leaves the per-endpoint comments out; so do we.

Syncs, as kube-proxy runs them (`iptables-restore -w --noflush --counters`,
input on stdin):
  full     every chain declared and every rule written (first load, and
           every sync of kube-proxy < 1.28 or a full resync)
  partial  kube-proxy >= 1.28 (MinimizeIPTablesRestore, GA): the filter
           table and the nat table's fixed chains, KUBE-SERVICES whole, and
           only the changed Service's KUBE-SVC and all its KUBE-SEP chains.
           In large cluster mode, stale KUBE-SEP chains are not deleted on
           every sync (only once per --sync-period), so the partial restore
           carries no -X either.
The jumps from the built-in chains (PREROUTING -> KUBE-SERVICES...) are
made once before the clock starts, as kube-proxy makes them with `iptables
-I` outside the restore.

The rules are generated before the clock starts: the figure is a lower
bound of kube-proxy's sync, which also has to compute them.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .common import CLUSTER_CIDR, NAMESPACE, Cluster, in_netns, progress, vip

LARGE_CLUSTER = 1000  # kube-proxy's largeClusterEndpointsThreshold


def _hash16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def svc_chain(port_name: str, proto: str = "tcp") -> str:
    return "KUBE-SVC-" + _hash16(port_name + proto)


def sep_chain(port_name: str, ep: str, proto: str = "tcp") -> str:
    return "KUBE-SEP-" + _hash16(port_name + proto + ep)


SETUP = """*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
COMMIT
"""

FILTER = """*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
"""

NAT_FIXED = [
    ":KUBE-SERVICES - [0:0]",
    ":KUBE-POSTROUTING - [0:0]",
    ":KUBE-NODEPORTS - [0:0]",
    ":KUBE-MARK-MASQ - [0:0]",
]
NAT_FIXED_RULES = [
    "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
    "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
    '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
    "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
]


class Ruleset:
    """kube-proxy's view of the cluster: per Service its endpoints; renders
    full and partial restore inputs."""

    def __init__(self, cl: Cluster):
        self.services = cl.scn.services
        self.eps = [[f"{a}:{p}" for a, p in cl.endpoints(i)] for i in range(self.services)]
        self.vips = [vip(i) for i in range(self.services)]

    def update(self, cl: Cluster, i: int) -> None:
        self.eps[i] = [f"{a}:{p}" for a, p in cl.endpoints(i)]

    @property
    def large(self) -> bool:
        return sum(len(e) for e in self.eps) > LARGE_CLUSTER

    def _names(self, i: int) -> tuple[str, str]:
        port_name = f"{NAMESPACE}/{Cluster.svc_name(i)}:http"
        return port_name, svc_chain(port_name)

    def _service(self, i: int, chains: list[str], rules: list[str]) -> None:
        port_name, svc = self._names(i)
        eps = self.eps[i]
        seps = [sep_chain(port_name, ep) for ep in eps]
        chains.append(f":{svc} - [0:0]")
        chains.extend(f":{c} - [0:0]" for c in seps)
        v = self.vips[i]
        rules.append(
            f'-A {svc} -m comment --comment "{port_name} cluster IP" -m tcp -p tcp -d {v} --dport 80 '
            f"! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ"
        )
        n = len(eps)
        large = self.large
        for k, (ep, c) in enumerate(zip(eps, seps, strict=False)):
            comment = "" if large else f'-m comment --comment "{port_name} -> {ep}" '
            if k < n - 1:
                rules.append(f"-A {svc} {comment}-m statistic --mode random --probability {1.0 / (n - k):.10f} -j {c}")
            else:
                rules.append(f"-A {svc} {comment}-j {c}")
        for ep, c in zip(eps, seps, strict=False):
            comment = "" if large else f'-m comment --comment "{port_name}" '
            ip = ep.rsplit(":", 1)[0]
            rules.append(f"-A {c} {comment}-s {ip} -j KUBE-MARK-MASQ")
            rules.append(f"-A {c} {comment}-m tcp -p tcp -j DNAT --to-destination {ep}")

    def render(self, changed: set[int] | None = None) -> str:
        """Restore input: every Service (full), or only `changed` (partial)."""
        chains = list(NAT_FIXED)
        rules = list(NAT_FIXED_RULES)
        for i in range(self.services):
            port_name, svc = self._names(i)
            rules.append(
                f'-A KUBE-SERVICES -m comment --comment "{port_name} cluster IP" -m tcp -p tcp '
                f"-d {self.vips[i]} --dport 80 -j {svc}"
            )
        for i in range(self.services) if changed is None else sorted(changed):
            self._service(i, chains, rules)
        rules.append(
            '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last '
            'rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS'
        )
        return FILTER + "*nat\n" + "\n".join(chains) + "\n" + "\n".join(rules) + "\nCOMMIT\n"


def restore(tool: str, ns: str, path: str, timeout: float) -> float | None:
    """Seconds `tool` took to restore the file into ns; None if stopped."""
    with open(path, "rb") as f:
        t0 = time.perf_counter()
        try:
            r = subprocess.run(
                in_netns(ns, [tool, "-w", "60", "--noflush", "--counters"]),
                stdin=f,
                capture_output=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return None
        dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{tool} failed ({r.returncode}): {r.stderr.decode(errors='replace')[-500:]}")
    return dt


def count_rules(tool: str, ns: str) -> int:
    save = tool.replace("-restore", "-save")
    out = subprocess.run(in_netns(ns, [save, "-t", "nat"]), capture_output=True, text=True, timeout=600).stdout
    return sum(1 for line in out.splitlines() if line.startswith("-A "))


def measure(cl: Cluster, change: tuple[int, int], tool: str, ns_factory, timeout: float, resync: bool = True) -> dict:
    """First load, one slice change as a full restore and as a partial one."""
    rs = Ruleset(cl)
    full = rs.render()
    res: dict = {
        "tool": tool,
        "services": cl.scn.services,
        "endpoints": cl.scn.total,
        "lines": full.count("\n"),
        "bytes": len(full),
        "timeout_s": timeout,
    }
    with tempfile.TemporaryDirectory(prefix="sliceproxy-bench-") as td, ns_factory() as ns:
        setup = Path(td) / "setup.rules"
        setup.write_text(SETUP)
        if restore(tool, ns, str(setup), 60) is None:
            raise RuntimeError(f"{tool}: setting up the namespace timed out")
        p_full = Path(td) / "full.rules"
        p_full.write_text(full)
        del full
        progress(f"peer {tool}: first load, {res['lines']:,} lines ({cl.scn.label} endpoints)")
        first = restore(tool, ns, str(p_full), timeout)
        res["full_s"] = first
        if first is None:
            return res
        res["nat_rules_loaded"] = count_rules(tool, ns)
        # A first load varies by a third from run to run on one host (3.3
        # to 5.4 s at S1): the median of three, each into a namespace of
        # its own, as ours is the median of three full syncs; one only
        # when a load takes more than 10 s.
        runs = [first]
        while len(runs) < 3 and sum(runs) < 20:
            with ns_factory() as again:
                if restore(tool, again, str(setup), 60) is None:
                    raise RuntimeError(f"{tool}: setting up the namespace timed out")
                dt = restore(tool, again, str(p_full), timeout)
            if dt is None:
                break
            runs.append(dt)
        res["full_runs"] = runs
        res["full_s"] = sorted(runs)[len(runs) // 2]
        i, j = change
        cl.replace(i, j)
        rs.update(cl, i)
        p_chg = Path(td) / "change-full.rules"
        p_chg.write_text(rs.render())
        p_part = Path(td) / "change-partial.rules"
        part = rs.render({i})
        p_part.write_text(part)
        res["partial_lines"] = part.count("\n")
        if resync:
            progress(f"peer {tool}: one slice changed, whole table restored (kube-proxy < 1.28, full syncs)")
            res["change_full_s"] = restore(tool, ns, str(p_chg), timeout)
        progress(
            f"peer {tool}: one slice changed, partial restore (kube-proxy >= 1.28), {res['partial_lines']:,} lines"
        )
        runs: list[float] = []
        while len(runs) < 3 and sum(runs) < 10:  # the median of 3, unless each takes seconds
            dt = restore(tool, ns, str(p_part), timeout)
            if dt is None:
                break
            runs.append(dt)
        res["change_partial_runs"] = runs
        res["change_partial_s"] = sorted(runs)[len(runs) // 2] if runs else None
    return res


def lb_ruleset(
    port_name: str,
    proto: str,
    cluster_ip: str,
    lb_ip: str,
    port: int,
    node_port: int,
    endpoint: str,
    ranges: list[str],
    others: Sequence[tuple[str, str, str]] = (),
) -> str:
    """Restore input for one LoadBalancer Service port with
    loadBalancerSourceRanges and one endpoint (externalTrafficPolicy
    Cluster), as kube-proxy 1.28+ writes it: in nat, KUBE-SERVICES sends
    the LB IP to KUBE-FW-<hash>, which sends each allowed range on to
    KUBE-EXT-<hash> (mark for masquerade, then the Service's KUBE-SVC and
    KUBE-SEP chains: DNAT) and lets everything else fall through undNATed;
    in filter, KUBE-PROXY-FIREWALL drops what is still addressed to the LB
    IP (hooked at INPUT, FORWARD and OUTPUT for new connections by SETUP).
    KUBE-POSTROUTING masquerades what was marked. others: ClusterIP
    Services (port name, cluster IP, one endpoint; TCP port 80) written
    around it as kube-proxy writes them, half of their KUBE-SERVICES rules
    before the Service's, half after (a packet walks that chain rule by
    rule, and one KUBE-FW refuses comes back to it). Load SETUP first."""
    svc = svc_chain(port_name, proto)
    h = svc[len("KUBE-SVC-") :]
    fw, ext = "KUBE-FW-" + h, "KUBE-EXT-" + h
    sep = sep_chain(port_name, endpoint, proto)
    ep_ip = endpoint.rsplit(":", 1)[0]
    m = f"-m {proto} -p {proto}"
    filt = FILTER.replace(
        "COMMIT\n",
        f'-A KUBE-PROXY-FIREWALL -m comment --comment "{port_name} traffic not accepted by {fw}" {m} -d {lb_ip} --dport {port} -j DROP\nCOMMIT\n',
    )
    chains = [*NAT_FIXED, f":{svc} - [0:0]", f":{ext} - [0:0]", f":{fw} - [0:0]", f":{sep} - [0:0]"]
    rules = [
        *NAT_FIXED_RULES,
        f'-A KUBE-SERVICES -m comment --comment "{port_name} cluster IP" {m} -d {cluster_ip} --dport {port} -j {svc}',
        f'-A KUBE-SERVICES -m comment --comment "{port_name} loadbalancer IP" {m} -d {lb_ip} --dport {port} -j {fw}',
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
        f'-A KUBE-NODEPORTS -m comment --comment "{port_name}" {m} --dport {node_port} -j {ext}',
        f'-A {svc} -m comment --comment "{port_name} cluster IP" {m} -d {cluster_ip} --dport {port} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ',
        f'-A {svc} -m comment --comment "{port_name} -> {endpoint}" -j {sep}',
        f'-A {ext} -m comment --comment "masquerade traffic for {port_name} external destinations" -j KUBE-MARK-MASQ',
        f"-A {ext} -j {svc}",
        *(f'-A {fw} -m comment --comment "{port_name} loadbalancer IP" -s {r} -j {ext}' for r in ranges),
        f'-A {fw} -m comment --comment "other traffic to {port_name} will be dropped by KUBE-PROXY-FIREWALL"',
        f'-A {sep} -m comment --comment "{port_name}" -s {ep_ip}/32 -j KUBE-MARK-MASQ',
        f'-A {sep} -m comment --comment "{port_name}" {m} -j DNAT --to-destination {endpoint}',
    ]
    half = len(others) // 2
    before: list[str] = []
    after: list[str] = []
    for i, (name, ip, ep) in enumerate(others):
        osvc, osep = svc_chain(name), sep_chain(name, ep)
        chains += [f":{osvc} - [0:0]", f":{osep} - [0:0]"]
        (before if i < half else after).append(
            f'-A KUBE-SERVICES -m comment --comment "{name} cluster IP" -m tcp -p tcp -d {ip} --dport 80 -j {osvc}'
        )
        rules += [
            f'-A {osvc} -m comment --comment "{name} cluster IP" -m tcp -p tcp -d {ip} --dport 80 '
            f"! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            f'-A {osvc} -m comment --comment "{name} -> {ep}" -j {osep}',
            f'-A {osep} -m comment --comment "{name}" -s {ep.rsplit(":", 1)[0]}/32 -j KUBE-MARK-MASQ',
            f'-A {osep} -m comment --comment "{name}" -m tcp -p tcp -j DNAT --to-destination {ep}',
        ]
    first = len(NAT_FIXED_RULES)
    rules[first:first] = before
    last = next(i for i, r in enumerate(rules) if "service nodeports" in r)
    rules[last:last] = after
    return filt + "*nat\n" + "\n".join(chains) + "\n" + "\n".join(rules) + "\nCOMMIT\n"
