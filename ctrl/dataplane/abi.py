"""The one Python mirror of ebpf/sliceproxy.h: layouts, constants, map names
and sizes, and reading the maps back.

The C header is the only place a layout is written. Its block between the
`sp:layout` markers is handed to cffi, which computes the same offsets the C
compiler does; `check_btf` then compares every struct with the BTF that
clang put in the compiled object and refuses to run when they differ. From
the cffi types come `struct` formats, so encoding 100,000 entries is one
`pack` call each rather than 100,000 cffi objects.

Python code names fields, never positions: a codec takes the fields its
caller uses, in the caller's order, and a field it does not name is written
as zeros and skipped when read (`codec`, `pack`, `unpack`). Constants
(`#define` and enum members of the block) are read from the header too, and
so is the layout version in every map's name (`map_name`). A field added to
a map value therefore touches the header, the code that decides its value,
and the docs; this module picks it up by itself (docs/architecture.md, "The
ABI rule").

Everything that crosses into the maps or comes back out of them goes
through here: the writer (ctrl.dataplane.apply) packs with these codecs, and
`sliceproxy dump`, the metrics, adoption and migration read with them.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache, reduce
from itertools import islice, starmap
from operator import or_
from pathlib import Path
from typing import Any

from ..model.plan import Backend, FKey, FrontendFlag, Scope, SourceRange
from ..util.addrs import addr_str
from .libbpf import BTF_KIND_ARRAY, BTF_KIND_STRUCT, ffi, lib
from .maps import Map

log = logging.getLogger("sliceproxy.apply")  # the logger name operators filter on

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
PACK_CHUNK = 8192  # entries Codec.pack_rows joins at a time


def _package_root() -> Path:
    return Path(__file__).resolve().parents[2]


def header_path() -> Path:
    """ebpf/sliceproxy.h: next to the package, or where SLICEPROXY_HEADER says."""
    env = os.environ.get("SLICEPROXY_HEADER")
    if env:
        return Path(env)
    for cand in (_package_root() / "ebpf" / "sliceproxy.h", Path("/usr/share/sliceproxy/sliceproxy.h")):
        if cand.exists():
            return cand
    return _package_root() / "ebpf" / "sliceproxy.h"


class LayoutError(RuntimeError):
    pass


# -- constants ---------------------------------------------------------------------

constants: dict[str, int] = {}


def _block() -> str:
    text = header_path().read_text()
    try:
        return text[text.index(_BEGIN) + len(_BEGIN) : text.index(_END)]
    except ValueError as e:
        raise LayoutError(f"{header_path()}: no sp:layout block") from e


def _load_constants() -> None:
    """Every #define and enum member of the layout block, read from the
    text alone (no libbpf needed)."""
    if constants:
        return
    block = _block()
    for name, value in re.findall(r"^#define (\w+) (\S+)", block, re.M):
        constants[name] = int(value, 0)
    for name, value in re.findall(r"^\s+(SP_\w+) = (\w+),", block, re.M):
        constants[name] = int(value, 0)
    implicit = re.findall(r"^\s+(SP_\w+),", block, re.M)
    if implicit:
        raise LayoutError(f"{header_path()}: enum members {implicit} need an explicit value")


def const(name: str) -> int:
    """A #define or enum value of the header's layout block."""
    _load_constants()
    try:
        return constants[name]
    except KeyError:
        raise LayoutError(f"{header_path()} defines no {name}") from None


def constants_with_prefix(prefix: str) -> list[str]:
    """Names of the header's constants starting with prefix (SP_V_ without SP_V_MAX)."""
    _load_constants()
    return [n for n in constants if n.startswith(prefix) and not n.endswith("_MAX")]


# The constants the control plane uses, by their header names without SP_.
LAYOUT_VERSION = const("SP_LAYOUT_VERSION")
SCOPE_INTERNAL = const("SP_SCOPE_INTERNAL")
SCOPE_EXTERNAL = const("SP_SCOPE_EXTERNAL")
BE_F_DRAINING = const("SP_BE_F_DRAINING")
CT_FORWARD = const("SP_CT_FORWARD")
CT_REPLY = const("SP_CT_REPLY")
CT_SNAT = const("SP_CT_SNAT")
CT_UNSNAT = const("SP_CT_UNSNAT")

