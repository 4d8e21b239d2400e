"""Helpers of the subsetting tests (tests/cluster/test_subsets.py): Nodes in
three zones, Services and Pods through the API, the subsetter as a process,
and an agent's plan through `sliceproxy run --dry-run` (the agent's source,
model and planner against the real API server; no kernel)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from scripts.harness.controlplane import ControlPlane, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
SLICEPROXY = Path(sys.executable).parent / "sliceproxy"
ZONES = ("zone-1", "zone-2", "zone-3")
SMP = "application/strategic-merge-patch+json"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"


def node_names(prefix: str) -> dict[str, str]:
    """node name -> zone: two Nodes a zone."""
    return {f"{prefix}-{z[-1]}{x}": z for z in ZONES for x in "ab"}


def make_nodes(cp: ControlPlane, nodes: dict[str, str]) -> None:
    for name, zone in nodes.items():
        status, body = cp.request(
            "POST", "/api/v1/nodes", {"metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}}
        )
        assert status in (201, 409), body
        # Allocatable CPU: what the EndpointSlice controller's topology-aware
        # hints weigh zones by.
        cp.ok(
            "PATCH",
            f"/api/v1/nodes/{name}/status",
            {"status": {"allocatable": {"cpu": "4"}, "capacity": {"cpu": "4"}}},
            content_type=SMP,
        )


def set_zone(cp: ControlPlane, node: str, zone: str) -> None:
    cp.ok("PATCH", f"/api/v1/nodes/{node}", {"metadata": {"labels": {"topology.kubernetes.io/zone": zone}}})


def make_service(cp: ControlPlane, ns: str, name: str, ip: str, hinted: bool = True, **spec: Any) -> dict:
    body: dict[str, Any] = {
        "clusterIP": ip,
        "selector": {"app": name},
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        **spec,
    }
    if hinted:
        body["trafficDistribution"] = "PreferClose"
    return cp.ok("POST", f"/api/v1/namespaces/{ns}/services", {"metadata": {"name": name}, "spec": body})


def make_pod(
    cp: ControlPlane, ns: str, name: str, app: str, node: str, ip: str | tuple[str, ...], ready: bool = True
) -> None:
    cp.ok(
        "POST",
        f"/api/v1/namespaces/{ns}/pods",
        {
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {
                "nodeName": node,
                "automountServiceAccountToken": False,
                "containers": [{"name": "web", "image": "registry.invalid/web:1", "ports": [{"containerPort": 8080}]}],
            },
        },
    )
    set_ready(cp, ns, name, ip, ready)


def set_ready(cp: ControlPlane, ns: str, name: str, ip: str | tuple[str, ...], ready: bool) -> None:
    """The Pod Running with `ip` (one address, or one of each family), and
    Ready or not."""
    ips = (ip,) if isinstance(ip, str) else ip
    flag = "True" if ready else "False"
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cp.ok(
        "PATCH",
        f"/api/v1/namespaces/{ns}/pods/{name}/status",
        {
            "status": {
                "phase": "Running",
                "podIP": ips[0],
                "podIPs": [{"ip": a} for a in ips],
                "conditions": [
                    {"type": "Ready", "status": flag, "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
                ],
            }
        },
        content_type=SMP,
    )


def slices(cp: ControlPlane, ns: str, selector: str) -> list[dict]:
    return cp.ok("GET", SLICES.format(ns=ns) + "?labelSelector=" + selector)["items"]


def subset_view(cp: ControlPlane, ns: str, service: str) -> dict[str, set[str]]:
    """subset -> the addresses of the Service's subset slices."""
    out: dict[str, set[str]] = {}
    for sl in slices(cp, ns, f"sliceproxy.io/service-name%3D{service}"):
        sub = sl["metadata"]["labels"]["sliceproxy.io/subset"]
        out.setdefault(sub, set()).update(e["addresses"][0] for e in sl.get("endpoints") or [])
    return out


def original_view(cp: ControlPlane, ns: str, service: str) -> dict[str, Any]:
    return {
        e["addresses"][0]: e
        for sl in slices(cp, ns, f"kubernetes.io/service-name%3D{service}")
        for e in sl.get("endpoints") or []
    }


def wait_hinted(cp: ControlPlane, ns: str, service: str, count: int) -> None:
    """The EndpointSlice controller has put `count` endpoints with zone hints."""

    def done() -> bool:
        eps = original_view(cp, ns, service)
        return len(eps) == count and all((e.get("hints") or {}).get("forZones") for e in eps.values())

    wait_until(done, 60, what=f"{count} hinted endpoints of {ns}/{service}")


class Subsetter:
    """`sliceproxy subsetter` as a process, its log collected."""

    def __init__(
        self, cp: ControlPlane, lease_ns: str, lease: str, identity: str, duration: float = 3.0, extra: tuple = ()
    ):
        self.identity = identity
        self.metrics_port = free_port()
        self.argv = [
            str(SLICEPROXY), "subsetter", "--kubeconfig", cp.kubeconfig,
            "--lease-namespace", lease_ns, "--lease-name", lease, "--identity", identity,
            "--lease-duration", str(duration), "--renew-period", str(duration / 4),
            "--metrics-bind-address", f"127.0.0.1:{self.metrics_port}", *extra,
        ]  # fmt: skip
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(REPO), stdin=subprocess.DEVNULL
        )
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def wait_log(self, pattern: str, timeout: float = 60) -> str:
        rx = re.compile(pattern)
        try:
            return wait_until(
                lambda: next((ln for ln in list(self.lines) if rx.search(ln)), None), timeout, what=pattern
            )
        except TimeoutError as e:
            raise AssertionError(f"subsetter {self.identity}: {e}; log:\n" + "\n".join(self.lines[-30:])) from None

    def metric(self, name: str) -> float | None:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)  # name may carry {labels}
        return float(m.group(1)) if m else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._t.join(2)


def planned(cp: ControlPlane, node: str, subsets: str, lease: str, ns: str) -> tuple[dict[str, list[str]], str]:
    """What an agent on `node` programs for the Services of `ns` (frontend
    -> sorted backends), and its log, from `sliceproxy run --dry-run`."""
    r = subprocess.run(
        [
            str(SLICEPROXY),
            "run",
            "--dry-run",
            "--output",
            "json",
            "--kubeconfig",
            cp.kubeconfig,
            "--node-name",
            node,
            "--subsets",
            subsets,
            "--subsets-lease",
            lease,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(REPO),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    maps = {k.rsplit("_v", 1)[0]: v for k, v in doc.items()}
    names = {e["key"]: e["value"] for e in maps["sp_names"]}
    backends = {e["key"]: e["value"]["backend"] for e in maps["sp_be"]}
    slots: dict[int, list[str]] = {}
    for e in maps["sp_slot"]:
        slots.setdefault(e["key"]["svc_id"], []).append(backends[e["value"]["backend_id"]])
    out = {}
    for e in maps["sp_svc"]:
        sid = e["value"]["svc_id"]
        name = names.get(sid, "")
        if name.startswith(f"{ns}/"):
            out[f"{name} {e['key']['frontend']} scope {e['key']['scope']}"] = sorted(slots.get(sid, []))
    return out, r.stderr
