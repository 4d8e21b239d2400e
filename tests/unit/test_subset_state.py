"""ClusterState takes a subset slice only with the subsetter's managed-by,
no service-name label, and an ownerReference naming its Service's uid; a
forged one is ignored with one log line, one that arrives before its
Service waits for it, and a Service made again (a new uid) drops the old
one's subsets."""

from __future__ import annotations

import copy
import logging

from ctrl.k8s.events import Event
from ctrl.k8s.objects import SERVICE_NAME_LABEL, Node, parse
from ctrl.model.state import ClusterState
from ctrl.subset.compute import subset_slices, zones_of

from .helpers import endpoint_slice, service

NODES = [Node("node-1a", {"topology.kubernetes.io/zone": "zone-1"})]


def svc(uid="uid-1"):
    raw = service()
    raw["metadata"]["uid"] = uid
    return parse(raw)


def subset_raw(uid="uid-1"):
    eps = [
        {
            "addresses": ["198.18.1.1"],
            "nodeName": "node-1a",
            "zone": "zone-1",
            "hints": {"forZones": [{"name": "zone-1"}]},
        }
    ]
    out = subset_slices(svc(uid), [parse(endpoint_slice("web-abc", endpoints=eps))], zones_of(NODES))
    (raw,) = out.values()
    return raw


def up(obj):
    key = obj.key if hasattr(obj, "key") and obj.__class__.__name__ == "Service" else f"{obj.namespace}/{obj.name}"
    return Event("upsert", obj.__class__.__name__, key, obj)


def test_right_subset_slice_is_taken_even_before_its_service(caplog):
    st = ClusterState("node-1a")
    sl = parse(subset_raw())
    assert st.apply(up(sl)) == set()  # waits for its Service
    assert st.apply(up(svc())) == {"default/web"}
    assert [s.name for s in st.slices_of("default/web")] == [sl.name]
    assert not caplog.records


def forged(change):
    raw = copy.deepcopy(subset_raw())
    change(raw)
    raw["metadata"]["name"] = "web-forged-0"
    return parse(raw)


def test_forged_subset_slices_are_ignored_with_one_line_each(caplog):
    st = ClusterState("node-1a")
    st.apply(up(svc()))
    bad = [
        forged(lambda r: r["metadata"]["labels"].update({"endpointslice.kubernetes.io/managed-by": "someone"})),
        forged(lambda r: r["metadata"]["ownerReferences"][0].update({"uid": "uid-other"})),
        forged(lambda r: r["metadata"].pop("ownerReferences")),
        forged(lambda r: r["metadata"]["labels"].update({SERVICE_NAME_LABEL: "web"})),
    ]
    for sl in bad:
        with caplog.at_level(logging.ERROR):
            caplog.clear()
            assert st.apply(up(sl)) == set()
            st.apply(up(sl))  # the same again: no second line
            assert len(caplog.records) == 1 and "subset slice ignored" in caplog.records[0].getMessage()
            assert st.slices_of("default/web") == []
            st.apply(Event("delete", "EndpointSlice", f"default/{sl.name}"))


def test_service_made_again_drops_the_old_subsets_and_takes_new_ones():
    st = ClusterState("node-1a")
    st.apply(up(svc("uid-1")))
    old = parse(subset_raw("uid-1"))
    st.apply(up(old))
    assert st.slices_of("default/web")
    assert st.apply(up(svc("uid-2"))) == {"default/web"}
    assert st.slices_of("default/web") == []
    st.apply(up(parse(subset_raw("uid-2"))))
    assert [s.owner_uids for s in st.slices_of("default/web")] == [("uid-2",)]
    # Deleted: its subsets leave the plan with it, and wait for a new one.
    st.apply(Event("delete", "Service", "default/web"))
    assert st.slices_of("default/web") == []
