"""Build the BPF object from an edited copy of ebpf/ (a header of another
layout version, an old release), with the Makefile's own rule and flags."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_sources(tree: Path) -> Path:
    """ebpf/ and the Makefile copied under `tree`; returns the copy's ebpf/."""
    shutil.copytree(REPO / "ebpf", tree / "ebpf")
    shutil.copy(REPO / "Makefile", tree / "Makefile")
    return tree / "ebpf"


def build_object(tree: Path) -> Path:
    """`make build/sliceproxy_tc.bpf.o` in a tree made by copy_sources (the
    packages are there already: deps is skipped); returns the object."""
    subprocess.run(
        ["make", "-s", "-C", str(tree), "-o", "deps", "build/sliceproxy_tc.bpf.o"],
        check=True,
        capture_output=True,
        text=True,
    )
    return tree / "build" / "sliceproxy_tc.bpf.o"
