#!/usr/bin/env python3
"""`make demo`: sliceproxy balancing a ClusterIP service between three pods.

Everything happens in network namespaces made here (a "node" and four "pods"
wired like a routed CNI), with addresses from 198.18.0.0/15 only and no route
out, so the machine's own network is never touched:

  1. build the node and pods; start a tiny backend in backend-1..3
  2. copy examples/web/*.yaml (Service default/web + two EndpointSlices)
  3. start `sliceproxy run` in the node namespace, reading that directory
  4. wait until `sliceproxy dump` shows the service with its 3 backends
  5. 300 HTTP requests from the client pod to 198.19.0.10:80: the spread
  6. empty one EndpointSlice (backend-3 leaves), 300 more: backend-3 gets 0
  7. show `sliceproxy dump` and `bpftool map dump pinned .../sp_svc_v5` (the
     frontend map, named after the header's layout version)

and always cleans up: agent, namespaces, veths, pinned maps, temp files,
including on Ctrl-C or SIGTERM. Needs root (namespaces, BPF).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ctrl.dataplane.abi import map_name  # noqa: E402
from scripts.harness.client import histogram  # noqa: E402
from scripts.harness.topo import Topology, TopologyError  # noqa: E402

EXAMPLES = REPO / "examples" / "web"
BPFFS = Path("/sys/fs/bpf")
PIN_PREFIX = "sliceproxy-demo-"
SLICEPROXY = Path(sys.executable).parent / "sliceproxy"

CLIENT_IP = "198.18.1.2"
BACKENDS = {"backend-1": "198.18.1.11", "backend-2": "198.18.1.12", "backend-3": "198.18.1.13"}
VIP = "198.19.0.10"
HTTP_FRONTEND = f"{VIP}:80/TCP"
REQUESTS = 300
PROGRAM_TIMEOUT = 30.0

_print_lock = threading.Lock()


class DemoError(Exception):
    """A step failed; the message says which and why."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM/SIGHUP: unwind through the finally blocks to clean up.
    A BaseException so no `except Exception` on the way swallows it."""


def say(text: str = "") -> None:
    # The agent's log lines come from another thread: keep lines whole.
    with _print_lock:
        print(text, flush=True)


def indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + line for line in text.splitlines())


def step(n: int, text: str) -> None:
    say(f"\n==> [{n}/7] {text}")


class Agent:
    """The `sliceproxy run` process and a thread echoing its log."""

    def __init__(self, topo: Topology, argv: list[str]) -> None:
        self.topo = topo
        self.tail: deque[str] = deque(maxlen=40)
        # Unbuffered so log lines appear as they happen, not in blocks.
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # cwd=REPO: the agent's default --bpf-object is relative to the repo.
        self.proc = topo.run_in("node", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        self.thread = threading.Thread(target=self._pump, name="agent-log", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                self.tail.append(line)
                say(f"    agent | {line}")
        except (OSError, ValueError):
            # The pipe was closed under us during shutdown.
            pass

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            self.thread.join(2)
            raise DemoError(f"the agent exited with status {self.proc.returncode}; its last lines:\n" + self.log_tail())

    def log_tail(self) -> str:
        return "\n".join(f"      {line}" for line in self.tail) or "      (no output)"

    def stop(self) -> None:
        # SIGTERM first: the agent's own shutdown path is part of the demo.
        rc = self.topo.stop(self.proc, timeout=10)
        self.thread.join(2)
        if rc not in (0, None, -signal.SIGTERM):
            say(f"    (agent exited with status {rc})")


def ensure_bpffs() -> None:
    """The agent pins its maps under /sys/fs/bpf; mount bpffs if the host
    has not (most distributions do). Left mounted afterwards: other tools
    may have pinned things there meanwhile, and unmounting would drop them."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == str(BPFFS) and fields[2] == "bpf":
            return
    say(f"    mounting bpffs at {BPFFS} (it will stay mounted)")
    cp = subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True)
    if cp.returncode != 0:
        raise DemoError(f"cannot mount bpffs at {BPFFS}: {cp.stderr.strip()}")


def remove_stale_leftovers() -> None:
    """Pin and temp directories of earlier demos that were killed before
    they could clean up: both carry the topology prefix in their name, and
    the prefix's owner process is gone."""
    for base, what in ((BPFFS, "pins"), (Path(tempfile.gettempdir()), "files")):
        for d in base.glob(PIN_PREFIX + "sp*"):
            m = re.fullmatch(re.escape(PIN_PREFIX) + r"(sp[0-9a-f]{6})(-.*)?", d.name)
            if m and d.is_dir() and not Topology.prefix_is_live(m.group(1)):
                say(f"    removing stale {what} {d}")
                shutil.rmtree(d, ignore_errors=True)


