"""The kernel side of `sliceproxy trace` (docs/inspecting.md, "Live flows").

The tap (ebpf/trace/tap.c) is compiled by bcc when a trace starts, with the
filter and the pinned maps' paths as #defines, and attached in front of our
program on every hook of this pin directory's dataplane: the same clsact
hook, one tc priority number lower (it runs first), returning "continue".
It arms this CPU's sp_trace entry for the packets it matches; our program
sends one event per armed packet at its verdict into the ring buffer
sp_events (ebpf/lib/trace.h), which `Trace.poll` reads with libbpf.

Only one trace runs per pin directory (a flock in /run/sliceproxy): two
would share one ring buffer and each see half the events. A tap left by a
trace that was killed outright (SIGKILL) names its pin directory in its
filter name: the next trace, and `sliceproxy uninstall`, find and remove it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import abi, attach, loader
from .libbpf import BPFError, ffi, lib
from .maps import Map

# One number before ours: tc runs a hook's filters by ascending priority.
TAP_PRIO = attach.PRIO - 1
TAP_HANDLE = 1
_TAP_NAME = "sliceproxy-trace"
LOCK_DIR = "/run/sliceproxy"

# Our program on a hook -> the tap function in front of it.
TAP_FUNCTIONS = {
    loader.PROGRAM: "tap_pod_ingress",
    loader.EGRESS_PROGRAM: "tap_pod_egress",
    loader.EXT_PROGRAM: "tap_ext_ingress",
    loader.EXT_EGRESS_PROGRAM: "tap_ext_egress",
}
_PARENTS = (attach.INGRESS_PARENT, attach.EGRESS_PARENT)


class TraceUnavailable(RuntimeError):
    """This node cannot compile the tap (no bcc, no kernel headers): one
    sentence saying what to install. `sliceproxy run` never needs either."""


def tap_name(pin_dir: str) -> str:
    """The tc filter name of a tap (TCA_BPF_NAME): it names the pin
    directory, so a leftover is found by the dataplane it belongs to."""
    return f"{_TAP_NAME} {os.path.normpath(pin_dir)}"


def tap_source() -> Path:
    """ebpf/trace/tap.c, next to the header the ABI module reads."""
    return abi.header_path().parent / "trace" / "tap.c"


# -- bcc and the kernel headers it needs --------------------------------------------


def import_bcc() -> Any:
    """bcc's Python module (Debian: python3-bpfcc), or TraceUnavailable."""
    try:
        import bcc  # type: ignore[import-not-found]
    except ImportError as e:
        raise TraceUnavailable(
            "sliceproxy trace needs bcc's Python module, which this Python cannot import: install "
            "python3-bpfcc (Debian, Ubuntu; `make venv` links it into the virtualenv) or your "
            f"distribution's bcc package ({e})"
        ) from None
    return bcc


def debian_headers(arch_dirs: list[str] | None = None) -> tuple[str, str] | None:
    """The newest Debian kernel headers package installed: (its
    architecture directory, the -common directory it builds on), or None.
    Debian splits a kernel's headers in two (linux-headers-V-amd64 holds the
    generated ones and includes linux-headers-V-common's Makefile)."""
    if arch_dirs is None:
        arch_dirs = glob.glob("/usr/src/linux-headers-*")
    found = []
    for d in arch_dirs:
        try:
            text = Path(d, "Makefile").read_text()
        except OSError:
            continue
        m = re.search(r"^include (\S+)/Makefile$", text, re.M)
        if not m or not os.path.isdir(os.path.join(d, "include", "generated")):
            continue
        nums = tuple(int(x) for x in re.findall(r"\d+", os.path.basename(d)))
        found.append((nums, d, m.group(1)))
    if not found:
        return None
    _, arch_dir, common = max(found)
    return arch_dir, common


def merged_kernel_tree(arch_dir: str, common: str, into: str) -> str:
    """A kernel tree bcc can use (BCC_KERNEL_SOURCE names one directory),
    made of symlinks into Debian's two: include/ and arch/<arch>/include/
    hold the entries of both. A tc classifier needs only headers, never
    the running kernel's own build: a 6.1 tree serves a 6.18 kernel."""
    os.makedirs(into, exist_ok=True)
    for sub in ["include", *(os.path.relpath(p, common) for p in glob.glob(os.path.join(common, "arch/*/include")))]:
        dst = os.path.join(into, sub)
        os.makedirs(dst, exist_ok=True)
        for top in (common, arch_dir):
            for entry in glob.glob(os.path.join(top, sub, "*")):
                link = os.path.join(dst, os.path.basename(entry))
                if not os.path.lexists(link):
                    os.symlink(entry, link)
    return into


