"""A throwaway network-namespace topology: one "node" and its "pods".

The shape copies a routed CNI such as Calico, because that is what the agent
meets on a real node: no bridge, one veth pair per pod, the pod holding a /32
and reaching everything in the test range through a link-scope gateway on
the node side of its veth. The agent attaches to the node side of those
veths (all named ``<prefix>h<n>`` so one glob selects them), and ClusterIPs
(198.19.0.0/16) sit on no interface at all: pods send them to the node only
because their 198.18.0.0/15 route covers them.

Safety rules this module keeps (docs/architecture.md, "Test tiers"):

* Addresses only from 198.18.0.0/15 and 2001:db8::/32, checked on input.
* Everything lives in namespaces created here; veths are created directly
  inside them (``ip -n POD link add ... peer ... netns NODE``) so not even a
  transient link appears in the root namespace, and sysctls are only ever
  written inside our own namespaces.
* No default route anywhere: a packet the dataplane fails to rewrite gets an
  ICMP unreachable from the node instead of leaking somewhere.
* Every namespace and process is removed by ``cleanup()``, which is
  idempotent and also runs from ``__exit__``, from an ``atexit`` backstop,
  and from ``cleanup_stale()`` in a later run if this one was SIGKILLed.

Typical use::

    with Topology() as topo:
        topo.add_pod("a", "198.18.1.2")
        topo.add_pod("b", "198.18.1.3")
        topo.start_server("b")
        print(topo.client("a", "http", "--target", "198.18.1.3:8080"))
"""

from __future__ import annotations

import atexit
import fnmatch
import ipaddress
import json
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any, NamedTuple

NETNS_DIR = Path("/run/netns")
# Owner records let a later run tell a crashed topology (owner gone) from one
# a parallel run is still using, so cleanup_stale never pulls the rug out
# from under a concurrent test session.
OWNER_DIR = Path("/run/sliceproxy-topo")

GATEWAY4 = "198.18.0.1"
# Link-local gateway for IPv6, as Calico does: the same fe80::1 can sit on
# every host veth because link-local addresses are scoped to their link.
GATEWAY6 = "fe80::1"
TEST_NET4 = ipaddress.ip_network("198.18.0.0/15")
TEST_NET6 = ipaddress.ip_network("2001:db8::/32")

HERE = Path(__file__).resolve().parent
SERVERS_PY = HERE / "servers.py"
CLIENT_PY = HERE / "client.py"

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,9}$")
_GENERATED_RE = re.compile(r"^sp[0-9a-f]{6}$")
IFNAMSIZ = 15  # kernel limit on interface names, without the NUL


class TopologyError(RuntimeError):
    """A command building or using the topology failed."""


class Pod(NamedTuple):
    ns: str  # namespace name (file under /run/netns)
    ip: str  # IPv4 address, /32 on eth0
    host_if: str  # node-side veth name, matches Topology.iface_glob


