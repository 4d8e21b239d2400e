"""Map key and value layouts, read from the C header and checked against BTF.

The C header ebpf/sliceproxy.h is the only place a layout is written. Its
block between the `sp:layout` markers is handed to cffi, which computes the
same offsets the C compiler does; `check_btf` then compares every struct with
the BTF that clang put in the compiled object and refuses to run when they
differ. From the cffi types we derive `struct` formats, so encoding 100,000
entries is one `pack` call each rather than 100,000 cffi objects.
"""

from __future__ import annotations

import os
import re
import struct
from array import array
from dataclasses import dataclass
from itertools import starmap
from pathlib import Path

from .libbpf import BTF_KIND_ARRAY, BTF_KIND_STRUCT, ffi, lib

_BEGIN = "/* sp:layout:begin */"
_END = "/* sp:layout:end */"

_PRIMITIVE_CODES = {
    "uint8_t": "B",
    "uint16_t": "H",
    "uint32_t": "I",
    "uint64_t": "Q",
    "int32_t": "i",
    "int64_t": "q",
}
_U32 = array("I")  # native __u32 (4 bytes on every Linux target)


def _package_root() -> Path:
    return Path(__file__).resolve().parent.parent


def header_path() -> Path:
    """ebpf/sliceproxy.h: next to the package, or where SLICEPROXY_HEADER says."""
    env = os.environ.get("SLICEPROXY_HEADER")
    if env:
        return Path(env)
    for cand in (_package_root() / "ebpf" / "sliceproxy.h", Path("/usr/share/sliceproxy/sliceproxy.h")):
        if cand.exists():
            return cand
    return _package_root() / "ebpf" / "sliceproxy.h"


def object_path() -> Path:
    """The compiled tc program: build/ next to the package, or SLICEPROXY_BPF_OBJECT."""
    env = os.environ.get("SLICEPROXY_BPF_OBJECT")
    if env:
        return Path(env)
    for cand in (
        _package_root() / "build" / "sliceproxy_tc.bpf.o",
        Path("/usr/share/sliceproxy/sliceproxy_tc.bpf.o"),
    ):
        if cand.exists():
            return cand
    return _package_root() / "build" / "sliceproxy_tc.bpf.o"


class LayoutError(RuntimeError):
    pass


@dataclass(frozen=True)
class Codec:
    """Packs and unpacks one C struct; fields named pad* are written as zeros.

    Values go in and come out in `fields` order: the header's order, or the
    order a caller named (codec(name, order)), so Python code refers to
    fields by name and a struct whose fields move in the header still packs
    right."""

    name: str
    size: int
    fields: tuple[str, ...]
    st: struct.Struct
    perm: tuple[int, ...] | None = None  # header position of each field in `fields`

    def pack(self, *values) -> bytes:
        if self.perm is None:
            return self.st.pack(*values)
        ordered = [None] * len(values)
        for i, pos in enumerate(self.perm):
            ordered[pos] = values[i]
        return self.st.pack(*ordered)

    def unpack(self, data: bytes) -> tuple:
        raw = self.st.unpack(data)
        return raw if self.perm is None else tuple(raw[pos] for pos in self.perm)

    def pack_rows(self, rows) -> bytes:
        """Many entries at once; starmap keeps the loop in C when the order is the header's."""
        if self.perm is None:
            return b"".join(starmap(self.st.pack, rows))
        return b"".join(self.pack(*r) for r in rows)

    def pack_columns(self, *cols) -> bytes:
        """Many entries given as one sequence per field (in `fields` order).
        A struct of __u32 fields only (slot keys and values, ids) is built
        by interleaving arrays, in C; anything else packs row by row."""
        if not self.st.format.strip("=I") and len(self.st.format) - 1 == len(cols) and _U32.itemsize == 4:
            if self.perm is not None:
                cols = tuple(c for _, c in sorted(zip(self.perm, cols, strict=True)))
            if len(cols) == 1:
                return array(_U32.typecode, cols[0]).tobytes()
            out = array(_U32.typecode, bytes(4 * len(cols) * len(cols[0])))
            for k, c in enumerate(cols):
                out[k :: len(cols)] = array(_U32.typecode, c)
            return out.tobytes()
        return self.pack_rows(zip(*cols, strict=True))


_loaded = False
_codecs: dict[str, Codec] = {}
_structs: list[str] = []
constants: dict[str, int] = {}


def _block() -> str:
    text = header_path().read_text()
    try:
        return text[text.index(_BEGIN) + len(_BEGIN) : text.index(_END)]
    except ValueError as e:
        raise LayoutError(f"{header_path()}: no sp:layout block") from e


def _load_constants(block: str) -> None:
    """Every #define and enum member of the layout block, read from the
    text alone (no libbpf needed), so the planner and the diff take their
    flag and scope values from the header instead of keeping copies."""
    if constants:
        return
    for name, value in re.findall(r"^#define (\w+) (\S+)", block, re.M):
        constants[name] = int(value, 0)
    for name, value in re.findall(r"^\s+(SP_\w+) = (\w+),", block, re.M):
        constants[name] = int(value, 0)
    implicit = re.findall(r"^\s+(SP_\w+),", block, re.M)
    if implicit:
        raise LayoutError(f"{header_path()}: enum members {implicit} need an explicit value")


def _load() -> None:
    global _loaded
    if _loaded:
        return
    block = _block()
    _load_constants(block)
    ffi.cdef(block)
    _structs.extend(re.findall(r"^struct (\w+) \{", block, re.M))
    for sname in _structs:
        _codecs[sname] = _make_codec(sname)
    _loaded = True


