"""The system libbpf (libbpf.so.1) through cffi in ABI mode.

ABI mode needs no compiler and no headers on the node: cffi computes the
layouts of the few libbpf structs we pass from the declarations below, which
follow libbpf's stable API (bpf/bpf.h, bpf/libbpf.h, bpf/btf.h of libbpf 1.x).
Struct layouts of our own maps are not declared here: ctrl.dataplane.abi reads
them from ebpf/sliceproxy.h.
"""

from __future__ import annotations

import errno
import os

from cffi import FFI

ffi = FFI()
ffi.cdef(
    """
    typedef uint8_t __u8;
    typedef uint16_t __u16;
    typedef uint32_t __u32;
    typedef uint64_t __u64;
    typedef int32_t __s32;
    typedef int64_t __s64;

    struct bpf_object;
    struct bpf_map;
    struct bpf_program;
    struct btf;

    struct btf_type {
        __u32 name_off;
        __u32 info;
        __u32 size_or_type;
    };
    struct btf_member {
        __u32 name_off;
        __u32 type;
        __u32 offset;
    };

    struct bpf_map_batch_opts {
        size_t sz;
        __u64 elem_flags;
        __u64 flags;
    };

    struct bpf_test_run_opts {
        size_t sz;
        const void *data_in;
        void *data_out;
        __u32 data_size_in;
        __u32 data_size_out;
        const void *ctx_in;
        void *ctx_out;
        __u32 ctx_size_in;
        __u32 ctx_size_out;
        __u32 retval;
        int repeat;
        __u32 duration;
        __u32 flags;
        __u32 cpu;
        __u32 batch_size;
    };

    /* The head of the kernel's struct bpf_map_info: the kernel accepts a
       shorter buffer than its own struct and fills what fits. */
    struct bpf_map_info_head {
        __u32 type;
        __u32 id;
        __u32 key_size;
        __u32 value_size;
        __u32 max_entries;
        __u32 map_flags;
        char name[16];
        __u32 ifindex;
        __u32 btf_vmlinux_value_type_id;
        __u64 netns_dev;
        __u64 netns_ino;
        __u32 btf_id;
        __u32 btf_key_type_id;
        __u32 btf_value_type_id;
    };

    /* The head of the kernel's struct bpf_link_info, with its cgroup
       member (the union starts 8-aligned). */
    struct bpf_link_info_cgroup {
        __u32 type;
        __u32 id;
        __u32 prog_id;
        __u32 pad;
        __u64 cgroup_id;
        __u32 attach_type;
        __u32 pad2;
    };

    /* The head of the kernel's struct bpf_prog_info, up to its name. */
    struct bpf_prog_info_head {
        __u32 type;
        __u32 id;
        __u8 tag[8];
        __u32 jited_prog_len;
        __u32 xlated_prog_len;
        __u64 jited_prog_insns;
        __u64 xlated_prog_insns;
        __u64 load_time;
        __u32 created_by_uid;
        __u32 nr_map_ids;
        __u64 map_ids;
        char name[16];
    };

    struct bpf_object *bpf_object__open_file(const char *path, const void *opts);
    int bpf_object__load(struct bpf_object *obj);
    void bpf_object__close(struct bpf_object *obj);
    struct bpf_map *bpf_object__next_map(const struct bpf_object *obj,
                                         const struct bpf_map *map);
    const char *bpf_map__name(const struct bpf_map *map);
    int bpf_map__set_pin_path(struct bpf_map *map, const char *path);
    int bpf_map__set_max_entries(struct bpf_map *map, __u32 max_entries);
    __u32 bpf_map__max_entries(const struct bpf_map *map);
    int bpf_map__fd(const struct bpf_map *map);
    int bpf_map__reuse_fd(struct bpf_map *map, int fd);
    __u32 bpf_map__type(const struct bpf_map *map);
    __u32 bpf_map__key_size(const struct bpf_map *map);
    __u32 bpf_map__value_size(const struct bpf_map *map);
    void *bpf_map__initial_value(struct bpf_map *map, size_t *psize);
    struct bpf_program *bpf_object__find_program_by_name(
        const struct bpf_object *obj, const char *name);
    int bpf_program__fd(const struct bpf_program *prog);
    int bpf_program__set_autoload(struct bpf_program *prog, bool autoload);
    int bpf_program__expected_attach_type(const struct bpf_program *prog);
    int bpf_map__set_autocreate(struct bpf_map *map, bool autocreate);
    int bpf_obj_pin(int fd, const char *pathname);
    int bpf_prog_get_fd_by_id(__u32 id);
    /* XDP programs on interfaces (ctrl.dataplane.attach). */
    int bpf_xdp_attach(int ifindex, int prog_fd, __u32 flags, const void *opts);
    int bpf_xdp_detach(int ifindex, __u32 flags, const void *opts);
    int bpf_xdp_query_id(int ifindex, int flags, __u32 *prog_id);
    int bpf_link_create(int prog_fd, int target_fd, int attach_type, const void *opts);
    int bpf_link_update(int link_fd, int new_prog_fd, const void *opts);
    int bpf_link_detach(int link_fd);
    struct btf *bpf_object__btf(const struct bpf_object *obj);

    __s32 btf__find_by_name_kind(const struct btf *btf, const char *name, __u32 kind);
    const struct btf_type *btf__type_by_id(const struct btf *btf, __u32 id);
    const char *btf__name_by_offset(const struct btf *btf, __u32 offset);
    __s64 btf__resolve_size(const struct btf *btf, __u32 type_id);
    __s32 btf__resolve_type(const struct btf *btf, __u32 type_id);
    struct btf *btf__load_from_kernel_by_id(__u32 id);
    void btf__free(struct btf *btf);

    int bpf_obj_get(const char *pathname);
    int bpf_obj_get_info_by_fd(int bpf_fd, void *info, __u32 *info_len);
    int bpf_map_lookup_elem(int fd, const void *key, void *value);
    int bpf_map_update_elem(int fd, const void *key, const void *value, __u64 flags);
    int bpf_map_delete_elem(int fd, const void *key);
    int bpf_map_get_next_key(int fd, const void *key, void *next_key);
    int bpf_map_update_batch(int fd, const void *keys, const void *values,
                             __u32 *count, const struct bpf_map_batch_opts *opts);
    int bpf_map_delete_batch(int fd, const void *keys, __u32 *count,
                             const struct bpf_map_batch_opts *opts);
    int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys,
                             void *values, __u32 *count,
                             const struct bpf_map_batch_opts *opts);
    int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);
    int libbpf_num_possible_cpus(void);
    /* Ring buffer maps (`sliceproxy trace`). */
    struct ring_buffer;
    struct ring_buffer *ring_buffer__new(int map_fd, int (*sample_cb)(void *ctx, void *data, size_t size),
                                         void *ctx, const void *opts);
    int ring_buffer__poll(struct ring_buffer *rb, int timeout_ms);
    void ring_buffer__free(struct ring_buffer *rb);
    void *libbpf_set_print(void *fn);
    """
)

