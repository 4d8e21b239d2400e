"""ctrl.cli.run.build_agent: the one place `sliceproxy run` (and the bench,
scripts/bench/ours.py) builds its agent, from the run flags' own parser."""

from __future__ import annotations

import json
import logging
import urllib.request

import pytest

from ctrl.cli import parser, run
from ctrl.dataplane import native
from ctrl.model import maglev
from ctrl.runtime.settings import Settings


class NoSource:
    events = None
    synced = True


def options(*flags: str) -> Settings:
    return parser.settings(parser.build_parser().parse_args(["run", "--node-name", "node-a", *flags]))


def test_the_defaults_build_metrics_health_and_the_drain_period():
    # Free ports on loopback instead of the defaults' fixed ones; nothing else changed.
    opts = options("--metrics-bind-address", "127.0.0.1:0", "--healthz-bind-address", "127.0.0.1:0")
    agent = run.build_agent(opts, NoSource())
    assert agent.metrics is not None and agent.health_checks is not None
    assert agent.programmed.drain_period == 60.0
    assert agent.schedule.resync_period == 60.0 and agent.schedule.min_sync_period is None  # auto
    assert agent.programmed.capacity == opts.sizes
    assert agent.settings == opts
    assert (opts.snat_ports, opts.snat_reclaim, opts.snat_reclaim_closed) == ((61000, 65535), 600, 10)


def test_the_servers_answer(tmp_path):
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    opts = options("--metrics-bind-address", f"127.0.0.1:{ports[0]}", "--healthz-bind-address", f"127.0.0.1:{ports[1]}")
    agent = run.build_agent(opts, NoSource())
    agent.metrics.changes_seen("EndpointSlice", 3)
    with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/metrics", timeout=10) as r:
        assert "kubeproxy_sync_proxy_rules_endpoint_changes_total 3.0" in r.read().decode()
    with pytest.raises(urllib.error.HTTPError) as e:  # before the first sync: unhealthy
        urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/healthz", timeout=10)
    assert e.value.code == 503 and "lastUpdated" in json.loads(e.value.read())


def test_a_dry_run_serves_nothing_and_drains_nothing():
    agent = run.build_agent(options("--dry-run"), NoSource())
    assert agent.metrics is None and agent.health_checks is None
    assert agent.programmed.drain_period == 0.0


def test_empty_addresses_turn_the_servers_off():
    agent = run.build_agent(options("--metrics-bind-address", "", "--healthz-bind-address", ""), NoSource())
    assert agent.metrics is None
    assert agent.health_checks is not None  # health check node ports are the Services', not a flag's


@pytest.mark.parametrize(
    "flag", ["--max-services", "--max-backends", "--max-slots", "--max-conntrack", "--max-source-ranges"]
)
def test_a_map_capacity_below_one_is_refused_naming_the_flag(flag):
    with pytest.raises(SystemExit, match=f"{flag}: 0 is not a map capacity"):
        options(flag, "0")


@pytest.mark.parametrize(("value", "want"), [("auto", None), ("0", 0.0), ("0.25", 0.25)])
def test_the_min_sync_period_is_a_number_of_seconds_or_auto(value, want):
    assert options("--min-sync-period", value).min_sync_period == want


@pytest.mark.parametrize("value", ["-1", "soon", "nan"])
def test_a_min_sync_period_neither_seconds_nor_auto_is_refused_naming_the_flag(value, capsys):
    with pytest.raises(SystemExit):
        options("--min-sync-period", value)
    err = capsys.readouterr().err
    assert "--min-sync-period" in err and f"{value!r} is not a number of seconds (0 or more) or auto" in err


@pytest.mark.parametrize(
    "flags,want",
    [
        pytest.param((), ("auto", False), id="default-auto-no-forwarding"),
        pytest.param(("--xdp", "generic"), ("generic", False), id="generic"),
        pytest.param(("--xdp", "off"), ("off", False), id="off"),
        pytest.param(("--xdp", "native", "--xdp-forward"), ("native", True), id="native-forwarding"),
    ],
)
def test_xdp_flags(flags, want):
    opts = options(*flags)
    assert (opts.xdp, opts.xdp_forward) == want


def test_an_unknown_xdp_mode_is_refused(capsys):
    with pytest.raises(SystemExit):
        options("--xdp", "offload")
    assert "--xdp: invalid choice: 'offload'" in capsys.readouterr().err


def test_maglev_without_the_c_helper_warns_once_and_still_builds(monkeypatch, caplog):
    off = ("--metrics-bind-address", "", "--healthz-bind-address", "")
    with caplog.at_level(logging.WARNING, logger="sliceproxy"):
        run.build_agent(options("--external-lb", "maglev", *off), NoSource())
    assert "libsliceproxy.so" not in caplog.text  # built by make: found
    monkeypatch.setattr(native, "library", lambda: None)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sliceproxy"):
        run.build_agent(options("--external-lb", "random", *off), NoSource())
        assert caplog.text == ""  # random mode builds no table
        agent = run.build_agent(options("--external-lb", "maglev", *off), NoSource())
    assert "--external-lb=maglev" in caplog.text and "libsliceproxy.so" in caplog.text
    assert agent.programmed.maglev_size == maglev.DEFAULT_SIZE
