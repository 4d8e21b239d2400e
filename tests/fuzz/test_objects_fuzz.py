"""Randomised malformed objects through both sources' parsing paths.

Valid Services, EndpointSlices and Nodes are generated, then mutated:
values of every JSON type put at any path (wrong types, huge strings and
numbers, unicode with control characters, nesting 60 levels deep), fields
deleted, unknown fields added, near-valid values (names one character too
long, addresses out of range). Each mutated object travels next to a valid
one:

* file source: the pair is one YAML file of a directory that FileSource
  scans once;
* API source: the pairs are items of list pages read by KubeSource.list_all
  (EndpointSlices and Services through the msgspec fast path first,
  ctrl.k8s.slicejson) and ADDED events of a stream read by KubeSource.watch.

Asserted: nothing raises; every object that the parser refuses or reports
costs exactly one log line, and every other object none; a wrong type
found at any field the parsers read (an independent schema below) is
always reported; the line names the object and a field on the path of one
of the mutations; and the valid objects are parsed exactly as when alone.

Seeded: the seed is printed and named in every failure; SLICEPROXY_FUZZ_SEED
replays a run, SLICEPROXY_FUZZ_OBJECTS sets how many mutated objects each
path gets (default 300).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
from pathlib import Path

import pytest
import yaml

from ctrl.k8s.files import DEFAULT_MAX_FILE_SIZE, FileSource
from ctrl.k8s.kube import KubeSource
from ctrl.k8s.objects import ObjectError, parse

DEFAULT_OBJECTS = 300
TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"
KIND_OF = {"Service": "Service", "EndpointSlice": "EndpointSlice", "Node": "Node"}


@pytest.fixture(scope="module")
def object_fuzz_run() -> tuple[int, int, str]:
    seed = int(os.environ.get("SLICEPROXY_FUZZ_SEED") or random.SystemRandom().getrandbits(32))
    n = int(os.environ.get("SLICEPROXY_FUZZ_OBJECTS") or DEFAULT_OBJECTS)
    replay = f"seed {seed} (replay: SLICEPROXY_FUZZ_SEED={seed} SLICEPROXY_FUZZ_OBJECTS={n})"
    print(f"\nobject fuzz: {replay}")
    return seed, n, replay


# -- valid objects ---------------------------------------------------------------


def valid_service(rnd: random.Random, name: str) -> dict:
    ports = []
    for i, number in enumerate(rnd.sample(range(1000, 9000), rnd.randrange(1, 4))):
        p: dict = {"name": f"p{i}", "port": number, "protocol": rnd.choice(["TCP", "UDP", "SCTP"])}
        p["targetPort"] = rnd.choice([number + 1, f"t{i}", number])
        if rnd.random() < 0.3:
            p["nodePort"] = 30000 + i
        ports.append(p)
    ip = f"198.19.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
    spec: dict = {
        "type": rnd.choice(["ClusterIP", "NodePort", "LoadBalancer"]),
        "clusterIP": ip,
        "clusterIPs": [ip],
        "ports": ports,
    }
    if rnd.random() < 0.5:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": rnd.randrange(1, 86401)}}
    if rnd.random() < 0.5:
        spec["internalTrafficPolicy"] = rnd.choice(["Cluster", "Local"])
        spec["externalTrafficPolicy"] = rnd.choice(["Cluster", "Local"])
        spec["healthCheckNodePort"] = 31000
    if rnd.random() < 0.5:
        spec["externalIPs"] = ["198.18.9.9"]
        spec["loadBalancerSourceRanges"] = ["198.18.0.0/16", "2001:db8::/32"]
    raw: dict = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": rnd.choice(["default", "shop"]), "labels": {"app": name}},
        "spec": spec,
    }
    if rnd.random() < 0.5:
        raw["metadata"]["annotations"] = {"note": "x"}
        raw["status"] = {"loadBalancer": {"ingress": [{"ip": "198.18.7.7", "ipMode": "VIP"}, {"hostname": "lb"}]}}
    return raw


def valid_slice(rnd: random.Random, name: str) -> dict:
    v6 = rnd.random() < 0.3
    eps = []
    for k in range(rnd.randrange(0, 5)):
        ep: dict = {"addresses": [f"2001:db8::{k + 1:x}" if v6 else f"198.18.1.{k + 1}"]}
        if rnd.random() < 0.8:
            ep["conditions"] = {"ready": rnd.random() < 0.7, "serving": True, "terminating": rnd.random() < 0.2}
        if rnd.random() < 0.7:
            ep["nodeName"] = rnd.choice(["node-a", "node-b"])
            ep["zone"] = "zone-1"
        if rnd.random() < 0.4:
            ep["hints"] = {"forZones": [{"name": "zone-1"}], "forNodes": [{"name": "node-a"}]}
        eps.append(ep)
    meta: dict = {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}}
    if rnd.random() < 0.5:
        meta["annotations"] = {TRIGGER: "2026-01-01T00:00:00Z"}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": "IPv6" if v6 else "IPv4",
        "ports": [{"name": "p0", "port": 8080, "protocol": "TCP"}, {"name": "p1", "port": 5353, "protocol": "UDP"}],
        "endpoints": eps,
    }


def valid_node(rnd: random.Random, name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "zone-1"}},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": "198.18.0.5"},
                {"type": "ExternalIP", "address": "2001:db8::5"},
                {"type": "Hostname", "address": name},
            ]
        },
    }


VALID = {"Service": valid_service, "EndpointSlice": valid_slice, "Node": valid_node}


# -- values and mutations --------------------------------------------------------

UNICODE = [
    (0x20, 0x7E),
    (0x00, 0x1F),  # control characters, newline among them
    (0x7F, 0xFF),
    (0x370, 0x3FF),
    (0x4E00, 0x4E80),
    (0x1F600, 0x1F640),
    (0x2028, 0x202E),  # line separators, right-to-left override
    (0x200B, 0x200F),  # zero-width
]
FIELD_NAMES = ["name", "namespace", "labels", "ports", "port", "ready", "addresses", "type", "ip", "kind", "items"]
NEAR_VALID = [
    "",
    "a" * 64,
    "a" * 254,
    "Web",
    "web_1",
    "198.18.0.300",
    "2001:db8::zz",
    "None",
    "ClientIP",
    "Local",
    "ICMP",
    "UDP",
    -1,
    0,
    65536,
    86401,
    2**31,
]


def rand_text(rnd: random.Random) -> str:
    size = rnd.choice([0, 1, 5, 20, 64, 300])
    out = []
    for _ in range(size):
        lo, hi = rnd.choice(UNICODE)
        out.append(chr(rnd.randint(lo, hi)))
    return "".join(out)


def rand_value(rnd: random.Random, depth: int = 0):
    r = rnd.random()
    if r < 0.08:
        return None
    if r < 0.16:
        return rnd.random() < 0.5
    if r < 0.26:
        return rnd.choice([0, 1, -7, 80, 65535, 10**18, -(10**30), 10**30])
    if r < 0.31:
        return rnd.choice([0.0, 1.5, -2.25, 1e300])
    if r < 0.45:
        return rand_text(rnd)
    if r < 0.48:
        return rnd.choice("xé\n") * rnd.choice([10_000, 100_000])  # huge
    if r < 0.53:
        return rnd.choice(FIELD_NAMES)
    if r < 0.58 and depth < 3:
        return [rand_value(rnd, depth + 1) for _ in range(rnd.randrange(0, 4))]
    if r < 0.66 and depth < 3:
        return {rnd.choice(FIELD_NAMES + [rand_text(rnd)]): rand_value(rnd, depth + 1) for _ in range(rnd.randrange(4))}
    if r < 0.70 and depth == 0:
        nested: object = rand_value(rnd, 3)
        for _ in range(rnd.randrange(10, 60)):  # deep, within the file source's 100 levels
            nested = [nested] if rnd.random() < 0.5 else {"n": nested}
        return nested
    return rnd.choice(NEAR_VALID)


def paths(node, prefix=()):
    """Every (path, parent, key) of a JSON-like tree."""
    if isinstance(node, dict):
        for k, v in list(node.items()):
            yield prefix + (k,), node, k
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,), node, i
            yield from paths(v, prefix + (i,))


def mutate(rnd: random.Random, raw: dict) -> tuple[object, list[tuple]]:
    """raw mutated 1-3 times; the paths mutated (() for the whole object)."""
    done: list[tuple] = []
    obj: object = raw
    for _ in range(rnd.choice([1, 1, 1, 2, 3])):
        if not isinstance(obj, dict | list) or rnd.random() < 0.02:
            obj = rand_value(rnd)
            done.append(())
            continue
        found = list(paths(obj))
        if not found:
            continue
        op = rnd.random()
        path, parent, key = rnd.choice(found)
        if op < 0.55:
            parent[key] = rand_value(rnd)
        elif op < 0.70:
            parent[key] = rnd.choice(NEAR_VALID)
        elif op < 0.85:
            del parent[key]
            if isinstance(parent, list):  # later entries moved up: so did the paths through them
                at = len(path) - 1
                done = [
                    q[:at] + (q[at] - 1,) + q[at + 1 :]
                    if len(q) > at and q[:at] == path[:at] and isinstance(q[at], int) and q[at] > key
                    else q
                    for q in done
                ]
        else:
            dicts = [(p, par[k]) for p, par, k in found if isinstance(par[k], dict)]
            if isinstance(obj, dict):
                dicts.append(((), obj))
            if not dicts:
                continue
            where, target = rnd.choice(dicts)
            new_key = rnd.choice(FIELD_NAMES + [rand_text(rnd) or "k"])
            target[new_key] = rand_value(rnd)
            path = where + (new_key,)
        done.append(path)
    return obj, done


# -- the independent schema: fields the parsers read, and their types -------------

MAP, LIST, STR, INT, BOOL, PORT_REF = "map", "list", "str", "int", "bool", "int|str"
ANY = "*"  # any list index or mapping key

SCHEMA: dict[str, dict[tuple, str]] = {
    "Service": {
        ("metadata",): MAP,
        ("metadata", "name"): STR,
        ("metadata", "namespace"): STR,
        ("metadata", "labels"): MAP,
        ("metadata", "labels", ANY): STR,
        ("metadata", "annotations"): MAP,
        ("metadata", "annotations", ANY): STR,
        ("spec",): MAP,
        ("spec", "type"): STR,
        ("spec", "clusterIP"): STR,
        ("spec", "clusterIPs"): LIST,
        ("spec", "ports"): LIST,
        ("spec", "ports", ANY): MAP,
        ("spec", "ports", ANY, "name"): STR,
        ("spec", "ports", ANY, "port"): INT,
        ("spec", "ports", ANY, "protocol"): STR,
        ("spec", "ports", ANY, "targetPort"): PORT_REF,
        ("spec", "ports", ANY, "nodePort"): INT,
        ("spec", "sessionAffinity"): STR,
        ("spec", "sessionAffinityConfig"): MAP,
        ("spec", "sessionAffinityConfig", "clientIP"): MAP,
        ("spec", "internalTrafficPolicy"): STR,
        ("spec", "externalTrafficPolicy"): STR,
        ("spec", "healthCheckNodePort"): INT,
        ("spec", "externalIPs"): LIST,
        ("spec", "externalIPs", ANY): STR,
        ("spec", "loadBalancerSourceRanges"): LIST,
        ("spec", "loadBalancerSourceRanges", ANY): STR,
        ("status",): MAP,
        ("status", "loadBalancer"): MAP,
        ("status", "loadBalancer", "ingress"): LIST,
        ("status", "loadBalancer", "ingress", ANY): MAP,
        ("status", "loadBalancer", "ingress", ANY, "ip"): STR,
        ("status", "loadBalancer", "ingress", ANY, "ipMode"): STR,
    },
    "EndpointSlice": {
        ("metadata",): MAP,
        ("metadata", "name"): STR,
        ("metadata", "namespace"): STR,
        ("metadata", "labels"): MAP,
        ("metadata", "labels", ANY): STR,
        ("metadata", "annotations"): MAP,
        ("metadata", "annotations", ANY): STR,
        ("addressType",): STR,
        ("ports",): LIST,
        ("ports", ANY): MAP,
        ("ports", ANY, "name"): STR,
        ("ports", ANY, "port"): INT,
        ("ports", ANY, "protocol"): STR,
        ("endpoints",): LIST,
        ("endpoints", ANY): MAP,
        ("endpoints", ANY, "addresses"): LIST,
        ("endpoints", ANY, "addresses", 0): STR,
        ("endpoints", ANY, "conditions"): MAP,
        ("endpoints", ANY, "conditions", "ready"): BOOL,
        ("endpoints", ANY, "conditions", "serving"): BOOL,
        ("endpoints", ANY, "conditions", "terminating"): BOOL,
        ("endpoints", ANY, "nodeName"): STR,
        ("endpoints", ANY, "zone"): STR,
        ("endpoints", ANY, "hints"): MAP,
        ("endpoints", ANY, "hints", "forZones"): LIST,
        ("endpoints", ANY, "hints", "forZones", ANY): MAP,
        ("endpoints", ANY, "hints", "forZones", ANY, "name"): STR,
        ("endpoints", ANY, "hints", "forNodes"): LIST,
        ("endpoints", ANY, "hints", "forNodes", ANY): MAP,
        ("endpoints", ANY, "hints", "forNodes", ANY, "name"): STR,
    },
    "Node": {
        ("metadata",): MAP,
        ("metadata", "name"): STR,
        ("metadata", "labels"): MAP,
        ("metadata", "labels", ANY): STR,
        ("status",): MAP,
        ("status", "addresses"): LIST,
        ("status", "addresses", ANY): MAP,
        ("status", "addresses", ANY, "type"): STR,
        ("status", "addresses", ANY, "address"): STR,
    },
}


def _has_type(value: object, want: str) -> bool:
    if want == MAP:
        return isinstance(value, dict)
    if want == LIST:
        return isinstance(value, list)
    if want == STR:
        return isinstance(value, str)
    if want == BOOL:
        return isinstance(value, bool)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return is_int or (want == PORT_REF and isinstance(value, str))


def _matches(pattern: tuple, node: object, at: tuple = ()):
    """(path, value) of every place in node that pattern names."""
    if not pattern:
        yield at, node
        return
    head, rest = pattern[0], pattern[1:]
    if head == ANY:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            yield from _matches(rest, v, at + (k,))
    elif isinstance(head, int):
        if isinstance(node, list) and len(node) > head:
            yield from _matches(rest, node[head], at + (head,))
    elif isinstance(node, dict) and head in node:
        yield from _matches(rest, node[head], at + (head,))


def wrong_types(kind: str, obj: object) -> list[tuple]:
    """Paths where a field the parsers read holds a value of another type
    (None counts as absent for a named field, but not for a list entry or
    a label's value)."""
    out = []
    for pattern, want in SCHEMA[kind].items():
        for path, value in _matches(pattern, obj):
            if value is None and isinstance(pattern[-1], str) and pattern[-1] != ANY:
                continue
            if not _has_type(value, want):
                out.append(path)
    return out


def render(path: tuple) -> str:
    """A path as the parsers name fields: spec.ports[0].name, metadata.labels[app]."""
    out = ""
    for i, k in enumerate(path):
        if isinstance(k, int) or (i == 2 and path[0] == "metadata" and path[1] in ("labels", "annotations")):
            out += f"[{k}]"
        else:
            out += f".{k}" if out else str(k)
    return out


def field_re(path: tuple) -> str:
    """render(path) as a regular expression; a label key that is not plain
    text is shown cut short in messages, so any text stands for it."""
    out = ""
    for i, k in enumerate(path):
        if i == 2 and path[0] == "metadata" and path[1] in ("labels", "annotations"):
            plain = isinstance(k, str) and k.isascii() and k.isprintable() and " " not in k and len(k) <= 40
            out += re.escape(f"[{k}]") if plain else r"\[.*?\]"
        elif isinstance(k, int):
            out += re.escape(f"[{k}]")
        else:
            out += re.escape(f".{k}" if out else str(k))
    return out


def names_a_mutated_field(line: str, mutated: list[tuple]) -> bool:
    """The line names a field on the path of one of the mutations: the
    field itself, one that holds it ("spec.ports: 5 is not a list"), or
    one inside the value put there ("...conditions.ready: 5 is not ...")."""
    if () in mutated:
        return True  # the whole object was replaced
    for p in mutated:
        for k in range(1, len(p) + 1):
            if re.search(": " + field_re(p[:k]) + ": ", line):
                return True
        if re.search(": " + field_re(p) + r"[.\[].*?: ", line):
            return True
    return False


PLAIN_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


def outcome(raw: object) -> str:
    """What parse() makes of an object: refused, reported or clean."""
    try:
        obj = parse(raw)
    except ObjectError:
        return "refused"
    return "reported" if obj.problems else "clean"


def check_line(line: str, raw: object, mutated: list[tuple], replay: str) -> None:
    assert "\n" not in line and len(line) < 1000, f"{replay}: unbounded line ({len(line)}) {line[:300]!r}"
    assert names_a_mutated_field(line, mutated), f"{replay}: {line!r} names none of {[render(p) for p in mutated]}"
    meta = raw.get("metadata") if isinstance(raw, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    if isinstance(name, str) and PLAIN_NAME.fullmatch(name) and len(name) <= 253:
        assert name in line, f"{replay}: {line!r} does not name {name}"


def cases(rnd: random.Random, n: int):
    """n (kind, bad, mutated paths, good) with unique names."""
    for i in range(n):
        kind = rnd.choice(list(VALID))
        bad, mutated = mutate(rnd, VALID[kind](rnd, f"bad-{i}"))
        good = VALID[kind](rnd, f"good-{i}")
        assert outcome(good) == "clean", good
        yield kind, bad, mutated, good


# -- the file source ---------------------------------------------------------------


def test_malformed_objects_in_files(tmp_path: Path, caplog, object_fuzz_run) -> None:
    seed, n, replay = object_fuzz_run
    rnd = random.Random(seed)
    files = {}
    for i, (kind, bad, mutated, good) in enumerate(cases(rnd, n)):
        path = tmp_path / f"case-{i:05d}.yaml"
        text = yaml.safe_dump_all([bad, good], allow_unicode=rnd.random() < 0.5)
        path.write_text(text, encoding="utf-8")
        loaded_bad = next(iter(yaml.safe_load_all(text)))  # what YAML made of it
        files[path] = (kind, loaded_bad, mutated, good)
    src = FileSource(tmp_path)
    with caplog.at_level(logging.ERROR, logger="sliceproxy.source.files"):
        src.scan()  # must not raise
    by_file: dict[Path, list[str]] = {p: [] for p in files}
    for r in caplog.records:
        if r.levelno >= logging.ERROR:
            msg = r.getMessage()
            path = Path(msg.split(":", 1)[0].split(" line ", 1)[0])
            assert path in by_file, f"{replay}: a line about no file: {msg[:300]!r}"
            by_file[path].append(msg)
    upserts = {}
    while not src.events.empty():
        for ev in src.events.get_nowait():
            assert ev.op == "upsert", f"{replay}: {ev}"
            upserts[(ev.kind, ev.key)] = ev.obj
    counts = {"refused": 0, "reported": 0, "clean": 0, "oversize": 0}
    for path, (kind, bad, mutated, good) in files.items():
        lines = by_file[path]
        where = f"{replay}: {path.name} ({kind}, mutated at {[render(p) for p in mutated]})"
        if path.stat().st_size > DEFAULT_MAX_FILE_SIZE:  # huge values: the file is not read at all
            assert len(lines) == 1 and "(--source-max-file-size)" in lines[0], f"{where}: {lines}"
            counts["oversize"] += 1
            continue
        result = outcome(bad) if bad is not None else "clean"  # an empty document holds nothing
        counts[result] += 1
        if wrong_types(kind, bad) or (isinstance(bad, dict) and bad.get("kind") != kind):
            assert result != "clean", f"{where}: a wrong type went unreported: {wrong_types(kind, bad)}"
        assert len(lines) == (result != "clean"), f"{where}: {result}, lines {lines}"
        for line in lines:
            check_line(line, bad, mutated, where)
        key = (
            good["metadata"]["name"]
            if kind == "Node"
            else f"{good['metadata']['namespace']}/{good['metadata']['name']}"
        )
        assert upserts.get((kind, key)) == parse(good), f"{where}: the valid object beside it differs"
    print(f"object fuzz, files: {n} mutated objects: {counts}")
    assert counts["refused"] and counts["reported"], f"{replay}: the mutations reach too little: {counts}"


# -- the API source ----------------------------------------------------------------


class Recorded:
    """Serves list pages by continue token and watch lines, as recorded."""

    def __init__(self, pages: list[bytes], lines: list[bytes]):
        self.pages = pages
        self.lines = lines

    def get_bytes(self, path, timeout=60, **params):
        return self.pages[int(params.get("continue") or 0)]

    def stream(self, path, read_timeout, **params):
        yield from self.lines


def as_item(raw: object) -> object:
    """As the API server lists objects: without kind."""
    if isinstance(raw, dict) and any(raw.get("kind") == k for k in KIND_OF):
        raw = {k: v for k, v in raw.items() if k != "kind"}
    return raw


@pytest.mark.parametrize("kind", ["Service", "EndpointSlice", "Node"])
def test_malformed_objects_in_api_lists_and_watches(caplog, object_fuzz_run, kind: str) -> None:
    seed, n, replay = object_fuzz_run
    rnd = random.Random(f"{seed}-{kind}")
    items: list[tuple[object, list[tuple], dict]] = []
    while len(items) < n:
        bad, mutated = mutate(rnd, VALID[kind](rnd, f"bad-{len(items)}"))
        good = VALID[kind](rnd, f"good-{len(items)}")
        items.append((as_item(bad), mutated, as_item(good)))
    per_page = 25
    pages = []
    for start in range(0, n, per_page):
        chunk = items[start : start + per_page]
        body = [x for bad, _, good in chunk for x in (bad, good)]
        meta = {"resourceVersion": "900"}
        if start + per_page < n:
            meta["continue"] = str(len(pages) + 1)
        pages.append(json.dumps({"kind": f"{kind}List", "metadata": meta, "items": body}).encode())
    lines = [
        json.dumps(
            {"type": "ADDED", "object": x if not isinstance(x, dict) else {**x, "kind": x.get("kind", kind)}}
        ).encode()
        for bad, _, good in items
        for x in (bad, good)
    ]
    for how in ("list", "watch"):
        caplog.clear()
        src = KubeSource(Recorded(pages, lines), "node-a")  # type: ignore[arg-type]
        known = src.held(kind)
        with caplog.at_level(logging.ERROR, logger="sliceproxy.source.kube"):
            if how == "list":
                assert src.list_all(kind) == "900"
            else:
                src.watch(kind, since="1")
        got = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        want_lines = 0
        for bad, mutated, good in items:
            raw = copy.deepcopy(bad)
            if isinstance(raw, dict) and raw.get("kind") is None:
                raw["kind"] = kind  # absent or null: the kind of the list
            result = outcome(raw)
            if isinstance(raw, dict) and raw.get("kind") != kind:
                result = "refused"  # another kind among these objects
            where = f"{replay}: {kind} {how}, mutated at {[render(p) for p in mutated]}"
            if wrong_types(kind, raw):
                assert result != "clean", f"{where}: a wrong type went unreported: {wrong_types(kind, raw)}"
            if result != "clean":
                assert want_lines < len(got), f"{where}: no line for it"
                check_line(got[want_lines], raw, mutated, where)
                want_lines += 1
            name = good["metadata"]["name"]
            key = name if kind == "Node" else f"{good['metadata']['namespace']}/{name}"
            assert known.get(key) == parse({**good, "kind": kind}), f"{where}: the valid object beside it differs"
        assert len(got) == want_lines, f"{replay}: {kind} {how}: {len(got)} lines for {want_lines} bad objects"
