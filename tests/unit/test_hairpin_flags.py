"""--hairpin-ipv4 / --hairpin-ipv6: parsed, checked per family, and turned
into the map-form addresses the loader writes into the program."""

from __future__ import annotations

import ipaddress

import pytest

from ctrl.cli import parser as cli
from ctrl.dataplane.abi import Hairpin
from ctrl.util.addrs import addr16


def hairpin(*argv: str) -> Hairpin:
    return cli._hairpin(cli.build_parser().parse_args(["run", "--source", "x", *argv]))


def test_defaults_are_reserved_addresses_of_each_family():
    h = hairpin()
    a4 = ipaddress.ip_address(cli.DEFAULT_HAIRPIN4)
    a6 = ipaddress.ip_address(cli.DEFAULT_HAIRPIN6)
    # IPv4 link-local, in the block RFC 3927 keeps hosts from choosing;
    # IPv6 the discard-only block (RFC 6666), never link-local (neighbour
    # discovery on the pod's link would find no one).
    assert a4 in ipaddress.ip_network("169.254.255.0/24")
    assert a6 in ipaddress.ip_network("100::/64") and not a6.is_link_local
    assert h == Hairpin(addr16(cli.DEFAULT_HAIRPIN4), addr16(cli.DEFAULT_HAIRPIN6))


def test_each_family_is_set_or_turned_off_on_its_own():
    assert hairpin("--hairpin-ipv4", "198.18.255.254", "--hairpin-ipv6", "") == Hairpin(addr16("198.18.255.254"), None)
    assert hairpin("--hairpin-ipv4", "", "--hairpin-ipv6", "2001:db8::fe") == Hairpin(None, addr16("2001:db8::fe"))


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--hairpin-ipv4", "2001:db8::fe"),  # the other family
        ("--hairpin-ipv6", "198.18.255.254"),
        ("--hairpin-ipv4", "198.18.255.300"),
        ("--hairpin-ipv4", "0.0.0.0"),
        ("--hairpin-ipv4", "224.0.0.1"),
        ("--hairpin-ipv4", "127.0.0.1"),
        ("--hairpin-ipv6", "::"),
        ("--hairpin-ipv6", "ff02::1"),
        ("--hairpin-ipv6", "::1"),
    ],
)
def test_anything_but_a_unicast_address_of_the_flags_family_is_refused(flag, value):
    with pytest.raises(SystemExit, match=f"{flag}: '{value}' is not a unicast IPv{flag[-1]} address"):
        hairpin(flag, value)