def _make_codec(sname: str) -> Codec:
    ctype = ffi.typeof(f"struct {sname}")
    fmt = "="
    pos = 0
    names = []
    for fname, f in sorted(ctype.fields, key=lambda nf: nf[1].offset):
        if f.offset > pos:
            fmt += f"{f.offset - pos}x"
        size = ffi.sizeof(f.type)
        if fname.startswith("pad"):
            fmt += f"{size}x"
        elif f.type.kind == "array":
            fmt += f"{f.type.length}s"
            names.append(fname)
        elif f.type.kind == "primitive" and f.type.cname in _PRIMITIVE_CODES:
            fmt += _PRIMITIVE_CODES[f.type.cname]
            names.append(fname)
        else:
            raise LayoutError(f"struct {sname}.{fname}: unsupported field type {f.type.cname}")
        pos = f.offset + size
    total = ffi.sizeof(ctype)
    if total > pos:
        fmt += f"{total - pos}x"
    st = struct.Struct(fmt)
    assert st.size == total, (sname, fmt)
    return Codec(sname, total, tuple(names), st)


def codec(sname: str, order: tuple[str, ...] | None = None) -> Codec:
    """The codec of struct sname, taking and giving values in `order` (field
    names; default the header's order). A name the header lacks is a
    LayoutError: the Python side and the header disagree."""
    _load()
    c = _codecs[sname]
    if order is None or order == c.fields:
        return c
    missing = [f for f in order if f not in c.fields]
    if missing or len(order) != len(c.fields):
        raise LayoutError(f"struct {sname}: the header has fields {c.fields}, the control plane uses {order}")
    return Codec(c.name, c.size, order, c.st, tuple(c.fields.index(f) for f in order))


def const(name: str) -> int:
    """A #define or enum value of the header's layout block."""
    if not constants:
        _load_constants(_block())
    try:
        return constants[name]
    except KeyError:
        raise LayoutError(f"{header_path()} defines no {name}") from None


def map_name(base: str) -> str:
    """A map's pinned name: its base and the header's layout version
    (sp_svc -> sp_svc_v3), so a layout change renames every map."""
    return f"{base}_v{const('SP_LAYOUT_VERSION')}"


def constants_with_prefix(prefix: str) -> list[str]:
    """Names of the header's constants starting with prefix (SP_V_ without SP_V_MAX)."""
    if not constants:
        _load_constants(_block())
    return [n for n in constants if n.startswith(prefix) and not n.endswith("_MAX")]


def struct_names() -> list[str]:
    _load()
    return list(_structs)


def describe(sname: str) -> list[tuple[str, int, int]]:
    """(field, offset, size) of a struct as cffi laid it out from the header."""
    _load()
    ctype = ffi.typeof(f"struct {sname}")
    return [(n, f.offset, ffi.sizeof(f.type)) for n, f in sorted(ctype.fields, key=lambda nf: nf[1].offset)]


def btf_struct(btf, sname: str) -> tuple[int, list[tuple[str, int, int]]]:
    """(size, [(field, byte offset, size)]) of a struct as the object's BTF has it."""
    tid = lib().btf__find_by_name_kind(btf, sname.encode(), BTF_KIND_STRUCT)
    if tid < 0:
        raise LayoutError(f"struct {sname} is not in the object's BTF")
    return btf_fields(btf, tid)


def btf_fields(btf, type_id: int) -> tuple[int, list[tuple[str, int, int]]]:
    """(size, [(field, byte offset, size)]) of any BTF type: a struct's
    members, or one unnamed field for a scalar (a bare __u32 key)."""
    lb = lib()
    rid = lb.btf__resolve_type(btf, type_id)  # through typedefs and modifiers
    t = lb.btf__type_by_id(btf, rid if rid >= 0 else type_id)
    size = int(lb.btf__resolve_size(btf, type_id))
    if ((t.info >> 24) & 0x1F) != BTF_KIND_STRUCT:
        return size, [("", 0, size)]
    vlen = t.info & 0xFFFF
    kflag = t.info >> 31
    members = ffi.cast("struct btf_member *", t + 1)
    out = []
    for i in range(vlen):
        m = members[i]
        bit_off = m.offset & 0xFFFFFF if kflag else m.offset
        name = ffi.string(lb.btf__name_by_offset(btf, m.name_off)).decode()
        out.append((name, bit_off // 8, int(lb.btf__resolve_size(btf, m.type))))
    return size, out


def btf_array_fields(btf, type_id: int) -> set[str]:
    """Names of the members of a BTF struct that are arrays (addresses,
    names): a migration may carry such a field into a longer one."""
    lb = lib()
    rid = lb.btf__resolve_type(btf, type_id)
    t = lb.btf__type_by_id(btf, rid if rid >= 0 else type_id)
    if ((t.info >> 24) & 0x1F) != BTF_KIND_STRUCT:
        return set()
    members = ffi.cast("struct btf_member *", t + 1)
    out = set()
    for i in range(t.info & 0xFFFF):
        m = members[i]
        mid = lb.btf__resolve_type(btf, m.type)
        mt = lb.btf__type_by_id(btf, mid if mid >= 0 else m.type)
        if ((mt.info >> 24) & 0x1F) == BTF_KIND_ARRAY:
            out.add(ffi.string(lb.btf__name_by_offset(btf, m.name_off)).decode())
    return out


def check_btf(btf) -> None:
    """Refuse to run when the header the control plane read and the compiled
    object disagree on any layout (a stale build, a hand edit)."""
    _load()
    problems = []
    for sname in _structs:
        size, members = btf_struct(btf, sname)
        ours = describe(sname)
        if size != ffi.sizeof(f"struct {sname}") or members != ours:
            problems.append(f"struct {sname}: object has size {size} fields {members}, header has {ours}")
    if problems:
        raise LayoutError(
            "the compiled BPF object and ebpf/sliceproxy.h disagree (rebuild with `make`): " + "; ".join(problems)
        )
