"""BPF maps as Python objects: raw bytes in and out, batch syscalls.

Keys and values cross this layer as bytes packed by ctrl.dataplane.abi's
codecs; the layer above decides what they mean. Batch calls move thousands of entries
per syscall: updating 100,000 entries one syscall at a time would cost more
than the whole sync budget.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

from .libbpf import BPFError, check, ffi, lib

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_DEVMAP_HASH = 25
BPF_MAP_TYPE_RINGBUF = 27

# Entries per batch syscall: large enough to amortise the syscall, small
# enough that one failed batch is cheap to retry element by element.
BATCH = 8192

# An update of at least this many distinct keys is written in two halves
# at once, one by a thread of its own (the syscalls release the GIL): a
# hash map takes entries on two CPUs about twice as fast as on one
# (100,000 slots: 40 ms by one thread, 20 ms by two on this 2-core
# machine), and a full sync's last batch waits for nothing else.
PARALLEL_ROWS = 32768


@cache
def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def _bytes(b: bytes | bytearray) -> bytes:
    return b if type(b) is bytes else bytes(b)


@dataclass
class MapInfo:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    btf_id: int = 0  # the BTF its key and value types live in (0: none)
    btf_key_type_id: int = 0
    btf_value_type_id: int = 0


class Map:
    def __init__(self, fd: int, name: str, owns_fd: bool = False):
        self.fd = fd
        self.name = name
        self._owns_fd = owns_fd
        self.info = map_info(fd)
        self.key_size = self.info.key_size
        self.value_size = self.info.value_size
        self.max_entries = self.info.max_entries
        self.percpu = self.info.type == BPF_MAP_TYPE_PERCPU_ARRAY
        self._ncpu = lib().libbpf_num_possible_cpus() if self.percpu else 1
        # Per-CPU values are padded to 8 bytes each by the kernel.
        self.stride = (self.value_size + 7) & ~7 if self.percpu else self.value_size

    @classmethod
    def open_pinned(cls, path: str) -> Map:
        fd = lib().bpf_obj_get(path.encode())
        if fd < 0:
            err = ffi.errno
            raise BPFError(err, f"opening pinned map {path}: {os.strerror(err)}")
        return cls(fd, os.path.basename(path), owns_fd=True)

    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- single elements -------------------------------------------------
    def lookup(self, key: bytes) -> bytes | None:
        out = ffi.new("char[]", self.stride * self._ncpu)
        ret = lib().bpf_map_lookup_elem(self.fd, key, out)
        if ret < 0:
            if ffi.errno == errno.ENOENT:
                return None
            check(ret, f"map {self.name}: lookup")
        return bytes(ffi.buffer(out))

    def lookup_percpu(self, key: bytes) -> list[bytes]:
        raw = self.lookup(key)
        if raw is None:
            return []
        return [raw[i * self.stride : i * self.stride + self.value_size] for i in range(self._ncpu)]

    def update(self, key: bytes | bytearray, value: bytes | bytearray) -> None:
        # cffi takes bytes for a `const void *`, not a bytearray (a slice of
        # the batches ctrl.dataplane.abi packs past one chunk).
        key, value = _bytes(key), _bytes(value)
        check(lib().bpf_map_update_elem(self.fd, key, value, 0), f"map {self.name}: update")

    def delete(self, key: bytes | bytearray) -> bool:
        ret = lib().bpf_map_delete_elem(self.fd, _bytes(key))
        if ret < 0:
            if ffi.errno == errno.ENOENT:
                return False
            check(ret, f"map {self.name}: delete")
        return True

    # -- batches ---------------------------------------------------------
    def update_batch(
        self, keys: bytes | bytearray, values: bytes | bytearray, chunk: int = 0, distinct: bool = False
    ) -> int:
        """Write len(keys)/key_size entries, `chunk` (default BATCH) per
        syscall; returns how many were written. distinct: no key is
        there twice (the caller knows), so their order does not matter
        and a large batch (PARALLEL_ROWS) is written by two threads."""
        n = len(keys) // self.key_size
        assert len(values) == n * self.value_size, (self.name, len(values), n)
        if n == 0:
            return 0
        if self.info.type == BPF_MAP_TYPE_LPM_TRIE:
            # LPM tries have no batch operations: one syscall per entry.
            ks, vs = self.key_size, self.value_size
            for i in range(n):
                self.update(keys[i * ks : (i + 1) * ks], values[i * vs : (i + 1) * vs])
            return n
        kb = ffi.from_buffer(keys)
        vb = ffi.from_buffer(values)
        step = chunk or BATCH
        if not distinct or n < PARALLEL_ROWS or _cpus() < 2:
            self._update_rows(kb, vb, 0, n, n, step)
            return n
        half = n // 2
        errors: list[Exception] = []

        def first() -> None:
            try:
                self._update_rows(kb, vb, 0, half, n, step)
            except Exception as e:  # raised below, in the caller's thread
                errors.append(e)

        other = threading.Thread(target=first, name="sliceproxy-batch", daemon=True)
        other.start()
        try:
            self._update_rows(kb, vb, half, n, n, step)
        finally:
            other.join()
        if errors:
            raise errors[0]
        return n

    def _update_rows(self, kb, vb, start: int, end: int, n: int, step: int) -> None:
        """Entries start to end of a batch of n (cffi buffers of its keys and
        values), step per syscall."""
        opts = ffi.new("struct bpf_map_batch_opts *", {"sz": ffi.sizeof("struct bpf_map_batch_opts")})
        done = start
        while done < end:
            part = min(step, end - done)
            cnt = ffi.new("__u32 *", part)
            ret = lib().bpf_map_update_batch(self.fd, kb + done * self.key_size, vb + done * self.value_size, cnt, opts)
            if ret < 0:
                err = ffi.errno
                where = f"entries {start} to {end} of {n}" if (start, end) != (0, n) else f"{n} entries"
                raise BPFError(
                    err,
                    f"map {self.name}: batch update of {where} failed after {done - start + cnt[0]}: "
                    f"{os.strerror(err)}",
                )
            done += part

    def delete_batch(self, keys: bytes | bytearray) -> int:
        """Delete entries; ones already gone are not an error."""
        n = len(keys) // self.key_size
        if n == 0:
            return 0
        if self.info.type == BPF_MAP_TYPE_LPM_TRIE:
            ks = self.key_size
            for i in range(n):
                self.delete(keys[i * ks : (i + 1) * ks])
            return n
        opts = ffi.new("struct bpf_map_batch_opts *", {"sz": ffi.sizeof("struct bpf_map_batch_opts")})
        kb = ffi.from_buffer(keys)
        done = 0
        while done < n:
            chunk = min(BATCH, n - done)
            cnt = ffi.new("__u32 *", chunk)
            ret = lib().bpf_map_delete_batch(self.fd, kb + done * self.key_size, cnt, opts)
            if ret < 0:
                if ffi.errno != errno.ENOENT:
                    check(ret, f"map {self.name}: batch delete")
                # A missing key stops the batch; finish this chunk one by one.
                for i in range(done + cnt[0], done + chunk):
                    self.delete(keys[i * self.key_size : (i + 1) * self.key_size])
            done += chunk
        return done

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every entry, read with batch lookups (hash maps) or per key (arrays);
        a ring buffer (the trace's events) has no entries to read."""
        out: list[tuple[bytes, bytes]] = []
        for chunk in self.chunks():
            out.extend(chunk)
        return out

    def chunks(self, chunk: int = 4096) -> Iterator[list[tuple[bytes, bytes]]]:
        """Every entry, about `chunk` at a time (a hash map's batch lookups
        resume where the last one stopped, so a caller may do other work,
        map writes included, between two chunks: an entry neither written
        nor deleted meanwhile is read exactly once, since a BPF hash map
        never moves an entry to another bucket). Maps without batch
        lookups come in one chunk."""
        if self.info.type == BPF_MAP_TYPE_RINGBUF:
            return
        if self.info.type in (BPF_MAP_TYPE_LPM_TRIE, BPF_MAP_TYPE_DEVMAP_HASH):
            yield self._walk()
            return
        if self.info.type not in (BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH):
            out = []
            for i in range(self.max_entries):
                k = i.to_bytes(4, "little")
                v = self.lookup(k)
                if v is not None:
                    out.append((k, v))
            yield out
            return
        ks, vs = self.key_size, self.stride * self._ncpu
        chunk = max(1, chunk)  # none at a time would never end
        keys = ffi.new("char[]", ks * chunk)
        vals = ffi.new("char[]", vs * chunk)
        in_b = ffi.NULL
        out_b = ffi.new("char[]", max(ks, 8))
        out_b2 = ffi.new("char[]", max(ks, 8))
        opts = ffi.new("struct bpf_map_batch_opts *", {"sz": ffi.sizeof("struct bpf_map_batch_opts")})
        while True:
            cnt = ffi.new("__u32 *", chunk)
            ret = lib().bpf_map_lookup_batch(self.fd, in_b, out_b, keys, vals, cnt, opts)
            err = ffi.errno if ret < 0 else 0
            if ret < 0 and err not in (errno.ENOENT,):
                if err == errno.ENOSPC:
                    # A hash bucket larger than our buffer: grow and retry.
                    chunk *= 2
                    keys = ffi.new("char[]", ks * chunk)
                    vals = ffi.new("char[]", vs * chunk)
                    continue
                check(ret, f"map {self.name}: batch lookup")
            kbuf = ffi.buffer(keys, ks * cnt[0])[:]
            vbuf = ffi.buffer(vals, vs * cnt[0])[:]
            yield [(kbuf[i * ks : (i + 1) * ks], vbuf[i * vs : (i + 1) * vs]) for i in range(cnt[0])]
            if ret < 0:  # ENOENT: the walk is complete
                return
            # The kernel wrote where to resume into out_batch; feed it back.
            in_b, out_b, out_b2 = out_b, out_b2, out_b

    def _walk(self) -> list[tuple[bytes, bytes]]:
        """Every entry by get_next_key (maps without batch lookups)."""
        out: list[tuple[bytes, bytes]] = []
        cur = ffi.NULL
        nxt = ffi.new("char[]", self.key_size)
        while lib().bpf_map_get_next_key(self.fd, cur, nxt) == 0:
            k = bytes(ffi.buffer(nxt, self.key_size))
            v = self.lookup(k)
            if v is not None:
                out.append((k, v))
            cur = ffi.new("char[]", k)
        return out

    def count(self) -> int:
        """Entries now in the map (a walk with batch lookups)."""
        return len(self.items())

    def clear(self) -> None:
        keys = [k for k, _ in self.items()]
        self.delete_batch(b"".join(keys))


def map_info(fd: int) -> MapInfo:
    info = ffi.new("struct bpf_map_info_head *")
    ln = ffi.new("__u32 *", ffi.sizeof("struct bpf_map_info_head"))
    check(lib().bpf_obj_get_info_by_fd(fd, info, ln), "reading map info")
    return MapInfo(
        name=ffi.string(info.name).decode(),
        type=info.type,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
        btf_id=info.btf_id,
        btf_key_type_id=info.btf_key_type_id,
        btf_value_type_id=info.btf_value_type_id,
    )
