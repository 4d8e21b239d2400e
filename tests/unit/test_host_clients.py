"""Host clients' flags, and finding the cgroup v2 hierarchy in mountinfo."""

from __future__ import annotations

import socket

import pytest

from ctrl.cli import parser
from ctrl.dataplane import hostclients, sockdiag


def options(*flags: str):
    return parser.settings(parser.build_parser().parse_args(["run", "--source", "x", *flags]))


def test_host_clients_default_auto_on_the_cgroup2_root():
    opts = options()
    assert (opts.host_clients, opts.cgroup) == ("auto", None)


def test_host_clients_flags(tmp_path):
    opts = options("--host-clients", "on", "--cgroup", str(tmp_path))
    assert (opts.host_clients, opts.cgroup) == ("on", str(tmp_path))


def test_cgroup_must_be_a_directory(tmp_path):
    with pytest.raises(SystemExit, match="--cgroup"):
        options("--cgroup", str(tmp_path / "nope"))


def test_host_clients_takes_three_values(capsys):
    with pytest.raises(SystemExit):
        options("--host-clients", "yes")
    assert "--host-clients" in capsys.readouterr().err


MOUNTINFO = """\
22 1 0:21 / /proc rw,nosuid - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 31 0:40 / /mnt/with\\040space rw - cgroup2 none rw
"""


@pytest.mark.parametrize(
    "text, want",
    [
        (MOUNTINFO, ["/sys/fs/cgroup/unified", "/mnt/with space"]),
        ("25 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n", ["/sys/fs/cgroup"]),
        ("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n", []),
    ],
    ids=["hybrid", "unified", "v1-only"],
)
def test_cgroup2_mounts(tmp_path, text, want):
    f = tmp_path / "mountinfo"
    f.write_text(text)
    assert hostclients.cgroup2_mounts(str(f)) == want


def test_sock_diag_destination_in_map_form():
    """A dumped socket's destination as the maps hold a backend: IPv4
    mapped, from an AF_INET socket's first 4 bytes."""
    dst4 = socket.inet_aton("198.18.1.11") + bytes(12)
    sid = sockdiag._SOCKID.pack(40000, 5353, bytes(16), dst4) + sockdiag._SOCKID_REST.pack(0, bytes(8))
    assert sockdiag._dest(socket.AF_INET, sid) == (b"\0" * 10 + b"\xff\xff" + socket.inet_aton("198.18.1.11"), 5353)
    dst6 = socket.inet_pton(socket.AF_INET6, "2001:db8::11")
    sid = sockdiag._SOCKID.pack(40000, 53, bytes(16), dst6) + sockdiag._SOCKID_REST.pack(0, bytes(8))
    assert sockdiag._dest(socket.AF_INET6, sid) == (dst6, 53)
