"""Helpers for netns tests: the `sliceproxy run` process and its YAML source.

* ``SourceDir`` writes Services and EndpointSlices into the directory the
  agent watches, atomically (staged outside the directory, then renamed), so
  the agent's scanner never reads a half-written file.
* ``AgentProc`` is one ``sliceproxy run`` started in the node namespace with
  nsenter (``ip netns exec`` would hide the bpffs mount). A thread collects
  its log lines so a test can wait for one, count them, and show the tail
  when something fails.
* ``dump`` / ``wait_dump`` read ``sliceproxy dump --json`` (the pinned maps,
  not the agent) and poll it until a condition holds, with a timeout and the
  last thing seen in the failure message.

Waiting is always "until a condition, at most N seconds"; nothing here
asserts how long anything took.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from scripts.harness.topo import CLIENT_PY, Topology

REPO = Path(__file__).resolve().parents[2]
SLICEPROXY = Path(sys.executable).parent / "sliceproxy"
BPFFS = Path("/sys/fs/bpf")
# Pin directories are named after the topology so a later session can tell
# a crashed run's leftovers (owner gone) from a parallel run's live ones.
PIN_PREFIX = "sliceproxy-test-"
FILTER_NAME = "sliceproxy"  # TCA_BPF_NAME of our tc filter (ctrl.dataplane.attach)

WAIT = 30.0  # generous upper bound for "the agent caught up"; never a speed goal


class AgentError(AssertionError):
    """The agent died or did not reach the wanted state; carries its log."""


# -- manifests -----------------------------------------------------------


def service(
    name: str,
    ip: str,
    ports: Iterable[tuple[str, int, str, int]],
    namespace: str = "default",
) -> dict[str, Any]:
    """A ClusterIP Service; ports are (name, port, protocol, targetPort)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": [{"name": n, "port": p, "protocol": pr, "targetPort": tp} for n, p, pr, tp in ports],
        },
    }


def endpoint(ip: str, ready: bool = True, serving: bool | None = None, terminating: bool = False) -> dict[str, Any]:
    return {
        "addresses": [ip],
        "conditions": {
            "ready": ready,
            "serving": ready if serving is None else serving,
            "terminating": terminating,
        },
        "nodeName": "node-a",
    }


