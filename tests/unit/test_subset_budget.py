"""The subsetter's write bounds: the token bucket over all its writes, and
its flags refused by name (docs/subsetting.md, "Coalesced writes")."""

from __future__ import annotations

import pytest

from ctrl.cli import parser
from ctrl.cli.subsetter import cmd_subsetter
from ctrl.subset.controller import Budget


def test_a_burst_then_the_rate():
    b = Budget(rate=4.0, burst=3, now=100.0)
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert b.ready_at(100.0) == 100.25
    assert not b.take(100.125)
    assert b.take(100.25)
    assert not b.take(100.25)
    # Idle a long time: the bucket holds `burst`, not more.
    assert [b.take(200.0) for _ in range(4)] == [True, True, True, False]


def test_a_clock_going_back_refills_nothing():
    b = Budget(rate=1.0, burst=1, now=50.0)
    assert b.take(50.0)
    assert not b.take(49.0)
    assert b.ready_at(49.0) == pytest.approx(50.0)


def test_rate_zero_is_no_bound():
    b = Budget(rate=0.0, burst=1, now=0.0)
    assert all(b.take(0.0) for _ in range(1000))


@pytest.mark.parametrize(
    "flag,value,says",
    [
        ("--write-period", "0", "--write-period: 0.0 is not a number of seconds above 0"),
        ("--write-qps", "-1", "--write-qps: -1.0 is not a rate"),
        ("--write-burst", "0", "--write-burst: 0 is not a count"),
    ],
)
def test_bad_write_bounds_are_refused_naming_the_flag(flag, value, says):
    args = parser.build_parser().parse_args(["subsetter", "--kubeconfig", "/nonexistent", flag, value])
    with pytest.raises(SystemExit, match=says):
        cmd_subsetter(args)
