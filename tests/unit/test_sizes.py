"""The --max-* flags: every bounded map the control plane fills has one."""

from __future__ import annotations

import pytest

from ctrl.cli.parser import build_parser, map_sizes
from ctrl.dataplane import loader
from ctrl.dataplane.abi import MapSizes


def test_every_flag_reaches_its_map():
    args = build_parser().parse_args(
        ["run", "--source", "x", "--max-services", "11", "--max-backends", "12", "--max-slots", "13",
         "--max-conntrack", "14", "--max-source-ranges", "15", "--max-maglev-entries", "16001"]
    )  # fmt: skip
    sizes = map_sizes(args)
    got = {name: sizes.for_map(name) for name in loader.map_names()}
    names = {n.rsplit("_v", 1)[0]: v for n, v in got.items()}
    assert names == {
        "sp_svc": 11,
        "sp_names": 11,
        "sp_be": 12,
        "sp_slot": 13,
        "sp_ct": 14,
        "sp_aff": 14,
        "sp_src": 15,
        "sp_mgl": 17,  # chunks of 1,000 table entries, rounded up
        "sp_mglptr": 11,  # a pointer per frontend at most
        "sp_stats": None,  # one entry per verdict
        "sp_handoff": None,  # one entry
        "sp_cfg": None,  # one entry
        "sp_host": None,  # one entry
        "sp_sock": None,  # socket-local storage: one entry per socket, no capacity
        "sp_frag": None,  # fragmented datagrams in flight: fixed, LRU
        "sp_trace": None,  # one entry per CPU
        "sp_events": None,  # a ring buffer of fixed bytes
        "sp_uplinks": None,  # the external interfaces with XDP: a few
    }


def test_defaults():
    args = build_parser().parse_args(["run", "--source", "x"])
    assert map_sizes(args) == MapSizes()


@pytest.mark.parametrize("flag", ["--max-services", "--max-source-ranges"])
def test_zero_entries_refused(flag):
    args = build_parser().parse_args(["run", "--source", "x", flag, "0"])
    with pytest.raises(SystemExit, match=flag):
        map_sizes(args)
