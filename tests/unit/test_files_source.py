import logging
import os
import re
import stat
import threading
from pathlib import Path

import pytest
import yaml

from ctrl.k8s.files import FileSource
from ctrl.model.state import ClusterState

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
    from ctrl.k8s.events import Event
    from ctrl.k8s.objects import parse

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


# -- bad input: one line each, nothing else lost -------------------------------

ERRORS = "sliceproxy.source.files"


def errors_about(caplog, path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and str(path) in r.getMessage()]


def with_(raw: dict, path: tuple, value) -> dict:
    node = raw
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return raw


def node_obj() -> dict:
    return {
        "kind": "Node",
        "metadata": {"name": "node-a"},
        "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.5"}]},
    }


# Each is a document that used to raise out of the scanner (reproduced by an
# adversarial run), with the field its error line must name.
CRASHERS = [
    pytest.param(
        lambda: service(name="bad", sessionAffinity="ClientIP", sessionAffinityConfig=5),
        "spec.sessionAffinityConfig: 5 is not a mapping",
        id="sessionAffinityConfig",
    ),
    pytest.param(lambda: service(name="bad", externalIPs=5), "spec.externalIPs: 5 is not a list", id="externalIPs"),
    pytest.param(lambda: {**service(name="bad"), "status": 5}, "status: 5 is not a mapping", id="status"),
    pytest.param(
        lambda: {**service(name="bad"), "status": {"loadBalancer": {"ingress": 5}}},
        "status.loadBalancer.ingress: 5 is not a list",
        id="ingress",
    ),
    pytest.param(
        lambda: with_(endpoint_slice("bad"), ("metadata", "labels"), 5),
        "metadata.labels: 5 is not a mapping",
        id="slice-labels",
    ),
    pytest.param(
        lambda: with_(endpoint_slice("bad"), ("metadata", "annotations"), 5),
        "metadata.annotations: 5 is not a mapping",
        id="slice-annotations",
    ),
    pytest.param(lambda: {**node_obj(), "status": 5}, "status: 5 is not a mapping", id="node-status"),
    pytest.param(
        lambda: with_(node_obj(), ("status", "addresses", 0, "type"), []),
        "status.addresses[0].type: [] is not a string; ignored",
        id="node-address-type",  # the entry is dropped, the Node used
    ),
    pytest.param(lambda: {"kind": "List", "items": 5}, "items: 5 is not a list", id="list-items"),
    pytest.param(lambda: 5, "document 1: object: 5 is not a mapping", id="document-not-a-mapping"),
]


@pytest.mark.parametrize("bad,message", CRASHERS)
def test_a_wrong_type_costs_one_line_and_no_other_files_change(tmp_path, caplog, bad, message):
    write(tmp_path / "a.yaml", service(name="first", ip="198.19.0.11"))
    write(tmp_path / "c.yaml", service(name="last", ip="198.19.0.12"))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump_all([bad(), service(name="middle", ip="198.19.0.13")]))
    src = FileSource(tmp_path)
    with caplog.at_level(logging.ERROR, logger=ERRORS):
        src.start()  # the first full read: it used to raise, and the agent exited 1
        src.stop()
    want = {("upsert", "Service", f"default/{n}") for n in ("first", "last")}
    if "items" not in message:  # a broken List makes its whole file keep what it had (nothing yet)
        want.add(("upsert", "Service", "default/middle"))
    if message.endswith("; ignored"):
        want.add(("upsert", "Node", "node-a"))
    assert set(keys(drain(src))) == want
    lines = errors_about(caplog, tmp_path / "b.yaml")
    assert len(lines) == 1 and message in lines[0], lines
    # A valid change to a file that sorts before the bad one is applied, and
    # the bad file, unchanged, is not reported again.
    caplog.clear()
    write(tmp_path / "a.yaml", service(name="first", ip="198.19.0.21"))
    with caplog.at_level(logging.ERROR, logger=ERRORS):
        events = drain_after_scan_of(src, tmp_path / "a.yaml")
    assert keys(events) == [("upsert", "Service", "default/first")]
    assert events[0].obj.cluster_ips == ("198.19.0.21",)
    assert errors_about(caplog, tmp_path / "b.yaml") == []


def drain_after_scan_of(src, path):
    """Force ``path`` to be seen as changed (mtime granularity) and scan."""
    src._files[path] = ("forced",)
    src.scan()
    return drain(src)


