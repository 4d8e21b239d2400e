# ruff: noqa: E501 - ruleset lines are kept verbatim, whatever their length
"""The peer: kube-proxy's nftables mode, loaded with `nft -f` into a
throwaway namespace.

The transaction is what kube-proxy's nftables proxier (pkg/proxy/nftables,
through knftables) sends for ClusterIP Services: a `kube-proxy` table of
family ip; its base chains (filter-* at dstnat-10, nat-prerouting and
nat-output at dstnat, nat-postrouting at srcnat) and regular chains
(services, masquerading, mark-for-masquerade, endpoints-check,
firewall-check, reject-chain); the verdict map `service-ips` (ipv4_addr .
inet_proto . inet_service : verdict) with one `goto service-...` element per
service port; per service port a chain `service-<HASH8>-<ns>/<name>/tcp/<port>`
with a masquerade rule and `numgen random mod N vmap { 0 : goto
endpoint-..., ... }`; per endpoint a chain
`endpoint-<HASH8>-<ns>/<name>/tcp/<port>__<ip>/<port>` marking for masquerade
when the endpoint talks to itself, then `dnat to`. Every chain kube-proxy
writes is first added and flushed (its ensureChain), in one transaction.

Syncs:
  full         the whole transaction (first load; kube-proxy's full syncs)
  incremental  kube-proxy >= 1.31 (partial sync): only the changed Service's
               chains, flushed and re-added in one transaction (its service
               chain and all its endpoint chains), then, as kube-proxy does a
               second later, a transaction deleting the stale endpoint chains.
               The figure is the sum of the two.
kube-proxy also runs `nft list` on its table before a sync; that is not
timed here (so, again, a lower bound of kube-proxy's own time).
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import tempfile
import time
from pathlib import Path

from .common import CLUSTER_CIDR, NAMESPACE, Cluster, in_netns, progress, vip

T = "ip kube-proxy"
MARK = "0x4000"


def _hash8(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:8]


SETUP = f"""add table {T} {{ comment "rules for kube-proxy" ; }}
add chain {T} filter-prerouting {{ type filter hook prerouting priority -110 ; }}
add chain {T} filter-input {{ type filter hook input priority -110 ; }}
add chain {T} filter-forward {{ type filter hook forward priority -110 ; }}
add chain {T} filter-output {{ type filter hook output priority -110 ; }}
add chain {T} nat-prerouting {{ type nat hook prerouting priority -100 ; }}
add chain {T} nat-output {{ type nat hook output priority -100 ; }}
add chain {T} nat-postrouting {{ type nat hook postrouting priority 100 ; }}
flush chain {T} filter-prerouting
flush chain {T} filter-input
flush chain {T} filter-forward
flush chain {T} filter-output
flush chain {T} nat-prerouting
flush chain {T} nat-output
flush chain {T} nat-postrouting
add chain {T} endpoints-check
flush chain {T} endpoints-check
add rule {T} filter-input ct state new jump endpoints-check
add rule {T} filter-forward ct state new jump endpoints-check
add rule {T} filter-output ct state new jump endpoints-check
add chain {T} firewall-check
flush chain {T} firewall-check
add rule {T} filter-prerouting ct state new jump firewall-check
add rule {T} filter-output ct state new jump firewall-check
add chain {T} services
flush chain {T} services
add rule {T} nat-output jump services
add rule {T} nat-prerouting jump services
add chain {T} masquerading
flush chain {T} masquerading
add rule {T} nat-postrouting jump masquerading
add chain {T} mark-for-masquerade
flush chain {T} mark-for-masquerade
add rule {T} mark-for-masquerade mark set mark or {MARK}
add rule {T} masquerading mark and {MARK} == 0 return
add rule {T} masquerading mark set mark xor {MARK}
add rule {T} masquerading masquerade fully-random
add map {T} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }}
add map {T} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }}
add chain {T} reject-chain {{ comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }}
flush chain {T} reject-chain
add rule {T} reject-chain reject
add rule {T} endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule {T} endpoints-check fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports
add map {T} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }}
add rule {T} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }}
add map {T} service-nodeports {{ type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }}
add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips
add rule {T} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports
flush map {T} firewall-ips
flush map {T} no-endpoint-services
flush map {T} no-endpoint-nodeports
flush map {T} service-ips
flush map {T} service-nodeports
"""


class Ruleset:
    def __init__(self, cl: Cluster):
        self.services = cl.scn.services
        self.eps = [list(cl.endpoints(i)) for i in range(self.services)]
        self.stale: list[str] = []

    def _base(self, i: int) -> str:
        name = f"{NAMESPACE}/{Cluster.svc_name(i)}/tcp/http"
        return name

    def svc_chain(self, i: int) -> str:
        name = self._base(i)
        return f"service-{_hash8(name)}-{name}"

    def ep_chain(self, i: int, ip: str, port: int) -> str:
        name = f"{self._base(i)}__{ip}/{port}"
        return f"endpoint-{_hash8(name)}-{name}"

    def update(self, cl: Cluster, i: int) -> None:
        old = {self.ep_chain(i, a, p) for a, p in self.eps[i]}
        self.eps[i] = list(cl.endpoints(i))
        new = {self.ep_chain(i, a, p) for a, p in self.eps[i]}
        self.stale = sorted(old - new)

    def _service(self, i: int, out: list[str], element: bool) -> None:
        eps = self.eps[i]
        chains = [self.ep_chain(i, a, p) for a, p in eps]
        for c in chains:  # endpoint chains first: the vmap below refers to them
            out.append(f"add chain {T} {c}")
            out.append(f"flush chain {T} {c}")
        svc = self.svc_chain(i)
        v = vip(i)
        out.append(f"add chain {T} {svc}")
        out.append(f"flush chain {T} {svc}")
        out.append(f"add rule {T} {svc} ip daddr {v} tcp dport 80 ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade")
        vmap = ", ".join(f"{k} : goto {c}" for k, c in enumerate(chains))
        out.append(f"add rule {T} {svc} numgen random mod {len(chains)} vmap {{ {vmap} }}")
        if element:
            out.append(f"add element {T} service-ips {{ {v} . tcp . 80 : goto {svc} }}")
        for (a, p), c in zip(eps, chains, strict=False):
            out.append(f"add rule {T} {c} ip saddr {a} jump mark-for-masquerade")
            out.append(f"add rule {T} {c} meta l4proto tcp dnat to {a}:{p}")

    def render_full(self) -> str:
        out = [SETUP.rstrip("\n")]
        for i in range(self.services):
            self._service(i, out, element=True)
        return "\n".join(out) + "\n"

    def render_change(self, i: int) -> str:
        out: list[str] = []
        self._service(i, out, element=False)  # the map element did not change
        return "\n".join(out) + "\n"

    def render_stale(self) -> str:
        return "".join(f"delete chain {T} {c}\n" for c in self.stale)


def load(ns: str, path: str, timeout: float) -> float | None:
    with open(path, "rb") as f:
        t0 = time.perf_counter()
        try:
            r = subprocess.run(in_netns(ns, ["nft", "-f", "-"]), stdin=f, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"nft -f failed ({r.returncode}): {r.stderr.decode(errors='replace')[-800:]}")
    return dt


def measure(cl: Cluster, change: tuple[int, int], ns_factory, timeout: float) -> dict:
    rs = Ruleset(cl)
    full = rs.render_full()
    res: dict = {
        "tool": "nft -f",
        "services": cl.scn.services,
        "endpoints": cl.scn.total,
        "lines": full.count("\n"),
        "bytes": len(full),
        "timeout_s": timeout,
    }
    with tempfile.TemporaryDirectory(prefix="sliceproxy-bench-") as td, ns_factory() as ns:
        p_full = Path(td) / "full.nft"
        p_full.write_text(full)
        del full
        progress(f"peer nft: first load, {res['lines']:,} lines ({cl.scn.label} endpoints)")
        res["full_s"] = load(ns, str(p_full), timeout)
        if res["full_s"] is None:
            return res
        i, j = change
        cl.replace(i, j)
        rs.update(cl, i)
        p_chg = Path(td) / "change.nft"
        chg = rs.render_change(i)
        p_chg.write_text(chg)
        p_stale = Path(td) / "stale.nft"
        p_stale.write_text(rs.render_stale())
        res["change_lines"] = chg.count("\n")
        progress(f"peer nft: one slice changed, the Service's chains rewritten, {res['change_lines']:,} lines")
        t1 = load(ns, str(p_chg), timeout)
        t2 = load(ns, str(p_stale), timeout) if t1 is not None else None
        res["change_tx_s"] = t1
        res["stale_delete_s"] = t2
        res["change_s"] = None if t1 is None or t2 is None else t1 + t2
        if res["change_s"] is not None and res["full_s"] < 60:
            progress("peer nft: full resync of the same table")
            res["resync_s"] = load(ns, str(p_full), timeout)
    return res