def running_kernel_headers(release: str) -> bool:
    """Where bcc looks by itself: the running kernel's build tree, or the
    headers it carries (CONFIG_IKHEADERS)."""
    return os.path.isdir(f"/lib/modules/{release}/build") or os.path.exists("/sys/kernel/kheaders.tar.xz")


def headers() -> tuple[str, str] | None:
    """None when bcc finds kernel headers by itself (the running kernel's,
    or BCC_KERNEL_SOURCE set by the operator), else Debian's (debian_headers);
    TraceUnavailable when there are none."""
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return None
    release = os.uname().release
    if running_kernel_headers(release):
        return None
    deb = debian_headers()
    if deb is None:
        raise TraceUnavailable(
            f"sliceproxy trace needs kernel headers for bcc and this node has none (not in "
            f"/lib/modules/{release}/build nor /usr/src/linux-headers-*): install linux-headers-amd64 "
            "(Debian; any version serves), your distribution's kernel headers package, or set BCC_KERNEL_SOURCE"
        )
    return deb


def check_tools() -> None:
    """TraceUnavailable, saying what to install, unless bcc and kernel
    headers are there: checked before anything is attached."""
    import_bcc()
    headers()
    if not tap_source().exists():
        raise TraceUnavailable(f"sliceproxy trace needs the tap's source, {tap_source()}, which is not there")