# The planner's symbols (ctrl.model.plan) as the header's values: a scope
# by SP_SCOPE_<NAME>, a flag by SP_SVC_F_<NAME>.
SCOPE_VALUE: dict[Scope, int] = {s: const(f"SP_SCOPE_{s.name}") for s in Scope}
SCOPE_OF: dict[int, Scope] = {v: s for s, v in SCOPE_VALUE.items()}
_FLAG_BITS = {m: const(f"SP_SVC_F_{m.name}") for m in FrontendFlag}
# Every combination, by the Flag's own value: one dict lookup per frontend
# (a Flag hashes in Python, its _value_ is a plain int).
_FLAG_WORDS = {v: reduce(or_, (_FLAG_BITS[m] for m in FrontendFlag(v)), 0) for v in range(1 << len(FrontendFlag))}


# Entries of a Maglev table per map entry (sp_mgl_v5 holds tables in
# chunks of this many backend ids).
MGL_CHUNK = const("SP_MGL_CHUNK")


def mgl_chunks(m: int) -> int:
    """Chunks of a Maglev table of m entries."""
    return -(-m // MGL_CHUNK)


def frontend_flags(flags: FrontendFlag) -> int:
    """A frontend's flags as sp_svc_val.flags holds them (SP_SVC_F_*)."""
    return _FLAG_WORDS[flags._value_]


def verdicts() -> list[str]:
    """Verdict names by index, from the header's enum sp_verdict (lower case)."""
    names = {const(c): c[len("SP_V_") :].lower() for c in constants_with_prefix("SP_V_")}
    return [names[i] for i in range(const("SP_V_MAX"))]


# -- maps: names and sizes -------------------------------------------------------------

# Every map of the dataplane, by base name; its pinned name adds the layout
# version (map_name).
MAP_BASES = (
    "sp_svc",
    "sp_slot",
    "sp_mgl",
    "sp_mglptr",
    "sp_be",
    "sp_ct",
    "sp_aff",
    "sp_stats",
    "sp_handoff",
    "sp_names",
    "sp_src",
    "sp_cfg",
    "sp_host",
    "sp_sock",
    "sp_frag",
    "sp_trace",
    "sp_events",
    "sp_uplinks",
)


def map_name(base: str) -> str:
    """A map's name in the kernel and under the pin directory: its base and
    the header's layout version (sp_svc -> sp_svc_v5), so a layout change
    renames every map."""
    return f"{base}_v{LAYOUT_VERSION}"


def map_base(name: str) -> str:
    """The base of a map name of any layout version (sp_ct_v5 -> sp_ct)."""
    return name.rsplit("_v", 1)[0]


def map_names() -> list[str]:
    """The maps of this layout version."""
    return [map_name(b) for b in MAP_BASES]


# The flag that sizes each map, for the messages that tell an operator
# which one to raise.
SIZE_FLAGS = {
    "sp_svc": "--max-services",
    "sp_names": "--max-services",
    "sp_be": "--max-backends",
    "sp_slot": "--max-slots",
    "sp_ct": "--max-conntrack",
    "sp_aff": "--max-conntrack",
    "sp_src": "--max-source-ranges",
    "sp_mgl": "--max-maglev-entries",
    "sp_mglptr": "--max-services",
}


@dataclass(frozen=True)
class MapSizes:
    """Map capacities: what the loader sizes the maps to, and what the
    dataplane checks a change against before writing it (a full map gets a
    clear error and no half-written service). Every map the control plane
    fills has one: the frontend, names, slot, backend and source range maps
    are checked per Service; conntrack and affinity are LRU maps, where
    full means the oldest entries go; counters and config are arrays of
    fixed size."""

    services: int = 65536  # frontends; also the names map
    backends: int = 262144
    slots: int = 262144  # sum of backends over slot tables
    conntrack: int = 262144  # LRU: full means the oldest flows go
    source_ranges: int = 65536  # loadBalancerSourceRanges entries, summed over frontends
    # Maglev table entries under --external-lb=maglev: M per table (one
    # per Service port and family), rounded up to whole chunks of
    # MGL_CHUNK; 15 tables of the default size.
    maglev: int = 262144

    def for_map(self, name: str) -> int | None:
        """max_entries of one map (any layout version), None for maps of fixed size."""
        return {
            "sp_svc": self.services,
            "sp_names": self.services,
            "sp_be": self.backends,
            "sp_slot": self.slots,
            "sp_ct": self.conntrack,
            "sp_aff": self.conntrack,  # at most one entry per client and service
            "sp_src": self.source_ranges,
            "sp_mgl": mgl_chunks(self.maglev),
            "sp_mglptr": self.services,  # at most one per frontend
        }.get(map_base(name))

    @property
    def maglev_chunks(self) -> int:
        """Chunks the Maglev map holds (sp_mgl_v5's max_entries)."""
        return mgl_chunks(self.maglev)


def size_flag(name: str) -> str:
    """The flag that sizes map `name` (any layout version)."""
    return SIZE_FLAGS.get(map_base(name), "its size")


# -- codecs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Codec:
    """Packs and unpacks one C struct by the fields a caller names.

    Values go in and come out in `fields` order (the caller's); fields of
    the header not in `fields`, and every field named pad*, are zeros when
    packed and skipped when unpacked."""

    name: str
    size: int
    fields: tuple[str, ...]
    st: struct.Struct
    perm: tuple[int, ...] | None = None  # position in the struct of each field in `fields`

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

    def pack_rows(self, rows: Iterable[tuple], n: int = 0) -> bytes | bytearray:
        """Many entries at once; starmap keeps the loop in C when the order
        is the header's. Joined PACK_CHUNK entries at a time: given an
        iterator, 100,000 rows never exist as tuples and packed pieces all
        at once (about 16 MiB at once for the backends of a full sync).
        Past one chunk the result is a bytearray, of n entries' size from
        the start when the caller knows n: the rows are held once, not
        twice while a buffer grows or is copied."""
        packed: Iterator[bytes]
        if self.perm is None:
            packed = starmap(self.st.pack, rows)
        else:
            packed = (self.pack(*r) for r in rows)
        first = b"".join(islice(packed, PACK_CHUNK))
        if len(first) < PACK_CHUNK * self.st.size:
            return first
        out = bytearray(max(n * self.st.size, len(first)))
        pos = len(first)
        out[:pos] = first
        while part := b"".join(islice(packed, PACK_CHUNK)):
            out[pos : pos + len(part)] = part  # grows the buffer past n's size
            pos += len(part)
        del out[pos:]  # fewer rows than n
        return out

    def pack_columns(self, *cols) -> bytes:
        """Many entries given as one sequence per field (in `fields` order).
        A struct of __u32 fields only (slot keys and values, ids) is built
        by interleaving arrays, in C; anything else packs row by row."""
        if not self.st.format.strip("=I") and len(self.st.format) - 1 == len(cols) and _U32.itemsize == 4:
            if self.perm is not None:
                cols = tuple(c for _, c in sorted(zip(self.perm, cols, strict=True)))
            cols = tuple(
                c if isinstance(c, array) and c.typecode == _U32.typecode else array(_U32.typecode, c) for c in cols
            )
            if len(cols) == 1:
                return cols[0].tobytes()
            out = array(_U32.typecode, bytes(4 * len(cols) * len(cols[0])))
            for k, c in enumerate(cols):
                out[k :: len(cols)] = c
            return out.tobytes()
        return self.pack_rows(zip(*cols, strict=True))


_cdef_done = False
_structs: list[str] = []


def _load() -> None:
    global _cdef_done
    if _cdef_done:
        return
    block = _block()
    ffi.cdef(block)
    _structs.extend(re.findall(r"^struct (\w+) \{", block, re.M))
    _cdef_done = True


def struct_names() -> list[str]:
    _load()
    return list(_structs)


def describe(sname: str) -> list[tuple[str, int, int]]:
    """(field, offset, size) of a struct as cffi laid it out from the header."""
    _load()
    ctype = ffi.typeof(f"struct {sname}")
    return [(n, f.offset, ffi.sizeof(f.type)) for n, f in sorted(ctype.fields, key=lambda nf: nf[1].offset)]


def field_names(sname: str) -> tuple[str, ...]:
    """The fields of a struct in the header's order, pads left out."""
    return tuple(n for n, _, _ in describe(sname) if not n.startswith("pad"))


@cache
def codec(sname: str, fields: tuple[str, ...] | None = None) -> Codec:
    """The codec of struct sname for `fields` (names, in the caller's
    order; default every field, in the header's). A name the header lacks
    is a LayoutError: the Python side and the header disagree."""
    _load()
    ctype = ffi.typeof(f"struct {sname}")
    every = field_names(sname)
    want = every if fields is None else fields
    missing = [f for f in want if f not in every]
    if missing or len(set(want)) != len(want):
        raise LayoutError(f"struct {sname}: the header has fields {every}, the control plane uses {want}")
    fmt = "="
    pos = 0
    taken: list[str] = []
    for fname, f in sorted(ctype.fields, key=lambda nf: nf[1].offset):
        if f.offset > pos:
            fmt += f"{f.offset - pos}x"
        size = ffi.sizeof(f.type)
        if fname not in want:
            fmt += f"{size}x"  # a pad, or a field this caller leaves at zero
        elif f.type.kind in ("array", "struct"):
            fmt += f"{size}s"  # raw bytes (an array of structs, a struct: unpack it with its own codec)
            taken.append(fname)
        elif f.type.kind == "primitive" and f.type.cname in _PRIMITIVE_CODES:
            fmt += _PRIMITIVE_CODES[f.type.cname]
            taken.append(fname)
        else:
            raise LayoutError(f"struct {sname}.{fname}: unsupported field type {f.type.cname}")
        pos = f.offset + size
    total = ffi.sizeof(ctype)
    if total > pos:
        fmt += f"{total - pos}x"
    st = struct.Struct(fmt)
    assert st.size == total, (sname, fmt)
    order = tuple(want)
    perm = None if order == tuple(taken) else tuple(taken.index(f) for f in order)
    return Codec(sname, total, order, st, perm)


def pack(sname: str, **values: Any) -> bytes:
    """One struct sname, its fields given by name; the others are zeros."""
    return codec(sname, tuple(values)).pack(*values.values())


def unpack(sname: str, raw: bytes) -> dict[str, Any]:
    """Every field of one struct sname, by name."""
    c = codec(sname)
    return dict(zip(c.fields, c.unpack(raw), strict=True))


# Map keys declared as a bare __u32 in the programs (backend and name ids,
# array indexes): BTF checks them as the map's key_size.
U32 = Codec("u32", 4, ("id",), struct.Struct("=I"))


def u32(i: int) -> bytes:
    return U32.pack(i)


# -- the BTF check ---------------------------------------------------------------------


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


# -- the structs the control plane writes and reads --------------------------------------


@dataclass
class Codecs:
    """The codecs of the maps the control plane programs, in the field
    order the writer and the readers use."""

    svc_key: Codec
    svc_val: Codec
    slot_key: Codec
    slot_val: Codec
    backend: Codec
    backend_new: Codec  # a backend in service: its flags and drain end zeros
    name: Codec
    src_key: Codec
    src_val: Codec
    mgl_key: Codec
    mgl_val: Codec
    mgl_ptr: Codec

    @classmethod
    def get(cls) -> Codecs:
        return cls(
            svc_key=codec("sp_svc_key", ("addr", "port", "proto", "scope")),
            svc_val=codec("sp_svc_val", ("svc_id", "count", "flags", "affinity_timeout", "slots_id")),
            slot_key=codec("sp_slot_key", ("svc_id", "slot")),
            slot_val=codec("sp_slot_val", ("backend_id",)),
            backend=codec("sp_backend", ("addr", "port", "proto", "flags", "drain_end")),
            backend_new=codec("sp_backend", ("addr", "port", "proto")),
            name=codec("sp_svc_name", ("name",)),
            src_key=codec("sp_src_key", ("prefixlen", "svc_id", "addr")),
            src_val=codec("sp_src_val", ("allow",)),
            mgl_key=codec("sp_mgl_key", ("id", "chunk")),
            mgl_val=codec("sp_mgl_val", ("backend",)),
            mgl_ptr=codec("sp_mgl_ptr", ("table", "size")),
        )

    def sizes(self) -> dict[str, tuple[int, int]]:
        """(key size, value size) of each map they encode, by map name."""
        return {
            map_name("sp_be"): (U32.size, self.backend.size),
            map_name("sp_slot"): (self.slot_key.size, self.slot_val.size),
            map_name("sp_svc"): (self.svc_key.size, self.svc_val.size),
            map_name("sp_names"): (U32.size, self.name.size),
            map_name("sp_src"): (self.src_key.size, self.src_val.size),
            map_name("sp_mgl"): (self.mgl_key.size, self.mgl_val.size),
            map_name("sp_mglptr"): (U32.size, self.mgl_ptr.size),
        }


def to_ns(seconds: float) -> int:
    """A time.monotonic() reading as bpf_ktime_get_ns() gives it (a
    backend's drain_end): both read CLOCK_MONOTONIC, so a deadline written
    by one agent means the same to the next one (and to the kernel)."""
    return max(0, round(seconds * 1e9))


def idle_ns(now: int, stamp: int) -> int:
    """How long ago a stamp of the programs was, as they compute it
    (idle_ns() in ebpf/lib/clock.h): now - stamp modulo 2**64. A flow idle
    longer than the machine's uptime has a stamp below the clock's zero,
    wrapped around; a stamp ahead of now (written on another CPU after now
    was read) is idle 0."""
    d = (now - stamp) % 2**64
    return 0 if d >= 2**63 else d


@dataclass(frozen=True)
class Hairpin:
    """struct sp_hairpin: the source addresses a pod's flow gets when its
    Service picks the pod itself as backend (16-byte map form), per family;
    None: no hairpin for that family. Set in the program before load:
    changing them takes a reload (an agent restart)."""

    addr4: bytes | None = None
    addr6: bytes | None = None

    def packed(self) -> bytes:
        zero = bytes(16)
        return pack("sp_hairpin", addr4=self.addr4 or zero, addr6=self.addr6 or zero)


@dataclass(frozen=True)
class NodeConfig:
    """struct sp_cfg: the addresses masqueraded flows leave with (addr16 or
    None), the SNAT port range, and how long an idle flow holds its port:
    open (snat_reclaim, 0: for ever) and once its TCP connection closed
    (snat_reclaim_closed, 0: close not tracked, snat_reclaim applies)."""

    addr4: bytes | None = None
    addr6: bytes | None = None
    snat_ports: tuple[int, int] = (61000, 65535)
    snat_reclaim: int = 600
    snat_reclaim_closed: int = 10

    def packed(self) -> bytes:
        zero = bytes(16)
        return pack(
            "sp_cfg",
            addr4=self.addr4 or zero,
            addr6=self.addr6 or zero,
            snat_port_min=self.snat_ports[0],
            snat_port_max=self.snat_ports[1],
            snat_reclaim=self.snat_reclaim,
            snat_reclaim_closed=self.snat_reclaim_closed,
        )

    def as_dict(self) -> dict[str, object]:
        """sp_cfg as `--dry-run` and `sliceproxy dump` print it."""
        return {
            "addr4": addr_str(self.addr4) if self.addr4 else None,
            "addr6": addr_str(self.addr6) if self.addr6 else None,
            "snat_port_min": self.snat_ports[0],
            "snat_port_max": self.snat_ports[1],
            "snat_reclaim": self.snat_reclaim,
            "snat_reclaim_closed": self.snat_reclaim_closed,
        }


def read_config(maps: dict[str, Map]) -> NodeConfig | None:
    """sp_cfg as the kernel holds it; None before the agent wrote it."""
    m = maps.get(map_name("sp_cfg"))
    raw = m.lookup(u32(0)) if m is not None else None
    if raw is None:
        return None
    v = unpack("sp_cfg", raw)
    a4, a6 = v["addr4"], v["addr6"]
    lo, hi, reclaim, closed = v["snat_port_min"], v["snat_port_max"], v["snat_reclaim"], v["snat_reclaim_closed"]
    if not (a4.strip(b"\0") or a6.strip(b"\0") or lo or hi or reclaim or closed):
        return None  # the array's zeroed entry: never written
    z = bytes(16)
    return NodeConfig(a4 if a4 != z else None, a6 if a6 != z else None, (lo, hi), reclaim, closed)


def ct_codecs() -> tuple[Codec, Codec]:
    """Conntrack key and value, in the field order the readers use."""
    return (
        codec("sp_ct_key", ("saddr", "daddr", "sport", "dport", "proto", "dir")),
        codec("sp_ct_val", ("nat_addr", "nat_port", "backend_id", "svc_id", "last_seen", "addr2", "port2", "flags")),
    )


def counters(maps: dict[str, Map]) -> dict[str, dict[str, int]]:
    """Packets and bytes per verdict, summed over CPUs."""
    m = maps.get(map_name("sp_stats"))
    if m is None:
        return {}
    c = codec("sp_stat", ("packets", "bytes"))
    out = {}
    for i, name in enumerate(verdicts()):
        vals = [c.unpack(v) for v in m.lookup_percpu(u32(i))]
        out[name] = {"packets": sum(v[0] for v in vals), "bytes": sum(v[1] for v in vals)}
    return out


def handoffs(maps: dict[str, Map]) -> dict[str, int]:
    """The packets (and bytes) tc's external ingress took from the XDP
    program's handoff (sp_handoff_v5), summed over CPUs; zeros without
    the map."""
    m = maps.get(map_name("sp_handoff"))
    if m is None:
        return {"packets": 0, "bytes": 0}
    c = codec("sp_stat", ("packets", "bytes"))
    vals = [c.unpack(v) for v in m.lookup_percpu(u32(0))]
    return {"packets": sum(v[0] for v in vals), "bytes": sum(v[1] for v in vals)}


@dataclass
class MapContents:
    """The service, slot, backend, name and source range maps, decoded."""

    # key -> (svc_id, count, flags, affinity_timeout, slots_id); a slots_id
    # of 0 (carried over from layout 3) reads as the frontend's svc_id.
    svc: dict[FKey, tuple[int, int, int, int, int]]
    slots: dict[tuple[int, int], int]
    backends: dict[int, Backend]
    names: dict[int, str]
    ranges: dict[int, set[SourceRange]]
    # Backend id -> end of its drain (CLOCK_MONOTONIC seconds), for those
    # flagged draining with a deadline (a map carried over from a layout
    # without one has none: their drain starts again).
    draining: dict[int, float]
    # The Maglev tables: table id -> {chunk: its MGL_CHUNK backend ids};
    # and the frontends' pointers: svc_id -> (table id, M).
    maglev: dict[int, dict[int, array]] = field(default_factory=dict)
    maglev_ptr: dict[int, tuple[int, int]] = field(default_factory=dict)

    def adopt_into(self, programmed) -> None:
        """Rebuild a mirror (ctrl.dataplane.programmed.Programmed) from these contents."""
        programmed.adopt(
            self.svc, self.slots, self.backends, self.names, self.ranges, self.draining, self.maglev, self.maglev_ptr
        )


def read_contents(maps: dict[str, Map]) -> MapContents:
    """Decode the service, slot, backend, name and source range maps. A
    scope the planner has no symbol for stays a number (nothing plans such
    a frontend: the first full sync removes it)."""
    c = Codecs.get()
    svc = {}
    for k, v in maps[map_name("sp_svc")].items():
        addr, port, proto, scope = c.svc_key.unpack(k)
        svc_id, count, flags, timeout, slots_id = c.svc_val.unpack(v)
        svc[(addr, port, proto, SCOPE_OF.get(scope, scope))] = (svc_id, count, flags, timeout, slots_id or svc_id)
    slots = {c.slot_key.unpack(k): c.slot_val.unpack(v)[0] for k, v in maps[map_name("sp_slot")].items()}
    rows = [(U32.unpack(k)[0], c.backend.unpack(v)) for k, v in maps[map_name("sp_be")].items()]
    backends = {bid: r[:3] for bid, r in rows}
    draining = {bid: r[4] / 1e9 for bid, r in rows if r[3] & BE_F_DRAINING and r[4]}
    names = {}
    if map_name("sp_names") in maps:
        for k, v in maps[map_name("sp_names")].items():
            svc_id, raw = U32.unpack(k)[0], c.name.unpack(v)[0]
            if b"\0" not in raw:
                # Not written by a control plane of this layout (ours never
                # cuts a name): its owner would be a guess, so none.
                log.warning("map %s: the name of id %d has no end; its owner is unknown", map_name("sp_names"), svc_id)
                continue
            names[svc_id] = raw.split(b"\0", 1)[0].decode(errors="replace")
    ranges: dict[int, set[SourceRange]] = {}
    if map_name("sp_src") in maps:
        for k, _ in maps[map_name("sp_src")].items():
            plen, svc_id, addr = c.src_key.unpack(k)
            ranges.setdefault(svc_id, set()).add((addr, plen - 32))
    maglev: dict[int, dict[int, array]] = {}
    if map_name("sp_mgl") in maps:
        for k, v in maps[map_name("sp_mgl")].items():
            tid, chunk = c.mgl_key.unpack(k)
            maglev.setdefault(tid, {})[chunk] = mgl_ids(v)
    maglev_ptr: dict[int, tuple[int, int]] = {}
    if map_name("sp_mglptr") in maps:
        for k, v in maps[map_name("sp_mglptr")].items():
            maglev_ptr[U32.unpack(k)[0]] = c.mgl_ptr.unpack(v)
    return MapContents(svc, slots, backends, names, ranges, draining, maglev, maglev_ptr)  # type: ignore[arg-type]


def mgl_ids(raw: bytes) -> array:
    """The backend ids of one Maglev chunk as the map holds it."""
    a = array(_U32.typecode)
    a.frombytes(raw)
    return a
