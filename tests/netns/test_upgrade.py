"""Tier 3: an upgrade across a map layout change keeps established flows.

The "old release" is this tree with its layout version set to 0 and two
structs reordered (backend_id and svc_id of the conntrack value swap
places, as do port and proto of the backend): its own object built from its
own header, run by the same agent code. Established connections through it
must survive the new release taking over its pinned maps."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from .agent import finish_client, start_client
from .conftest import THREE, VIP, Agents, assert_spread, http, web_backends
from .topo import Topology

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]


def build_old_release(out: Path) -> tuple[Path, Path]:
    hdr = (REPO / "ebpf" / "sliceproxy.h").read_text()
    hdr = hdr.replace("#define SP_LAYOUT_VERSION 2", "#define SP_LAYOUT_VERSION 0")
    ct_fields = (
        "\t__u32 backend_id;  /* backend the flow was given */\n"
        "\t__u32 svc_id;      /* service the flow was given by */\n"
    )
    assert ct_fields in hdr
    hdr = hdr.replace(ct_fields, "\t__u32 svc_id;\n\t__u32 backend_id;\n")
    be_fields = "\t__u16 port;    /* backend port, host order */\n\t__u8 proto;    /* IPPROTO_* */\n"
    assert be_fields in hdr
    hdr = hdr.replace(be_fields, "\t__u8 proto;\n\t__u8 pad0;\n\t__u16 port;\n").replace(
        "\t__u8 pad;      /* zero */\n};\n\n/* sp_ct_v2", "\t__u8 pad1[2];\n};\n\n/* sp_ct_v2", 1
    )
    src = (REPO / "ebpf" / "sliceproxy_tc.bpf.c").read_text()
    src = re.sub(r"\b(sp_[a-z]+)_v2\b", r"\1_v0", src)
    (out / "sliceproxy.h").write_text(hdr)
    (out / "sliceproxy_tc.bpf.c").write_text(src)
    arch = os.uname().machine
    # The Makefile's BPF_CFLAGS (-mcpu=v3: the programs use BPF atomics).
    subprocess.run(
        ["clang", "-O2", "-g", "-target", "bpf", "-mcpu=v3", f"-I/usr/include/{arch}-linux-gnu", f"-I{out}", "-c",
         str(out / "sliceproxy_tc.bpf.c"), "-o", str(out / "old.bpf.o")],
        check=True,
    )  # fmt: skip
    return out / "old.bpf.o", out / "sliceproxy.h"


def test_upgrade_across_a_layout_change_keeps_established_connections(
    topo: Topology, agents: Agents, tmp_path: Path
) -> None:
    obj, hdr = build_old_release(tmp_path)
    old_env = {"SLICEPROXY_BPF_OBJECT": str(obj), "SLICEPROXY_HEADER": str(hdr)}
    saved = {k: os.environ.get(k) for k in old_env}
    os.environ.update(old_env)  # inherited by the agent started next
    try:
        old = agents.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    # `sliceproxy dump` of this release reads _v2 maps: follow the old
    # release through its log instead.
    old.wait_log(r"sync \(full\): 1 services changed")
    old.wait_attached(p.host_if for p in topo.pods.values())
    assert sorted(p.name for p in agents.pin_dir.iterdir() if p.name.endswith("_v0"))
    assert_spread(http(topo), THREE)

    # Six long-lived connections through the old release. Without their
    # conntrack entries carried over, each would be re-balanced (and reset
    # by its new backend) with probability 2/3.
    lines = 120
    echoes = [
        start_client(topo, "client", "echo", "--target", f"{VIP}:8081", "--count", str(lines),
                     "--interval", "0.05", "--timeout", "2")
        for _ in range(6)
    ]  # fmt: skip
    try:
        assert old.terminate() == 0
        new = agents.start()
        agents.wait_ready(new)
        new.wait_log(r"migrated \d+ entries of sp_ct_v0 into sp_ct_v2")
        assert all(e.poll() is None for e in echoes), "a connection ended before the upgrade; the test proved nothing"
        results = [finish_client(topo, e, timeout=60) for e in echoes]
    finally:
        for e in echoes:
            if e.poll() is None:
                topo.stop(e)
    for res in results:
        assert res["errors"] == 0, res["error_samples"]
        assert len(res["counts"]) == 1 and sum(res["counts"].values()) == lines, res["counts"]
    names = sorted(p.name for p in agents.pin_dir.iterdir())
    assert not [n for n in names if n.endswith("_v0")], names
    assert_spread(http(topo), THREE)
    agents.wait(web_backends(*THREE))
