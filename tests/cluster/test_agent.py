"""Tier 4: the agent against a real kube-apiserver and the real EndpointSlice
controller, with real traffic between network namespaces.

There is no kubelet: Pods are created through the API with a nodeName, and
their status is patched to Running/Ready with the address of a backend
namespace the test made. The controller-manager's EndpointSlice controller
writes the slices, the agent (in the node namespace, reaching the API
server through scripts/harness/nsforward.py) programs the maps, and a client
namespace sends requests to the ClusterIP.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scripts.harness.controlplane import ControlPlane
from scripts.harness.topo import Topology, wait_for_line
from tests.netns.agent import BPFFS, PIN_PREFIX, AgentProc, TrafficLoop, has_backends, wait_dump

REPO = Path(__file__).resolve().parents[2]
NODE = "node-a"
CLIENT_IP = "198.18.1.2"
PODS = {"web-1": "198.18.1.11", "web-2": "198.18.1.12", "web-3": "198.18.1.13"}

NSFORWARD = Path(__file__).resolve().parents[2] / "scripts" / "harness" / "nsforward.py"


_vips = itertools.count(10)


def backends(vip: str, *pods: str) -> dict[str, set[str]]:
    return {f"{vip}:80/TCP": {f"{PODS[p]}:8080" for p in pods}}


class Cluster:
    """The test's view: API helpers for Services and Pods in one namespace."""

    def __init__(self, cp: ControlPlane, ns: str):
        self.cp = cp
        self.ns = ns
        # A ClusterIP of its own: a deleted namespace frees its Service's IP
        # only later.
        self.vip = f"198.19.0.{next(_vips)}"

    def service(self, name: str = "web") -> None:
        self.cp.ok(
            "POST",
            f"/api/v1/namespaces/{self.ns}/services",
            {
                "metadata": {"name": name},
                "spec": {
                    "clusterIP": self.vip,
                    "selector": {"app": name},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                },
            },
        )

    def pod(self, name: str, ip: str, app: str = "web", ready: bool = True) -> None:
        self.cp.ok(
            "POST",
            f"/api/v1/namespaces/{self.ns}/pods",
            {
                "metadata": {"name": name, "labels": {"app": app}},
                "spec": {
                    "nodeName": NODE,
                    "containers": [
                        {"name": "web", "image": "registry.invalid/web:1", "ports": [{"containerPort": 8080}]}
                    ],
                },
            },
        )
        self.set_ready(name, ip, ready)

    def set_ready(self, name: str, ip: str, ready: bool) -> None:
        # What a kubelet would report; the EndpointSlice controller reads it,
        # and takes its last-change-trigger-time from the Ready condition's
        # lastTransitionTime.
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.cp.ok(
            "PATCH",
            f"/api/v1/namespaces/{self.ns}/pods/{name}/status",
            {
                "status": {
                    "phase": "Running",
                    "podIP": ip,
                    "podIPs": [{"ip": ip}],
                    "conditions": [
                        {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now},
                        {"type": "ContainersReady", "status": "True" if ready else "False", "lastTransitionTime": now},
                    ],
                }
            },
        )

    def delete_pod(self, name: str) -> None:
        self.cp.ok("DELETE", f"/api/v1/namespaces/{self.ns}/pods/{name}?gracePeriodSeconds=0")


