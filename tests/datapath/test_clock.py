"""Tier 2: the programs' clock, and ages read back from stamps.

Every stamp the programs write (conntrack last_seen, affinity last_used) is
bpf_ktime_get_ns(), CLOCK_MONOTONIC, which starts near zero at boot; ages
are computed modulo 2**64, so a flow idle longer than the uptime has a stamp
that wrapped below zero, and one stamped on another CPU a moment later is
ahead of now. The `uptime` fixture runs a test twice: on this machine's
clock, and with the programs' clock shifted to read 5 seconds.
"""

from __future__ import annotations

import pytest

from ctrl.cli import dump

from .packets import (
    FORWARD,
    NS,
    TC_ACT_OK,
    TCP_P,
    VIP,
    Backend,
    CtKey,
    CtVal,
    Seed,
    Svc,
    ct_dump,
    prog_now,
    put_ct,
    run,
    seed,
    set_uptime,
    stamp,
    tcp,
)

CLIENT = "198.18.1.1"
BE = Backend(1, "198.18.2.1", 8080, TCP_P)
WEB = Svc(VIP, 80, TCP_P, svc_id=10, slots=(BE.id,))


def test_the_programs_run_at_the_uptime_the_test_sets(dp):
    """Not vacuous: with the clock shifted, a new flow is stamped about 5 s
    after boot, whatever this machine's uptime."""
    seed(dp, Seed(services=(WEB,), backends=(BE,)))
    set_uptime(dp, 5)
    r = run(dp, tcp(CLIENT, VIP, 40000, 80))
    assert r.retval == TC_ACT_OK and r.counted.keys() == {"DNAT_NEW"}
    stamps = {k.dir: last for k, (_, last) in ct_dump(dp).items()}
    assert stamps and all(5 * NS <= s < 65 * NS for s in stamps.values()), stamps
    set_uptime(dp, None)
    r = run(dp, tcp(CLIENT, VIP, 40001, 80))
    fwd = ct_dump(dp)[CtKey(CLIENT, VIP, 40001, 80, TCP_P, FORWARD)][1]
    assert r.t0 <= fwd <= r.t1


@pytest.mark.parametrize(
    "idle,shown",
    [
        pytest.param(3, 3.0, id="three-seconds"),
        # Longer than the uptime in the uptime-5s runs: the stamp wrapped.
        pytest.param(600, 600.0, id="ten-minutes"),
        pytest.param(86400 * 3, 259200.0, id="three-days"),
        # Ahead of now: a packet on another CPU stamped it after we read the clock.
        pytest.param(-1, 0.0, id="ahead-of-now"),
    ],
)
def test_dump_shows_the_idle_time_of_any_stamp(dp, uptime, idle, shown):
    seed(dp, Seed(services=(WEB,), backends=(BE,)))
    key = CtKey(CLIENT, VIP, 40000, 80, TCP_P, FORWARD)
    put_ct(dp, key, CtVal(BE.addr, BE.port, BE.id, WEB.svc_id), stamp(dp, idle))
    (flow,) = dump.conntrack(dp.maps, now=prog_now(dp))
    assert flow["client"] == f"{CLIENT}:40000" and flow["frontend"] == f"{VIP}:80"
    assert abs(flow["idle_seconds"] - shown) <= 0.2, flow
