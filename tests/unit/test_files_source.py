import logging

import yaml

from ctrl.source.files import FileSource
from ctrl.state import ClusterState

from .helpers import endpoint_slice, eps, service


def write(path, *docs):
    path.write_text(yaml.safe_dump_all(list(docs)))


def drain(src):
    out = []
    while not src.events.empty():
        out.extend(src.events.get_nowait())
    return out


def keys(events):
    return sorted((e.op, e.kind, e.key) for e in events)


def test_initial_scan_then_changes(tmp_path):
    write(tmp_path / "svc.yaml", service())
    write(
        tmp_path / "slices.yaml",
        endpoint_slice("a", endpoints=eps("198.18.1.1")),
        endpoint_slice("b", endpoints=eps("198.18.1.2")),
    )
    src = FileSource(tmp_path)
    src.scan()
    assert keys(drain(src)) == [
        ("upsert", "EndpointSlice", "default/a"),
        ("upsert", "EndpointSlice", "default/b"),
        ("upsert", "Service", "default/web"),
    ]
    src.scan()
    assert drain(src) == []  # nothing changed, nothing sent
    write(tmp_path / "slices.yaml", endpoint_slice("a", endpoints=eps("198.18.1.1", "198.18.1.3")))
    assert keys(drain_after_scan(src)) == [
        ("delete", "EndpointSlice", "default/b"),
        ("upsert", "EndpointSlice", "default/a"),
    ]
    (tmp_path / "svc.yaml").unlink()
    assert keys(drain_after_scan(src)) == [("delete", "Service", "default/web")]


def drain_after_scan(src):
    # mtime granularity: force the change to be seen even within one tick.
    src._files = {p: (0, -1) for p in src._files}
    src.scan()
    return drain(src)


def test_malformed_file_keeps_its_objects_and_names_file_and_line(tmp_path, caplog):
    write(tmp_path / "svc.yaml", service())
    src = FileSource(tmp_path)
    src.scan()
    drain(src)
    (tmp_path / "svc.yaml").write_text("kind: Service\nmetadata: {name: web\n  bad: [\n")
    with caplog.at_level(logging.ERROR):
        events = drain_after_scan(src)
    assert events == []
    assert "svc.yaml line" in caplog.text and "keeping its previous objects" in caplog.text


def test_bad_object_named_and_others_in_file_used(tmp_path, caplog):
    bad = service(name="bad", ip="198.19.0.999")
    write(
        tmp_path / "svcs.yaml", bad, service(name="good", ip="198.19.0.11"), {"kind": "Pod", "metadata": {"name": "p"}}
    )
    src = FileSource(tmp_path)
    with caplog.at_level(logging.ERROR):
        src.scan()
    assert keys(drain(src)) == [("upsert", "Service", "default/good")]
    assert "svcs.yaml: default/bad Service: spec.clusterIP: '198.19.0.999' is not an IP address" in caplog.text
    assert "unknown kind 'Pod'" in caplog.text


def test_list_kind_and_state_dirty_tracking(tmp_path):
    write(
        tmp_path / "all.yaml", {"kind": "List", "items": [service(), endpoint_slice("a", endpoints=eps("198.18.1.1"))]}
    )
    src = FileSource(tmp_path)
    src.scan()
    st = ClusterState("node-a")
    dirty = set()
    for ev in drain(src):
        dirty |= st.apply(ev)
    assert dirty == {"default/web"}
    assert [s.name for s in st.slices_of("default/web")] == ["a"]
    # The same objects again change nothing.
    for ev in [e for e in []]:
        st.apply(ev)
    write(
        tmp_path / "all.yaml", {"kind": "List", "items": [service(), endpoint_slice("a", endpoints=eps("198.18.1.1"))]}
    )
    dirty = set()
    for ev in drain_after_scan(src):
        dirty |= st.apply(ev)
    assert dirty == set()


def test_slice_relabelled_to_other_service_moves(tmp_path):
    st = ClusterState()
    from ctrl.objects import parse
    from ctrl.state import Event

    st.apply(
        Event(
            "upsert",
            "EndpointSlice",
            "default/a",
            parse(endpoint_slice("a", service="web", endpoints=eps("198.18.1.1"))),
        )
    )
    dirty = st.apply(
        Event(
            "upsert",
            "EndpointSlice",
            "default/a",
            parse(endpoint_slice("a", service="api", endpoints=eps("198.18.1.1"))),
        )
    )
    assert dirty == {"default/web", "default/api"}
    assert st.slices_of("default/web") == [] and len(st.slices_of("default/api")) == 1


def test_bad_edit_of_an_object_keeps_its_last_good_version(tmp_path, caplog):
    write(tmp_path / "svc.yaml", service(), service(name="other", ip="198.19.0.11"))
    src = FileSource(tmp_path)
    src.scan()
    drain(src)
    write(tmp_path / "svc.yaml", service(ip="198.19.0.300"), service(name="other", ip="198.19.0.12"))
    with caplog.at_level(logging.ERROR):
        events = drain_after_scan(src)
    # web keeps its programmed version; other moves on.
    assert keys(events) == [("upsert", "Service", "default/other")]
    assert "default/web Service: spec.clusterIP" in caplog.text
    # Deleting the broken object from the file does delete it.
    write(tmp_path / "svc.yaml", service(name="other", ip="198.19.0.12"))
    assert keys(drain_after_scan(src)) == [("delete", "Service", "default/web")]
