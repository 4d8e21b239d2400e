"""The C header is the one source of layouts; the compiled object must agree."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctrl import layout
from ctrl.libbpf import ffi, lib

ROOT = Path(__file__).resolve().parents[2]


def _btf_of_object():
    obj = lib().bpf_object__open_file(str(layout.object_path()).encode(), ffi.NULL)
    assert obj != ffi.NULL, f"cannot open {layout.object_path()}: run make"
    return obj, lib().bpf_object__btf(obj)


def test_header_matches_compiled_object_btf():
    obj, btf = _btf_of_object()
    try:
        layout.check_btf(btf)
        for s in layout.struct_names():
            size, members = layout.btf_struct(btf, s)
            assert size == layout.codec(s).size
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
        "from ctrl import layout\n"
        "from ctrl.libbpf import ffi, lib\n"
        f"obj = lib().bpf_object__open_file({str(layout.object_path())!r}.encode(), ffi.NULL)\n"
        "layout.check_btf(lib().bpf_object__btf(obj))\n"
    )
    env = {**os.environ, "SLICEPROXY_HEADER": str(tmp_path / "sliceproxy.h")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    assert "disagree" in r.stderr and "sp_svc_key" in r.stderr


def test_codecs_pack_fields_at_header_offsets():
    c = layout.codec("sp_svc_key")
    raw = c.pack(b"\x01" * 16, 0x1234, 6, 1)
    offs = dict((n, o) for n, o, _ in layout.describe("sp_svc_key"))
    assert raw[offs["port"] : offs["port"] + 2] == (0x1234).to_bytes(2, sys.byteorder)
    assert raw[offs["proto"]] == 6 and raw[offs["scope"]] == 1


def _header_constant_copies(root: Path) -> list[str]:
    """Module-level assignments of an integer literal to a name the header
    defines (SVC_F_MASQ = 4 for SP_SVC_F_MASQ): hand-made copies that
    drift when the header changes."""
    layout.const("SP_LAYOUT_VERSION")  # reads the header's constants
    names = set(layout.constants)
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
    assert not copies, f"read these from ebpf/sliceproxy.h with ctrl.layout.const instead: {copies}"


def test_the_copy_check_finds_a_copy(tmp_path):
    (tmp_path / "m.py").write_text("SVC_F_MASQ = 4\nOTHER = 4\nBE_F_DRAINING: int = 1\n")
    assert [c.split(": ", 1)[1] for c in _header_constant_copies(tmp_path)] == ["SVC_F_MASQ = 4", "BE_F_DRAINING = 1"]


def test_python_constants_named_after_the_header_have_its_values():
    from ctrl import apply, diff, dump, plan

    seen = 0
    for mod in (plan, diff, apply, dump):
        for name, value in vars(mod).items():
            header = f"SP_{name}"
            if header in layout.constants and type(value) is int:
                assert value == layout.const(header), (mod.__name__, name)
                seen += 1
    assert seen >= 6  # the scopes, three frontend flags, the draining flag


def test_planner_flags_follow_the_header(tmp_path):
    hdr = tmp_path / "sliceproxy.h"
    text = (ROOT / "ebpf" / "sliceproxy.h").read_text()
    hdr.write_text(text.replace("#define SP_SVC_F_MASQ 4", "#define SP_SVC_F_MASQ 64"))
    code = "from ctrl import plan; print(plan.SVC_F_MASQ)"
    env = {**os.environ, "SLICEPROXY_HEADER": str(hdr)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "64"
