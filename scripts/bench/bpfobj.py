"""One of the bench's own BPF objects (scripts/bench/*.bpf.c, built by
common.compile_bpf) loaded with libbpf, no pins: its programs' fds by name
and its maps by name, until close()."""

from __future__ import annotations

from pathlib import Path

from ctrl.dataplane.libbpf import BPFError, check, ffi, lib
from ctrl.dataplane.maps import Map


class BpfObject:
    def __init__(self, obj_path: Path):
        lb = lib()
        self._obj = lb.bpf_object__open_file(str(obj_path).encode(), ffi.NULL)
        if self._obj == ffi.NULL:
            raise BPFError(ffi.errno, f"opening {obj_path}")
        check(lb.bpf_object__load(self._obj), f"loading {obj_path}")
        self.maps: dict[str, Map] = {}
        m = lb.bpf_object__next_map(self._obj, ffi.NULL)
        while m != ffi.NULL:
            name = ffi.string(lb.bpf_map__name(m)).decode()
            self.maps[name] = Map(lb.bpf_map__fd(m), name)
            m = lb.bpf_object__next_map(self._obj, m)

    def fd_of(self, name: str) -> int:
        prog = lib().bpf_object__find_program_by_name(self._obj, name.encode())
        if prog == ffi.NULL:
            raise BPFError(0, f"no program {name} in the object")
        return lib().bpf_program__fd(prog)

    def close(self) -> None:
        if self._obj is not None:
            lib().bpf_object__close(self._obj)
            self._obj = None
