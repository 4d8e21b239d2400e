"""Tier 5: sliceproxy as it runs in production, on a real node.

A kubelet with containerd and the CNI bridge runs in a network namespace of
its own (tests/node/kubenode.py); there is no kube-proxy. The repository's
deploy/rbac.yaml and deploy/daemonset.yaml are applied with kubectl, and the
DaemonSet's pod starts from the image built by scripts/build-images.sh. The
backends are agnhost netexec pods behind real Services; the clients are
other pods, or a host on the nodes' LAN for NodePorts.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections import Counter
from typing import Any

import pytest

from scripts.harness.controlplane import wait_until

from .images import image
from .kubenode import LAN_GW, NodeCluster

pytestmark = pytest.mark.root


def agnhost() -> str:
    return image("agnhost").ref


def apply(kube: NodeCluster, ns: str, *docs: dict[str, Any]) -> None:
    kube.kubectl("-n", ns, "apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))


def web_deployment(replicas: int = 3) -> dict[str, Any]:
    """agnhost netexec: answers /hostname with the pod's name. It keeps
    serving for a while after SIGTERM (as a well-behaved server does while
    proxies drop it), and is Ready only while it serves."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "containers": [
                        {
                            "name": "netexec",
                            "image": agnhost(),
                            "imagePullPolicy": "Never",
                            "args": ["netexec", "--http-port=8080", "--udp-port=8081", "--delay-shutdown=10"],
                            "ports": [{"containerPort": 8080, "name": "http"}],
                            "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8080}, "periodSeconds": 1},
                        }
                    ],
                },
            },
        },
    }