# -- the filter ---------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    """What a trace shows. service: "namespace/name"; frontend: (address in
    map form, port); backend: an address in map form; verdicts: names of
    enum sp_verdict (lower case, abi.verdicts()), empty: every one; rate:
    events per second, over every CPU."""

    service: str | None = None
    frontend: tuple[bytes, int] | None = None
    backend: bytes | None = None
    verdicts: frozenset[str] = frozenset()
    rate: int = 100

    def verdict_mask(self) -> int:
        names = abi.verdicts()
        if not self.verdicts:
            return (1 << len(names)) - 1
        return sum(1 << i for i, n in enumerate(names) if n in self.verdicts)


def _words(addr: bytes) -> list[int]:
    # The tap reads an address as four __u32 in the CPU's own order.
    return [int.from_bytes(addr[i : i + 4], sys.byteorder) for i in (0, 4, 8, 12)]


def _addr_match(var: str, addr: bytes) -> str:
    return " && ".join(f"{var}[{i}] == {w:#x}U" for i, w in enumerate(_words(addr)))


def prelude(pin_dir: str, f: Filter, ncpu: int) -> str:
    """The #defines the tap is compiled with (see ebpf/trace/tap.c)."""
    lines = [f'#define TAP_PIN_{tag} "{os.path.join(pin_dir, abi.map_name(base))}"' for tag, base in _PINNED]
    if f.frontend is not None:
        addr, port = f.frontend
        lines.append(f"#define TAP_FRONT_MATCH(w, port) ({_addr_match('w', addr)} && (port) == {port})")
    else:
        lines.append("#define TAP_FRONT_MATCH(w, port) 1")
    if f.backend is not None:
        lines.append(f"#define TAP_BACKEND_MATCH(w) ({_addr_match('w', f.backend)})")
    else:
        lines.append("#define TAP_BACKEND_MATCH(w) 1")
    if f.service is not None:
        # sp_names holds "namespace/name:port/PROTO": the Service is the
        # part before the colon (names have none).
        want = (f.service + ":").encode()
        cmp = " && ".join(f"(n)[{i}] == {b}" for i, b in enumerate(want))
        lines += ["#define TAP_SVC_FILTER 1", f"#define TAP_SVC_MATCH(n) ({cmp})"]
    # Each CPU gets its share of the rate, a second's worth at most at once.
    per_cpu = max(1, f.rate // max(1, ncpu))
    lines += [f"#define TAP_NS_PER_TOKEN {max(1, 1_000_000_000 // per_cpu)}ULL", f"#define TAP_BURST {per_cpu}"]
    return "\n".join(lines) + "\n"


_PINNED = (("SVC", "sp_svc"), ("CT", "sp_ct"), ("NAMES", "sp_names"), ("TRACE", "sp_trace"))


def compile_tap(pin_dir: str, f: Filter, workdir: str) -> tuple[Any, dict[str, int]]:
    """The tap compiled by bcc against this pin directory's maps: (the bcc
    object, which must outlive the filters' attach; fd per tap function)."""
    for _, base in _PINNED:
        path = os.path.join(pin_dir, abi.map_name(base))
        if not os.path.exists(path):
            # bcc would create and pin an empty map there.
            raise BPFError(
                errno.ENOENT, f"{pin_dir} holds no {abi.map_name(base)}: is an agent of this version running there?"
            )
    bcc = import_bcc()
    deb = headers()
    text = prelude(pin_dir, f, lib().libbpf_num_possible_cpus()) + tap_source().read_text()
    # bcc reads BCC_KERNEL_SOURCE while it compiles: set for that only, so
    # no later compile of this process uses a tree removed since.
    before = os.environ.get("BCC_KERNEL_SOURCE")
    if deb is not None:
        os.environ["BCC_KERNEL_SOURCE"] = merged_kernel_tree(*deb, os.path.join(workdir, "kernel"))
    try:
        b = bcc.BPF(text=text.encode(), cflags=[f"-I{abi.header_path().parent}"])
    except Exception as e:  # bcc raises a bare Exception, its errors went to stderr
        raise BPFError(errno.EINVAL, f"bcc could not compile {tap_source()} (its errors are above): {e}") from None
    finally:
        if before is None:
            os.environ.pop("BCC_KERNEL_SOURCE", None)
        else:
            os.environ["BCC_KERNEL_SOURCE"] = before
    fds = {}
    for fn in TAP_FUNCTIONS.values():
        fds[fn] = b.load_func(fn.encode(), bcc.BPF.SCHED_CLS).fd
    return b, fds


# -- hooks, taps ---------------------------------------------------------------------


def _prog_maps(prog_id: int) -> tuple[str, set[int]]:
    """(name, ids of the maps it uses) of a loaded program."""
    fd = lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return "", set()
    try:
        ids = ffi.new("__u32[]", 64)
        info = ffi.new("struct bpf_prog_info_head *", {"nr_map_ids": 64, "map_ids": int(ffi.cast("uintptr_t", ids))})
        size = ffi.new("__u32 *", ffi.sizeof("struct bpf_prog_info_head"))
        if lib().bpf_obj_get_info_by_fd(fd, info, size) < 0:
            return "", set()
        return ffi.string(info.name).decode(), {ids[i] for i in range(min(64, info.nr_map_ids))}
    finally:
        os.close(fd)


def _map_id(path: str) -> int:
    m = Map.open_pinned(path)
    try:
        info = ffi.new("struct bpf_map_info_head *")
        size = ffi.new("__u32 *", ffi.sizeof("struct bpf_map_info_head"))
        lib().bpf_obj_get_info_by_fd(m.fd, info, size)
        return int(info.id)
    finally:
        m.close()


def _filters(ipr: IPRoute, idx: int, parent: int) -> list:
    try:
        return list(ipr.get_filters(idx, parent=parent))
    except NetlinkError as e:
        if e.code in (errno.EINVAL, errno.ENOENT):
            return []  # no clsact there
        raise


TCA_BPF_ID = 11  # linux/pkt_cls.h: the id of the program a bpf filter runs


def _bpf_prog_id(opts: Any) -> int:
    """TCA_BPF_ID of a bpf filter's TCA_OPTIONS. pyroute2 does not decode
    it: its netlink attributes are read here from the message's bytes."""
    data, pos, end = opts.data, opts.offset + 4, opts.offset + opts.length
    while pos + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4:
            break
        if kind & 0x3FFF == TCA_BPF_ID and length >= 8:
            return int(struct.unpack_from("=I", data, pos + 4)[0])
        pos += (length + 3) & ~3
    return 0


@dataclass(frozen=True)
class Hook:
    ifname: str
    ifindex: int
    parent: int  # attach.INGRESS_PARENT or EGRESS_PARENT
    program: str  # ours there (loader.PROGRAM...)


def _bpf_filters(ipr: IPRoute, patterns: list[str], prio: int):
    """(interface, ifindex, parent, options) of every tc bpf filter of
    priority `prio` on the interfaces matching the patterns."""
    links = [(link.get_attr("IFLA_IFNAME"), link["index"]) for link in ipr.get_links()]
    names = set(attach.match_interfaces(patterns, [n for n, _ in links]))
    for ifname, idx in links:
        if ifname not in names:
            continue
        for parent in _PARENTS:
            for f in _filters(ipr, idx, parent):
                opts = f.get_attr("TCA_OPTIONS")
                if f.get_attr("TCA_KIND") == "bpf" and opts and (f["info"] >> 16) == prio:
                    yield ifname, idx, parent, opts


def our_hooks(pin_dir: str, patterns: list[str]) -> list[Hook]:
    """The hooks where a program of this pin directory's dataplane is
    attached (the one using its sp_trace map), on interfaces matching the
    patterns."""
    want = _map_id(os.path.join(pin_dir, abi.map_name("sp_trace")))
    out = []
    with IPRoute() as ipr:
        for ifname, idx, parent, opts in _bpf_filters(ipr, patterns, attach.PRIO):
            prog_id = _bpf_prog_id(opts)
            if not prog_id:
                continue
            name, maps = _prog_maps(prog_id)
            if want in maps and name in TAP_FUNCTIONS:
                out.append(Hook(ifname, idx, parent, name))
    return out


def attach_tap(hook: Hook, fd: int, pin_dir: str) -> None:
    with IPRoute() as ipr:
        ipr.tc(
            "replace-filter",
            "bpf",
            hook.ifindex,
            TAP_HANDLE,
            fd=fd,
            name=tap_name(pin_dir),
            parent=hook.parent,
            classid=1,
            direct_action=True,
            prio=TAP_PRIO,
        )


def _taps(ipr: IPRoute, pin_dir: str, patterns: list[str] | None) -> list[tuple[str, int, int]]:
    """(interface, ifindex, parent) of this pin directory's taps."""
    name = tap_name(pin_dir)
    return [
        (ifname, idx, parent)
        for ifname, idx, parent, opts in _bpf_filters(ipr, patterns or ["*"], TAP_PRIO)
        if opts.get_attr("TCA_BPF_NAME") == name
    ]


def taps(pin_dir: str, patterns: list[str] | None = None) -> list[tuple[str, int]]:
    """(interface, parent) of every tap of this pin directory's traces now."""
    with IPRoute() as ipr:
        return [(ifname, parent) for ifname, _, parent in _taps(ipr, pin_dir, patterns)]


def detach_taps(pin_dir: str, patterns: list[str] | None = None) -> int:
    """Remove the taps of this pin directory's traces from every interface
    matching the patterns (default every one): how many were removed."""
    n = 0
    with IPRoute() as ipr:
        for _, idx, parent in _taps(ipr, pin_dir, patterns):
            try:
                ipr.tc("del-filter", "bpf", idx, TAP_HANDLE, parent=parent, prio=TAP_PRIO)
                n += 1
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                    raise
    return n


# -- the lock ------------------------------------------------------------------------


def lock_path(pin_dir: str) -> str:
    flat = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.normpath(pin_dir).strip("/"))
    return os.path.join(LOCK_DIR, f"trace-{flat}.lock")


