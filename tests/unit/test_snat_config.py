"""--snat-reclaim-closed: parsed, checked, carried into NodeConfig and shown
by --dry-run next to the other SNAT settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctrl.cli import main
from ctrl.cli.parser import build_parser
from ctrl.dataplane import abi
from ctrl.dataplane.abi import NodeConfig
from ctrl.util.addrs import addr16

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


def test_node_config_round_trips_the_new_field():
    raw = NodeConfig(addr16("198.18.250.1"), None, (61000, 61003), 600, 7).packed()
    v = abi.unpack("sp_cfg", raw)
    assert (v["snat_reclaim"], v["snat_reclaim_closed"]) == (600, 7)


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
    assert doc[abi.map_name("sp_cfg")] == [
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