def test_a_file_failing_in_any_way_costs_no_other_files_events(tmp_path, caplog, monkeypatch):
    """Per-file isolation: whatever reading one file raises, the other files'
    changes of the same scan are queued, and the failing file is retried
    when it changes again."""
    import ctrl.k8s.files as files

    write(tmp_path / "a.yaml", service(name="first", ip="198.19.0.11"))
    write(tmp_path / "b.yaml", service(name="boom", ip="198.19.0.12"))
    write(tmp_path / "c.yaml", service(name="last", ip="198.19.0.13"))
    real_parse = files.parse

    def parse(raw):
        if raw.get("metadata", {}).get("name") == "boom":
            raise RuntimeError("a defect in a parser")
        return real_parse(raw)

    monkeypatch.setattr(files, "parse", parse)
    src = FileSource(tmp_path)
    with caplog.at_level(logging.ERROR, logger=ERRORS):
        src.scan()
    assert keys(drain(src)) == [("upsert", "Service", "default/first"), ("upsert", "Service", "default/last")]
    lines = errors_about(caplog, tmp_path / "b.yaml")
    assert len(lines) == 1 and "RuntimeError: a defect in a parser" in lines[0], lines
    write(tmp_path / "a.yaml", service(name="first", ip="198.19.0.21"))
    assert keys(drain_after_scan_of(src, tmp_path / "a.yaml")) == [("upsert", "Service", "default/first")]
    monkeypatch.setattr(files, "parse", real_parse)
    assert keys(drain_after_scan_of(src, tmp_path / "b.yaml")) == [("upsert", "Service", "default/boom")]


def scan_within(src, seconds=20.0):
    """scan() in a thread: a scanner that blocks fails the test instead of
    hanging it."""
    done = threading.Event()
    failure: list[BaseException] = []

    def run():
        try:
            src.scan()
        except BaseException as e:  # noqa: BLE001 - reported below
            failure.append(e)
        finally:
            done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return done.wait(seconds), failure


