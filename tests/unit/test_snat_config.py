"""--snat-reclaim-closed: parsed, checked, carried into NodeConfig and shown
by --dry-run next to the other SNAT settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctrl.apply import NodeConfig, cfg_codec
from ctrl.cli import build_parser, main
from ctrl.objects import addr16

NODE_YAML = """apiVersion: v1
kind: Node
metadata:
  name: node-a
status:
  addresses:
  - type: InternalIP
    address: 198.18.250.1
"""


def test_defaults():
    args = build_parser().parse_args(["run", "--source", "x"])
    assert (args.snat_reclaim, args.snat_reclaim_closed) == (600, 10)
    assert NodeConfig().snat_reclaim_closed == 10


def test_cfg_codec_round_trips_the_new_field():
    c = cfg_codec()
    raw = c.pack(addr16("198.18.250.1"), b"\0" * 16, 61000, 61003, 600, 7)
    assert c.unpack(raw)[4:] == (600, 7)


@pytest.mark.parametrize("flag", ["--snat-reclaim", "--snat-reclaim-closed"])
def test_negative_seconds_refused(tmp_path: Path, flag: str):
    with pytest.raises(SystemExit, match=flag):
        main(["run", "--source", str(tmp_path), "--dry-run", flag, "-1"])


def test_dry_run_prints_the_node_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "node.yaml").write_text(NODE_YAML)
    argv = ["run", "--source", str(tmp_path), "--node-name", "node-a", "--dry-run", "--output", "json"]
    rc = main([*argv, "--snat-port-range", "61000-61003", "--snat-reclaim", "300", "--snat-reclaim-closed", "3"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["sp_cfg_v3"] == [
        {
            "key": 0,
            "value": {
                "addr4": "198.18.250.1",
                "addr6": None,
                "snat_port_min": 61000,
                "snat_port_max": 61003,
                "snat_reclaim": 300,
                "snat_reclaim_closed": 3,
            },
        }
    ]