def endpoint_slice(
    name: str,
    service_name: str,
    ports: Iterable[tuple[str, int, str]],
    endpoints: Iterable[dict[str, Any] | str],
    namespace: str = "default",
) -> dict[str, Any]:
    """An IPv4 EndpointSlice of ``service_name``; ports are (name, port,
    protocol); an endpoint given as a plain string is a ready one."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": [{"name": n, "port": p, "protocol": pr} for n, p, pr in ports],
        "endpoints": [endpoint(e) if isinstance(e, str) else e for e in endpoints],
    }


class SourceDir:
    """The directory the agent reads (``path``), with a staging directory
    beside it for atomic writes."""

    def __init__(self, base: Path) -> None:
        self.path = base / "src"
        self._staging = base / "staging"
        self.path.mkdir(parents=True, exist_ok=True)
        self._staging.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.path / name

    def write(self, name: str, *docs: dict[str, Any]) -> Path:
        return self.write_text(name, yaml.safe_dump_all(list(docs), sort_keys=False))

    def write_text(self, name: str, text: str) -> Path:
        staged = self._staging / name
        staged.write_text(text)
        dest = self.path / name
        os.replace(staged, dest)
        return dest

    def remove(self, name: str) -> None:
        (self.path / name).unlink()


# -- the agent -------------------------------------------------------------


class AgentProc:
    """One ``sliceproxy run`` in the node namespace of ``topo``."""

    def __init__(self, topo: Topology, source: Path | None, pin_dir: Path, extra: Iterable[str] = ()) -> None:
        """source None: the source flags are in extra (--kubeconfig ...)."""
        extra = tuple(extra)
        self.topo = topo
        self.pin_dir = pin_dir
        self.argv = [
            str(SLICEPROXY), "run",
            *(["--source", str(source)] if source is not None else []),
            "--interfaces", topo.iface_glob,
            "--pin-dir", str(pin_dir),
            "--min-sync-period", "0.05",
            # Host clients only on a cgroup of the test's own (--cgroup):
            # never the machine's root cgroup, the default.
            *(() if "--cgroup" in extra or "--host-clients" in extra else ("--host-clients", "off")),
            *extra,
        ]  # fmt: skip
        self.lines: list[str] = []
        self._cond = threading.Condition()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = topo.run_in(
            "node", self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(REPO)
        )
        self._thread = threading.Thread(target=self._pump, name=f"agent-log-{self.proc.pid}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                with self._cond:
                    self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass  # pipe closed under us at stop
        with self._cond:
            self._cond.notify_all()

    # -- state -----------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> list[str]:
        with self._cond:
            return list(self.lines)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join("    | " + line for line in self.log()[-n:]) or "    | (no output)"

    def check_alive(self) -> None:
        if not self.alive():
            self._thread.join(2)
            raise AgentError(f"the agent exited with status {self.proc.returncode}; its log:\n{self.log_tail()}")

    def matching(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in self.log() if rx.search(line)]

    def wait_log(self, pattern: str, count: int = 1, timeout: float = WAIT) -> list[str]:
        """Wait until at least ``count`` log lines match ``pattern`` (regex)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self.lines if rx.search(line)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._thread.is_alive()):
                    break
                self._cond.wait(min(left, 0.2))
        state = "running" if self.alive() else f"exited {self.proc.returncode}"
        raise AgentError(
            f"agent ({state}) did not log {count} line(s) matching {pattern!r} within {timeout:g}s "
            f"(found {len(found)}); its log:\n{self.log_tail()}"
        )

    def wait_attached(self, ifaces: Iterable[str], timeout: float = WAIT) -> None:
        for ifname in ifaces:
            self.wait_log(rf"attached to interface {re.escape(ifname)}$", timeout=timeout)

    # -- stopping --------------------------------------------------------

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (topo.stop escalates to SIGKILL after timeout)."""
        rc = self.topo.stop(self.proc, timeout=timeout)
        self._thread.join(2)
        return rc

    def kill(self) -> int:
        """SIGKILL: no shutdown path at all, as after an OOM kill."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        rc = self.proc.wait(10)
        self._thread.join(2)
        self.topo.stop(self.proc)  # bookkeeping and pipes; it is already dead
        return rc


# -- reading the maps ------------------------------------------------------


