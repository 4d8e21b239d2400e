"""Load the compiled dataplane with libbpf and pin its maps.

Maps are pinned by name under one bpffs directory per instance. When a map
is already pinned there (a restart), libbpf reuses it instead of creating an
empty one (the device map sp_uplinks: the loader itself, DEVICE_MAPS), so
the backends, slots and conntrack of the running dataplane survive the
agent. One pinned with another capacity than asked for is set
aside and carried into a new one (ctrl.dataplane.migrate). The programs
themselves are attached by ctrl.dataplane.attach; a tc filter holds a
reference to each, so they too outlive the agent.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import abi, migrate
from .abi import Hairpin, MapSizes, map_base, map_name, map_names
from .libbpf import BPFError, check, explain, ffi, lib
from .maps import Map

PROGRAM = "sp_tc_ingress"  # DNAT of packets pods send
EGRESS_PROGRAM = "sp_tc_egress"  # reverse NAT of replies on their way into pods
EXT_PROGRAM = "sp_ext_ingress"  # external interfaces: DNAT, reverse SNAT of replies
EXT_EGRESS_PROGRAM = "sp_ext_egress"  # external interfaces: SNAT, reverse NAT of replies
XDP_PROGRAM = "sp_ext_xdp"  # external interfaces, XDP: source range drops, flows sent back out
# Host clients (ebpf/host_sock.c): cgroup socket programs, loaded only when
# asked for, so a kernel that refuses them still runs the tc programs. The
# ones that turn a backend back into its frontend come first: attached in
# this order, no socket is given a backend it could not name back.
HOST_PROGRAMS = (
    "sp_host_recvmsg4",
    "sp_host_recvmsg6",
    "sp_host_getpeername4",
    "sp_host_getpeername6",
    "sp_host_connect4",
    "sp_host_connect6",
    "sp_host_sendmsg4",
    "sp_host_sendmsg6",
)
# Maps only the host programs use: not created without them.
HOST_MAPS = ("sp_sock",)
# Device maps: pinned and reused by us, not by libbpf, whose check of a
# pinned map before reusing it (libbpf 1.1, Debian 12's) compares its flags
# with the object's and finds BPF_F_RDONLY_PROG, which the kernel adds to
# every device map: a restart would fail to load.
DEVICE_MAPS = ("sp_uplinks",)

# The program's read-only global struct sp_hairpin lives alone in this
# section, which libbpf loads as an internal map of its own.
HAIRPIN_SECTION = ".rodata.hairpin"
# The same for the XDP program's struct sp_xdp_cfg.
XDP_SECTION = ".rodata.xdp"

DEFAULT_PIN_DIR = "/sys/fs/bpf/sliceproxy"


def object_path() -> Path:
    """The compiled tc programs: build/ next to the package, or SLICEPROXY_BPF_OBJECT."""
    env = os.environ.get("SLICEPROXY_BPF_OBJECT")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    for cand in (root / "build" / "sliceproxy_tc.bpf.o", Path("/usr/share/sliceproxy/sliceproxy_tc.bpf.o")):
        if cand.exists():
            return cand
    return root / "build" / "sliceproxy_tc.bpf.o"


@dataclass
class Dataplane:
    """A loaded object: its maps by name and the program's fd."""

    pin_dir: str | None
    maps: dict[str, Map]
    prog_fd: int
    egress_fd: int
    ext_fd: int = -1
    ext_egress_fd: int = -1
    xdp_fd: int = -1  # sp_ext_xdp (ctrl.dataplane.attach attaches it: xdp_attach)
    # sp_xdp_cfg.cookie of this load: what the XDP program's handoff
    # metadata carries, and what tc's ingress trusts metadata by.
    xdp_cookie: int = 0
    # Host clients' programs by name (HOST_PROGRAMS): (fd, BPF attach
    # type). Empty when loaded without them.
    host_progs: dict[str, tuple[int, int]] = field(default_factory=dict)
    _obj: object = field(repr=False, default=None)

    def test_run(
        self,
        packet: bytes,
        repeat: int = 1,
        egress: bool = False,
        external: bool = False,
        ctx: bytes | None = None,
        xdp: bool = False,
    ) -> tuple[int, bytes, int]:
        """Run the ingress (or egress) program of pod interfaces, or of
        external ones, on one packet in the kernel (BPF_PROG_TEST_RUN):
        (tc verdict, packet as the program left it, mean ns per run). ctx:
        the __sk_buff the run starts from (its gso_size, say), if given.
        xdp: the external interfaces' XDP program instead (its XDP action;
        ctx then a struct xdp_md, its ingress_ifindex say)."""
        if xdp:
            return test_run(self.xdp_fd, packet, repeat, ctx)
        if external:
            fd = self.ext_egress_fd if egress else self.ext_fd
        else:
            fd = self.egress_fd if egress else self.prog_fd
        return test_run(fd, packet, repeat, ctx)

    def close(self) -> None:
        if self._obj is not None:
            lib().bpf_object__close(self._obj)
            self._obj = None


