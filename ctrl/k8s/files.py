"""A directory of Kubernetes YAML as the source of truth: no cluster needed.

Every *.yaml / *.yml / *.json file under the directory (recursively) may
hold several documents and `kind: List` objects. The directory is scanned
again every `interval` seconds; a file whose signature (inode, size, mtime,
ctime) changed is re-read, and the difference with what it held before
becomes upsert and delete events.

Bad input costs one log line and never what is programmed:

* A file that cannot be used (it does not parse, it is too big, it is not
  a regular file: a FIFO, a dangling or looping symlink) keeps its last good
  objects (a half-saved file must not drop services) and gets one line
  naming the file (and the line, for YAML errors), once per change of it.
* A bad object gets one line naming the file, the object and the field,
  keeps its last good version if it had one, and the rest of the file is
  used.
* One file's failure never costs another file's events: each file is read
  on its own, and a file counts as read only together with its events.

Only regular files are read (symlinks to them too: a ConfigMap volume is
made of symlinks), opened without blocking, and at most `max_file_size`
bytes (`--source-max-file-size`). The YAML is composed here, from libyaml's
events, iteratively: libyaml's own composer recurses in C and a file of a
few hundred kilobytes of `[[[[...` overflows the stack, and an alias bomb
of a few hundred bytes stands for billions of nodes. A document nested
deeper than MAX_DEPTH, or holding more nodes than a quarter of the size
limit (aliases counted expanded), is refused like a syntax error.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.events import (
    AliasEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..util.gcpause import paused_gc
from .events import Event
from .objects import KINDS, ObjectError, describe, parse, problem_line, short

log = logging.getLogger("sliceproxy.source.files")

try:  # libyaml is ten times faster on large slices when available
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on the PyYAML build
    _Loader = yaml.SafeLoader  # type: ignore[misc]

SUFFIXES = (".yaml", ".yml", ".json")

# A file over this many bytes is not read (--source-max-file-size). 2 MiB
# holds any single Kubernetes object (etcd refuses requests over 1.5 MiB),
# about 10,000 endpoints; reading that much YAML costs about a second of
# CPU, and the worst 2 MiB (all one-digit numbers) 120 MB for a moment.
DEFAULT_MAX_FILE_SIZE = 2 * 1024 * 1024
# Kubernetes objects are a dozen levels deep at most (managedFields).
MAX_DEPTH = 100
# Nodes a file may hold per byte of the size limit, aliases counted
# expanded. Real manifests hold about one node per 8 bytes; a flow list of
# one-digit numbers two per byte, and each node costs ~200 bytes to build.
NODES_PER_BYTE = 0.25
MAX_LINE = 1000  # characters of any one log line about a file


class FileError(Exception):
    """A file that cannot be used at all: it keeps its previous objects."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def object_key(kind: str, obj) -> str:
    if kind == "Node":
        return obj.name
    return f"{obj.namespace}/{obj.name}"


def raw_ident(raw: object) -> tuple[str, str] | None:
    """(kind, key) of an object we could not parse, as far as it tells."""
    if not isinstance(raw, dict) or raw.get("kind") not in KINDS:
        return None
    meta = raw.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    if raw["kind"] == "Node":
        return ("Node", meta["name"])
    ns = meta.get("namespace")
    if ns is not None and not isinstance(ns, str):
        return None
    return (raw["kind"], f"{ns or 'default'}/{meta['name']}")


# -- reading one file --------------------------------------------------------