def web_services() -> list[dict[str, Any]]:
    port = {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
         "spec": {"selector": {"app": "web"}, "ports": [port]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-np"},
         "spec": {"type": "NodePort", "selector": {"app": "web"}, "ports": [port]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-headless"},
         "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [port]}},
    ]  # fmt: skip


def client_pod(name: str = "client", host_network: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "hostNetwork": host_network,
            "containers": [{"name": "client", "image": agnhost(), "imagePullPolicy": "Never", "args": ["pause"]}],
        },
    }


def wait_ready_pods(kube: NodeCluster, ns: str, selector: str, count: int, timeout: float = 180) -> list[dict]:
    def ready() -> list[dict] | None:
        pods = [
            p
            for p in kube.kubectl_json("-n", ns, "get", "pods", "-l", selector)["items"]
            if not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        ]
        return pods if len(pods) == count else None

    try:
        return wait_until(ready, timeout, interval=1, what=f"{count} Ready pods {selector} in {ns}")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{kube.kubectl('-n', ns, 'describe', 'pods', check=False)[-4000:]}") from None


@pytest.fixture
def web(kube: NodeCluster, kns: str) -> dict[str, Any]:
    """Deployment web (3 pods), its ClusterIP, NodePort and headless
    Services, and a client pod; returns their addresses."""
    apply(kube, kns, web_deployment(), *web_services(), client_pod())
    pods = wait_ready_pods(kube, kns, "app=web", 3)
    wait_ready_pods(kube, kns, "app=client", 1)
    svc = {s["metadata"]["name"]: s for s in kube.kubectl_json("-n", kns, "get", "services")["items"]}
    return {
        "ns": kns,
        "pods": {p["metadata"]["name"]: p["status"]["podIP"] for p in pods},
        "clusterIP": svc["web"]["spec"]["clusterIP"],
        "nodePort": svc["web-np"]["spec"]["ports"][0]["nodePort"],
        "npClusterIP": svc["web-np"]["spec"]["clusterIP"],
    }


# -- clients ---------------------------------------------------------------

LOOP = r"""
ok=0; fail=0; i=0
while [ ! -e /tmp/stop-{tag} ] && [ $i -lt {max} ]; do
  i=$((i+1))
  if out=$(curl -sS --max-time 3 http://{target}/hostname 2>&1); then ok=$((ok+1)); echo "ok $out"
  else fail=$((fail+1)); echo "fail $out"; fi
done
echo "summary ok=$ok fail=$fail"
"""


def parse_loop(out: str) -> tuple[Counter[str], list[str], int, int]:
    answers: Counter[str] = Counter()
    failures = []
    for line in out.splitlines():
        if line.startswith("ok "):
            answers[line[3:].strip()] += 1
        elif line.startswith("fail"):
            failures.append(line)
    m = re.search(r"summary ok=(\d+) fail=(\d+)", out)
    if not m:
        raise AssertionError(f"client loop did not finish: {out[-2000:]}")
    return answers, failures, int(m.group(1)), int(m.group(2))


def requests_from_pod(
    kube: NodeCluster, ns: str, target: str, count: int, pod: str = "client"
) -> tuple[Counter[str], list[str]]:
    out = kube.kubectl(
        "-n", ns, "exec", pod, "--", "sh", "-c", LOOP.format(tag="x", max=count, target=target), timeout=300
    )
    answers, failures, ok, _ = parse_loop(out)
    assert ok + len(failures) == count
    return answers, failures


class ClientLoop:
    """Requests from the client pod, back to back, until ``stop()`` (or a
    bound on count); its output is read as it comes, and the result counts
    every request."""

    def __init__(self, kube: NodeCluster, ns: str, target: str, max_requests: int = 20000) -> None:
        self.kube, self.ns = kube, ns
        self.tag = re.sub(r"[^0-9a-z]", "", target)
        script = LOOP.format(tag=self.tag, max=max_requests, target=target)
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            kube.kubectl_argv("-n", ns, "exec", "client", "--", "sh", "-c", script),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=kube.cp._env(),
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line)

    def answered(self) -> int:
        with self._lock:
            return sum(1 for line in self.lines if line.startswith("ok "))

    def stop(self) -> tuple[Counter[str], list[str], int]:
        try:
            self.kube.kubectl("-n", self.ns, "exec", "client", "--", "touch", f"/tmp/stop-{self.tag}")
            self.proc.wait(120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        self._thread.join(10)
        with self._lock:
            out = "".join(self.lines)
        answers, failures, ok, _ = parse_loop(out)
        return answers, failures, ok


def in_ns(ns_path: str, code: str, timeout: float = 60) -> str:
    """Python ``code`` run in a network namespace of the test (nsenter)."""
    argv = ["nsenter", f"--net={ns_path}", "--", sys.executable, "-c", code]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


def http_get_in_ns(ns_path: str, url: str) -> tuple[int, str]:
    code = (
        "import urllib.request,urllib.error,json\n"
        f"try:\n r=urllib.request.urlopen({url!r}, timeout=5); print(json.dumps([r.status, r.read().decode()]))\n"
        "except urllib.error.HTTPError as e:\n print(json.dumps([e.code, e.read().decode()]))\n"
    )
    status, body = json.loads(in_ns(ns_path, code))
    return status, body


def agent_dump(kube: NodeCluster) -> dict[str, Any]:
    node = kube.nodes[0]
    pod = kube.agent_pods()[0]["metadata"]["name"]
    out = kube.kubectl(
        "-n", "kube-system", "exec", pod, "--",
        "sliceproxy", "dump", "--json", "--pin-dir", f"/sys/fs/bpf/sliceproxy-test-{node.name}",
    )  # fmt: skip
    doc: dict[str, Any] = json.loads(out)
    return doc


def wait_programmed(kube: NodeCluster, frontend: str, backends: set[str], timeout: float = 60) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        for s in agent_dump(kube)["services"]:
            if s["frontend"] == frontend and set(s["backends"]) == backends:
                return s
        return None

    return wait_until(check, timeout, interval=1, what=f"{frontend} -> {sorted(backends)} in the maps")


# -- tests -------------------------------------------------------------------


def test_daemonset_pod_runs_the_image_and_attaches_pod_interfaces(kube: NodeCluster, web: dict[str, Any]) -> None:
    (pod,) = kube.agent_pods()
    assert pod["spec"]["containers"][0]["image"] == image("sliceproxy").ref
    assert pod["spec"]["nodeName"] == kube.nodes[0].name
    # One host-side veth per pod the CNI made: every one carries the program.
    node = kube.nodes[0]
    links = json.loads(
        subprocess.run(
            ["ip", "-n", node.ns, "-j", "link", "show", "type", "veth"], capture_output=True, text=True, check=True
        ).stdout
    )
    veths = [link["ifname"] for link in links if link["ifname"].startswith("veth")]
    assert len(veths) >= 4  # three web pods and the client
    logs = kube.kubectl("-n", "kube-system", "logs", pod["metadata"]["name"])

    def attached() -> bool:
        text = kube.kubectl("-n", "kube-system", "logs", pod["metadata"]["name"])
        return all(f"attached to interface {v}" in text for v in veths)

    wait_until(attached, 60, what=f"the agent's log to name every pod veth {veths}")
    # --log-format=json in the DaemonSet: kubectl logs shows one object a line.
    records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert records, logs[-2000:]


def test_clusterip_from_other_pods_reaches_every_backend(kube: NodeCluster, web: dict[str, Any]) -> None:
    pods = web["pods"]
    wait_programmed(kube, f"{web['clusterIP']}:80/TCP", {f"{ip}:8080" for ip in pods.values()})
    answers, failures = requests_from_pod(kube, web["ns"], f"{web['clusterIP']}:80", 90)
    assert not failures, failures[:5]
    assert set(answers) == set(pods), answers


def test_nodeport_from_a_pod_and_from_the_lan(kube: NodeCluster, web: dict[str, Any]) -> None:
    pods = web["pods"]
    node = kube.nodes[0]
    wait_programmed(kube, f"{web['npClusterIP']}:80/TCP", {f"{ip}:8080" for ip in pods.values()})
    # From a host on the nodes' LAN (the LAN namespace holds LAN_GW).
    assert kube.lan is not None
    url = f"http://{node.ip}:{web['nodePort']}/hostname"
    seen = Counter(http_get_in_ns(kube.lan.net.ns_path("node"), url)[1] for _ in range(30))
    assert set(seen) == set(pods), seen
    # Cluster policy masquerades only flows to other nodes' pods: these
    # backends are local, so they see the LAN client's own address.
    status, ip = http_get_in_ns(kube.lan.net.ns_path("node"), f"http://{node.ip}:{web['nodePort']}/clientip")
    assert status == 200 and ip.rsplit(":", 1)[0] == LAN_GW, ip


def test_a_host_network_pod_reaches_services_through_the_socket_hooks(kube: NodeCluster, web: dict[str, Any]) -> None:
    # hostNetwork: its packets never cross a pod interface. The DaemonSet
    # (no API address override) serves it by its cgroup hooks on the
    # node's cgroup subtree, with the pods' endpoint choice.
    pods = web["pods"]
    node = kube.nodes[0]
    apply(kube, web["ns"], client_pod("hostclient", host_network=True))
    wait_ready_pods(kube, web["ns"], "app=hostclient", 1)
    wait_programmed(kube, f"{web['clusterIP']}:80/TCP", {f"{ip}:8080" for ip in pods.values()})
    for target in (f"{web['clusterIP']}:80", f"{node.ip}:{web['nodePort']}"):
        answers, failures = requests_from_pod(kube, web["ns"], target, 60, pod="hostclient")
        assert not failures, (target, failures[:5])
        assert set(answers) == set(pods), (target, answers)
    # The agent says which cgroup it serves: the node's own, not the machine's.
    [agent] = [p for p in kube.agent_pods() if p["spec"]["nodeName"] == node.name]
    logs = kube.kubectl("-n", "kube-system", "logs", agent["metadata"]["name"])
    assert "host clients:" in logs, logs[-2000:]


def test_headless_service_is_not_programmed_and_its_pods_answer_directly(
    kube: NodeCluster, web: dict[str, Any]
) -> None:
    label = "kubernetes.io/service-name=web-headless"
    slices = kube.kubectl_json("-n", web["ns"], "get", "endpointslices", "-l", label)
    addresses = {a for s in slices["items"] for e in s.get("endpoints") or [] for a in e["addresses"]}
    assert addresses == set(web["pods"].values())
    dumped = agent_dump(kube)["services"]
    # No frontend for a Service without a ClusterIP: clients use the pod IPs.
    assert not [s for s in dumped if s.get("service", "").endswith("/web-headless")], dumped
    for name, ip in web["pods"].items():
        answers, failures = requests_from_pod(kube, web["ns"], f"{ip}:8080", 3)
        assert not failures and set(answers) == {name}


def test_rollout_of_the_backends_under_traffic_fails_no_request(kube: NodeCluster, web: dict[str, Any]) -> None:
    ns = web["ns"]
    old = set(web["pods"])
    loop = ClientLoop(kube, ns, f"{web['clusterIP']}:80")
    wait_until(lambda: loop.answered() >= 20, 60, what="the client loop running")
    kube.kubectl("-n", ns, "rollout", "restart", "deployment/web")
    kube.kubectl("-n", ns, "rollout", "status", "deployment/web", "--timeout=300s", timeout=320)
    new = {p["metadata"]["name"] for p in wait_ready_pods(kube, ns, "app=web", 3)}
    # Traffic keeps going after the last old pod is gone.
    done = loop.answered()
    wait_until(lambda: loop.answered() >= done + 20, 60, what="requests after the rollout")
    answers, failures, ok = loop.stop()
    assert not failures, f"{len(failures)} of {ok + len(failures)} requests failed: {failures[:5]}"
    assert not new & old
    assert old & set(answers) and new & set(answers), answers


def test_agent_pod_replaced_under_traffic_fails_no_request(kube: NodeCluster, web: dict[str, Any]) -> None:
    ns = web["ns"]
    (old,) = kube.agent_pods()
    loop = ClientLoop(kube, ns, f"{web['clusterIP']}:80")
    wait_until(lambda: loop.answered() >= 20, 60, what="the client loop running")
    kube.kubectl("-n", "kube-system", "delete", "pod", old["metadata"]["name"], "--wait=true", timeout=120)
    (new,) = kube.wait_agents_ready(exclude_uids=frozenset({old["metadata"]["uid"]}))
    done = loop.answered()
    wait_until(lambda: loop.answered() >= done + 20, 60, what="requests after the new agent is Ready")
    answers, failures, ok = loop.stop()
    assert not failures, f"{len(failures)} of {ok + len(failures)} requests failed: {failures[:5]}"
    assert set(answers) == set(web["pods"])
    # The new agent adopted the pinned maps: it logs that, and serves.
    logs = kube.kubectl("-n", "kube-system", "logs", new["metadata"]["name"])
    assert "attached to interface" in logs


def test_healthz_on_the_node_address_and_metrics_on_loopback(kube: NodeCluster) -> None:
    node = kube.nodes[0]
    assert kube.lan is not None
    # --healthz-bind-address=0.0.0.0:10256 (the DaemonSet): the kubelet's
    # probes use it, and so can a load balancer from the LAN.
    status, body = http_get_in_ns(kube.lan.net.ns_path("node"), f"http://{node.ip}:10256/healthz")
    assert status == 200, body
    health = json.loads(body)
    assert {"lastUpdated", "currentTime"} <= set(health), health
    # Metrics: the default 127.0.0.1:10249, inside the node's namespace.
    status, text = http_get_in_ns(node.ns_path, "http://127.0.0.1:10249/metrics")
    assert status == 200
    assert "kubeproxy_sync_proxy_rules_duration_seconds" in text
    # ... and not on the node's address (loopback only, as configured).
    code = "import socket\ns=socket.socket(); s.settimeout(3)\n" f"print(s.connect_ex(({node.ip!r}, 10249)))\n"
    assert in_ns(kube.lan.net.ns_path("node"), code).strip() != "0"
