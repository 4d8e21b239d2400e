"""The loaded program every datapath test runs packets through."""

import os

import pytest

from ctrl.dataplane import abi, loader

from .packets import HAIRPIN4, HAIRPIN6, mapped, set_uptime


@pytest.fixture
def dp():
    """A freshly loaded program with private (unpinned), empty maps, and
    the test range's hairpin addresses (HAIRPIN4, HAIRPIN6)."""
    if os.geteuid() != 0:
        pytest.fail(
            "the datapath tests load a BPF program and run it with BPF_PROG_TEST_RUN: "
            "they need root (run `sudo make test` or pytest as root)",
            pytrace=False,
        )
    d = loader.load(pin_dir=None, hairpin=abi.Hairpin(mapped(HAIRPIN4), mapped(HAIRPIN6)))
    try:
        yield d
    finally:
        d.close()


@pytest.fixture(params=[None, 5], ids=["machine-clock", "uptime-5s"])
def uptime(request, dp):
    """Tests that age entries run twice: on this machine's clock, and with
    the programs' clock reading 5 seconds, as in the first minute after
    boot, where "idle for 600 s" is a stamp before the clock's zero."""
    set_uptime(dp, request.param)
    return request.param