def read_bytes(path: Path, max_size: int) -> bytes:
    """The content of a regular file of at most max_size bytes; FileError
    otherwise. O_NONBLOCK: opening a FIFO must not wait for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise  # gone since it was listed: the next scan sees it deleted
        raise FileError(f"cannot open: {os.strerror(e.errno or 0)}") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileError(f"not a regular file ({_file_type(st.st_mode)})")
        if st.st_size > max_size:
            raise FileError(f"{st.st_size} bytes, over the limit of {max_size} (--source-max-file-size)")
        chunks = []
        left = max_size + 1
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    if len(data) > max_size:  # it grew after fstat
        raise FileError(f"over the limit of {max_size} bytes (--source-max-file-size)")
    return data


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a file"


def load_documents(data: bytes, max_nodes: int, max_depth: int = MAX_DEPTH) -> Iterator[Any]:
    """The documents of a YAML stream, as yaml.load_all(data, CSafeLoader)
    gives them, composed here without recursion and within limits: a
    document nested deeper than max_depth, or more than max_nodes nodes in
    the stream (an alias counts as the nodes it stands for), raises a
    ComposerError with the position, before those nodes are built."""
    loader = _Loader(data)
    try:
        get = loader.get_event
        resolve = loader.resolve
        get()  # StreamStartEvent
        used = 0
        while True:
            ev = get()
            if type(ev) is StreamEndEvent:
                return
            # A DocumentStartEvent; then one node, then DocumentEndEvent.
            anchors: dict[str, tuple[Node, int | None]] = {}
            # Open collections: [node, expanded size so far, pending mapping key, anchor]
            stack: list[list[Any]] = []
            while True:
                ev = get()
                t = type(ev)
                node: Node
                if t is ScalarEvent:
                    tag = ev.tag
                    if tag is None or tag == "!":
                        tag = resolve(ScalarNode, ev.value, ev.implicit)
                    # No end mark: only the constructor reads marks, for
                    # messages, and only the start; saves ~100 bytes a node.
                    node = ScalarNode(tag, ev.value, ev.start_mark, None, style=ev.style)
                    size = added = 1
                    if ev.anchor is not None:
                        anchors[ev.anchor] = (node, 1)
                elif t is AliasEvent:
                    entry = anchors.get(ev.anchor)
                    if entry is None:
                        raise ComposerError(None, None, f"found undefined alias {short(ev.anchor)}", ev.start_mark)
                    node, known = entry
                    if known is None:
                        raise ComposerError(
                            None, None, f"alias {short(ev.anchor)} refers to a node that holds it", ev.start_mark
                        )
                    size = added = known
                elif t is SequenceStartEvent or t is MappingStartEvent:
                    if len(stack) >= max_depth:
                        raise ComposerError(None, None, f"nested deeper than {max_depth} levels", ev.start_mark)
                    cls = SequenceNode if t is SequenceStartEvent else MappingNode
                    tag = ev.tag
                    if tag is None or tag == "!":
                        tag = resolve(cls, None, ev.implicit)
                    node = cls(tag, [], ev.start_mark, None, flow_style=ev.flow_style)
                    if ev.anchor is not None:
                        anchors[ev.anchor] = (node, None)  # open: an alias to it now is a cycle
                    used += 1
                    stack.append([node, 1, None, ev.anchor])
                    continue
                elif t is SequenceEndEvent or t is MappingEndEvent:
                    frame = stack.pop()
                    node, size = frame[0], frame[1]
                    if frame[3] is not None:
                        anchors[frame[3]] = (node, size)
                    added = 0  # itself when it opened, its children as they came
                else:  # pragma: no cover - libyaml emits nothing else inside a document
                    raise ComposerError(None, None, f"unexpected {t.__name__}", ev.start_mark)
                used += added
                if used > max_nodes:
                    raise ComposerError(
                        None,
                        None,
                        f"more than {max_nodes} YAML nodes, aliases counted expanded "
                        "(the limit is a quarter of --source-max-file-size)",
                        ev.start_mark,
                    )
                if not stack:
                    break
                parent = stack[-1]
                parent[1] += size
                if type(parent[0]) is SequenceNode:
                    parent[0].value.append(node)
                elif parent[2] is None:
                    parent[2] = node
                else:
                    parent[0].value.append((parent[2], node))
                    parent[2] = None
            get()  # DocumentEndEvent
            yield loader.construct_document(node)
    finally:
        loader.dispose()


def read_file(
    path: Path, max_size: int = DEFAULT_MAX_FILE_SIZE
) -> tuple[dict[tuple[str, str], object], set[tuple[str, str]]]:
    """Objects of one file by (kind, key), and the idents of objects that
    failed to parse (each logged in one line). Raises FileError for a file
    that cannot be used at all (and FileNotFoundError for one that is gone);
    nothing is logged then about its objects."""
    data = read_bytes(path, max_size)
    out: dict[tuple[str, str], object] = {}
    failed: set[tuple[str, str]] = set()
    errors: list[str] = []
    # Building the documents allocates a node and an object per scalar, none
    # in a cycle (aliases to open nodes are refused): the cyclic collector
    # would only rescan them, which doubles the time.
    with paused_gc():
        try:
            for d, doc in enumerate(load_documents(data, max(1000, int(max_size * NODES_PER_BYTE))), 1):
                for where, raw in _items(doc, d):
                    _take(raw, where, path, out, failed, errors)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            msg = " ".join(str(x) for x in (e.context, e.problem) if x)
            raise FileError(f"cannot parse: {msg}", mark.line + 1 if mark is not None else None) from None
        except yaml.YAMLError as e:
            raise FileError(f"cannot parse: {e}") from None
        except (ValueError, OverflowError) as e:  # e.g. an integer of more than 4300 digits
            raise FileError(f"cannot parse: {e}") from None
    for line in errors:
        log.error("%s", line)
    return out, failed


def _items(doc: object, d: int) -> Iterator[tuple[str, object]]:
    """(where, raw object) of one document: itself, or a List's items."""
    if doc is None:
        return
    if isinstance(doc, dict):
        kind = doc.get("kind")
        if kind == "List" or (isinstance(kind, str) and kind.endswith("List") and "items" in doc):
            items = doc.get("items")
            if items is None:
                return
            if not isinstance(items, list):
                # The objects it held cannot be told apart: like a syntax error,
                # the file keeps what it had.
                raise FileError(f"document {d} ({short(kind)}): items: {short(items)} is not a list")
            for i, raw in enumerate(items):
                yield f"document {d} items[{i}]", raw
            return
    yield f"document {d}", doc