@pytest.fixture(scope="module")
def node(controlplane: ControlPlane):
    status, _ = controlplane.request("GET", f"/api/v1/nodes/{NODE}")
    if status == 404:
        controlplane.ok(
            "POST",
            "/api/v1/nodes",
            {"metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "zone-a"}}},
        )
    return NODE


@pytest.fixture
def topo():
    with Topology() as t:
        t.add_pod("client", CLIENT_IP)
        for i, (name, ip) in enumerate(PODS.items(), 1):
            t.add_pod(name, ip)
            t.start_server(name, name=f"backend-{i}")
        yield t


@pytest.fixture
def forward(topo, controlplane):
    """The API server's port, reachable on 127.0.0.1 inside the node namespace."""
    port = int(controlplane.server.rsplit(":", 1)[1])
    proc = subprocess.Popen(
        [sys.executable, str(NSFORWARD), topo.ns_path("node"), str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_line(proc, "ready", 10, "nsforward")
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def pin_dir(topo):
    p = BPFFS / f"{PIN_PREFIX}{topo.prefix}"
    yield p
    shutil.rmtree(p, ignore_errors=True)


@pytest.fixture
def cluster(controlplane, namespace, node):
    return Cluster(controlplane, namespace)


def start_agent(topo, pin_dir: Path, kubeconfig: str) -> AgentProc:
    return AgentProc(
        topo,
        None,
        pin_dir,
        extra=["--kubeconfig", kubeconfig, "--node-name", NODE, "--healthz-bind-address", "127.0.0.1:10256"],
    )


def http(topo, vip: str, count: int = 120) -> dict:
    return topo.client("client", "http", "--target", f"{vip}:80", "--count", str(count), "--timeout", "1")


def wait_programmed(topo, pin_dir, agent, vip: str, *pods: str) -> dict:
    return wait_dump(topo, pin_dir, has_backends(backends(vip, *pods)), f"backends {pods}", agent=agent, timeout=60)


@contextlib.contextmanager
def web_agent(topo, pin_dir, cluster, controlplane, pods=tuple(PODS), kubeconfig=None):
    """Service web with these Pods, and an agent that has programmed them."""
    cluster.service()
    for name in pods:
        cluster.pod(name, PODS[name])
    agent = start_agent(topo, pin_dir, kubeconfig or controlplane.kubeconfig)
    try:
        wait_programmed(topo, pin_dir, agent, cluster.vip, *pods)
        yield agent
    finally:
        if agent.alive():
            agent.terminate()


def test_service_from_the_api_reaches_real_pods_and_follows_changes(topo, forward, pin_dir, cluster, controlplane):
    with web_agent(topo, pin_dir, cluster, controlplane) as agent:
        res = http(topo, cluster.vip)
        assert res["errors"] == 0, res
        assert set(res["counts"]) == {"backend-1", "backend-2", "backend-3"}

        # Not ready: the controller moves it out of the ready set, we follow.
        cluster.set_ready("web-2", PODS["web-2"], False)
        wait_programmed(topo, pin_dir, agent, cluster.vip, "web-1", "web-3")
        res = http(topo, cluster.vip)
        assert res["errors"] == 0 and "backend-2" not in res["counts"], res

        # Deleted: gone from the slice, gone from the maps.
        cluster.delete_pod("web-3")
        wait_programmed(topo, pin_dir, agent, cluster.vip, "web-1")
        res = http(topo, cluster.vip, 40)
        assert res["errors"] == 0 and set(res["counts"]) == {"backend-1"}, res


def test_scale_to_many_pods_spans_several_slices(topo, forward, pin_dir, cluster, controlplane):
    with web_agent(topo, pin_dir, cluster, controlplane, pods=("web-1",)) as agent:
        # Pods with no namespace behind them: only the maps are checked for them.
        extra = {f"many-{i}": f"198.18.{2 + i // 250}.{1 + i % 250}" for i in range(150)}
        for name, ip in extra.items():
            cluster.pod(name, ip)
        want = {f"{cluster.vip}:80/TCP": {f"{PODS['web-1']}:8080"} | {f"{ip}:8080" for ip in extra.values()}}
        wait_dump(topo, pin_dir, has_backends(want), "151 backends", agent=agent, timeout=90)
        status, slices = controlplane.request(
            "GET",
            f"/apis/discovery.k8s.io/v1/namespaces/{cluster.ns}/endpointslices?labelSelector=kubernetes.io/service-name%3Dweb",
        )
        assert status == 200 and len(slices["items"]) >= 2, "the controller should split 151 endpoints"
        for name in extra:
            cluster.delete_pod(name)
        wait_programmed(topo, pin_dir, agent, cluster.vip, "web-1")
        res = http(topo, cluster.vip, 40)
        assert res["errors"] == 0 and set(res["counts"]) == {"backend-1"}, res


def test_apiserver_restart_loses_no_traffic_and_changes_still_follow(topo, forward, pin_dir, cluster, controlplane):
    with web_agent(topo, pin_dir, cluster, controlplane) as agent:
        loop = TrafficLoop(topo, "client", "http", f"{cluster.vip}:80", per_batch=20, max_seconds=120).start()
        try:
            loop.wait_batches(2)
            done = loop.done()
            controlplane.restart_apiserver(down_seconds=3)
            loop.wait_batches(done + 3)
        finally:
            batches = loop.stop()
        errors = sum(b["errors"] for b in batches)
        assert errors == 0, [b for b in batches if b["errors"]][:2]
        # The agent reconnected: a change after the restart is programmed.
        cluster.set_ready("web-1", PODS["web-1"], False)
        wait_programmed(topo, pin_dir, agent, cluster.vip, "web-2", "web-3")
        assert agent.matching(r"watch failed"), "the agent should have seen the API server go away"


def test_restart_while_api_unreachable_prunes_nothing(topo, forward, pin_dir, cluster, controlplane):
    with web_agent(topo, pin_dir, cluster, controlplane):
        pass  # programmed, then stopped
    forward.terminate()  # the API is now unreachable from the node
    forward.wait(10)
    agent = start_agent(topo, pin_dir, controlplane.kubeconfig)
    try:
        agent.wait_log(r"failed .*retrying", timeout=30)
        # Still serving the pinned state, nothing pruned.
        res = http(topo, cluster.vip, 60)
        assert res["errors"] == 0 and set(res["counts"]) == {"backend-1", "backend-2", "backend-3"}, res
        wait_programmed(topo, pin_dir, agent, cluster.vip, "web-1", "web-2", "web-3")
    finally:
        agent.terminate()


def _objects(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _collection(obj: dict, ns: str | None) -> str:
    api = obj["apiVersion"]
    base = f"/api/{api}" if "/" not in api else f"/apis/{api}"
    plural = {
        "ServiceAccount": "serviceaccounts",
        "ClusterRole": "clusterroles",
        "ClusterRoleBinding": "clusterrolebindings",
        "DaemonSet": "daemonsets",
        "Role": "roles",
        "RoleBinding": "rolebindings",
        "Deployment": "deployments",
    }[obj["kind"]]
    if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
        return f"{base}/{plural}"
    return f"{base}/namespaces/{ns or obj['metadata']['namespace']}/{plural}"


@pytest.mark.parametrize("manifest", ["rbac.yaml", "daemonset.yaml", "subsetter.yaml"])
def test_manifests_pass_server_side_dry_run(controlplane, manifest):
    for obj in _objects(REPO / "deploy" / manifest):
        status, body = controlplane.request("POST", _collection(obj, None) + "?dryRun=All&fieldValidation=Strict", obj)
        assert status in (200, 201), f"{obj['kind']} {obj['metadata']['name']}: {status} {body}"


@pytest.fixture
def agent_account(controlplane):
    """deploy/rbac.yaml applied for real, and a token of its ServiceAccount."""
    created = []
    for obj in _objects(REPO / "deploy" / "rbac.yaml"):
        status, body = controlplane.request("POST", _collection(obj, None), obj)
        assert status in (201, 409), body
        created.append(obj)
    tok = controlplane.ok(
        "POST",
        "/api/v1/namespaces/kube-system/serviceaccounts/sliceproxy/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}},
    )["status"]["token"]
    yield tok


def test_agent_runs_with_its_own_serviceaccount_and_nothing_more(
    topo, forward, pin_dir, cluster, controlplane, agent_account, tmp_path
):
    kc = yaml.safe_load(Path(controlplane.kubeconfig).read_text())
    for u in kc["users"]:
        u["user"] = {"token": agent_account}
    path = tmp_path / "sa.kubeconfig"
    path.write_text(yaml.safe_dump(kc))
    with web_agent(topo, pin_dir, cluster, controlplane, pods=("web-1",), kubeconfig=str(path)) as agent:
        assert not agent.matching(r"HTTP 403"), agent.log_tail()
    # The same token outside the role: refused by the real RBAC.
    for path_ in ("/api/v1/secrets", f"/api/v1/namespaces/{cluster.ns}/pods"):
        status, _ = controlplane.request("GET", path_, token=agent_account)
        assert status == 403, path_
    status, _ = controlplane.request(
        "POST",
        f"/api/v1/namespaces/{cluster.ns}/services",
        {"metadata": {"name": "x"}, "spec": {"ports": [{"port": 1}]}},
        token=agent_account,
    )
    assert status == 403


def test_healthz_and_network_programming_latency(topo, forward, pin_dir, cluster, controlplane):
    with web_agent(topo, pin_dir, cluster, controlplane, pods=("web-1",)) as agent:
        probe = (
            "import urllib.request,sys;"
            "r=urllib.request.urlopen('http://127.0.0.1:10256/healthz',timeout=5);"
            "sys.stdout.write(str(r.status)+' '+r.read().decode())"
        )
        out = topo.exec_in("node", [sys.executable, "-c", probe], timeout=10)
        code, body = out.stdout.split(" ", 1)
        assert code == "200", out.stdout + out.stderr
        doc = json.loads(body)
        assert doc["nodeEligible"] is True and doc["lastUpdated"] and doc["currentTime"]
        # A change while the agent watches: the EndpointSlice controller stamps
        # the slice update with last-change-trigger-time (and drops it on later
        # resyncs), and the agent turns it into network programming latency.
        cluster.pod("web-2", PODS["web-2"])
        wait_programmed(topo, pin_dir, agent, cluster.vip, "web-1", "web-2")
        probe = probe.replace("10256/healthz", "10249/metrics")
        out = topo.exec_in("node", [sys.executable, "-c", probe], timeout=10)
        code, text = out.stdout.split(" ", 1)
        assert code == "200"
        count = [
            ln for ln in text.splitlines() if ln.startswith("kubeproxy_network_programming_duration_seconds_count")
        ]
        assert count and float(count[0].split()[-1]) >= 1, count
