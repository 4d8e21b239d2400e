/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every map the programs share, defined once: the four attach points are
 * compiled into one object (sliceproxy_tc.bpf.c), so they use the same maps
 * and the loader pins each once.
 */
#ifndef SP_LIB_MAPS_H
#define SP_LIB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "sliceproxy.h"

/*
 * Map names end in the header's layout version (sp_svc_v5 for version 4):
 * SP_MAP(sp_svc) is this build's map, so changing SP_LAYOUT_VERSION alone
 * renames every map (a new layout is a new map, never a misread old one).
 */
#define SP_MAP_NAME_(base, version) base##_v##version
#define SP_MAP_NAME(base, version) SP_MAP_NAME_(base, version)
#define SP_MAP(base) SP_MAP_NAME(base, SP_LAYOUT_VERSION)

/* Sizes are placeholders: the control plane sets max_entries before load
 * (flags --max-services, --max-backends...). The maps the datapath reads are
 * preallocated: no allocation on a write, batch writes about 40% faster than
 * without, and memory is taken once at load instead of failing under
 * pressure later. Only the names map, which packets never read, is not. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sp_svc_key);
	__type(value, struct sp_svc_val);
} SP_MAP(sp_svc) SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct sp_slot_key);
	__type(value, struct sp_slot_val);
} SP_MAP(sp_slot) SEC(".maps");

/* Maglev tables (--max-maglev-entries, in chunks of SP_MGL_CHUNK) and
 * the frontends' pointers to them: not preallocated, so a node in random
 * mode (the default) pays for their buckets only, and a table is
 * allocated when it is first written. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 263);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sp_mgl_key);
	__type(value, struct sp_mgl_val);
} SP_MAP(sp_mgl) SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct sp_mgl_ptr);
} SP_MAP(sp_mglptr) SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, __u32);
	__type(value, struct sp_backend);
} SP_MAP(sp_be) SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct sp_ct_key);
	__type(value, struct sp_ct_val);
} SP_MAP(sp_ct) SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct sp_aff_key);
	__type(value, struct sp_aff_val);
} SP_MAP(sp_aff) SEC(".maps");

/* Fragments in flight: one entry per fragmented datagram whose first
 * fragment was translated, for as long as reassembly waits for the rest
 * (30 s IPv4, 60 s IPv6, as Linux). Not sized by a flag: it holds only
 * datagrams in flight, and the LRU forgets the oldest. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct sp_frag_key);
	__type(value, struct sp_frag_val);
} SP_MAP(sp_frag) SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SP_V_MAX);
	__type(key, __u32);
	__type(value, struct sp_stat);
} SP_MAP(sp_stats) SEC(".maps");

/* The packets tc's external ingress took from XDP's handoff (struct
 * sp_xdp_meta): one counter, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sp_stat);
} SP_MAP(sp_handoff) SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct sp_svc_name);
} SP_MAP(sp_names) SEC(".maps");

/* loadBalancerSourceRanges: (svc_id, source prefix) -> allowed. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sp_src_key);
	__type(value, struct sp_src_val);
} SP_MAP(sp_src) SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sp_cfg);
} SP_MAP(sp_cfg) SEC(".maps");

/* Host clients: the node's netns cookie (written by the agent). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sp_host_cfg);
} SP_MAP(sp_host) SEC(".maps");

/* Per host socket: the frontends it reached (struct sp_sock). Socket-local
 * storage is freed by the kernel with the socket: nothing to clean up, no
 * capacity to size (max_entries must be 0). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sp_sock);
} SP_MAP(sp_sock) SEC(".maps");

/* The external interfaces with our XDP program in native mode: where XDP
 * may redirect a frame (sp_uplinks_v5 in sliceproxy.h). Sizes, not BTF
 * types: the kernel refuses BTF for a device map. 256 interfaces: far
 * more uplinks than a node has. */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__uint(max_entries, 256);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} SP_MAP(sp_uplinks) SEC(".maps");

/* `sliceproxy trace`: this CPU's trace state, armed per packet by the tap
 * bcc compiles at trace time (struct sp_trace). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sp_trace);
} SP_MAP(sp_trace) SEC(".maps");

/* The events of armed packets (struct sp_trace_event), read by `sliceproxy
 * trace`. 256 KiB, about 1900 events: two seconds at the fastest --rate a
 * reader polling ten times a second needs, and memory nobody misses. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} SP_MAP(sp_events) SEC(".maps");

#endif /* SP_LIB_MAPS_H */
