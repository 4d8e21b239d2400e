"""Tier 3: the agent fed a directory full of bad input keeps serving.

`sliceproxy run --source DIR` (a real process) starts on a directory that
already holds, next to the web Service, every kind of bad input an
adversarial run found crashing or hanging the file source, and seeded random
malformed objects (tests/fuzz): it must start, report each bad file in one
line, keep web carrying real traffic, and still apply a valid change made
after more bad files appeared.
"""

from __future__ import annotations

import os
import random
import re

import pytest
import yaml

from scripts.harness.topo import Topology

from ..fuzz.test_objects_fuzz import cases
from .agent import SourceDir, service
from .conftest import THREE, VIP, Agents, assert_spread, http, udp, web_backends, web_slice

pytestmark = pytest.mark.root

SEED_ENV = "SLICEPROXY_FUZZ_SEED"
FUZZ_OBJECTS = 60

# A 458-byte document whose aliases stand for 10^9 strings.
BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
    "i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
    "kind: Service\nmetadata: {name: bomb}\nspec: {clusterIP: *i}\n"
)


def crashers() -> dict[str, dict]:
    """Documents with a wrong type that raised out of the scanner, each
    with (a part of) the line it must now get."""
    svc = service("bad-svc", "198.19.0.40", [("http", 80, "TCP", 8080)])
    sl = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "bad-slice", "namespace": "default"},
        "addressType": "IPv4",
        "endpoints": [],
    }
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "bad-node"}}
    return {
        "affinity-config.yaml": {**svc, "spec": {**svc["spec"], "sessionAffinityConfig": 5}},
        "external-ips.yaml": {**svc, "spec": {**svc["spec"], "externalIPs": 5}},
        "status.yaml": {**svc, "status": 5},
        "ingress.yaml": {**svc, "status": {"loadBalancer": {"ingress": 5}}},
        "slice-labels.yaml": {**sl, "metadata": {**sl["metadata"], "labels": 5}},
        "slice-annotations.yaml": {**sl, "metadata": {**sl["metadata"], "annotations": 5}},
        "node-status.yaml": {**node, "status": 5},
        "node-address-type.yaml": {**node, "status": {"addresses": [{"type": [], "address": "198.18.0.9"}]}},
        "list-items.yaml": {"apiVersion": "v1", "kind": "List", "items": 5},
    }


def write_bad_files(src: SourceDir, prefix: str) -> list[str]:
    """Bad files of every kind; returns their names."""
    names = []
    for name, doc in crashers().items():
        names.append(src.write(f"{prefix}{name}", doc).name)
    fifo = src.file(f"{prefix}fifo.yaml")
    os.mkfifo(fifo)
    loop = src.file(f"{prefix}loop.yaml")
    os.symlink(loop.name, loop)
    os.symlink("nowhere.yaml", src.file(f"{prefix}dangling.yaml"))
    src.write_text(f"{prefix}bomb.yaml", BOMB)
    src.write_text(f"{prefix}deep.yaml", "kind: Service\nspec: " + "[" * 500_000 + "]" * 500_000 + "\n")
    src.write_text(f"{prefix}big.yaml", "# padding\n" * 300_000)  # 3 MB: over the 2 MiB default
    src.write_text(f"{prefix}broken.yaml", "kind: Service\nmetadata: {name: x\n")
    return names + [f"{prefix}{n}.yaml" for n in ("fifo", "loop", "dangling", "bomb", "deep", "big", "broken")]


def write_fuzz_files(src: SourceDir, seed: int) -> list[str]:
    """Seeded random malformed objects, one file each, kept away from web:
    no slice names web as its Service and no object holds web's address."""
    names = []
    for i, (_, bad, _, _) in enumerate(cases(random.Random(seed), FUZZ_OBJECTS)):
        if isinstance(bad, dict):
            meta = bad.get("metadata")
            labels = meta.get("labels") if isinstance(meta, dict) else None
            if isinstance(labels, dict) and labels.get("kubernetes.io/service-name") == "web":
                labels["kubernetes.io/service-name"] = "fuzz"
        text = yaml.safe_dump(bad)
        if VIP in text:
            continue
        names.append(src.write_text(f"fuzz-{i:03d}.yaml", text).name)
    return names


def lines_about(agent, name: str) -> list[str]:
    return [line for line in agent.log() if " ERROR " in line and re.search(rf"/{re.escape(name)}\b", line)]


def test_bad_files_cost_one_line_each_and_web_keeps_serving(topo: Topology, agents: Agents, src: SourceDir) -> None:
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().getrandbits(32))
    print(f"\nbad input: fuzz seed {seed} (replay: {SEED_ENV}={seed})")
    # Present before the agent starts: it exited 1 on the first of these.
    before = write_bad_files(src, "a-") + write_fuzz_files(src, seed)
    agent = agents.start_ready()
    assert_spread(http(topo), THREE)
    assert_spread(udp(topo), THREE)

    # More bad files while it runs, sorting before and after web's files.
    after = write_bad_files(src, "z-")
    agent.wait_log(re.escape("z-list-items.yaml"))
    # A valid change made after them is applied: backend-4 replaces backend-3.
    src.write("slice-b.yaml", web_slice("web-b", "backend-4"))
    agents.wait(web_backends("backend-1", "backend-2", "backend-4"), agent=agent)
    assert_spread(http(topo), ["backend-1", "backend-2", "backend-4"])
    agent.check_alive()

    for name in before + after:
        if name.startswith("fuzz-"):
            continue  # a random object may be valid: no line then
        found = lines_about(agent, name)
        assert len(found) == 1, f"{name}: expected one error line, got {found}"
    for name in crashers():
        (line,) = lines_about(agent, f"a-{name}")
        fields = {"list-items.yaml": "items: 5 is not a list", "node-address-type.yaml": "status.addresses[0].type"}
        assert fields.get(name, ": 5 is not a") in line, line
    assert not [line for line in agent.log() if "Traceback" in line], "a traceback in the agent's log"
    for line in agent.log():
        assert len(line) < 2000, f"an unbounded log line ({len(line)} characters)"
