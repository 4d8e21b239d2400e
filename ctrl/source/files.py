"""A directory of Kubernetes YAML as the source of truth: no cluster needed.

Every *.yaml / *.yml / *.json file under the directory (recursively) may
hold several documents and `kind: List` objects. The directory is scanned
again every `interval` seconds; a file whose size or mtime changed is
re-read, and the difference with what it held before becomes upsert and
delete events. A file that no longer parses keeps its last good objects (a
half-saved file must not drop services) and gets one log line naming the
file and the line; a bad object gets one naming the file, the object and
the field, keeps its last good version if it had one, and the rest of the
file is used.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

import yaml

from ..objects import KINDS, ObjectError, describe, parse
from ..state import Event

log = logging.getLogger("sliceproxy.source.files")

try:  # libyaml is ten times faster on large slices when available
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on the PyYAML build
    _Loader = yaml.SafeLoader  # type: ignore[misc]

SUFFIXES = (".yaml", ".yml", ".json")


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
    return (raw["kind"], f"{meta.get('namespace') or 'default'}/{meta['name']}")


def read_file(path: Path) -> tuple[dict[tuple[str, str], object], set[tuple[str, str]]]:
    """Objects of one file by (kind, key), and the idents of objects that
    failed to parse. Raises yaml.YAMLError / OSError for a file that cannot
    be read at all."""
    with open(path, "rb") as f:
        docs = list(yaml.load_all(f, Loader=_Loader))
    out: dict[tuple[str, str], object] = {}
    failed: set[tuple[str, str]] = set()
    items: list[Any] = []
    for doc in docs:
        if doc is None:
            continue
        if (
            isinstance(doc, dict)
            and doc.get("kind") == "List"
            or (isinstance(doc, dict) and str(doc.get("kind", "")).endswith("List") and "items" in doc)
        ):
            items.extend(doc.get("items") or [])
        else:
            items.append(doc)
    for raw in items:
        try:
            obj = parse(raw)
        except ObjectError as e:
            log.error("%s: %s", path, e)
            ident = raw_ident(raw)
            if ident is not None:
                failed.add(ident)
            continue
        for problem in getattr(obj, "problems", ()):
            log.error("%s: %s", path, problem)
        kind = raw["kind"]
        key = object_key(kind, obj)
        if (kind, key) in out:
            log.error("%s: %s is defined twice in this file; the last one counts", path, describe(raw))
        out[(kind, key)] = obj
    return out, failed


class FileSource:
    """Watches a directory; `events` is a queue of lists of Events."""

    def __init__(self, directory: str | os.PathLike, interval: float = 0.5):
        self.dir = Path(directory)
        self.interval = interval
        self.events: queue.Queue[list[Event]] = queue.Queue()
        self.synced = False
        self._files: dict[Path, tuple[float, int]] = {}
        self._objects: dict[Path, dict[tuple[str, str], object]] = {}
        # Which file currently provides an object (the same object in two
        # files: the one read last wins, with a warning).
        self._owner: dict[tuple[str, str], Path] = {}
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

    def _list(self) -> dict[Path, tuple[float, int]]:
        found: dict[Path, tuple[float, int]] = {}
        for root, dirs, files in os.walk(self.dir):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or not name.endswith(SUFFIXES):
                    continue
                p = Path(root) / name
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                found[p] = (st.st_mtime_ns, st.st_size)
        return found

    def scan(self) -> None:
        """One pass over the directory; queues the events it finds."""
        now = self._list()
        events: list[Event] = []
        for p in sorted(set(self._files) - set(now)):
            events.extend(self._replace(p, {}))
            del self._files[p]
        for p, sig in now.items():
            if self._files.get(p) == sig:
                continue
            try:
                objs, failed = read_file(p)
            except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
                mark = getattr(e, "problem_mark", None)
                where = f" line {mark.line + 1}" if mark is not None else ""
                log.error("%s%s: cannot parse, keeping its previous objects: %s", p, where, _one_line(e))
                self._files[p] = sig
                continue
            self._files[p] = sig
            # An object that no longer parses keeps its last good version:
            # a typo in a Service must not take the Service down.
            old = self._objects.get(p, {})
            for ident in failed:
                if ident in old and ident not in objs:
                    objs[ident] = old[ident]
            events.extend(self._replace(p, objs))
        if events:
            self.events.put(events)

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


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


__all__ = ["FileSource", "KINDS"]
