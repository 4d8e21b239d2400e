"""The C header is the one source of layouts; the compiled object must agree."""

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


def test_python_constants_match_the_header():
    from ctrl import diff, plan

    assert plan.SVC_F_AFFINITY == layout.const("SP_SVC_F_AFFINITY")
    assert diff.BE_F_DRAINING == layout.const("SP_BE_F_DRAINING")
    assert plan.SCOPE_INTERNAL == layout.const("SP_SCOPE_INTERNAL")
    assert plan.SCOPE_EXTERNAL == layout.const("SP_SCOPE_EXTERNAL")