def test_run(prog_fd: int, packet: bytes, repeat: int = 1, ctx: bytes | None = None) -> tuple[int, bytes, int]:
    """Run a loaded tc program on one packet in the kernel
    (BPF_PROG_TEST_RUN), `repeat` times: (its return value, unsigned as
    the kernel gives it; the packet as it left it; mean ns per run)."""
    out = ffi.new("char[]", len(packet) + 256)
    fields = {
        "sz": ffi.sizeof("struct bpf_test_run_opts"),
        "data_in": ffi.from_buffer(packet),
        "data_size_in": len(packet),
        "data_out": out,
        "data_size_out": len(packet) + 256,
        "repeat": repeat,
    }
    if ctx is not None:
        fields |= {"ctx_in": ffi.from_buffer(ctx), "ctx_size_in": len(ctx)}
    opts = ffi.new("struct bpf_test_run_opts *", fields)
    check(lib().bpf_prog_test_run_opts(prog_fd, opts), "BPF_PROG_TEST_RUN")
    return opts.retval, bytes(ffi.buffer(out, opts.data_size_out)), opts.duration


def is_bpffs(path: str) -> bool:
    """True if path lies on a bpf filesystem (pins only work there)."""
    p = Path(path).resolve()
    best = ("", "")
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt, fstype = parts[1], parts[2]
            if (str(p) == mnt or str(p).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype)
    return best[1] == "bpf"


def _make_pin_dir(pin_dir: str) -> bool:
    """Create the pin directory on a bpffs; True if it was made now."""
    parent = os.path.dirname(pin_dir.rstrip("/")) or "/"
    if not is_bpffs(parent if not os.path.exists(pin_dir) else pin_dir):
        raise BPFError(
            errno.ENOTSUP,
            f"pin directory {pin_dir} is not on a bpf filesystem: mount one with "
            f"`mount -t bpf bpf /sys/fs/bpf` or pass --pin-dir",
        )
    created = not os.path.exists(pin_dir)
    try:
        os.makedirs(pin_dir, exist_ok=True)
    except PermissionError as e:
        raise BPFError(errno.EPERM, f"cannot create pin directory {pin_dir}: {explain(errno.EPERM)}") from e
    return created


class PinDirBusy(BPFError):
    """Another process holds the pin directory's lock."""


@dataclass
class PinLock:
    """An exclusive lock on one pin directory, held until release() or
    the end of the process (the kernel drops it then, SIGKILL included)."""

    pin_dir: str
    fd: int
    created: bool  # the directory was made by lock_pin_dir

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1

    def discard(self) -> None:
        """Release, and remove the directory if we made it and it is empty."""
        self.release()
        if self.created:
            with contextlib.suppress(OSError):
                os.rmdir(self.pin_dir)