BTF_KIND_INT = 1
BTF_KIND_ARRAY = 3
BTF_KIND_STRUCT = 4
BTF_KIND_TYPEDEF = 8

_lib = None


class BPFError(OSError):
    """A libbpf call failed; the message says what we were doing."""


def lib():
    """The loaded libbpf, with a one-sentence error if the node lacks it."""
    global _lib
    if _lib is None:
        try:
            _lib = ffi.dlopen("libbpf.so.1")
        except OSError as e:
            raise BPFError(
                errno.ENOENT,
                "libbpf.so.1 was not found: install the system libbpf " "(Debian/Ubuntu package libbpf1) on this node",
            ) from e
    return _lib


def quiet(on: bool = True) -> None:
    """Silence libbpf's own stderr messages (the verifier log among them):
    errors reach the operator as one sentence from us; --log-level debug
    brings libbpf's detail back."""
    if on:
        lib().libbpf_set_print(ffi.NULL)


def check(ret: int, what: str) -> int:
    """Turn libbpf's negative-errno convention into a BPFError naming `what`."""
    if ret < 0:
        err = -ret if ret != -1 else ffi.errno
        raise BPFError(err, f"{what}: {os.strerror(err)}")
    return ret


def explain(err: int) -> str:
    """One sentence for the errors an operator can fix."""
    if err in (errno.EPERM, errno.EACCES):
        return (
            "permission denied: sliceproxy needs root or CAP_BPF, CAP_NET_ADMIN "
            "and CAP_SYS_ADMIN, and a writable bpffs"
        )
    if err in (errno.ENOSYS, errno.EINVAL):
        return "this kernel does not support the BPF features sliceproxy needs (5.6 or later)"
    return os.strerror(err)
