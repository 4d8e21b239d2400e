"""Load the compiled dataplane with libbpf and pin its maps.

Maps are pinned by name under one bpffs directory per instance. When a map
is already pinned there (a restart), libbpf reuses it instead of creating an
empty one, so the backends, slots and conntrack of the running dataplane
survive the agent. The program itself is attached by ctrl.attach; a tc
filter holds a reference to it, so it too outlives the agent.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import layout
from .layout import map_name as mn
from .libbpf import BPFError, check, explain, ffi, lib
from .maps import Map
from .sizes import MapSizes

PROGRAM = "sp_tc_ingress"  # DNAT of packets pods send
EGRESS_PROGRAM = "sp_tc_egress"  # reverse NAT of replies on their way into pods
EXT_PROGRAM = "sp_ext_ingress"  # external interfaces: DNAT, reverse SNAT of replies
EXT_EGRESS_PROGRAM = "sp_ext_egress"  # external interfaces: SNAT, reverse NAT of replies

# The program's read-only global struct sp_hairpin lives alone in this
# section, which libbpf loads as an internal map of its own.
HAIRPIN_SECTION = ".rodata.hairpin"

MAP_BASES = ("sp_svc", "sp_slot", "sp_be", "sp_ct", "sp_aff", "sp_stats", "sp_names", "sp_src", "sp_cfg")


def map_names() -> list[str]:
    """The maps of this layout version (names from ebpf/sliceproxy.h)."""
    return [mn(b) for b in MAP_BASES]


DEFAULT_PIN_DIR = "/sys/fs/bpf/sliceproxy"


@dataclass(frozen=True)
class Hairpin:
    """The source addresses a pod's flow gets when its Service picks the pod
    itself as backend (16-byte map form, see ctrl.objects.addr16), per
    family; None: no hairpin for that family. Set in the program before
    load: changing them takes a reload (an agent restart)."""

    addr4: bytes | None = None
    addr6: bytes | None = None


@dataclass
class Dataplane:
    """A loaded object: its maps by name and the program's fd."""

    pin_dir: str | None
    maps: dict[str, Map]
    prog_fd: int
    egress_fd: int
    ext_fd: int = -1
    ext_egress_fd: int = -1
    _obj: object = field(repr=False, default=None)

    def test_run(
        self, packet: bytes, repeat: int = 1, egress: bool = False, external: bool = False
    ) -> tuple[int, bytes, int]:
        """Run the ingress (or egress) program of pod interfaces, or of
        external ones, on one packet in the kernel (BPF_PROG_TEST_RUN):
        (tc verdict, packet as the program left it, mean ns per run)."""
        if external:
            fd = self.ext_egress_fd if egress else self.ext_fd
        else:
            fd = self.egress_fd if egress else self.prog_fd
        out = ffi.new("char[]", len(packet) + 256)
        opts = ffi.new(
            "struct bpf_test_run_opts *",
            {
                "sz": ffi.sizeof("struct bpf_test_run_opts"),
                "data_in": ffi.from_buffer(packet),
                "data_size_in": len(packet),
                "data_out": out,
                "data_size_out": len(packet) + 256,
                "repeat": repeat,
            },
        )
        check(lib().bpf_prog_test_run_opts(fd, opts), "BPF_PROG_TEST_RUN")
        return opts.retval, bytes(ffi.buffer(out, opts.data_size_out)), opts.duration

    def close(self) -> None:
        if self._obj is not None:
            lib().bpf_object__close(self._obj)
            self._obj = None


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