@pytest.mark.parametrize(
    "make,reason",
    [
        pytest.param(lambda p: os.mkfifo(p), "not a regular file (a FIFO)", id="fifo"),
        pytest.param(lambda p: os.symlink(p.name, p), "cannot stat: Too many levels of symbolic links", id="self-link"),
        pytest.param(lambda p: os.symlink("nowhere.yaml", p), "a dangling symlink", id="dangling-link"),
    ],
)
def test_only_regular_files_are_read_and_never_block(tmp_path, caplog, make, reason):
    write(tmp_path / "a.yaml", service(name="first", ip="198.19.0.11"))
    bad = tmp_path / "b.yaml"
    make(bad)
    write(tmp_path / "c.yaml", service(name="last", ip="198.19.0.13"))
    src = FileSource(tmp_path)
    try:
        with caplog.at_level(logging.ERROR, logger=ERRORS):
            finished, failure = scan_within(src)
            assert finished, "the scanner blocked on b.yaml"
            assert failure == []
            assert keys(drain(src)) == [
                ("upsert", "Service", "default/first"),
                ("upsert", "Service", "default/last"),
            ]
            lines = errors_about(caplog, bad)
            assert len(lines) == 1 and reason in lines[0], lines
            # Unchanged: not reported again.
            assert scan_within(src) == (True, [])
            assert len(errors_about(caplog, bad)) == 1
    finally:
        if bad.exists() and stat.S_ISFIFO(os.lstat(bad).st_mode):
            # Release a scanner stuck in open() (the defect this tests);
            # with no reader waiting, this open fails (ENXIO) and that is fine.
            try:
                os.close(os.open(bad, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass


def test_a_file_that_becomes_unusable_keeps_its_objects(tmp_path, caplog):
    write(tmp_path / "svc.yaml", service())
    src = FileSource(tmp_path)
    src.scan()
    drain(src)
    (tmp_path / "svc.yaml").unlink()
    os.mkfifo(tmp_path / "svc.yaml")
    with caplog.at_level(logging.ERROR, logger=ERRORS):
        assert scan_within(src) == (True, [])
    assert drain(src) == []
    assert "not a regular file (a FIFO); not read, keeping its previous objects" in caplog.text


def test_a_symlink_to_a_file_is_read(tmp_path):
    """A ConfigMap volume holds symlinks into a hidden ..data directory."""
    data = tmp_path / "..data"
    data.mkdir()
    write(data / "svc.yaml", service())
    os.symlink("..data/svc.yaml", tmp_path / "svc.yaml")
    src = FileSource(tmp_path)
    src.scan()
    assert keys(drain(src)) == [("upsert", "Service", "default/web")]


# A 458-byte document whose aliases stand for 10^9 strings (the adversarial
# run's bomb: printed whole, it made a 32 MB log line).
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


def test_an_alias_bomb_is_refused_in_one_short_line(tmp_path, caplog):
    write(tmp_path / "svc.yaml", service())
    src = FileSource(tmp_path)
    src.scan()
    drain(src)
    (tmp_path / "svc.yaml").write_text(BOMB)
    with caplog.at_level(logging.ERROR, logger=ERRORS):
        assert drain_after_scan_of(src, tmp_path / "svc.yaml") == []  # web is kept
    lines = errors_about(caplog, tmp_path / "svc.yaml")
    assert len(lines) == 1, lines
    assert re.search(r"svc.yaml line \d+: ", lines[0]) and "YAML nodes, aliases counted expanded" in lines[0], lines[0]
    assert len(lines[0]) < 1000


def test_a_value_built_of_aliases_is_cut_short_in_its_error_line(tmp_path, caplog):
    # Within the node limit (10^4 strings), and not an address: the line
    # quoting it stays short.
    doc = "\n".join(BOMB.splitlines()[:4]) + "\nkind: Service\nmetadata: {name: bomb}\nspec: {clusterIP: *d}\n"
    (tmp_path / "svc.yaml").write_text(doc)
    src = FileSource(tmp_path)
    with caplog.at_level(logging.ERROR, logger=ERRORS):
        src.scan()
    lines = errors_about(caplog, tmp_path / "svc.yaml")
    assert len(lines) == 1 and "default/bomb Service: spec.clusterIP:" in lines[0], lines
    assert len(lines[0]) < 400, len(lines[0])


@pytest.mark.parametrize("depth", [10_000, 1_000_000], ids=["10k", "1M"])
def test_deep_nesting_is_refused_not_a_crash(tmp_path, caplog, depth):
    # libyaml's composer recursed in C: this much nesting overflowed the
    # stack and killed the process.
    (tmp_path / "deep.yaml").write_text("kind: Service\nspec: " + "[" * depth + "]" * depth + "\n")
    write(tmp_path / "svc.yaml", service())
    src = FileSource(tmp_path)
    with caplog.at_level(logging.ERROR, logger=ERRORS):
        src.scan()
    assert keys(drain(src)) == [("upsert", "Service", "default/web")]
    lines = errors_about(caplog, tmp_path / "deep.yaml")
    assert len(lines) == 1 and "deep.yaml line 2:" in lines[0] and "nested deeper than 100 levels" in lines[0]


def test_nesting_up_to_the_limit_is_read(tmp_path):
    from ctrl.k8s.files import MAX_DEPTH, load_documents

    text = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert list(load_documents(text.encode(), 10_000)) == [yaml.safe_load(text)]
    with pytest.raises(yaml.YAMLError):
        list(load_documents(("[" + text + "]").encode(), 10_000))


def test_a_file_over_the_size_limit_is_not_read_and_keeps_its_objects(tmp_path, caplog):
    write(tmp_path / "a.yaml", service(name="first", ip="198.19.0.11"))
    write(tmp_path / "big.yaml", service())
    src = FileSource(tmp_path, max_file_size=4096)
    src.scan()
    drain(src)
    write(tmp_path / "big.yaml", service(), {"kind": "List", "items": [], "padding": "x" * 5000})
    write(tmp_path / "a.yaml", service(name="first", ip="198.19.0.21"))
    with caplog.at_level(logging.ERROR, logger=ERRORS):
        src.scan()
    assert keys(drain(src)) == [("upsert", "Service", "default/first")]  # web stays, a.yaml moves on
    lines = errors_about(caplog, tmp_path / "big.yaml")
    size = (tmp_path / "big.yaml").stat().st_size
    assert len(lines) == 1 and f"{size} bytes, over the limit of 4096 (--source-max-file-size)" in lines[0]
    write(tmp_path / "big.yaml", service(ip="198.19.0.99"))
    events = drain_after_scan_of(src, tmp_path / "big.yaml")
    assert keys(events) == [("upsert", "Service", "default/web")] and events[0].obj.cluster_ips == ("198.19.0.99",)


def test_a_file_of_too_many_nodes_is_refused_before_they_are_built(tmp_path, caplog):
    # 4 KiB allows 1024 nodes; a flow list of one-digit numbers is two per byte.
    (tmp_path / "dense.yaml").write_text("kind: Service\nspec: {junk: [" + "1," * 1500 + "1]}\n")
    src = FileSource(tmp_path, max_file_size=4096)
    with caplog.at_level(logging.ERROR, logger=ERRORS):
        src.scan()
    lines = errors_about(caplog, tmp_path / "dense.yaml")
    assert len(lines) == 1 and "more than 1024 YAML nodes" in lines[0], lines


def test_an_integer_python_refuses_to_build_is_one_line(tmp_path, caplog):
    write(tmp_path / "svc.yaml", service())
    (tmp_path / "huge.yaml").write_text(
        "kind: Service\nmetadata: {name: huge}\nspec: {healthCheckNodePort: " + "9" * 5000 + "}\n"
    )
    src = FileSource(tmp_path)
    with caplog.at_level(logging.ERROR, logger=ERRORS):
        src.scan()
    assert keys(drain(src)) == [("upsert", "Service", "default/web")]
    lines = errors_about(caplog, tmp_path / "huge.yaml")
    assert len(lines) == 1 and len(lines[0]) < 1000, lines


def test_an_unlisted_directory_does_not_delete_its_files_objects(tmp_path, caplog, monkeypatch):
    import ctrl.k8s.files as files

    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "svc.yaml", service())
    src = FileSource(tmp_path)
    src.scan()
    drain(src)
    real_walk = os.walk

    def walk(top, onerror=None, **kw):
        for root, dirs, names in real_walk(top, onerror=onerror, **kw):
            if "sub" in dirs:
                dirs.remove("sub")
                onerror(PermissionError(13, "Permission denied", str(Path(root) / "sub")))
            yield root, dirs, names

    monkeypatch.setattr(files.os, "walk", walk)
    with caplog.at_level(logging.ERROR, logger=ERRORS):
        src.scan()
        src.scan()
    assert drain(src) == []
    assert len([r for r in caplog.records if "cannot list (Permission denied)" in r.getMessage()]) == 1
    monkeypatch.setattr(files.os, "walk", real_walk)
    (tmp_path / "sub" / "svc.yaml").unlink()
    src.scan()
    assert keys(drain(src)) == [("delete", "Service", "default/web")]


YAML_FEATURES = [
    pytest.param("a: 1\n---\nb: [x, y]\n...\n---\n", id="documents"),
    pytest.param("", id="empty"),
    pytest.param("---\n", id="empty-document"),
    pytest.param("base: &b {x: 1, y: 2}\nuse: {<<: *b, y: 3}\nlist: [*b, *b]\n", id="anchors-and-merge"),
    pytest.param("s: !!str 12\ni: !!int '7'\nf: 1.5\nn: ~\nt: yes\nd: 2026-01-01\n", id="tags-and-resolution"),
    pytest.param("b: !!binary aGVsbG8=\nset: !!set {a, b}\nomap: !!omap [{a: 1}, {b: 2}]\n", id="binary-set-omap"),
    pytest.param('{"kind": "Service", "spec": {"ports": [{"port": 80}]}}', id="json"),
    pytest.param("? [a, b]\n: complex-key-refused\n", id="complex-key"),
    pytest.param("- - - - nested\n  - x\n- |\n  block\n  text\n", id="block-styles"),
]


@pytest.mark.parametrize("text", YAML_FEATURES)
def test_documents_are_what_pyyaml_gives(text):
    from ctrl.k8s.files import load_documents

    try:
        want = list(yaml.load_all(text, Loader=yaml.CSafeLoader))
    except yaml.YAMLError as e:
        with pytest.raises(type(e)):
            list(load_documents(text.encode(), 10_000))
        return
    assert list(load_documents(text.encode(), 10_000)) == want


def test_the_size_limit_flag_reaches_the_file_source(tmp_path):
    from ctrl.cli.parser import build_parser
    from ctrl.cli.run import make_source
    from ctrl.k8s.files import DEFAULT_MAX_FILE_SIZE

    def source(*flags):
        return make_source(build_parser().parse_args(["run", "--source", str(tmp_path), *flags]))

    assert source().max_file_size == DEFAULT_MAX_FILE_SIZE == 2 * 1024 * 1024
    assert source("--source-max-file-size", "4096").max_file_size == 4096
    with pytest.raises(SystemExit, match="--source-max-file-size must be at least 1"):
        source("--source-max-file-size", "0")
