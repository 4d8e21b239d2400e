"""The kernel side: the one mirror of ebpf/sliceproxy.h (abi), libbpf
through cffi (libbpf, maps), loading and pinning (loader, migrate),
attaching (attach), and turning planned frontends into ordered map writes
(ids, slots, drain, changeset, programmed, apply)."""
