"""ClusterState.take_touched names every slice of a Service that changed
since it was last asked, whatever the path: added, replaced, removed,
relabelled to another Service, and subset slices taken or dropped as
their Service comes, goes or is made again. The planner trusts it to
compare only those slices (ctrl.model.planner)."""

from __future__ import annotations

import random

from ctrl.k8s.events import Event
from ctrl.k8s.objects import Node, parse
from ctrl.model.state import ClusterState
from ctrl.subset.compute import subset_slices, zones_of

from .helpers import endpoint_slice, service

OWNERS = ["default/web", "default/api"]
NODES = [Node("node-1a", {"topology.kubernetes.io/zone": "zone-1"})]


def svc(name: str, uid: str):
    raw = service(name=name)
    raw["metadata"]["uid"] = uid
    return parse(raw)


def subset(name: str, uid: str, k: int):
    eps = [{"addresses": [f"198.18.9.{k}"], "nodeName": "node-1a", "zone": "zone-1"}]
    out = subset_slices(
        svc(name, uid), [parse(endpoint_slice(f"{name}-x", service=name, endpoints=eps))], zones_of(NODES)
    )
    (raw,) = out.values()
    return parse(raw)


def test_touched_names_cover_every_change():
    rnd = random.Random(3)
    st = ClusterState("node-1a")
    seen = {o: {} for o in OWNERS}  # what each owner's slices were when last asked
    for step in range(3000):
        r = rnd.random()
        if r < 0.1:  # a Service made, made again (another uid) or deleted
            name = rnd.choice(["web", "api"])
            if rnd.random() < 0.3:
                st.apply(Event("delete", "Service", f"default/{name}"))
            else:
                s = svc(name, rnd.choice(["uid-1", "uid-2"]))
                st.apply(Event("upsert", "Service", s.key, s))
        elif r < 0.2:  # a subset slice of either uid
            name = rnd.choice(["web", "api"])
            sl = subset(name, rnd.choice(["uid-1", "uid-2"]), rnd.randrange(1, 4))
            st.apply(Event("upsert", "EndpointSlice", f"{sl.namespace}/{sl.name}", sl))
        else:  # a plain slice: any label (relabels), replaced, the same again, or deleted
            name = f"s-{rnd.randrange(6)}"
            if rnd.random() < 0.15:
                st.apply(Event("delete", "EndpointSlice", f"default/{name}"))
            else:
                owner = rnd.choice(["web", "api", None])
                eps = [{"addresses": [f"198.18.1.{rnd.randrange(1, 4)}"]}]
                sl = parse(endpoint_slice(name, service=owner, endpoints=eps))
                st.apply(Event("upsert", "EndpointSlice", f"default/{name}", sl))
        if rnd.random() < 0.3:
            owner = rnd.choice(OWNERS)
            now = dict(st.slices.get(owner, {}))
            before = seen[owner]
            differ = {n for n in before.keys() | now.keys() if before.get(n) is not now.get(n)}
            assert differ <= st.take_touched(owner), step
            seen[owner] = now