def _run(argv: list[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a setup command; on failure raise with its stderr, which is what
    anyone debugging a broken topology needs to see."""
    cp = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise TopologyError(f"{' '.join(argv)!r} failed ({cp.returncode}): {cp.stderr.strip() or cp.stdout.strip()}")
    return cp


def _proc_start_time(pid: int) -> str | None:
    """Start time of a pid in clock ticks since boot, or None if it is gone.
    Paired with the pid it identifies a process even after pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces or ')', so split after
    # the last ')'; starttime is field 22 overall, i.e. index 19 after it.
    return stat.rsplit(")", 1)[1].split()[19]


def list_netns() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    # Lines look like "name (id: 3)" or just "name".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def exit_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally`` blocks and context
    managers run; by default Python dies on them without any cleanup. Call
    from the main thread (a CLI's main(), or a pytest conftest)."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    for s in signals:
        signal.signal(s, handler)


_live: weakref.WeakSet[Topology] = weakref.WeakSet()


@atexit.register
def _cleanup_live() -> None:
    # Backstop for callers that forgot the context manager or cleanup().
    for topo in list(_live):
        topo.cleanup()


class Topology:
    """One node namespace plus pod namespaces wired to it by veth pairs.

    Construction creates the node namespace; ``add_pod`` adds pods. Use as a
    context manager, or call ``cleanup()`` yourself (it is idempotent).
    """

    def __init__(self, prefix: str | None = None) -> None:
        # 'sp' + 6 hex: 8 chars, leaving room for 'h<n>' within IFNAMSIZ,
        # and random so parallel or aborted runs never reuse a name.
        self.prefix = prefix or "sp" + secrets.token_hex(3)
        if not _PREFIX_RE.match(self.prefix):
            raise ValueError(f"prefix {self.prefix!r} must match {_PREFIX_RE.pattern}")
        self.node_ns = f"{self.prefix}-node"
        self.pods: dict[str, Pod] = {}
        self.pod_ip6: dict[str, str] = {}
        self.uplink_ip: str | None = None  # the first uplink's
        self.uplink_peer: str | None = None  # the first uplink's bridge-side end, in the lan's namespace
        self.uplink_peers: dict[str, str] = {}  # every uplink -> its bridge-side end
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._next_index = 0
        self._closed = False
        _live.add(self)
        try:
            self._write_owner()
            self._add_ns(self.node_ns)
            # Forwarding is what makes the node a router between pods.
            # rp_filter off: after the tc program reverse-NATs a reply its
            # source is a ClusterIP with no route on the node, which strict
            # and loose reverse-path filtering would both drop. The effective
            # value is max(all, iface), hence both 'all' and 'default'.
            self._sysctl(
                self.node_ns,
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv6.conf.all.forwarding=1",
            )
        except BaseException:
            self.cleanup()
            raise

    # -- context manager -------------------------------------------------

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- names -----------------------------------------------------------

    @property
    def iface_glob(self) -> str:
        """Glob of every node-side pod veth: what the agent gets as --interfaces."""
        return f"{self.prefix}h*"

    def ns_name(self, name: str) -> str:
        """Namespace name for 'node', a pod name, or an already full ns name."""
        if name == "node":
            return self.node_ns
        if name in self.pods:
            return self.pods[name].ns
        if name in self._namespaces:
            return name
        raise KeyError(f"no namespace {name!r} in topology {self.prefix}")

    def ns_path(self, name: str) -> str:
        return str(NETNS_DIR / self.ns_name(name))

    # -- building --------------------------------------------------------

    def add_namespace(self, name: str) -> str:
        """An empty namespace ``<prefix>-<name>`` (only lo, up), removed
        with the rest: for a caller that wires it itself. Returns its name."""
        if not _NAME_RE.match(name) or name == "node" or name in self.pods:
            raise ValueError(f"bad or duplicate namespace name {name!r}")
        ns = f"{self.prefix}-{name}"
        self._add_ns(ns)
        return ns

    def add_pod(self, name: str, ip: str, ip6: str | None = None) -> Pod:
        """Create pod namespace ``<prefix>-<name>`` with eth0 = ``ip``/32,
        routed through the node. ``ip6`` optionally adds an IPv6 /128."""
        if not _NAME_RE.match(name) or name == "node" or name in self.pods:
            raise ValueError(f"bad or duplicate pod name {name!r}")
        addr = ipaddress.ip_address(ip)
        if addr.version != 4 or addr not in TEST_NET4 or str(addr) == GATEWAY4:
            raise ValueError(f"pod {name}: {ip} must be an IPv4 address in {TEST_NET4} other than {GATEWAY4}")
        if ip6 is not None:
            a6 = ipaddress.ip_address(ip6)
            if a6.version != 6 or a6 not in TEST_NET6:
                raise ValueError(f"pod {name}: {ip6} must be an IPv6 address in {TEST_NET6}")
            ip6 = str(a6)

        ns = f"{self.prefix}-{name}"
        host_if = f"{self.prefix}h{self._next_index}"
        if len(host_if) > IFNAMSIZ:
            raise ValueError(f"interface name {host_if!r} longer than {IFNAMSIZ}")
        self._next_index += 1

        self._add_ns(ns)
        # Record the pod before wiring it so a failure half-way is still
        # cleaned up (the namespace is already in _namespaces).
        pod = Pod(ns=ns, ip=str(addr), host_if=host_if)
        self.pods[name] = pod

        # Both ends are born in our namespaces: never in the root one.
        _run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", host_if, "netns", self.node_ns])

        # Pod side: /32 and a link-scope route to the gateway, then the test
        # range via it. No default route, so nothing can leave the range.
        _run(["ip", "-n", ns, "addr", "add", f"{pod.ip}/32", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "route", "add", GATEWAY4, "dev", "eth0", "scope", "link"])
        _run(["ip", "-n", ns, "route", "add", str(TEST_NET4), "via", GATEWAY4, "dev", "eth0"])

        # Node side: the gateway address (same on every host veth, which the
        # kernel allows) answers the pod's ARP; a /32 route sends the pod's
        # traffic down its veth.
        _run(["ip", "-n", self.node_ns, "addr", "add", f"{GATEWAY4}/32", "dev", host_if])
        _run(["ip", "-n", self.node_ns, "link", "set", host_if, "up"])
        _run(["ip", "-n", self.node_ns, "route", "add", f"{pod.ip}/32", "dev", host_if, "scope", "link"])

        if ip6 is not None:
            self.pod_ip6[name] = ip6
            _run(["ip", "-n", ns, "-6", "addr", "add", f"{ip6}/128", "dev", "eth0", "nodad"])
            _run(["ip", "-n", ns, "-6", "route", "add", str(TEST_NET6), "via", GATEWAY6, "dev", "eth0"])
            _run(["ip", "-n", self.node_ns, "-6", "addr", "add", f"{GATEWAY6}/64", "dev", host_if, "nodad"])
            _run(["ip", "-n", self.node_ns, "-6", "route", "add", f"{ip6}/128", "dev", host_if])
        return pod

    def add_uplink(self, lan: Lan, ip: str, prefixlen: int = 24, ip6: str | None = None) -> str:
        """Join this node to ``lan``'s bridge with an uplink ``<prefix>u<n>``
        (u0 for the first, u1 for a second, on another lan say) holding
        ``ip``/``prefixlen`` (and ``ip6``/64 if given): the node's
        external interface (what the agent gets as --external-interfaces).
        Returns its name."""
        addr = ipaddress.ip_address(ip)
        if addr.version != 4 or addr not in TEST_NET4:
            raise ValueError(f"uplink {ip} must be an IPv4 address in {TEST_NET4}")
        if ip6 is not None and (ipaddress.ip_address(ip6).version != 6 or ipaddress.ip_address(ip6) not in TEST_NET6):
            raise ValueError(f"uplink {ip6} must be an IPv6 address in {TEST_NET6}")
        uplink = f"{self.prefix}u{len(self.uplink_peers)}"
        port = lan.new_port_name()
        # Both ends born in our namespaces, as for pods.
        peer = ["peer", "name", port, "netns", lan.node_ns]
        _run(["ip", "-n", self.node_ns, "link", "add", uplink, "type", "veth", *peer])
        lan.attach_port(port)
        _run(["ip", "-n", self.node_ns, "addr", "add", f"{ip}/{prefixlen}", "dev", uplink])
        if ip6 is not None:
            _run(["ip", "-n", self.node_ns, "-6", "addr", "add", f"{ip6}/64", "dev", uplink, "nodad"])
        _run(["ip", "-n", self.node_ns, "link", "set", uplink, "up"])
        # A node forwards a DNATed packet out of the interface it came in
        # by (client and remote backend both behind the uplink): no ICMP
        # redirects telling the client to go around us.
        self._sysctl(self.node_ns, "net.ipv4.conf.all.send_redirects=0", f"net.ipv4.conf.{uplink}.send_redirects=0")
        if not self.uplink_peers:
            self.uplink_ip = str(addr)
            self.uplink_peer = port
        self.uplink_peers[uplink] = port
        return uplink

    def add_route(self, name: str, cidr: str, via: str) -> None:
        """A route in namespace ``name`` ('node', a pod) to a test-range CIDR."""
        net = ipaddress.ip_network(cidr)
        if not (net.subnet_of(TEST_NET4) if net.version == 4 else net.subnet_of(TEST_NET6)):  # type: ignore[arg-type]
            raise ValueError(f"route {cidr} must lie in {TEST_NET4} or {TEST_NET6}")
        _run(["ip", "-n", self.ns_name(name), "route", "add", cidr, "via", via])

    # -- processes -------------------------------------------------------

    def run_in(self, name: str, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside a namespace; it is killed by cleanup().

        nsenter rather than ``ip netns exec``: the latter remounts /sys for
        the new namespace, which hides the bpffs mount at /sys/fs/bpf that
        the agent pins its maps in. nsenter (without --fork) execs argv, so
        the returned pid is the program's own.
        """
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        # Own process group, so cleanup can also reach anything it forks,
        # and a Ctrl-C on the terminal reaches only us: we stop children in
        # order instead of them dying mid-write.
        popen_kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(["nsenter", f"--net={self.ns_path(name)}", "--", *argv], **popen_kwargs)
        self._procs.append(proc)
        return proc

    def exec_in(self, name: str, argv: list[str], **run_kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside a namespace to completion (captured text output
        and a 60 s timeout unless overridden; not checked unless check=True)."""
        run_kwargs.setdefault("stdin", subprocess.DEVNULL)
        if "stdout" not in run_kwargs and "stderr" not in run_kwargs:
            run_kwargs.setdefault("capture_output", True)
        run_kwargs.setdefault("text", True)
        run_kwargs.setdefault("timeout", 60)
        return subprocess.run(["nsenter", f"--net={self.ns_path(name)}", "--", *argv], **run_kwargs)

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
        """SIGTERM a process started by run_in, SIGKILL after ``timeout``."""
        if proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait(5)
        # Close our ends of its pipes; leaking them only warns, but tidy.
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    @staticmethod
    def _signal(proc: subprocess.Popen[Any], sig: int) -> None:
        try:
            # Signal the group only if the child leads its own group (the
            # run_in default); never the group we ourselves belong to.
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    # -- servers and clients from this directory --------------------------

    def start_server(
        self,
        pod: str,
        name: str | None = None,
        tcp_port: int = 8080,
        echo_port: int | None = None,
        udp_port: int = 5353,
        bind: str = "0.0.0.0",
        timeout: float = 10.0,
    ) -> subprocess.Popen[bytes]:
        """Start servers.py in ``pod`` (answering as ``name``, default the pod
        name) and return once it printed 'ready'."""
        argv = [
            sys.executable, str(SERVERS_PY), "--name", name or pod,
            "--tcp-port", str(tcp_port), "--udp-port", str(udp_port), "--bind", bind,
        ]  # fmt: skip
        if echo_port is not None:
            argv += ["--echo-port", str(echo_port)]
        proc = self.run_in(pod, argv, stdout=subprocess.PIPE)
        wait_for_line(proc, "ready", timeout, what=f"server in pod {pod}")
        return proc

    def client(self, pod: str, *args: str, timeout: float = 120) -> dict[str, Any]:
        """Run client.py in ``pod`` with ``args`` and return its JSON result."""
        cp = self.exec_in(pod, [sys.executable, str(CLIENT_PY), *args, "--json"], timeout=timeout)
        if cp.returncode != 0:
            raise TopologyError(f"client in pod {pod} {list(args)} exited {cp.returncode}: {cp.stderr.strip()}")
        result: dict[str, Any] = json.loads(cp.stdout)
        return result

    # -- cleanup ---------------------------------------------------------

    def cleanup(self) -> None:
        """Kill our processes, delete our namespaces (which destroys the
        veths in them) and our owner record. Safe to call repeatedly."""
        if self._closed:
            return
        # Keep going whatever fails, even on a second Ctrl-C, so one error
        # never strands the rest; report the first problem at the end.
        first: BaseException | None = None
        for proc in list(self._procs):
            try:
                self.stop(proc)
            except BaseException as e:  # noqa: BLE001 - see above
                first = first or e
        # Pods first, node last, the reverse of creation.
        for ns in reversed(self._namespaces):
            try:
                _delete_ns(ns)
            except BaseException as e:  # noqa: BLE001
                first = first or e
        try:
            (OWNER_DIR / self.prefix).unlink(missing_ok=True)
        except OSError as e:
            first = first or e
        self._closed = True
        _live.discard(self)
        if first is not None:
            raise first

    @staticmethod
    def prefix_is_live(prefix: str) -> bool:
        """True if the process that created topology ``prefix`` still runs."""
        try:
            pid_s, start = (OWNER_DIR / prefix).read_text().split()
        except (OSError, ValueError):
            return False
        return _proc_start_time(int(pid_s)) == start

    @classmethod
    def cleanup_stale(cls, prefix_glob: str = "sp??????") -> list[str]:
        """Delete namespaces ``<prefix>-*`` left by dead runs (prefix matching
        ``prefix_glob``), and kill what still runs inside them. Topologies of
        live processes (parallel runs) are left alone, and so are namespaces
        that merely look alike: a prefix counts as ours only if it has an
        owner record, or, without one, has the generated form sp + 6 hex.
        Returns the deleted namespace names."""
        deleted = []
        for ns in list_netns():
            prefix, sep, _ = ns.partition("-")
            if not sep or not fnmatch.fnmatchcase(prefix, prefix_glob) or not _PREFIX_RE.match(prefix):
                continue
            has_owner = (OWNER_DIR / prefix).exists()
            if not has_owner and not _GENERATED_RE.match(prefix):
                continue
            if cls.prefix_is_live(prefix):
                continue
            # Orphaned servers/agents would keep the namespace (and their
            # sockets) alive after the name is gone.
            pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _delete_ns(ns)
            deleted.append(ns)
            (OWNER_DIR / prefix).unlink(missing_ok=True)
        # Owner records whose namespaces are already gone.
        if OWNER_DIR.is_dir():
            for f in OWNER_DIR.iterdir():
                if fnmatch.fnmatchcase(f.name, prefix_glob) and not cls.prefix_is_live(f.name):
                    f.unlink(missing_ok=True)
        return deleted

    # -- internals -------------------------------------------------------

    def _write_owner(self) -> None:
        OWNER_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        pid = os.getpid()
        start = _proc_start_time(pid)
        # O_EXCL: a prefix collision (explicit prefix reused) fails loudly
        # instead of two runs sharing and then deleting each other's state.
        fd = os.open(OWNER_DIR / self.prefix, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(f"{pid} {start}\n")

    def _add_ns(self, ns: str) -> None:
        if (NETNS_DIR / ns).exists():
            raise TopologyError(f"namespace {ns} already exists")
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # DAD would leave IPv6 addresses 'tentative' (unusable) for about a
        # second after link up, the link-local ones too, which neighbour
        # discovery sends from: a flow started in that second waits a
        # retransmission for its first hop. Every address here is the
        # test's own, so skip it. Set on 'default' before any interface
        # exists, so each inherits the value.
        self._sysctl(ns, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")

    @staticmethod
    def _sysctl(ns: str, *settings: str) -> None:
        # Only ever inside our own namespace: net.* sysctls are per netns.
        _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings])


class Lan(Topology):
    """A shared L2 segment: a bridge in namespace ``<prefix>-node`` (here
    the "lan", no routing) that node uplinks (Topology.add_uplink) and
    outside hosts (add_host) plug into. An outside host has a /24 on the
    segment and routes only what the test gives it: never a default route."""

    BRIDGE = "br0"

    def __init__(self, prefix: str | None = None) -> None:
        self._ports = 0
        super().__init__(prefix)
        try:
            _run(["ip", "-n", self.node_ns, "link", "add", self.BRIDGE, "type", "bridge"])
            _run(["ip", "-n", self.node_ns, "link", "set", self.BRIDGE, "up"])
        except BaseException:
            self.cleanup()
            raise

    def new_port_name(self) -> str:
        name = f"{self.prefix}p{self._ports}"
        self._ports += 1
        return name

    def attach_port(self, port: str) -> None:
        _run(["ip", "-n", self.node_ns, "link", "set", port, "master", self.BRIDGE])
        _run(["ip", "-n", self.node_ns, "link", "set", port, "up"])

    def add_host(self, name: str, ip: str, prefixlen: int = 24, ip6: str | None = None) -> Pod:
        """An outside host ``<prefix>-<name>`` with eth0 = ip/prefixlen (and
        ip6/64 if given) on the bridge."""
        if not _NAME_RE.match(name) or name == "node" or name in self.pods:
            raise ValueError(f"bad or duplicate host name {name!r}")
        addr = ipaddress.ip_address(ip)
        if addr.version != 4 or addr not in TEST_NET4:
            raise ValueError(f"host {name}: {ip} must be an IPv4 address in {TEST_NET4}")
        ns = f"{self.prefix}-{name}"
        port = self.new_port_name()
        self._add_ns(ns)
        host = Pod(ns=ns, ip=str(addr), host_if=port)
        self.pods[name] = host
        _run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.node_ns])
        self.attach_port(port)
        _run(["ip", "-n", ns, "addr", "add", f"{addr}/{prefixlen}", "dev", "eth0"])
        if ip6 is not None:
            a6 = ipaddress.ip_address(ip6)
            if a6.version != 6 or a6 not in TEST_NET6:
                raise ValueError(f"host {name}: {ip6} must be an IPv6 address in {TEST_NET6}")
            _run(["ip", "-n", ns, "-6", "addr", "add", f"{a6}/64", "dev", "eth0", "nodad"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        return host

    def full_checksums(self, name: str) -> None:
        """Frames host ``name`` sends carry whole TCP/UDP checksums, as
        frames from a wire do. A veth offloads them by default: its peer
        gets them partial, marked on the skb, which tc's helpers keep right
        but an XDP program rewriting the frame itself cannot see (it sends
        a frame whose checksum no receiver accepts)."""
        cp = self.exec_in(name, [sys.executable, "-c", _TX_CSUM_OFF, "eth0"])
        if cp.returncode != 0:
            raise TopologyError(f"turning off checksum offload in {name}: {cp.stderr.strip()}")


# ETHTOOL_STXCSUM (0x17) off through SIOCETHTOOL, for hosts without ethtool(8).
_TX_CSUM_OFF = r"""
import ctypes, fcntl, socket, struct, sys
val = ctypes.create_string_buffer(struct.pack("II", 0x17, 0), 8)
ifr = struct.pack("16sP", sys.argv[1].encode(), ctypes.addressof(val)).ljust(40, b"\0")
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    fcntl.ioctl(s.fileno(), 0x8946, ifr)
"""


def _delete_ns(ns: str) -> None:
    if not (NETNS_DIR / ns).exists():
        return
    cp = _run(["ip", "netns", "del", ns], check=False)
    if cp.returncode != 0 and (NETNS_DIR / ns).exists():
        raise TopologyError(f"ip netns del {ns} failed: {cp.stderr.strip()}")


def wait_for_line(proc: subprocess.Popen[Any], want: str, timeout: float, what: str = "process") -> None:
    """Read ``proc.stdout`` until a line equal to ``want``; fail if the
    process exits or ``timeout`` passes first (no hang on a dead server)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TopologyError(f"{what} did not print {want!r} within {timeout:g}s")
        # select + os.read on the raw fd: a buffered readline() could block
        # past the deadline.
        ready, _, _ = select.select([fd], [], [], min(left, 0.2))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                proc.wait(1)
                raise TopologyError(f"{what} exited ({proc.returncode}) before printing {want!r}")
            buf += chunk
            if want.encode() in buf.splitlines():
                return
        elif proc.poll() is not None:
            raise TopologyError(f"{what} exited ({proc.returncode}) before printing {want!r}")


if __name__ == "__main__":
    # Manual aid: `python3 topo.py cleanup` removes leftovers of dead runs.
    if sys.argv[1:] == ["cleanup"]:
        for name in Topology.cleanup_stale():
            print(f"deleted {name}")
    else:
        sys.exit("usage: topo.py cleanup")