def _take(
    raw: object,
    where: str,
    path: Path,
    out: dict[tuple[str, str], object],
    failed: set[tuple[str, str]],
    errors: list[str],
) -> None:
    try:
        obj = parse(raw)
    except ObjectError as e:
        # An object with no name is placed by its position in the file.
        named = isinstance(raw, dict) and isinstance(raw.get("metadata"), dict) and raw["metadata"].get("name")
        errors.append(_cut(f"{path}: {e}" if named else f"{path}: {where}: {e}"))
        ident = raw_ident(raw)
        if ident is not None:
            failed.add(ident)
        return
    if obj.problems:
        errors.append(_cut(f"{path}: {problem_line(obj.problems)}"))
    assert isinstance(raw, dict)  # parse() refused anything else
    kind = raw["kind"]
    ident = (kind, object_key(kind, obj))
    if ident in out:
        errors.append(_cut(f"{path}: {describe(raw)} is defined twice in this file; the last one counts"))
    out[ident] = obj


def _cut(line: str) -> str:
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 3] + "..."


# -- the directory -------------------------------------------------------------

# What a listed file looked like: (inode, size, mtime, ctime) of a regular
# file, or ("unusable", why, inode, mtime) of anything else, so that each
# state of a file is read (or reported) once.
Signature = tuple


