"""Carry pinned maps over to new ones: across a layout version, or a size.

Map names end in their layout version (`sp_ct_v5`). A release that changes
a layout changes the version, so the new agent never misreads an old map:
libbpf creates the new maps beside the old ones. A map pinned with another
capacity than the flags ask for (`--max-backends` raised as a log line
advised) cannot be reused either (the kernel fixes max_entries at
creation): before the object is loaded its pin is set aside under
`<name>_old` (bpffs names may not hold a dot), and libbpf creates the new
map under the name.

Before the new programs replace the old ones, every entry of an old map is
rewritten into its new counterpart, field by field by name, with the
layouts read from the BTF each map was created with: fields that kept
their name and size keep their value wherever they moved, new fields start
at zero, an array that grew (a longer name) keeps its old bytes at its
start, dropped fields are dropped (and so is a field that shrank or
changed size otherwise: cut, it could mean something else). Backend and service ids therefore
survive, and so do the conntrack and affinity entries that name them:
established connections keep their backends. Flows that start between
that copy and the new programs' attach are written by the old programs
into the old maps: once the new programs are attached, a second pass
carries those too, then the old pins are removed (the old maps go when
the old programs detach).

Shrinking: an LRU map (conntrack, affinity) keeps the most recently used
entries that fit, by their stamps, and the log says how many did not: the
datapath drops the least recently used flows itself whenever such a map is
full, so this is a state it is built for. Any other map (services,
backends, slots, names) holds what the agent programmed: carrying part of
it would leave frontends counting slots or naming backends that are gone,
so a capacity below what is held is refused before anything changes, with
the flag to raise (the old agent's maps keep serving meanwhile).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field

from . import abi
from .libbpf import BPFError, ffi, lib
from .maps import BPF_MAP_TYPE_DEVMAP_HASH, BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_RINGBUF, Map

log = logging.getLogger("sliceproxy.migrate")

_NAME = re.compile(r"^(sp_[a-z]+)_v(\d+)$")
ASIDE = "_old"  # suffix of a pin set aside by a resize
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
# Socket-local storage (sp_sock): keyed by live sockets, it can be neither
# listed nor carried; the sockets keep what the old map holds for them.
BPF_MAP_TYPE_SK_STORAGE = 24
BPF_NOEXIST = 1
# Value fields stamped by the datapath on each use (ebpf/sliceproxy.h):
# the newest entries are the ones kept when an LRU map shrinks.
STAMPS = ("last_seen", "last_used")

Fields = list[tuple[str, int, int]]

# Maps not carried over from a layout older than the version given: what
# their entries mean changed, and the agent writes them anew at its first
# sync. The Maglev tables became chunks in layout 5 (until that sync a new
# flow to a Maglev frontend takes a random slot, as with no table).
REBUILT = {"sp_mgl": 5}


def rebuilt(path: str) -> bool:
    """Whether the map pinned at path is of a layout its map is not
    carried over from (REBUILT)."""
    m = _NAME.match(os.path.basename(path))
    return m is not None and int(m.group(2)) < REBUILT.get(m.group(1), 0)


class ResizeRefused(BPFError):
    """A map would shrink below the entries it holds; nothing was changed."""


def is_lru(m: Map) -> bool:
    return m.info.type in (BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_LRU_PERCPU_HASH)


def _layouts(m: Map) -> tuple[tuple[Fields, set[str]], tuple[Fields, set[str]]]:
    """Key and value fields of a map, from the BTF it was created with,
    each with the names of its fields that are arrays."""
    if not m.info.btf_id:
        raise BPFError(0, f"map {m.name} carries no BTF: its layout is unknown")
    btf = lib().btf__load_from_kernel_by_id(m.info.btf_id)
    if btf == ffi.NULL:
        raise BPFError(ffi.errno, f"map {m.name}: cannot load its BTF {m.info.btf_id}")
    try:
        k, v = m.info.btf_key_type_id, m.info.btf_value_type_id
        return (
            (abi.btf_fields(btf, k)[1], abi.btf_array_fields(btf, k)),
            (abi.btf_fields(btf, v)[1], abi.btf_array_fields(btf, v)),
        )
    finally:
        lib().btf__free(btf)


def converter(old: Fields, new: Fields, new_size: int, arrays: set[str] | frozenset[str] = frozenset()):
    """bytes in the old layout -> bytes in the new one, by field name.
    Fields named in `arrays` (arrays in both layouts) may grow: the old
    elements come first, the rest is zero (a NUL-terminated name stays
    one)."""
    moves = []
    by_name = {name: (off, size) for name, off, size in old}
    for name, off, size in new:
        if name.startswith("pad"):
            continue
        src = by_name.get(name)
        if src is not None and (src[1] == size or (name in arrays and src[1] < size)):
            moves.append((src[0], off, src[1]))

    def convert(raw: bytes) -> bytes:
        out = bytearray(new_size)
        for src, dst, size in moves:
            out[dst : dst + size] = raw[src : src + size]
        return bytes(out)

    return convert


def _stamp(fields: Fields):
    """raw value -> its use stamp (0 without a stamp field)."""
    for name, off, size in fields:
        if name in STAMPS:
            return lambda raw: int.from_bytes(raw[off : off + size], "little")
    return lambda raw: 0


def old_pins(pin_dir: str, current: Collection[str]) -> list[tuple[str, str]]:
    """(old pin path, current map name) for pins of another layout version
    and pins set aside by a resize, whose current map is in `current`."""
    version = abi.LAYOUT_VERSION
    out = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir(pin_dir)):
            if entry.endswith(ASIDE) and entry[: -len(ASIDE)] in current:
                out.append((os.path.join(pin_dir, entry), entry[: -len(ASIDE)]))
                continue
            m = _NAME.match(entry)
            if m is None or int(m.group(2)) == version:
                continue
            target = f"{m.group(1)}_v{version}"
            if target in current:
                out.append((os.path.join(pin_dir, entry), target))
    return out


# -- before the object is loaded: set resized maps aside ----------------------------


@dataclass
class Resize:
    name: str
    old: int  # max_entries pinned
    new: int  # max_entries asked for


def _count(m: Map) -> int:
    return 0 if m.info.type in (BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_SK_STORAGE, BPF_MAP_TYPE_RINGBUF) else m.count()


def _open(path: str) -> Map | None:
    try:
        return Map.open_pinned(path)
    except BPFError as e:
        if e.errno == errno.ENOENT:
            return None
        raise


def set_aside(pin_dir: str, wanted: dict[str, int]) -> list[Resize]:
    """Before the object is loaded (`wanted`: max_entries per map name):
    rename each pinned map of another capacity to `<name>_old`, so libbpf
    creates it anew at the size asked for. Refuses (ResizeRefused, nothing
    renamed) when a map other than an LRU one holds more entries than its
    new capacity, also one of an older layout version about to be carried
    over."""
    _settle(pin_dir, wanted)
    resizes: list[Resize] = []
    refused: list[str] = []
    for name, size in sorted(wanted.items()):
        m = _open(os.path.join(pin_dir, name))
        if m is None:
            continue
        try:
            if m.max_entries == size:
                continue
            held = _count(m)
            if held > size and not is_lru(m):
                refused.append(
                    f"{name} holds {held} entries, more than {abi.size_flag(name)} {size} allows: "
                    f"raise {abi.size_flag(name)} to at least {held}"
                )
            resizes.append(Resize(name, m.max_entries, size))
        finally:
            m.close()
    for path, target in old_pins(pin_dir, wanted):
        m = None if rebuilt(path) else _open(path)
        if m is None:
            continue
        try:
            held = _count(m)
            if held > wanted[target] and not is_lru(m):
                refused.append(
                    f"{os.path.basename(path)} holds {held} entries to carry into {target}, more than "
                    f"{abi.size_flag(target)} {wanted[target]} allows: raise {abi.size_flag(target)} to at least {held}"
                )
        finally:
            m.close()
    if refused:
        raise ResizeRefused(
            errno.ENOSPC,
            f"maps pinned in {pin_dir} do not fit the sizes asked for: " + "; ".join(refused) + ". Nothing was "
            "changed: the pinned maps keep serving",
        )
    for r in resizes:
        os.rename(os.path.join(pin_dir, r.name), os.path.join(pin_dir, r.name + ASIDE))
        log.info("resizing %s from %d to %d entries: its entries are carried into a new map", r.name, r.old, r.new)
    return resizes


def put_back(pin_dir: str, resizes: list[Resize]) -> None:
    """Undo set_aside after a failed load (libbpf unpinned what it made)."""
    for r in resizes:
        path = os.path.join(pin_dir, r.name)
        if not os.path.exists(path):
            with contextlib.suppress(FileNotFoundError):
                os.rename(path + ASIDE, path)


def _settle(pin_dir: str, wanted: dict[str, int]) -> None:
    """A resize that stopped half way (the agent killed between setting a
    map aside and removing it) left `<name>_old`. Without `<name>`, put it
    back. With `<name>` (the new map, partly filled, maybe serving), carry
    the rest over now if `<name>` is to be resized again (the name `_old` is
    needed); else the carry after load finishes it."""
    for name, size in wanted.items():
        path = os.path.join(pin_dir, name)
        old_path = path + ASIDE
        if not os.path.exists(old_path):
            continue
        if not os.path.exists(path):
            os.rename(old_path, path)
            log.info("%s: put back the map an interrupted resize had set aside", name)
            continue
        cur = Map.open_pinned(path)
        try:
            if cur.max_entries == size:
                continue
            carried = _carry(old_path, cur)
            log.info("%s: finished an interrupted resize (%d entries carried)", name, carried)
        finally:
            cur.close()
        os.unlink(old_path)


# -- after the object is loaded: carry the entries over -------------------------------


def _noexist_update(m: Map, key: bytes, value: bytes) -> bool:
    """Write one entry unless the key is there (the datapath's is newer)."""
    if lib().bpf_map_update_elem(m.fd, key, value, BPF_NOEXIST) == 0:
        return True
    err = ffi.errno
    if err == errno.EEXIST:
        return False
    raise BPFError(err, f"map {m.name}: update: {os.strerror(err)}")


def _carry(path: str, new: Map, skip: set[bytes] | None = None, seen: set[bytes] | None = None) -> int:
    """Copy the map pinned at path into `new`, converted by field name.
    An LRU target keeps its own entries (written by the datapath since, so
    newer) and, when not all fit, the most recently used ones. `skip`: old
    keys carried before (the second pass: the few left are the newest, and
    the map's own LRU makes room for them); `seen`: filled with the old
    keys read."""
    if rebuilt(path):
        log.info("%s is not carried into %s: its layout changed; the first sync writes it anew", path, new.name)
        return 0
    old = Map.open_pinned(path)
    try:
        if old.info.type == BPF_MAP_TYPE_PERCPU_ARRAY:
            return 0  # per-CPU counters start afresh
        if old.info.type == BPF_MAP_TYPE_SK_STORAGE:
            return 0  # cannot be listed: see BPF_MAP_TYPE_SK_STORAGE
        if old.info.type == BPF_MAP_TYPE_RINGBUF:
            return 0  # trace events nobody read: nothing to carry
        if old.info.type == BPF_MAP_TYPE_DEVMAP_HASH:
            return 0  # the XDP interfaces: the attacher writes them at attach
        (ok, oka), (ov, ova) = _layouts(old)
        (nk, nka), (nv, nva) = _layouts(new)
        ck = converter(ok, nk, new.key_size, oka & nka)
        cv = converter(ov, nv, new.value_size, ova & nva)
        items = old.items()
        if seen is not None:
            seen.update(k for k, _ in items)
        if skip:
            items = [(k, v) for k, v in items if k not in skip]
        if not items:
            return 0
        if not is_lru(new):
            if len(items) > new.max_entries:  # set_aside refused this already
                raise ResizeRefused(
                    errno.ENOSPC,
                    f"{os.path.basename(path)} holds {len(items)} entries, more than {new.name} has room "
                    f"for ({new.max_entries}): raise {abi.size_flag(new.name)}",
                )
            new.update_batch(b"".join(ck(k) for k, _ in items), b"".join(cv(v) for _, v in items))
            return len(items)
        present = {k for k, _ in new.items()}
        todo = [(ck(k), cv(v), v) for k, v in items]
        todo = [t for t in todo if t[0] not in present]
        room = max(0, new.max_entries - len(present))
        if len(todo) > room and skip is None:
            stamp = _stamp(ov)
            todo.sort(key=lambda t: stamp(t[2]))
            dropped = len(todo) - room
            todo = todo[dropped:]
            log.warning(
                "%s has room for %d entries: the %d least recently used of %s were not carried over "
                "(flows that will pick a backend again, as when the map is full)",
                new.name,
                new.max_entries,
                dropped,
                os.path.basename(path),
            )
        if not present:  # the usual case, a new empty map: one batch
            return new.update_batch(b"".join(t[0] for t in todo), b"".join(t[1] for t in todo))
        return sum(_noexist_update(new, k, v) for k, v, _ in todo)
    finally:
        old.close()


@dataclass
class Carry:
    """The entries of old maps (another layout version, another size) into
    the loaded ones: copy() before the new programs attach, finish() after."""

    pin_dir: str
    current: dict[str, Map]
    _seen: dict[str, set[bytes]] = field(default_factory=dict)

    def copy(self) -> int:
        """Carry every old map's entries; returns how many."""
        moved = 0
        for path, target in old_pins(self.pin_dir, self.current):
            seen = self._seen.setdefault(path, set())
            n = _carry(path, self.current[target], seen=seen)
            moved += n
            log.info("migrated %d entries of %s into %s", n, os.path.basename(path), target)
        return moved

    def finish(self) -> None:
        """The new programs are attached: carry the LRU entries the old
        programs wrote since copy() (flows that started meanwhile), then
        unpin the old maps; they go when no program holds them."""
        for path, target in old_pins(self.pin_dir, self.current):
            new = self.current[target]
            if is_lru(new) and path in self._seen:
                n = _carry(path, new, skip=self._seen[path])
                if n:
                    log.info(
                        "carried %d entries %s gained during the switch into %s", n, os.path.basename(path), target
                    )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                log.info("removed old pin %s", path)
