"""The container images of the node tier (docs/architecture.md, "Test tiers"), built by
scripts/build-images.sh, and podman run with the same settings as that
script (its own containers.conf, registries.conf and image store under the
image cache, never the machine's /etc).

``image(name)`` asks the script for an image, which builds it first when
the tree changed since the cached one (the cache key hashes what the image
copies), so a test always runs the code of this checkout.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "build-images.sh"
PODMAN_CONF = REPO / "scripts" / "podman"
RUNROOT = "/run/sliceproxy-podman"


class Image(NamedTuple):
    archive: Path  # docker-archive, what `ctr images import` reads
    ref: str  # the full name in podman's store and in the archive


class ImageError(RuntimeError):
    """An image could not be built or found."""


def image_cache() -> Path:
    """Same path logic as scripts/build-images.sh."""
    if c := os.environ.get("SLICEPROXY_IMAGE_CACHE"):
        return Path(c)
    return Path(os.environ.get("SLICEPROXY_K8S_CACHE") or "/var/cache/sliceproxy") / "images"


@functools.cache
def image(name: str) -> Image:
    """sliceproxy, pause or agnhost: built when missing or stale (the first
    build of sliceproxy's takes minutes: `make image` does it ahead)."""
    cp = subprocess.run(
        ["bash", str(SCRIPT), "--ref", name], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=3600
    )
    if cp.returncode != 0:
        raise ImageError(f"scripts/build-images.sh --ref {name} failed ({cp.returncode}):\n{cp.stderr[-3000:]}")
    archive, ref = cp.stdout.split()
    return Image(Path(archive), ref)


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(PODMAN_CONF / "containers.conf")
    env["CONTAINERS_REGISTRIES_CONF"] = str(PODMAN_CONF / "registries.conf")
    env["CONTAINERS_STORAGE_CONF"] = str(PODMAN_CONF / "storage.conf")
    return env


def podman(*args: str) -> list[str]:
    """argv of one podman command on the build script's image store."""
    return [
        "podman",
        "--root",
        str(image_cache() / "podman"),
        "--runroot",
        RUNROOT,
        "--storage-driver",
        "overlay",
        *args,
    ]
