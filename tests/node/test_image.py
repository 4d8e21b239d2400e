"""Tier 5: the container image (deploy/Containerfile, built by
scripts/build-images.sh) runs, and its agent carries traffic as the agent of
the virtualenv does.

The image's agent runs under podman in the node namespace of a netns-tier
topology (`--network ns:`, the container's "host network"), with the host's
bpffs and the capabilities deploy/daemonset.yaml grants; the same scenario
then runs with the virtualenv's agent on a fresh topology, and both must give
the same maps and the same answers.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from scripts.harness.topo import Topology
from tests.netns.agent import BPFFS, PIN_PREFIX, AgentProc, SourceDir, dump, has_backends, service, wait_dump
from tests.netns.conftest import (
    BACKENDS,
    CLIENT_IP,
    THREE,
    VIP,
    WEB_PORTS,
    assert_spread,
    http,
    udp,
    web_backends,
    web_slice,
)

from .cgroups import remove_tree
from .images import image, podman, podman_env

pytestmark = pytest.mark.root

# What deploy/daemonset.yaml gives the container (capabilities.add).
DAEMONSET_CAPS = "BPF,NET_ADMIN,SYS_RESOURCE,SYS_ADMIN"


class ImageAgent(AgentProc):
    """``sliceproxy run`` from the image, under podman, in the node namespace
    of ``topo``; log, wait and stop helpers as for the virtualenv's agent."""

    def __init__(self, topo: Topology, source: Path, pin_dir: Path, ref: str) -> None:
        self.topo = topo
        self.pin_dir = pin_dir
        self.name = f"sliceproxy-test-{topo.prefix}"
        self.argv = podman(
            "run", "--rm", "--name", self.name, "--cgroup-parent", f"/{self.name}",
            "--network", f"ns:{topo.ns_path('node')}",
            "--cap-drop", "ALL", "--cap-add", DAEMONSET_CAPS,
            "-v", f"{BPFFS}:{BPFFS}", "-v", f"{source}:{source}:ro",
            "-e", "PYTHONUNBUFFERED=1",
            ref,
            "sliceproxy", "run", "--source", str(source), "--interfaces", topo.iface_glob,
            "--pin-dir", str(pin_dir), "--min-sync-period", "0.05",
            # The pods' path only: no cgroup hooks from a container whose
            # cgroup view this test does not control (the node tier serves
            # host clients on a cgroup of its own).
            "--host-clients", "off",
        )  # fmt: skip
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = topo.run_in("node", self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=podman_env())
        self._thread = threading.Thread(target=self._pump, name=f"image-agent-{self.proc.pid}", daemon=True)
        self._thread.start()

    def remove(self) -> None:
        """The container gone whatever happened to podman run (--rm only
        acts when podman itself sees the end)."""
        subprocess.run(podman("rm", "--force", "--ignore", self.name), env=podman_env(), capture_output=True)
        # conmon's and the container's cgroups (podman leaves its parent).
        left = remove_tree(self.name)
        assert not left, f"cgroups still in use after the container ended: {left}"


@pytest.fixture(scope="module")
def sliceproxy_image() -> str:
    return image("sliceproxy").ref


def run_once(ref: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """``podman run --rm`` under a cgroup parent of its own, removed after."""
    parent = f"sliceproxy-test-{secrets.token_hex(4)}"
    try:
        return subprocess.run(
            podman("run", "--rm", "--cgroup-parent", f"/{parent}", ref, *argv),
            env=podman_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        remove_tree(parent)


def test_image_runs_sliceproxy_help(sliceproxy_image: str) -> None:
    cp = run_once(sliceproxy_image, "sliceproxy", "--help")
    assert cp.returncode == 0, cp.stderr
    for sub in ("run", "dump", "uninstall"):
        assert sub in cp.stdout
    # The compiled object and header the agent loads are in the image where
    # its environment says.
    cp = run_once(sliceproxy_image, "sh", "-c", 'test -s "$SLICEPROXY_BPF_OBJECT" && test -s "$SLICEPROXY_HEADER"')
    assert cp.returncode == 0, cp.stderr
    # The C helper (Maglev tables) loads there, with the image's libc.
    cp = run_once(
        sliceproxy_image, "python3", "-c", "from ctrl.dataplane import native; print(native.missing() or 'loaded')"
    )
    assert cp.returncode == 0 and cp.stdout.strip() == "loaded", cp.stdout + cp.stderr


Scenario = dict[str, object]


def run_scenario(tmp: Path, start: Callable[[Topology, Path, Path], AgentProc]) -> Scenario:
    """web with backend-1..3: TCP and UDP from a client pod, then backend-3
    taken out of the source and TCP again. Returns what was seen."""
    src = SourceDir(tmp)
    src.write("service.yaml", service("web", VIP, WEB_PORTS))
    src.write("slice-a.yaml", web_slice("web-a", "backend-1", "backend-2"))
    src.write("slice-b.yaml", web_slice("web-b", "backend-3"))
    with Topology() as topo:
        topo.add_pod("client", CLIENT_IP)
        for name, ip in BACKENDS.items():
            topo.add_pod(name, ip)
            topo.start_server(name)
        pin_dir = BPFFS / f"{PIN_PREFIX}{topo.prefix}"
        agent = start(topo, src.path, pin_dir)
        try:
            wait_dump(
                topo, pin_dir, has_backends(web_backends(*THREE)), "web's three backends", agent=agent, timeout=90
            )
            agent.wait_attached((p.host_if for p in topo.pods.values()), timeout=60)
            first = dump(topo, pin_dir)
            tcp, dns = http(topo), udp(topo)
            src.remove("slice-b.yaml")
            wait_dump(
                topo, pin_dir, has_backends(web_backends("backend-1", "backend-2")), "backend-3 gone", agent=agent
            )
            after = http(topo)
            agent.check_alive()
        finally:
            agent.terminate(timeout=30)
            if isinstance(agent, ImageAgent):
                agent.remove()
            shutil.rmtree(pin_dir, ignore_errors=True)
    return {"dump": first, "tcp": tcp, "udp": dns, "after": after, "log": agent.log()}


def services_of(doc: dict) -> list:
    """The dump's services without per-run values (counters)."""
    return sorted(
        ({k: v for k, v in s.items() if k not in ("packets", "bytes", "counters")} for s in doc["services"]),
        key=lambda s: s["frontend"],
    )


def test_agent_in_the_image_serves_traffic_as_the_venv_agent_does(sliceproxy_image: str, tmp_path: Path) -> None:
    from_image = run_scenario(tmp_path / "image", lambda t, s, p: ImageAgent(t, s, p, sliceproxy_image))
    from_venv = run_scenario(tmp_path / "venv", lambda t, s, p: AgentProc(t, s, p))
    for seen in (from_image, from_venv):
        assert_spread(seen["tcp"], THREE)
        assert_spread(seen["udp"], THREE)
        assert_spread(seen["after"], ("backend-1", "backend-2"))
        assert seen["tcp"]["client_ips_seen"] == [CLIENT_IP]
    # Same maps from the same source: frontends, backends, ids and flags.
    assert services_of(from_image["dump"]) == services_of(from_venv["dump"])
