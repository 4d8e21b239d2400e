"""Tier 3: an upgrade across a map layout change keeps established flows.

The "old release" is this tree with layout version 2's 128-byte names and
two structs reordered (backend_id and svc_id of the conntrack value swap
places, as do port and proto of the backend): its own object built from its
own header, run by the same agent code. Established connections through it
must survive the new release taking over its pinned maps. Its backends keep
their drain deadline (this tree's agent needs it); the migration of layout
2's real backend entries, which had none, is tested with entries written
straight into an old object's maps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.harness.topo import Topology

from ..bpfbuild import build_object, copy_sources
from .agent import finish_client, start_client
from .conftest import THREE, VIP, Agents, assert_spread, http, web_backends

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
OLD = 2  # the layout version the old release pins its maps under


def build_old_release(out: Path, v2_backend: bool = False) -> tuple[Path, Path]:
    """The old object and header; with v2_backend the backend loses its
    drain deadline, as in layout 2, and the frontend its slot table id, as
    in layouts 2 and 3 (this tree's agent cannot run that).
    The programs name their maps after the header's SP_LAYOUT_VERSION, so
    the header is all that changes."""
    src = copy_sources(out)
    hdr = (src / "sliceproxy.h").read_text()
    m = re.search(r"#define SP_LAYOUT_VERSION (\d+)", hdr)
    assert m is not None and int(m.group(1)) > OLD
    hdr = hdr.replace(m.group(0), f"#define SP_LAYOUT_VERSION {OLD}")
    # Version 2's names were 128 bytes, and its backend had no drain deadline.
    drain = re.search(r"\t__u32 pad; +/\* zero \*/\n\t__u64 drain_end;.*?\*/\n", hdr, re.S)
    assert drain is not None
    slots_id = re.search(r"\t__u32 slots_id;.*?\*/\n", hdr, re.S)
    assert slots_id is not None
    if v2_backend:
        hdr = hdr.replace(drain.group(0), "")
        hdr = hdr.replace(slots_id.group(0), "")
        # Its frontends read the slots of their own id, as layout 3's did.
        lb = (src / "lib" / "lb.h").read_text()
        own = "return svc->slots_id ? svc->slots_id : svc->svc_id;"
        assert own in lb
        (src / "lib" / "lb.h").write_text(lb.replace(own, "return svc->svc_id;"))
    name = re.search(r"\tchar name\[(\d+)\];", hdr)
    assert name is not None and int(name.group(1)) > 128
    hdr = hdr.replace(name.group(0), "\tchar name[128];")
    ct_fields = (
        "\t__u32 backend_id;  /* backend the flow was given */\n"
        "\t__u32 svc_id;      /* service the flow was given by */\n"
    )
    assert ct_fields in hdr
    hdr = hdr.replace(ct_fields, "\t__u32 svc_id;\n\t__u32 backend_id;\n")
    be_fields = re.search(r"\t__u16 port; +/\* backend port, host order \*/\n\t__u8 proto; +/\* IPPROTO_\* \*/\n", hdr)
    assert be_fields is not None
    hdr = hdr.replace(be_fields.group(0), "\t__u8 proto;\n\t__u8 pad0;\n\t__u16 port;\n")
    (src / "sliceproxy.h").write_text(hdr)
    return build_object(out), src / "sliceproxy.h"


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
    # `sliceproxy dump` of this release reads the current layout's maps:
    # follow the old release through its log instead.
    old.wait_log(r"sync \(full\): 1 services changed")
    old.wait_attached(p.host_if for p in topo.pods.values())
    assert sorted(p.name for p in agents.pin_dir.iterdir() if p.name.endswith(f"_v{OLD}"))
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
        new.wait_log(rf"migrated \d+ entries of sp_ct_v{OLD} into sp_ct_v\d+")
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
    assert not [n for n in names if n.endswith(f"_v{OLD}")], names
    assert_spread(http(topo), THREE)
    agents.wait(web_backends(*THREE))


OLD_WRITER = """
import sys
from ctrl.dataplane import abi, loader
dp = loader.load(None, sys.argv[1])
names, backends = dp.maps[abi.map_name("sp_names")], dp.maps[abi.map_name("sp_be")]
names.update(abi.u32(7), abi.pack("sp_svc_name", name=sys.argv[2].encode()))
addr = bytes(10) + b"\\xff\\xff" + bytes([198, 18, 1, 11])
backends.update(abi.u32(3), abi.pack("sp_backend", addr=addr, port=8080, proto=6, flags=1))
vip = bytes(10) + b"\\xff\\xff" + bytes([198, 19, 0, 10])
dp.maps[abi.map_name("sp_svc")].update(
    abi.pack("sp_svc_key", addr=vip, port=80, proto=6, scope=0),
    abi.pack("sp_svc_val", svc_id=7, count=1, flags=0, affinity_timeout=0),
)
dp.maps[abi.map_name("sp_slot")].update(
    abi.pack("sp_slot_key", svc_id=7, slot=0), abi.pack("sp_slot_val", backend_id=3)
)
dp.maps[abi.map_name("sp_mgl")].update(abi.pack("sp_mgl_key", id=1, chunk=0), bytes(4 * abi.MGL_CHUNK))
dp.close()
"""


def test_migration_carries_a_name_into_the_longer_array(tmp_path: Path, pin_dir: Path) -> None:
    """Version 2's 128-byte names go into the longer array whole: the new
    agent reads each frontend's owner from its name. A frontend of a layout
    without slot table ids gets 0, which reads its own svc_id's slots. Its
    Maglev map is not carried."""
    from ctrl.dataplane import abi, loader, migrate
    from ctrl.dataplane.abi import read_contents
    from ctrl.model.plan import Scope
    from ctrl.util.addrs import addr16

    obj, hdr = build_old_release(tmp_path, v2_backend=True)
    name = "n" * 50 + "/" + "s" * 63 + ":http/TCP"  # 123 bytes: fits version 2
    env = {**os.environ, "SLICEPROXY_BPF_OBJECT": str(obj), "SLICEPROXY_HEADER": str(hdr)}
    subprocess.run([sys.executable, "-c", OLD_WRITER, str(pin_dir), name], env=env, cwd=REPO, check=True)
    dp = loader.load(pin_dir=str(pin_dir))
    try:
        carry = migrate.Carry(str(pin_dir), dp.maps)
        assert carry.copy() >= 2
        mc = read_contents(dp.maps)
        assert mc.names == {7: name}
        assert mc.backends == {3: (addr16("198.18.1.11"), 8080, 6)}
        key = (addr16("198.19.0.10"), 80, 6, Scope.INTERNAL)
        assert mc.svc == {key: (7, 1, 0, 0, 7)} and mc.slots == {(7, 0): 3}
        ((_, raw),) = dp.maps[abi.map_name("sp_svc")].items()
        assert abi.Codecs.get().svc_val.unpack(raw)[4] == 0
        # Flagged draining by version 2, which kept no deadline: none is
        # made up (the first full sync starts a drain period).
        assert mc.draining == {}
        # Maglev tables of a layout before 5 are not carried (the first
        # sync writes them anew); their old pin goes all the same.
        assert mc.maglev == {} and migrate.rebuilt(str(pin_dir / f"sp_mgl_v{OLD}"))
        carry.finish()
        assert not [p.name for p in pin_dir.iterdir() if p.name.endswith(f"_v{OLD}")]
    finally:
        dp.close()