def load(
    obj_path: str | os.PathLike | None = None,
    pin_dir: str | None = DEFAULT_PIN_DIR,
    sizes: MapSizes | None = None,
    hairpin: Hairpin | None = None,
) -> Dataplane:
    """Open, size, pin and load the tc program; pin_dir None means no pins
    (private maps, as the datapath tests use); hairpin None: no hairpin."""
    obj_path = str(obj_path or layout.object_path())
    if not os.path.exists(obj_path):
        raise BPFError(errno.ENOENT, f"BPF object {obj_path} not found: run `make` to build it")
    sizes = sizes or MapSizes()
    lb = lib()
    created = False
    if pin_dir is not None:
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
    obj = lb.bpf_object__open_file(obj_path.encode(), ffi.NULL)
    if obj == ffi.NULL:
        err = ffi.errno
        raise BPFError(err, f"opening BPF object {obj_path}: {os.strerror(err)}")
    try:
        btf = lb.bpf_object__btf(obj)
        if btf == ffi.NULL:
            raise layout.LayoutError(f"{obj_path} has no BTF: build it with clang -g")
        layout.check_btf(btf)
        m = lb.bpf_object__next_map(obj, ffi.NULL)
        bpf_maps = {}
        hairpin_set = False
        while m != ffi.NULL:
            name = ffi.string(lb.bpf_map__name(m)).decode()
            if name == HAIRPIN_SECTION:
                _set_hairpin(m, hairpin or Hairpin())
                hairpin_set = True
            if not name.startswith("."):  # .rodata/.bss: not ours to pin
                bpf_maps[name] = m
                size = sizes.for_map(name)
                if size is not None:
                    lb.bpf_map__set_max_entries(m, size)
                if pin_dir is not None:
                    lb.bpf_map__set_pin_path(m, os.path.join(pin_dir, name).encode())
            m = lb.bpf_object__next_map(obj, m)
        if not hairpin_set:
            raise BPFError(errno.ENOENT, f"{obj_path} has no {HAIRPIN_SECTION} section: rebuild it with `make`")
        ret = lb.bpf_object__load(obj)
        if ret < 0:
            err = -ret if ret != -1 else ffi.errno
            hint = explain(err) + " (--log-level debug shows libbpf's and the verifier's detail)"
            if err == errno.EINVAL and pin_dir is not None:
                hint += (
                    f"; or a map pinned in {pin_dir} has another size or layout than this build "
                    f"asks for (remove it with `sliceproxy uninstall`-style cleanup: rm -r {pin_dir})"
                )
            raise BPFError(err, f"loading BPF object {obj_path}: {hint}")
        fds = {}
        for name in (PROGRAM, EGRESS_PROGRAM, EXT_PROGRAM, EXT_EGRESS_PROGRAM):
            prog = lb.bpf_object__find_program_by_name(obj, name.encode())
            if prog == ffi.NULL:
                raise BPFError(errno.ENOENT, f"{obj_path} has no program {name}")
            fds[name] = lb.bpf_program__fd(prog)
        maps = {name: Map(lb.bpf_map__fd(m), name) for name, m in bpf_maps.items()}
        missing = set(map_names()) - set(maps)
        if missing:
            raise BPFError(errno.ENOENT, f"{obj_path} lacks maps {sorted(missing)}")
        return Dataplane(
            pin_dir=pin_dir,
            maps=maps,
            prog_fd=fds[PROGRAM],
            egress_fd=fds[EGRESS_PROGRAM],
            ext_fd=fds[EXT_PROGRAM],
            ext_egress_fd=fds[EXT_EGRESS_PROGRAM],
            _obj=obj,
        )
    except BaseException:
        lb.bpf_object__close(obj)
        if pin_dir is not None and created:
            with contextlib.suppress(OSError):
                os.rmdir(pin_dir)  # only if still empty
        raise


def _set_hairpin(m: object, hairpin: Hairpin) -> None:
    """Write the hairpin addresses into the program's sp_hairpin global
    (the initial value of its internal map, before load; read-only after)."""
    codec = layout.codec("sp_hairpin", ("addr4", "addr6"))
    size = ffi.new("size_t *")
    data = lib().bpf_map__initial_value(m, size)
    if data == ffi.NULL or size[0] != codec.size:
        raise layout.LayoutError(
            f"{HAIRPIN_SECTION} holds {size[0]} bytes, struct sp_hairpin {codec.size}: rebuild with `make`"
        )
    zero = bytes(16)
    ffi.memmove(data, codec.pack(hairpin.addr4 or zero, hairpin.addr6 or zero), codec.size)


def open_pinned(pin_dir: str = DEFAULT_PIN_DIR) -> dict[str, Map]:
    """The pinned maps of a running (or dead) agent, for dump and inspection."""
    if not os.path.isdir(pin_dir):
        raise BPFError(errno.ENOENT, f"no sliceproxy maps pinned in {pin_dir} (is the agent running there?)")
    out = {}
    for name in map_names():
        path = os.path.join(pin_dir, name)
        if os.path.exists(path):
            out[name] = Map.open_pinned(path)
    if mn("sp_svc") not in out:
        raise BPFError(errno.ENOENT, f"{pin_dir} holds no sp_svc_v2 map")
    return out
