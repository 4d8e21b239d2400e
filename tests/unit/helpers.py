"""Builders of raw Kubernetes objects for the unit tests (test range addresses only)."""

from __future__ import annotations


def service(name="web", ns="default", ip="198.19.0.10", ports=None, **spec):
    ports = ports if ports is not None else [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
    body = {"clusterIP": ip, "ports": ports, **spec}
    if ip is None:
        body.pop("clusterIP")
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": body}


def endpoint(ip, ready=None, serving=None, terminating=None, node="node-a"):
    cond = {}
    for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating)):
        if v is not None:
            cond[k] = v
    return {"addresses": [ip], "conditions": cond, "nodeName": node}


def eps(*ips):
    return [endpoint(ip) for ip in ips]


def endpoint_slice(name, service="web", ns="default", endpoints=(), ports=None, address_type="IPv4"):
    ports = ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}]
    labels = {"kubernetes.io/service-name": service} if service else {}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "addressType": address_type,
        "ports": ports,
        "endpoints": list(endpoints),
    }