def run_dump(topo: Topology, pin: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # In the node namespace, like the agent, in case dump also looks at the
    # attached interfaces; the pins themselves are visible from anywhere.
    return topo.exec_in("node", [str(SLICEPROXY), "dump", "--pin-dir", str(pin), *extra], timeout=20)


def backend_str(b: Any) -> str:
    if isinstance(b, str):
        return b
    if isinstance(b, dict):
        return f"{b.get('address') or b.get('ip')}:{b.get('port')}"
    return str(b)


def wait_programmed(topo: Topology, agent: Agent, pin: Path, want: set[str]) -> None:
    """Poll `sliceproxy dump --json` until the http frontend has exactly the
    wanted backends; fail after PROGRAM_TIMEOUT with what was last seen."""
    deadline = time.monotonic() + PROGRAM_TIMEOUT
    last = "no dump yet"
    while time.monotonic() < deadline:
        agent.check_alive()
        cp = run_dump(topo, pin, "--json")
        if cp.returncode != 0:
            last = f"dump exited {cp.returncode}: {cp.stderr.strip()[-300:]}"
        else:
            try:
                doc = json.loads(cp.stdout)
            except json.JSONDecodeError as e:
                last = f"dump printed invalid JSON ({e}): {cp.stdout[:200]!r}"
            else:
                svcs = [s for s in doc.get("services", []) if s.get("frontend") == HTTP_FRONTEND]
                if not svcs:
                    last = f"no frontend {HTTP_FRONTEND} in dump"
                else:
                    have = {backend_str(b) for b in svcs[0].get("backends", [])}
                    if have == want:
                        say(f"    {HTTP_FRONTEND} -> {', '.join(sorted(have))}")
                        return
                    last = f"{HTTP_FRONTEND} has backends {sorted(have)}"
        time.sleep(0.3)
    raise DemoError(
        f"the agent did not program {HTTP_FRONTEND} with backends {sorted(want)} within "
        f"{PROGRAM_TIMEOUT:g}s; last seen: {last}\n  agent's last lines:\n{agent.log_tail()}"
    )


def send_requests(topo: Topology, proto: str, target: str, count: int) -> dict[str, Any]:
    say(f"    client {CLIENT_IP} -> {target}: {count} {proto.upper()} requests, each a new flow")
    try:
        res = topo.client("client", proto, "--target", target, "--count", str(count))
    except TopologyError as e:
        raise DemoError(str(e)) from e
    # Name every backend, so one that got nothing shows as an empty bar.
    counts = {name: 0 for name in BACKENDS} | res["counts"]
    say(indent(histogram(counts, count)))
    if res["errors"]:
        say(f"    {res['errors']} errors, e.g. {res['error_samples'][:3]}")
    return res


def main() -> int:
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces, BPF); try: sudo make demo", file=sys.stderr)
        return 2
    for tool in ("ip", "nsenter", "bpftool"):
        if not shutil.which(tool):
            print(f"demo: {tool} not found in PATH", file=sys.stderr)
            return 2
    if not SLICEPROXY.exists():
        print(f"demo: {SLICEPROXY} not found; build and install first (make)", file=sys.stderr)
        return 2

    cleaning = False

    def on_signal(signum: int, _frame: Any) -> None:
        if cleaning:
            # Let the cleanup finish: stopping half-way is what leaves
            # namespaces and pins behind.
            say(f"    ({signal.Signals(signum).name} received; still cleaning up, one moment)")
            return
        raise Interrupted(signal.Signals(signum).name)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    topo: Topology | None = None
    agent: Agent | None = None
    pin: Path | None = None
    tmp: Path | None = None
    rc = 0
    try:
        # Leftovers of runs that were SIGKILLed (nothing of a live run).
        for ns in Topology.cleanup_stale():
            say(f"    removed stale namespace {ns}")
        ensure_bpffs()
        remove_stale_leftovers()

        step(1, "building the node and its pods (network namespaces, veth pairs, routes)")
        topo = Topology()
        pin = BPFFS / f"{PIN_PREFIX}{topo.prefix}"
        topo.add_pod("client", CLIENT_IP)
        for name, ip in BACKENDS.items():
            topo.add_pod(name, ip)
        for name in BACKENDS:
            topo.start_server(name)
        for name, pod in topo.pods.items():
            say(f"    pod {name:<10} {pod.ip:<12} netns {pod.ns:<18} node side {pod.host_if}")
        say(f"    node netns {topo.node_ns}; backends serve HTTP on :8080 and UDP on :5353")

        step(2, "writing the demo's Service and EndpointSlices")
        # Named after the topology so a later run can spot it as stale.
        tmp = Path(tempfile.mkdtemp(prefix=f"{PIN_PREFIX}{topo.prefix}-"))
        src = tmp / "web"
        src.mkdir()
        for f in sorted(EXAMPLES.glob("*.yaml")):
            shutil.copy(f, src / f.name)
            say(f"    {src / f.name}")

        step(3, "starting the agent in the node namespace")
        argv = [
            str(SLICEPROXY), "run", "--source", str(src), "--interfaces", topo.iface_glob,
            "--pin-dir", str(pin), "--log-level", "info",
            "--host-clients", "off",  # the demo's client is a pod; never hook the machine's cgroups
        ]  # fmt: skip
        say(f"    nsenter --net={topo.ns_path('node')} -- {' '.join(argv)}")
        agent = Agent(topo, argv)

        step(4, f"waiting for {HTTP_FRONTEND} to be programmed with 3 backends")
        wait_programmed(topo, agent, pin, {f"{ip}:8080" for ip in BACKENDS.values()})

        step(5, f"sending traffic to the ClusterIP {VIP}")
        res = send_requests(topo, "http", f"{VIP}:80", REQUESTS)
        missing = sorted(set(BACKENDS) - set(res["counts"]))
        if res["errors"] or missing:
            raise DemoError(
                f"expected every request answered by all 3 backends; errors={res['errors']}, silent={missing}"
            )
        if res.get("client_ips_seen") == [CLIENT_IP]:
            say(f"    every backend saw the client's own address {CLIENT_IP}: no SNAT on the way")
        else:
            say(f"    note: backends saw client addresses {res.get('client_ips_seen')}")
        udp = send_requests(topo, "udp", f"{VIP}:53", 60)
        if udp["errors"]:
            raise DemoError(f"UDP to {VIP}:53 had {udp['errors']} errors: {udp['error_samples'][:3]}")

        step(6, "backend-3 (198.18.1.13) leaves: emptying EndpointSlice web-m4w9d")
        remove_backend(src / "slice-b.yaml", tmp)
        wait_programmed(topo, agent, pin, {f"{BACKENDS['backend-1']}:8080", f"{BACKENDS['backend-2']}:8080"})
        res = send_requests(topo, "http", f"{VIP}:80", REQUESTS)
        if res["errors"] or res["counts"].get("backend-3", 0) != 0:
            raise DemoError(
                f"after removal expected no errors and 0 answers from backend-3; "
                f"errors={res['errors']}, backend-3={res['counts'].get('backend-3', 0)}"
            )
        say("    backend-3 got 0 requests")

        step(7, "what is programmed")
        say(f"    $ sliceproxy dump --pin-dir {pin}")
        cp = run_dump(topo, pin)
        if cp.returncode != 0:
            raise DemoError(f"sliceproxy dump exited {cp.returncode}: {cp.stderr.strip()}")
        say(indent(cp.stdout.rstrip()))
        svc_map = map_name("sp_svc")  # sp_svc_v<the header's layout version>
        say(f"\n    $ bpftool map dump pinned {pin}/{svc_map}")
        cp = subprocess.run(["bpftool", "map", "dump", "pinned", str(pin / svc_map)], capture_output=True, text=True)
        if cp.returncode != 0:
            raise DemoError(f"bpftool map dump exited {cp.returncode}: {cp.stderr.strip()}")
        say(indent(cp.stdout.rstrip()))
        say("\ndemo: OK")
    except DemoError as e:
        say(f"\ndemo: FAILED: {e}")
        rc = 1
    except TopologyError as e:
        say(f"\ndemo: FAILED setting up namespaces: {e}")
        rc = 1
    except Interrupted as e:
        say(f"\ndemo: interrupted ({e}), cleaning up")
        rc = 130
    finally:
        cleaning = True
        rc = cleanup(topo, agent, pin, tmp) or rc
    return rc


