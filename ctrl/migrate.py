"""Carry pinned maps of another layout version over to this one.

Map names end in their layout version (`sp_ct_v3`). A release that changes
a layout changes the version, so the new agent never misreads an old map:
libbpf creates the new maps beside the old ones. Before the new programs
replace the old ones, every entry of an old map is rewritten into its new
counterpart, field by field by name, with the layouts read from the BTF
each map was created with: fields that kept their name and size keep their
value wherever they moved, an array that grew (a longer name) keeps its old
bytes at its start, new fields start at zero, dropped fields are dropped
(and so is a field that shrank or changed size otherwise: cut, it could
mean something else). Backend and service ids therefore survive, and so do the
conntrack and affinity entries that name them: established connections
keep their backends across the upgrade. The old pins are then removed (the
old maps go when the old programs detach).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re

from . import layout
from .libbpf import BPFError, ffi, lib
from .maps import BPF_MAP_TYPE_PERCPU_ARRAY, Map

log = logging.getLogger("sliceproxy.migrate")

_NAME = re.compile(r"^(sp_[a-z]+)_v(\d+)$")

Fields = list[tuple[str, int, int]]


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
            (layout.btf_fields(btf, k)[1], layout.btf_array_fields(btf, k)),
            (layout.btf_fields(btf, v)[1], layout.btf_array_fields(btf, v)),
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


def old_pins(pin_dir: str, current: dict[str, Map]) -> list[tuple[str, str]]:
    """(old pin path, current map name) for pins of another layout version."""
    version = layout.const("SP_LAYOUT_VERSION")
    out = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir(pin_dir)):
            m = _NAME.match(entry)
            if m is None or int(m.group(2)) == version:
                continue
            target = f"{m.group(1)}_v{version}"
            if target in current:
                out.append((os.path.join(pin_dir, entry), target))
    return out


def migrate(pin_dir: str, current: dict[str, Map]) -> int:
    """Copy every old-version map into its current counterpart; returns the
    number of entries carried over. Per-CPU counters start afresh."""
    moved = 0
    for path, target in old_pins(pin_dir, current):
        old = Map.open_pinned(path)
        new = current[target]
        try:
            if old.info.type == BPF_MAP_TYPE_PERCPU_ARRAY:
                continue
            (ok, oka), (ov, ova) = _layouts(old)
            (nk, nka), (nv, nva) = _layouts(new)
            ck = converter(ok, nk, new.key_size, oka & nka)
            cv = converter(ov, nv, new.value_size, ova & nva)
            items = old.items()
            if items:
                new.update_batch(b"".join(ck(k) for k, _ in items), b"".join(cv(v) for _, v in items))
            moved += len(items)
            log.info("migrated %d entries of %s into %s", len(items), os.path.basename(path), target)
        finally:
            old.close()
    return moved


def remove_old_pins(pin_dir: str, current: dict[str, Map]) -> None:
    """Unpin the old-version maps; they go when no program holds them."""
    for path, _ in old_pins(pin_dir, current):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            log.info("removed old pin %s", path)
