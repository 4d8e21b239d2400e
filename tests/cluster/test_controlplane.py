"""The tier-4 fixture itself: a real apiserver that enforces RBAC and
allocates ClusterIPs from the test range, and the real EndpointSlice
controller (in kube-controller-manager) turning Pods into slices.

No kubelet runs: the tests create a Node through the API, bind Pods to it
with spec.nodeName and play the kubelet by patching the Pods' status.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest

from scripts.harness.controlplane import SERVICE_CIDR, ControlPlane, k8s_version, wait_until

SMP = "application/strategic-merge-patch+json"
_node_counter = itertools.count(1)


@pytest.fixture
def node(controlplane: ControlPlane) -> Iterator[str]:
    """A Node object for Pods to be bound to (nobody runs on it)."""
    name = f"node-{os.getpid()}-{next(_node_counter)}"
    controlplane.ok(
        "POST",
        "/api/v1/nodes",
        {"metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "zone-a"}}},
    )
    try:
        yield name
    finally:
        controlplane.request("DELETE", f"/api/v1/nodes/{name}")


def create_pod(cp: ControlPlane, ns: str, name: str, node: str, labels: dict[str, str]) -> None:
    cp.ok(
        "POST",
        f"/api/v1/namespaces/{ns}/pods",
        {
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "nodeName": node,
                "automountServiceAccountToken": False,
                "containers": [{"name": "app", "image": "registry.invalid/web:1"}],
            },
        },
    )


def set_pod_status(cp: ControlPlane, ns: str, name: str, ip: str | None, ready: bool) -> None:
    """What the kubelet would report: Running, with an IP, Ready or not.
    A strategic merge patch merges conditions by type, so flipping
    readiness later keeps the IP."""
    flag = "True" if ready else "False"
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [
            {"type": "Ready", "status": flag},
            {"type": "ContainersReady", "status": flag},
        ],
    }
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    cp.ok("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": status}, content_type=SMP)


def endpoints_of(cp: ControlPlane, ns: str, service: str) -> dict[str, dict[str, Any]]:
    """address -> endpoint conditions, over every slice of ``service``."""
    body = cp.ok(
        "GET",
        f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=kubernetes.io/service-name%3D{service}",
    )
    out: dict[str, dict[str, Any]] = {}
    for sl in body["items"]:
        assert sl["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
        for ep in sl.get("endpoints") or []:
            for addr in ep["addresses"]:
                out[addr] = ep
    return out


def test_apiserver_reports_pinned_version(controlplane: ControlPlane) -> None:
    body = controlplane.ok("GET", "/version")
    assert body["gitVersion"] == k8s_version()
    kubeconfig = open(controlplane.kubeconfig).read()
    assert controlplane.server in kubeconfig
    assert controlplane.server.startswith("https://127.0.0.1:")


def test_unknown_token_is_rejected(controlplane: ControlPlane) -> None:
    status, _ = controlplane.request("GET", "/api/v1/namespaces", token="not-a-token")
    assert status == 401


def test_service_gets_cluster_ip_from_test_range(controlplane: ControlPlane, namespace: str) -> None:
    svc = controlplane.ok(
        "POST",
        f"/api/v1/namespaces/{namespace}/services",
        {
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        },
    )
    ip = ipaddress.ip_address(svc["spec"]["clusterIP"])
    assert ip in ipaddress.ip_network(SERVICE_CIDR)


def test_endpointslice_controller_follows_pod_readiness(controlplane: ControlPlane, namespace: str, node: str) -> None:
    cp = controlplane
    cp.ok(
        "POST",
        f"/api/v1/namespaces/{namespace}/services",
        {
            "metadata": {"name": "web"},
            "spec": {
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            },
        },
    )
    pods = {"web-1": "198.18.1.11", "web-2": "198.18.1.12"}
    for name in pods:
        create_pod(cp, namespace, name, node, {"app": "web"})
    # A Pod with the label but in another app must stay out of the slice.
    create_pod(cp, namespace, "other", node, {"app": "other"})
    set_pod_status(cp, namespace, "other", "198.18.1.99", ready=True)
    for name, ip in pods.items():
        set_pod_status(cp, namespace, name, ip, ready=True)

    def both_ready() -> dict[str, dict[str, Any]] | None:
        eps = endpoints_of(cp, namespace, "web")
        if set(eps) == set(pods.values()) and all(ep["conditions"]["ready"] for ep in eps.values()):
            return eps
        return None

    eps = wait_until(both_ready, timeout=30, what="EndpointSlice of web with both Pods ready")
    ep = eps["198.18.1.11"]
    assert ep["nodeName"] == node
    assert ep["zone"] == "zone-a"
    assert ep["targetRef"]["name"] == "web-1"
    slices = cp.ok(
        "GET",
        f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices?labelSelector=kubernetes.io/service-name%3Dweb",
    )["items"]
    assert [sl["addressType"] for sl in slices] == ["IPv4"]
    assert slices[0]["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]

    # The kubelet reports web-2 not ready: the slice keeps it, not ready.
    set_pod_status(cp, namespace, "web-2", None, ready=False)

    def web2_not_ready() -> dict[str, dict[str, Any]] | None:
        eps = endpoints_of(cp, namespace, "web")
        if set(eps) == set(pods.values()) and eps["198.18.1.12"]["conditions"]["ready"] is False:
            return eps
        return None

    eps = wait_until(web2_not_ready, timeout=30, what="web-2 not ready in the EndpointSlice")
    assert eps["198.18.1.11"]["conditions"]["ready"] is True
    assert eps["198.18.1.12"]["conditions"]["serving"] is False
    assert eps["198.18.1.12"]["conditions"]["terminating"] is False

    # Deleting the Pod takes it out of the slice altogether.
    cp.ok("DELETE", f"/api/v1/namespaces/{namespace}/pods/web-2?gracePeriodSeconds=0")
    wait_until(
        lambda: set(endpoints_of(cp, namespace, "web")) == {"198.18.1.11"},
        timeout=30,
        what="web-2 gone from the EndpointSlice",
    )


def test_service_account_token_is_limited_by_rbac(controlplane: ControlPlane, namespace: str) -> None:
    cp = controlplane
    sa, role = "svc-reader", f"svc-reader-{namespace}"
    cp.ok("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": sa}})
    cp.ok(
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        {
            "metadata": {"name": role},
            "rules": [{"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]}],
        },
    )
    cp.ok(
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        {
            "metadata": {"name": role},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}],
        },
    )
    try:
        tr = cp.ok(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 600}},
        )
        token = tr["status"]["token"]

        # RBAC reaches the authorizer through an informer: allow a moment.
        wait_until(
            lambda: cp.request("GET", "/api/v1/services", token=token)[0] == 200,
            timeout=15,
            what="the ServiceAccount to be allowed to list services",
        )
        status, body = cp.request("GET", "/api/v1/services?watch=1&timeoutSeconds=1", token=token)
        assert status == 200, body
        status, body = cp.request("GET", "/api/v1/secrets", token=token)
        assert status == 403, body
        assert body["reason"] == "Forbidden"
        assert f"system:serviceaccount:{namespace}:{sa}" in body["message"]
        status, _ = cp.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/services",
            {"metadata": {"name": "nope"}, "spec": {"ports": [{"port": 80}]}},
            token=token,
        )
        assert status == 403
    finally:
        cp.request("DELETE", f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{role}")
        cp.request("DELETE", f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{role}")


def test_restart_apiserver_keeps_data(controlplane: ControlPlane, namespace: str) -> None:
    cp = controlplane
    cp.ok("POST", f"/api/v1/namespaces/{namespace}/configmaps", {"metadata": {"name": "kept"}, "data": {"a": "1"}})
    port = cp.ports["kube-apiserver"]
    cp.restart_apiserver()
    assert cp.ports["kube-apiserver"] == port
    assert cp.ok("GET", f"/api/v1/namespaces/{namespace}/configmaps/kept")["data"] == {"a": "1"}
    # The controller-manager reconnected: a new namespace gets its default
    # ServiceAccount again.
    ns2 = f"{namespace}-after"
    cp.ok("POST", "/api/v1/namespaces", {"metadata": {"name": ns2}})
    try:
        cp.wait_service_account(ns2)
    finally:
        cp.request("DELETE", f"/api/v1/namespaces/{ns2}")