def lock_trace(pin_dir: str) -> int:
    """One trace per pin directory: a flock the kernel drops when the
    process dies, whatever kills it. The fd, or PinDirBusy naming the
    trace that holds it."""
    os.makedirs(LOCK_DIR, exist_ok=True)
    fd = os.open(lock_path(pin_dir), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = loader.lock_holder(fd)
        os.close(fd)
        raise loader.PinDirBusy(errno.EBUSY, f"a trace of {pin_dir} already runs: {holder}") from None
    return fd


def clear_killed(pin_dir: str, state: Map) -> int | None:
    """Undo what a trace killed outright left (docs/inspecting.md,
    "Detaching"): every CPU's sp_trace entry still asking for verdicts,
    which keeps the XDP program handing every packet to tc, and its taps,
    which cost every packet of their hooks. Done only when no trace holds
    the lock; the agent calls this on each interface refresh. The number of
    taps removed, or None when nothing was left (or a trace runs)."""
    running = abi.codec("sp_trace", ("verdicts",))
    if not any(running.unpack(v)[0] for v in state.lookup_percpu(abi.u32(0))):
        return None
    try:
        fd = lock_trace(pin_dir)
    except loader.PinDirBusy:
        return None  # a live trace: its own state
    try:
        n = detach_taps(pin_dir)
        set_state(state, abi.pack("sp_trace"))
    finally:
        os.close(fd)
    return n


# -- the trace -------------------------------------------------------------------------


@dataclass
class Counts:
    """Summed over CPUs, since this trace started."""

    emitted: int = 0
    limited: int = 0  # over --rate
    lost: int = 0  # the ring buffer was full


def set_state(m: Map, value: bytes) -> None:
    """Write struct sp_trace `value` as every CPU's entry of map m (sp_trace)."""
    one = value + bytes(m.stride - len(value))
    m.update(abi.u32(0), one * m._ncpu)


class EventReader:
    """The events in a ring buffer map (struct sp_trace_event, decoded by
    field name), handed to on_event by poll(). An exception raised by
    on_event stops that poll and is raised by it."""

    def __init__(self, rb: Map, on_event: Callable[[dict[str, Any]], None]) -> None:
        self._on_event = on_event
        self._error: BaseException | None = None
        self._cb = ffi.callback("int(void *, void *, size_t)", self._sample)
        self._rb = lib().ring_buffer__new(rb.fd, self._cb, ffi.NULL, ffi.NULL)
        if self._rb == ffi.NULL:
            raise BPFError(ffi.errno, f"opening ring buffer {rb.name}: {os.strerror(ffi.errno)}")

    def _sample(self, _ctx: Any, data: Any, size: int) -> int:
        try:
            self._on_event(abi.unpack("sp_trace_event", bytes(ffi.buffer(data, size))))
        except BaseException as e:  # noqa: BLE001 - raised again by poll(), not through C
            self._error = e
            return -1
        return 0

    def poll(self, timeout_ms: int) -> None:
        ret = lib().ring_buffer__poll(self._rb, timeout_ms)
        if self._error is not None:
            e, self._error = self._error, None
            raise e
        if ret < 0 and -ret != errno.EINTR:
            raise BPFError(-ret, f"reading ring buffer {abi.map_name('sp_events')}: {os.strerror(-ret)}")

    def close(self) -> None:
        if self._rb is not None:
            lib().ring_buffer__free(self._rb)
            self._rb = None


@dataclass
class Trace:
    """A running trace: the tap attached in front of every hook of one
    dataplane, the per-CPU state set, the ring buffer open. Close it (or
    leave the `with`) to detach: also on an exception."""

    pin_dir: str
    patterns: list[str]
    filter: Filter
    hooks: set[Hook] = field(default_factory=set)
    leftovers: int = 0  # taps of a killed trace removed at start
    _lock: int = -1
    _workdir: str = ""
    _bpf: Any = None
    _fds: dict[str, int] = field(default_factory=dict)
    _state: Map | None = None
    _reader: EventReader | None = None

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, on_event: Callable[[dict[str, Any]], None]) -> None:
        self._lock = lock_trace(self.pin_dir)
        try:
            self.leftovers = detach_taps(self.pin_dir)
            self._workdir = tempfile.mkdtemp(prefix="sliceproxy-trace-")
            self._bpf, self._fds = compile_tap(self.pin_dir, self.filter, self._workdir)
            self._state = Map.open_pinned(os.path.join(self.pin_dir, abi.map_name("sp_trace")))
            self._reset_state(tokens=max(1, self.filter.rate // max(1, self._state._ncpu)))
            rb = Map.open_pinned(os.path.join(self.pin_dir, abi.map_name("sp_events")))
            try:
                self._reader = EventReader(rb, on_event)
            finally:
                rb.close()  # the reader keeps its own mapping of the buffer
            self.refresh()
        except BaseException:
            self.close()
            raise

    def _reset_state(self, tokens: int) -> None:
        """Every CPU's sp_trace entry: disarmed, counters at zero, the
        verdicts asked for, a full bucket."""
        assert self._state is not None
        set_state(
            self._state, abi.pack("sp_trace", tokens=tokens, verdicts=self.filter.verdict_mask() if tokens else 0)
        )

    def refresh(self) -> list[Hook]:
        """Put the tap in front of hooks that appeared (new pods); forget
        the ones gone. The hooks tapped now."""
        live = set(our_hooks(self.pin_dir, self.patterns))
        new = sorted(live - self.hooks, key=lambda h: (h.ifname, h.parent))
        for h in new:
            try:
                attach_tap(h, self._fds[TAP_FUNCTIONS[h.program]], self.pin_dir)
            except NetlinkError as e:
                if e.code != errno.ENODEV:  # the interface went meanwhile
                    raise
                live.discard(h)
        self.hooks = live
        return new

    def poll(self, timeout_ms: int) -> None:
        """Deliver the events that arrive within timeout_ms to on_event."""
        assert self._reader is not None
        self._reader.poll(timeout_ms)

    def counts(self) -> Counts:
        if self._state is None:
            return Counts()
        c = abi.codec("sp_trace", ("emitted", "limited", "lost"))
        vals = [c.unpack(v) for v in self._state.lookup_percpu(abi.u32(0))]
        return Counts(*(sum(v[i] for v in vals) for i in range(3)))

    def close(self) -> None:
        """Detach the taps, then disarm every CPU: nothing of the trace is
        left on a hook, and our program sends no more events."""
        with contextlib.suppress(Exception):
            detach_taps(self.pin_dir)
        self.hooks = set()
        if self._state is not None:
            with contextlib.suppress(Exception):
                self._reset_state(tokens=0)
            self._state.close()
            self._state = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._bpf is not None:
            with contextlib.suppress(Exception):
                self._bpf.cleanup()
            self._bpf = None
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = ""
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1