def remove_backend(slice_file: Path, tmp: Path) -> None:
    """Rewrite the slice with no endpoints, as the EndpointSlice controller
    does when a service's last pod in a slice goes away (the slice itself
    stays). Written to a temp file and renamed over the original so the
    agent's directory watcher never reads a half-written file; the temp file
    lives outside the watched directory so it is never taken for input."""
    import yaml  # only this step needs it; PyYAML ships with the package deps

    doc = yaml.safe_load(slice_file.read_text())
    doc["endpoints"] = []
    meta = doc.setdefault("metadata", {})
    meta["resourceVersion"] = str(int(meta.get("resourceVersion", "0")) + 1)
    staged = tmp / (slice_file.name + ".new")
    staged.write_text(
        "# default/web slice web-m4w9d after its only pod (198.18.1.13) went away.\n"
        + yaml.safe_dump(doc, sort_keys=False)
    )
    os.replace(staged, slice_file)
    say(f"    rewrote {slice_file} with endpoints: []")


def cleanup(topo: Topology | None, agent: Agent | None, pin: Path | None, tmp: Path | None) -> int:
    """Undo everything, each part independent of the others' success."""
    say("\n==> cleaning up")
    rc = 0
    if agent is not None:
        try:
            agent.stop()
        except Exception as e:  # noqa: BLE001 - keep cleaning
            say(f"    stopping the agent: {e}")
            rc = 1
    if topo is not None:
        try:
            topo.cleanup()
            say(f"    removed namespaces {topo.prefix}-*")
        except Exception as e:  # noqa: BLE001
            say(f"    removing namespaces: {e}")
            rc = 1
    if pin is not None and pin.exists():
        # Unlinking a pin in bpffs drops that reference to the map; with the
        # agent gone and the programs detached, the maps are freed.
        try:
            shutil.rmtree(pin)
            say(f"    removed pins {pin}")
        except OSError as e:
            say(f"    removing {pin}: {e}")
            rc = 1
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