def dump(topo: Topology, pin_dir: Path) -> dict[str, Any]:
    """``sliceproxy dump --json`` from the node namespace; raises with its
    stderr if it fails."""
    cp = topo.exec_in("node", [str(SLICEPROXY), "dump", "--pin-dir", str(pin_dir), "--json"], timeout=30)
    if cp.returncode != 0:
        raise AgentError(f"sliceproxy dump --pin-dir {pin_dir} exited {cp.returncode}: {cp.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(cp.stdout)
    return result


def frontends(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Dump services by frontend ("198.19.0.10:80/TCP")."""
    return {s["frontend"]: s for s in doc["services"]}


def wait_dump(
    topo: Topology,
    pin_dir: Path,
    want: Callable[[dict[str, Any]], bool],
    what: str,
    agent: AgentProc | None = None,
    timeout: float = WAIT,
) -> dict[str, Any]:
    """Poll the dump until ``want(doc)``; return that dump."""
    deadline = time.monotonic() + timeout
    last = "no dump yet"
    while True:
        if agent is not None:
            agent.check_alive()
        try:
            doc = dump(topo, pin_dir)
        except (AgentError, json.JSONDecodeError) as e:
            last = str(e)
        else:
            if want(doc):
                return doc
            last = json.dumps({f: s["backends"] for f, s in frontends(doc).items()})
        if time.monotonic() >= deadline:
            tail = f"\n  agent log:\n{agent.log_tail()}" if agent is not None else ""
            raise AgentError(f"the dump did not show {what} within {timeout:g}s; last seen: {last}{tail}")
        time.sleep(0.1)


def has_backends(expected: dict[str, set[str]]) -> Callable[[dict[str, Any]], bool]:
    """Predicate: each frontend has exactly these backends (any order)."""

    def check(doc: dict[str, Any]) -> bool:
        fr = frontends(doc)
        return all(f in fr and sorted(fr[f]["backends"]) == sorted(b) for f, b in expected.items())

    return check


# -- tc --------------------------------------------------------------------


def our_filters(topo: Topology, ifname: str, hook: str = "ingress") -> list[dict[str, Any]]:
    """Our bpf filters at the tc ingress (or egress) of a node-side interface."""
    cp = topo.exec_in("node", ["tc", "-j", "filter", "show", "dev", ifname, hook], timeout=20)
    if cp.returncode != 0:
        # No clsact qdisc at all means no filter either.
        if "Cannot find" in cp.stderr or "Invalid" in cp.stderr:
            return []
        raise AgentError(f"tc filter show dev {ifname} {hook} exited {cp.returncode}: {cp.stderr.strip()}")
    entries = json.loads(cp.stdout or "[]")
    return [e for e in entries if e.get("kind") == "bpf" and (e.get("options") or {}).get("bpf_name") == FILTER_NAME]


def all_filters(topo: Topology, ifname: str) -> list[dict[str, Any]]:
    """Every filter (with options, i.e. not the per-prio header rows) at ingress."""
    cp = topo.exec_in("node", ["tc", "-j", "filter", "show", "dev", ifname, "ingress"], timeout=20)
    if cp.returncode != 0:
        return []
    return [e for e in json.loads(cp.stdout or "[]") if e.get("options")]


# -- clients in the background ---------------------------------------------


def start_client(topo: Topology, pod: str, *args: str) -> subprocess.Popen[bytes]:
    """client.py in ``pod`` without waiting; read its JSON with finish_client."""
    return topo.run_in(pod, [sys.executable, str(CLIENT_PY), *args, "--json"], stdout=subprocess.PIPE)


def finish_client(topo: Topology, proc: subprocess.Popen[bytes], timeout: float = 120) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        topo.stop(proc)
    if proc.returncode != 0:
        raise AgentError(f"client exited {proc.returncode}")
    result: dict[str, Any] = json.loads(out)
    return result


class TrafficLoop:
    """Back-to-back batches of client.py requests in a thread, until
    ``stop()`` or a bound on batches and time (a failing dataplane can not
    make it run forever). ``batches`` holds each batch's result."""

    def __init__(
        self, topo: Topology, pod: str, mode: str, target: str, per_batch: int = 50,
        max_batches: int = 400, max_seconds: float = 90.0,
    ) -> None:  # fmt: skip
        self.topo = topo
        self.args = (pod, mode, "--target", target, "--count", str(per_batch), "--timeout", "1")
        self.max_batches = max_batches
        self.max_seconds = max_seconds
        self.batches: list[dict[str, Any]] = []
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self) -> TrafficLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        try:
            while not self._stop.is_set() and len(self.batches) < self.max_batches and time.monotonic() < deadline:
                res = self.topo.client(*self.args, timeout=60)
                with self._cond:
                    self.batches.append(res)
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.failure = e
        finally:
            with self._cond:
                self._cond.notify_all()

    def done(self) -> int:
        with self._cond:
            return len(self.batches)

    def wait_batches(self, n: int, timeout: float = WAIT) -> None:
        """Wait until ``n`` batches in total have completed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.batches) < n:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    raise AgentError(
                        f"traffic loop completed {len(self.batches)} of {n} batches "
                        f"(running={self._thread.is_alive()}, failure={self.failure!r})"
                    )
                self._cond.wait(min(left, 0.2))

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(120)
        if self.failure is not None:
            raise self.failure
        return list(self.batches)


def stale_pin_dirs() -> list[Path]:
    """Pin directories of earlier sessions whose topology owner is gone."""
    out = []
    for d in BPFFS.glob(PIN_PREFIX + "sp*"):
        m = re.fullmatch(re.escape(PIN_PREFIX) + r"(sp[0-9a-f]{6})(-.*)?", d.name)
        if m and d.is_dir() and not Topology.prefix_is_live(m.group(1)):
            out.append(d)
    return out
