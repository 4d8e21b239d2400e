"""The loaded program every datapath test runs packets through."""

import os

import pytest

from ctrl import loader


@pytest.fixture
def dp():
    """A freshly loaded program with private (unpinned), empty maps."""
    if os.geteuid() != 0:
        pytest.fail(
            "the datapath tests load a BPF program and run it with BPF_PROG_TEST_RUN: "
            "they need root (run `sudo make test` or pytest as root)",
            pytrace=False,
        )
    d = loader.load(pin_dir=None)
    try:
        yield d
    finally:
        d.close()