class FileSource:
    """Watches a directory; `events` is a queue of lists of Events."""

    def __init__(self, directory: str | os.PathLike, interval: float = 0.5, max_file_size: int = DEFAULT_MAX_FILE_SIZE):
        self.dir = Path(directory)
        self.interval = interval
        self.max_file_size = max_file_size
        self.events: queue.Queue[list[Event]] = queue.Queue()
        self.synced = False
        self._files: dict[Path, Signature] = {}
        self._objects: dict[Path, dict[tuple[str, str], object]] = {}
        # Which file currently provides an object (the same object in two
        # files: the one read last wins, with a warning).
        self._owner: dict[tuple[str, str], Path] = {}
        # Directories the last walk could not list: their files are not
        # deleted for not being seen.
        self._unlisted: set[Path] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Read the whole directory once (the first full list), then watch."""
        if not self.dir.is_dir():
            raise FileNotFoundError(f"source directory {self.dir} does not exist")
        self.scan()
        self.synced = True
        self._thread = threading.Thread(target=self._run, name="file-source", daemon=True)
        self._thread.start()

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self.synced  # start() reads the whole directory before returning

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.scan()
            except Exception:  # keep watching whatever one scan hit
                log.exception("scanning %s failed", self.dir)

    def _list(self) -> dict[Path, Signature]:
        found: dict[Path, Signature] = {}
        unlisted: set[Path] = set()

        def walk_error(e: OSError) -> None:
            where = Path(e.filename) if e.filename else self.dir
            unlisted.add(where)
            if where not in self._unlisted:
                log.error("%s: cannot list (%s); keeping the objects of its files", where, e.strerror)

        # followlinks=False: a symlinked directory could loop; a symlinked
        # file is followed below.
        for root, dirs, files in os.walk(self.dir, onerror=walk_error):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or not name.endswith(SUFFIXES):
                    continue
                p = Path(root) / name
                sig = _signature(p)
                if sig is not None:
                    found[p] = sig
        self._unlisted = unlisted
        return found

    def scan(self) -> None:
        """One pass over the directory; queues the events it finds, in one
        batch (an object moved from one file to another is never seen
        deleted in between)."""
        now = self._list()
        events: list[Event] = []
        try:
            for p in sorted(set(self._files) - set(now)):
                if any(d == p or d in p.parents for d in self._unlisted):
                    continue  # not seen because its directory could not be listed
                events.extend(self._replace(p, {}))
                del self._files[p]
            for p, sig in now.items():
                if self._files.get(p) == sig:
                    continue
                objs = self._read(p, sig)
                if objs is not None:
                    events.extend(self._replace(p, objs))
                # Marked read only here, its events in `events`: whatever
                # raises above leaves it unread, to be tried again.
                self._files[p] = sig
        finally:
            if events:
                self.events.put(events)

    def _read(self, p: Path, sig: Signature) -> dict[tuple[str, str], object] | None:
        """The objects of a changed file, or None when it keeps its previous
        ones (the reason logged in one line)."""
        if sig[0] == "unusable":
            log.error("%s: %s; not read, keeping its previous objects", p, sig[1])
            return None
        try:
            objs, failed = read_file(p, self.max_file_size)
        except FileNotFoundError:
            return None  # deleted since listed: the next scan deletes its objects
        except FileError as e:
            where = f" line {e.line}" if e.line is not None else ""
            log.error("%s", _cut(f"{p}{where}: {_one_line(str(e))}; keeping its previous objects"))
            return None
        except Exception as e:  # whatever one file raises must not cost the others
            log.error(
                "%s", _cut(f"{p}: cannot read ({type(e).__name__}: {_one_line(str(e))}); keeping its previous objects")
            )
            return None
        # An object that no longer parses keeps its last good version:
        # a typo in a Service must not take the Service down.
        old = self._objects.get(p, {})
        for ident in failed:
            if ident in old and ident not in objs:
                objs[ident] = old[ident]
        return objs

    def _replace(self, path: Path, objs: dict[tuple[str, str], Any]) -> list[Event]:
        old = self._objects.get(path, {})
        events = []
        for ident in old.keys() - objs.keys():
            if self._owner.get(ident) == path:
                del self._owner[ident]
                events.append(Event("delete", ident[0], ident[1]))
        for ident, obj in objs.items():
            other = self._owner.get(ident)
            if other is not None and other != path:
                log.warning("%s %s is defined in %s and %s; using %s", ident[0], ident[1], other, path, path)
            self._owner[ident] = path
            if old.get(ident) != obj or other != path:
                events.append(Event("upsert", ident[0], ident[1], obj))
        if objs:
            self._objects[path] = objs
        else:
            self._objects.pop(path, None)
        return events


def _signature(p: Path) -> Signature | None:
    """The signature of a listed name, None when it is gone."""
    try:
        st = os.stat(p)  # follows symlinks
    except FileNotFoundError:
        try:
            lst = os.lstat(p)
        except FileNotFoundError:
            return None  # removed since the walk
        return ("unusable", "a dangling symlink", lst.st_ino, lst.st_mtime_ns)
    except OSError as e:  # ELOOP (a symlink to itself), EACCES on a path...
        try:
            lst = os.lstat(p)
        except OSError:
            return None
        return ("unusable", f"cannot stat: {os.strerror(e.errno or 0)}", lst.st_ino, lst.st_mtime_ns)
    if not stat.S_ISREG(st.st_mode):
        return ("unusable", f"not a regular file ({_file_type(st.st_mode)})", st.st_ino, st.st_mtime_ns)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _one_line(text: str) -> str:
    return " ".join(text.split())


__all__ = ["FileSource", "KINDS"]
