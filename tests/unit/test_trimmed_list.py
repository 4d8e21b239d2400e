"""ctrl.k8s.slicejson.decode_trimmed_list: a Service or Node list decoded
keeping only what ctrl.k8s.objects.parse reads gives exactly the objects,
problems and errors parse gives from the whole JSON, or declines (None).

Generated lists mix clean items, items with fields a proxy does not read
(managedFields...), and items broken in every field parse checks."""

import json
import random

import pytest

from ctrl.k8s.objects import ObjectError, parse
from ctrl.k8s.slicejson import decode_trimmed_list

BAD = [None, 7, "x", [], {}, {"a": 1}, True, "198.19.0.999", "Bad Name!"]


def maybe_bad(rnd: random.Random, good):
    return rnd.choice(BAD) if rnd.random() < 0.08 else good


def rand_service(rnd: random.Random, n: int) -> dict:
    meta: dict = {
        "name": maybe_bad(rnd, f"svc-{n}"),
        "resourceVersion": str(n),
        "creationTimestamp": "2026-01-01T00:00:00Z",
    }
    for key, good in (
        ("namespace", rnd.choice(["default", "shop", ""])),
        ("uid", f"uid-{n}"),
        ("labels", {"app": "web"}),
        ("annotations", {"service.beta.kubernetes.io/load-balancer-source-ranges": "198.18.0.0/16, 198.19.1.0/24"}),
    ):
        if rnd.random() < 0.8:
            meta[key] = maybe_bad(rnd, good)
    if rnd.random() < 0.5:
        meta["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:ports": {}}}}]
    ports = [
        {
            "name": maybe_bad(rnd, f"p{i}"),
            "port": maybe_bad(rnd, 80 + i),
            "protocol": maybe_bad(rnd, rnd.choice(["TCP", "UDP", "SCTP"])),
            "targetPort": maybe_bad(rnd, rnd.choice([8080, "http", 0, ""])),
        }
        for i in range(rnd.randrange(0, 3))
    ]
    spec: dict = {
        "type": maybe_bad(rnd, rnd.choice(["ClusterIP", "NodePort", "LoadBalancer"])),
        "clusterIP": maybe_bad(rnd, f"198.19.0.{n % 250 + 1}"),
        "ports": maybe_bad(rnd, ports),
        "selector": {"app": "web"},
    }
    for key, good in (
        ("clusterIPs", [f"198.19.0.{n % 250 + 1}", f"2001:db8:19::{n:x}"]),
        ("internalTrafficPolicy", rnd.choice(["Cluster", "Local"])),
        ("externalTrafficPolicy", rnd.choice(["Cluster", "Local"])),
        ("externalIPs", ["198.18.5.5"]),
        ("sessionAffinity", rnd.choice(["None", "ClientIP"])),
        ("sessionAffinityConfig", {"clientIP": {"timeoutSeconds": rnd.choice([10, 0, 90000])}}),
        ("healthCheckNodePort", 30999),
        ("loadBalancerSourceRanges", ["198.18.0.0/15"]),
    ):
        if rnd.random() < 0.5:
            spec[key] = maybe_bad(rnd, good)
    raw: dict = {"metadata": maybe_bad(rnd, meta) if rnd.random() < 0.3 else meta}
    if rnd.random() < 0.95:
        raw["spec"] = maybe_bad(rnd, spec) if rnd.random() < 0.3 else spec
    if rnd.random() < 0.5:
        raw["status"] = maybe_bad(rnd, {"loadBalancer": {"ingress": [{"ip": maybe_bad(rnd, "198.18.9.9")}]}})
    if rnd.random() < 0.2:
        raw["kind"] = "Service"
    return raw


def rand_node(rnd: random.Random, n: int) -> dict:
    meta: dict = {"name": maybe_bad(rnd, f"node-{n}"), "labels": maybe_bad(rnd, {"topology.kubernetes.io/zone": "z"})}
    addrs = [
        {
            "type": maybe_bad(rnd, rnd.choice(["InternalIP", "ExternalIP", "Hostname"])),
            "address": maybe_bad(rnd, f"198.18.0.{n % 250 + 1}"),
        }
        for _ in range(rnd.randrange(0, 3))
    ]
    return {"metadata": meta, "spec": {"podCIDR": "198.18.128.0/24"}, "status": {"addresses": maybe_bad(rnd, addrs)}}


def outcome(raw, kind: str):
    raw = dict(raw) if isinstance(raw, dict) else raw
    if isinstance(raw, dict) and raw.get("kind") is None:
        raw["kind"] = kind  # as the list path does
    try:
        return parse(raw)
    except ObjectError as e:
        return ("error", str(e))


@pytest.mark.parametrize("kind,make", [("Service", rand_service), ("Node", rand_node)])
@pytest.mark.parametrize("seed", range(40))
def test_a_trimmed_list_parses_exactly_as_the_whole_one(kind, make, seed):
    rnd = random.Random(seed)
    items = [make(rnd, n) for n in range(30)]
    body = json.dumps({"kind": f"{kind}List", "metadata": {"resourceVersion": "42"}, "items": items}).encode()
    whole = json.loads(body)
    trimmed = decode_trimmed_list(body)
    if any(isinstance(it.get("metadata"), int | str | list | bool) for it in items):
        assert trimmed is None  # a metadata that is not an object: the exact path
        return
    assert trimmed is not None
    assert trimmed["metadata"] == whole["metadata"]
    assert len(trimmed["items"]) == len(whole["items"])
    for a, b in zip(whole["items"], trimmed["items"], strict=True):
        want, got = outcome(a, kind), outcome(b, kind)
        assert got == want
        if not isinstance(want, tuple):
            assert got.problems == want.problems
    assert "managedFields" not in json.dumps(trimmed["items"])


def test_the_generator_gives_clean_and_broken_items():
    """The comparison above is only worth something if both kinds occur."""
    rnd = random.Random(0)
    results = [outcome(rand_service(rnd, n), "Service") for n in range(200)]
    assert sum(isinstance(r, tuple) for r in results) > 20
    assert sum(not isinstance(r, tuple) and not r.problems for r in results) > 20
    assert sum(not isinstance(r, tuple) and bool(r.problems) for r in results) > 5


@pytest.mark.parametrize("body", [b'{"items": [1, 2]}', b'{"items": {"a": 1}}', b"[]", b"not json"])
def test_shapes_it_does_not_know_go_the_exact_way(body):
    assert decode_trimmed_list(body) is None


def test_the_source_lists_services_trimmed_and_names_a_broken_one(caplog):
    import logging

    from ctrl.k8s.kube import KubeSource

    from .test_slicejson import PagedBytes

    rnd = random.Random(7)
    good = [s for s in (rand_service(rnd, n) for n in range(200)) if not isinstance(outcome(s, "Service"), tuple)][:5]
    broken = {"metadata": {"name": "broken", "namespace": "shop"}, "spec": {"type": "Nope", "ports": []}}
    body = json.dumps({"kind": "ServiceList", "metadata": {"resourceVersion": "9"}, "items": good + [broken]})
    src = KubeSource(PagedBytes([body.encode()]), "node-a")  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="sliceproxy.source.kube"):
        assert src.list_all("Service") == "9"
    held = src.held("Service")
    assert sorted(held.values(), key=lambda s: s.key) == sorted(
        (outcome(s, "Service") for s in good), key=lambda s: s.key
    )
    assert "shop/broken Service: spec.type: unknown type" in caplog.text