def lock_pin_dir(pin_dir: str, create: bool = True) -> PinLock:
    """Take the pin directory for this process alone, or raise PinDirBusy
    naming the process that holds it. Two agents on one directory undo each
    other's writes (each prunes what the other programmed). bpffs holds
    only pins and directories, so the lock is a flock on the directory
    itself: every process that sees this bpffs sees it, in any container
    or mount namespace, and a dead holder never leaves it behind. `sliceproxy
    dump` takes no lock: it only reads."""
    created = _make_pin_dir(pin_dir) if create else False
    fd = os.open(pin_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(fd)
        os.close(fd)
        raise PinDirBusy(errno.EBUSY, f"pin directory {pin_dir} is in use by {holder}") from None
    except BaseException:
        os.close(fd)
        raise
    return PinLock(pin_dir, fd, created)


def lock_holder(fd: int) -> str:
    """Who holds the flock on fd's file: "pid N (its command line)", from
    /proc/locks (pid 0 there: a process of another PID namespace)."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pid = None
    with contextlib.suppress(OSError), open("/proc/locks") as f:
        for line in f:
            # "1: FLOCK  ADVISORY  WRITE 4242 00:28:25027 0 EOF"; waiters carry "->".
            parts = line.split()
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == key:
                pid = int(parts[4])
                break
    if not pid:
        return "a process this one cannot see (another PID namespace: a container)"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    if len(cmd) > 200:
        cmd = cmd[:197] + "..."
    return f"pid {pid} ({cmd})" if cmd else f"pid {pid}"


def load(
    obj_path: str | os.PathLike | None = None,
    pin_dir: str | None = DEFAULT_PIN_DIR,
    sizes: MapSizes | None = None,
    hairpin: Hairpin | None = None,
    host_clients: bool = False,
    xdp_forward: bool = False,
) -> Dataplane:
    """Open, size, pin and load the programs; pin_dir None means no pins
    (private maps, as the datapath tests use); hairpin None: no hairpin;
    host_clients: also the cgroup socket programs of host clients (and
    their maps); xdp_forward: the XDP program sends flows to other nodes'
    backends back out itself (struct sp_xdp_cfg)."""
    obj_path = str(obj_path or object_path())
    if not os.path.exists(obj_path):
        raise BPFError(errno.ENOENT, f"BPF object {obj_path} not found: run `make` to build it")
    sizes = sizes or MapSizes()
    lb = lib()
    created = _make_pin_dir(pin_dir) if pin_dir is not None else False
    resized: list[migrate.Resize] = []
    obj = lb.bpf_object__open_file(obj_path.encode(), ffi.NULL)
    if obj == ffi.NULL:
        err = ffi.errno
        raise BPFError(err, f"opening BPF object {obj_path}: {os.strerror(err)}")
    try:
        btf = lb.bpf_object__btf(obj)
        if btf == ffi.NULL:
            raise abi.LayoutError(f"{obj_path} has no BTF: build it with clang -g")
        abi.check_btf(btf)
        m = lb.bpf_object__next_map(obj, ffi.NULL)
        bpf_maps = {}
        hairpin_set = xdp_set = False
        cookie = 0
        while m != ffi.NULL:
            name = ffi.string(lb.bpf_map__name(m)).decode()
            if name == HAIRPIN_SECTION:
                _set_hairpin(m, hairpin or Hairpin())
                hairpin_set = True
            if name == XDP_SECTION:
                cookie = _new_cookie()
                _set_initial(m, XDP_SECTION, abi.pack("sp_xdp_cfg", forward=int(xdp_forward), cookie=cookie))
                xdp_set = True
            if not host_clients and map_base(name) in HOST_MAPS:
                lb.bpf_map__set_autocreate(m, False)
            elif "." not in name:  # global data (.rodata.xdp, <object>.bss): not ours to pin
                bpf_maps[name] = m
                size = sizes.for_map(name)
                if size is not None:
                    lb.bpf_map__set_max_entries(m, size)
                if pin_dir is not None and map_base(name) not in DEVICE_MAPS:
                    lb.bpf_map__set_pin_path(m, os.path.join(pin_dir, name).encode())
            m = lb.bpf_object__next_map(obj, m)
        for section, found in ((HAIRPIN_SECTION, hairpin_set), (XDP_SECTION, xdp_set)):
            if not found:
                raise BPFError(errno.ENOENT, f"{obj_path} has no {section} section: rebuild it with `make`")
        if pin_dir is not None:
            # A pinned map of another capacity cannot be reused (libbpf
            # refuses it): set it aside for ctrl.dataplane.migrate to carry over.
            wanted = {name: int(lb.bpf_map__max_entries(bm)) for name, bm in bpf_maps.items()}
            resized = migrate.set_aside(pin_dir, wanted)
            for name, bm in bpf_maps.items():
                if map_base(name) in DEVICE_MAPS:
                    _reuse_pinned(bm, os.path.join(pin_dir, name))
        for name in HOST_PROGRAMS:
            prog = lb.bpf_object__find_program_by_name(obj, name.encode())
            if prog == ffi.NULL:
                raise BPFError(errno.ENOENT, f"{obj_path} has no program {name}: rebuild it with `make`")
            if not host_clients:
                lb.bpf_program__set_autoload(prog, False)
        ret = lb.bpf_object__load(obj)
        if ret < 0:
            if resized and pin_dir is not None:
                migrate.put_back(pin_dir, resized)
            err = -ret if ret != -1 else ffi.errno
            hint = explain(err) + " (--log-level debug shows libbpf's and the verifier's detail)"
            if err == errno.EINVAL and pin_dir is not None:
                hint += (
                    f"; or a map pinned in {pin_dir} has another layout than this build with the same "
                    f"version (a build from another tree: `sliceproxy uninstall --pin-dir {pin_dir}` removes it)"
                )
            raise BPFError(err, f"loading BPF object {obj_path}: {hint}")
        fds = {}
        for name in (PROGRAM, EGRESS_PROGRAM, EXT_PROGRAM, EXT_EGRESS_PROGRAM, XDP_PROGRAM):
            prog = lb.bpf_object__find_program_by_name(obj, name.encode())
            if prog == ffi.NULL:
                raise BPFError(errno.ENOENT, f"{obj_path} has no program {name}")
            fds[name] = lb.bpf_program__fd(prog)
        host_progs = {}
        for name in HOST_PROGRAMS if host_clients else ():
            prog = lb.bpf_object__find_program_by_name(obj, name.encode())
            host_progs[name] = (lb.bpf_program__fd(prog), lb.bpf_program__expected_attach_type(prog))
        if pin_dir is not None:
            for name, bm in bpf_maps.items():
                path = os.path.join(pin_dir, name)
                if map_base(name) in DEVICE_MAPS and not os.path.exists(path):
                    check(lb.bpf_obj_pin(lb.bpf_map__fd(bm), path.encode()), f"pinning map {path}")
        maps = {name: Map(lb.bpf_map__fd(m), name) for name, m in bpf_maps.items()}
        missing = set(map_names()) - set(maps) - (set() if host_clients else {map_name(b) for b in HOST_MAPS})
        if missing:
            raise BPFError(errno.ENOENT, f"{obj_path} lacks maps {sorted(missing)}")
        return Dataplane(
            pin_dir=pin_dir,
            maps=maps,
            prog_fd=fds[PROGRAM],
            egress_fd=fds[EGRESS_PROGRAM],
            ext_fd=fds[EXT_PROGRAM],
            ext_egress_fd=fds[EXT_EGRESS_PROGRAM],
            xdp_fd=fds[XDP_PROGRAM],
            xdp_cookie=cookie,
            host_progs=host_progs,
            _obj=obj,
        )
    except BaseException:
        lb.bpf_object__close(obj)
        if pin_dir is not None and created:
            with contextlib.suppress(OSError):
                os.rmdir(pin_dir)  # only if still empty
        raise


def _new_cookie() -> int:
    """A random, nonzero sp_xdp_cfg.cookie: each load's own, so tc trusts
    the handoff metadata of this load's XDP program only (not an older
    load's still attached somewhere, nor another tool's)."""
    while True:
        cookie = int.from_bytes(os.urandom(8), "little")
        if cookie:
            return cookie


def _reuse_pinned(m: object, path: str) -> None:
    """Have the object use the map pinned at path, if one is there of the
    same type, key and value sizes and capacity (a resize set it aside
    already); one that differs otherwise is unpinned (a device map holds
    only what the agent writes at attach), and the object creates its own,
    pinned after load."""
    if not os.path.exists(path):
        return
    lb = lib()
    old = Map.open_pinned(path)
    try:
        same = (old.info.type, old.key_size, old.value_size, old.max_entries) == (
            lb.bpf_map__type(m),
            lb.bpf_map__key_size(m),
            lb.bpf_map__value_size(m),
            lb.bpf_map__max_entries(m),
        )
        if same:
            check(lb.bpf_map__reuse_fd(m, old.fd), f"reusing map {path}")
            return
    finally:
        old.close()
    os.unlink(path)


def _set_hairpin(m: object, hairpin: Hairpin) -> None:
    """Write the hairpin addresses into the program's sp_hairpin global
    (the initial value of its internal map, before load; read-only after)."""
    _set_initial(m, HAIRPIN_SECTION, hairpin.packed())


def _set_initial(m: object, section: str, packed: bytes) -> None:
    """Write a read-only global alone in its section (the initial value of
    its internal map, before load; read-only after)."""
    size = ffi.new("size_t *")
    data = lib().bpf_map__initial_value(m, size)
    if data == ffi.NULL or size[0] != len(packed):
        raise abi.LayoutError(f"{section} holds {size[0]} bytes, its struct {len(packed)}: rebuild with `make`")
    ffi.memmove(data, packed, len(packed))


def open_pinned(pin_dir: str = DEFAULT_PIN_DIR) -> dict[str, Map]:
    """The pinned maps of a running (or dead) agent, for dump and inspection."""
    if not os.path.isdir(pin_dir):
        raise BPFError(errno.ENOENT, f"no sliceproxy maps pinned in {pin_dir} (is the agent running there?)")
    out = {}
    for name in map_names():
        path = os.path.join(pin_dir, name)
        if os.path.exists(path):
            out[name] = Map.open_pinned(path)
    if map_name("sp_svc") not in out:
        raise BPFError(errno.ENOENT, f"{pin_dir} holds no {map_name('sp_svc')} map")
    return out
