"""ctrl.dataplane.abi: the C header is the one source of layouts, constants
and map names; the compiled object must agree, and Python code packs by
field name."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctrl.dataplane import abi, loader
from ctrl.dataplane.libbpf import ffi, lib
from ctrl.model.plan import FrontendFlag, Scope

from ..bpfbuild import build_object, copy_sources

ROOT = Path(__file__).resolve().parents[2]


def _btf_of_object():
    obj = lib().bpf_object__open_file(str(loader.object_path()).encode(), ffi.NULL)
    assert obj != ffi.NULL, f"cannot open {loader.object_path()}: run make"
    return obj, lib().bpf_object__btf(obj)


def test_header_matches_compiled_object_btf():
    obj, btf = _btf_of_object()
    try:
        abi.check_btf(btf)
        for s in abi.struct_names():
            size, members = abi.btf_struct(btf, s)
            assert size == abi.codec(s).size
    finally:
        lib().bpf_object__close(obj)


@pytest.mark.parametrize(
    "old,new",
    [
        pytest.param(
            "\t__u16 port;    /* frontend port, host order */", "\t__u32 port;    /* widened */", id="field-widened"
        ),
        pytest.param(
            "\t__u8 proto;    /* IPPROTO_TCP (6) or IPPROTO_UDP (17) */\n\t__u8 scope;",
            "\t__u8 scope;\n\t__u8 proto;",
            id="fields-swapped",
        ),
    ],
)
def test_divergent_header_is_refused(tmp_path, old, new):
    text = (ROOT / "ebpf" / "sliceproxy.h").read_text()
    assert old in text
    (tmp_path / "sliceproxy.h").write_text(text.replace(old, new, 1))
    code = (
        "from ctrl.dataplane import abi\n"
        "from ctrl.dataplane.libbpf import ffi, lib\n"
        f"obj = lib().bpf_object__open_file({str(loader.object_path())!r}.encode(), ffi.NULL)\n"
        "abi.check_btf(lib().bpf_object__btf(obj))\n"
    )
    env = {**os.environ, "SLICEPROXY_HEADER": str(tmp_path / "sliceproxy.h")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    assert "disagree" in r.stderr and "sp_svc_key" in r.stderr


def test_codecs_pack_fields_at_header_offsets():
    c = abi.codec("sp_svc_key")
    raw = c.pack(b"\x01" * 16, 0x1234, 6, 1)
    offs = dict((n, o) for n, o, _ in abi.describe("sp_svc_key"))
    assert raw[offs["port"] : offs["port"] + 2] == (0x1234).to_bytes(2, sys.byteorder)
    assert raw[offs["proto"]] == 6 and raw[offs["scope"]] == 1


def test_a_field_left_unnamed_packs_as_zeros_and_reads_back_by_name():
    """The keyword packer: a struct grown by a field the caller does not
    know of still packs, the new field zero (what makes a field added to a
    map value touch no test)."""
    full = abi.pack("sp_backend", addr=b"\x07" * 16, port=8080, proto=6, flags=1, drain_end=5)
    part = abi.pack("sp_backend", addr=b"\x07" * 16, port=8080, proto=6)
    assert len(part) == len(full) == abi.codec("sp_backend").size
    offs = {n: (o, s) for n, o, s in abi.describe("sp_backend")}
    o, s = offs["drain_end"]
    assert part[o : o + s] == bytes(s) and full[o : o + s] == (5).to_bytes(s, sys.byteorder)
    got = abi.unpack("sp_backend", part)
    assert {k: got[k] for k in ("addr", "port", "proto")} == {"addr": b"\x07" * 16, "port": 8080, "proto": 6}
    assert not [k for k, v in got.items() if k not in ("addr", "port", "proto") and v]  # the rest reads zero
    # A codec of some fields, in the caller's order, reads only those.
    assert abi.codec("sp_backend", ("port", "addr")).unpack(full) == (8080, b"\x07" * 16)


@pytest.mark.parametrize("n", [0, 1, abi.PACK_CHUNK - 1, abi.PACK_CHUNK, 2 * abi.PACK_CHUNK + 3])
@pytest.mark.parametrize(
    "fields", [("addr", "port", "proto"), ("port", "addr", "proto")], ids=["header-order", "other"]
)
@pytest.mark.parametrize("hint", ["none", "exact", "short", "long"])
def test_rows_packed_a_chunk_at_a_time_are_every_row_in_order(n, fields, hint):
    """pack_rows joins PACK_CHUNK entries at a time from an iterator: the
    result is still every row, in order, at the row's offset, across chunk
    edges; and exactly the rows whether the count it is told to size its
    buffer for is right, short of the rows or past them."""
    c = abi.codec("sp_backend", fields)

    def row(i):
        v = {"addr": i.to_bytes(16, "big"), "port": i % 65536, "proto": 6 if i % 2 else 17}
        return tuple(v[f] for f in fields)

    told = {"none": 0, "exact": n, "short": n // 3, "long": n + abi.PACK_CHUNK + 5}[hint]
    got = c.pack_rows((row(i) for i in range(n)), told)
    assert isinstance(got, bytes | bytearray) and len(got) == n * c.size
    for i in {0, n // 2, abi.PACK_CHUNK - 1, abi.PACK_CHUNK, n - 1} & set(range(n)):
        assert c.unpack(got[i * c.size : (i + 1) * c.size]) == row(i)


@pytest.mark.parametrize(
    "fields",
    [pytest.param(("addr", "colour"), id="unknown-field"), pytest.param(("port", "port"), id="twice")],
)
def test_a_field_the_header_lacks_is_a_layout_error(fields):
    with pytest.raises(abi.LayoutError, match="sp_backend"):
        abi.codec("sp_backend", fields)


def test_map_names_carry_the_header_layout_version():
    version = abi.const("SP_LAYOUT_VERSION")
    assert abi.map_name("sp_ct") == f"sp_ct_v{version}"
    assert abi.map_base(f"sp_ct_v{version}") == abi.map_base("sp_ct_v1") == "sp_ct"
    assert abi.map_names() == [f"{b}_v{version}" for b in abi.MAP_BASES]


def test_the_programs_map_names_follow_the_header(tmp_path):
    """SP_MAP() in ebpf/lib/maps.h pastes SP_LAYOUT_VERSION: the object
    built from a header of another version names its maps after it, and the
    control plane reading that header expects those names."""
    hdr = copy_sources(tmp_path) / "sliceproxy.h"
    version = abi.const("SP_LAYOUT_VERSION")
    hdr.write_text(hdr.read_text().replace(f"#define SP_LAYOUT_VERSION {version}", "#define SP_LAYOUT_VERSION 97"))
    obj = build_object(tmp_path)
    names = subprocess.run(["llvm-objdump", "-t", str(obj)], capture_output=True, text=True, check=True).stdout
    code = "from ctrl.dataplane import abi; print(' '.join(abi.map_names()))"
    env = {**os.environ, "SLICEPROXY_HEADER": str(hdr)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, check=True)
    expected = r.stdout.split()
    assert expected and all(n.endswith("_v97") for n in expected)
    for n in expected:
        assert f" {n}\n" in names, f"{n} not in the object built from a version-97 header"


def test_every_planner_symbol_has_its_header_value():
    assert {s: abi.SCOPE_VALUE[s] for s in Scope} == {
        Scope.INTERNAL: abi.const("SP_SCOPE_INTERNAL"),
        Scope.EXTERNAL: abi.const("SP_SCOPE_EXTERNAL"),
    }
    every = FrontendFlag.AFFINITY | FrontendFlag.SRC_RANGES | FrontendFlag.MASQ
    assert abi.frontend_flags(every) == (
        abi.const("SP_SVC_F_AFFINITY") | abi.const("SP_SVC_F_SRC_RANGES") | abi.const("SP_SVC_F_MASQ")
    )
    assert abi.frontend_flags(FrontendFlag(0)) == abi.const("SP_SVC_F_NONE")


def _header_constant_copies(root: Path) -> list[str]:
    """Module-level assignments of an integer literal to a name the header
    defines (SVC_F_MASQ = 4 for SP_SVC_F_MASQ): hand-made copies that
    drift when the header changes."""
    abi.const("SP_LAYOUT_VERSION")  # reads the header's constants
    names = set(abi.constants)
    copies = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            else:
                continue
            if not (isinstance(value, ast.Constant) and type(value.value) is int):
                continue
            for t in targets:
                if isinstance(t, ast.Name) and (t.id in names or f"SP_{t.id}" in names):
                    copies.append(f"{path.relative_to(root)}:{node.lineno}: {t.id} = {value.value}")
    return copies


def test_no_control_plane_module_copies_a_header_constant():
    copies = _header_constant_copies(ROOT / "ctrl")
    assert not copies, f"read these from ebpf/sliceproxy.h with ctrl.dataplane.abi.const instead: {copies}"


def test_the_copy_check_finds_a_copy(tmp_path):
    (tmp_path / "m.py").write_text("SVC_F_MASQ = 4\nOTHER = 4\nBE_F_DRAINING: int = 1\n")
    assert [c.split(": ", 1)[1] for c in _header_constant_copies(tmp_path)] == ["SVC_F_MASQ = 4", "BE_F_DRAINING = 1"]


def test_python_constants_named_after_the_header_have_its_values():
    seen = 0
    for name, value in vars(abi).items():
        header = f"SP_{name}"
        if header in abi.constants and type(value) is int:
            assert value == abi.const(header), name
            seen += 1
    assert seen >= 8  # the version, the scopes, the draining flag, the conntrack directions


def test_frontend_flags_follow_the_header(tmp_path):
    hdr = tmp_path / "sliceproxy.h"
    text = (ROOT / "ebpf" / "sliceproxy.h").read_text()
    hdr.write_text(text.replace("#define SP_SVC_F_MASQ 4", "#define SP_SVC_F_MASQ 64"))
    code = (
        "from ctrl.dataplane import abi; from ctrl.model.plan import FrontendFlag; "
        "print(abi.frontend_flags(FrontendFlag.MASQ | FrontendFlag.AFFINITY))"
    )
    env = {**os.environ, "SLICEPROXY_HEADER": str(hdr)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "65"
