// SPDX-License-Identifier: GPL-2.0
/* The memory system's share of a new flow's cost, measured apart from
 * sliceproxy's program (scripts/bench/probe.py; docs/benchmarks.md,
 * "Per packet: where a new flow's time goes").
 *
 * Per packet it does only what grows with the cluster in the dataplane's
 * new-flow path: a slot lookup, a backend lookup, and the two conntrack
 * inserts (forward and reply), on maps with the dataplane's own key and
 * value layouts (ebpf/sliceproxy.h) and sizes, preallocated alike. The
 * bench fills the slot and backend maps with as many entries as the
 * scenario has endpoints, and times new flows through it the way it times
 * the dataplane's: the difference between 100 and 100,000 entries is what
 * cache and TLB misses cost at that working set, on this machine. */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "sliceproxy.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct sp_slot_key);
	__type(value, struct sp_slot_val);
} probe_slot SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, __u32);
	__type(value, struct sp_backend);
} probe_be SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct sp_ct_key);
	__type(value, struct sp_ct_val);
} probe_ct SEC(".maps");

/* [0]: how many slots the probed service has (the bench sets it);
 * [1]: nonzero to skip the backend lookup, as if the slot held the backend
 * itself (what one lookup less would save). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} probe_cfg SEC(".maps");

SEC("tc")
int probe(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct tcphdr *tcp = (void *)(ip + 1);
	__u32 zero = 0, one = 1, *n, *skip_be;
	struct sp_backend local = { .port = 8080, .proto = IPPROTO_TCP };

	if ((void *)(tcp + 1) > end)
		return TC_ACT_SHOT;
	n = bpf_map_lookup_elem(&probe_cfg, &zero);
	skip_be = bpf_map_lookup_elem(&probe_cfg, &one);
	if (!n || !*n || !skip_be)
		return TC_ACT_SHOT;
	/* The dataplane picks a slot by a random number; a hash of the new
	 * flow's source spreads the picks alike and keeps runs repeatable. */
	__u32 h = (ip->saddr ^ ((__u32)tcp->source << 16)) * 2654435761u;
	struct sp_slot_key sk = { .svc_id = 1, .slot = h % *n };
	struct sp_slot_val *slot = bpf_map_lookup_elem(&probe_slot, &sk);
	if (!slot)
		return TC_ACT_SHOT;
	struct sp_backend *be = &local;
	if (!*skip_be) {
		be = bpf_map_lookup_elem(&probe_be, &slot->backend_id);
		if (!be)
			return TC_ACT_SHOT;
	} else {
		__builtin_memcpy(&local.addr[12], &slot->backend_id, 4);
	}

	struct sp_ct_key fwd = {}, rev = {};
	struct sp_ct_val v = {};
	fwd.saddr[10] = fwd.saddr[11] = 0xff;
	__builtin_memcpy(&fwd.saddr[12], &ip->saddr, 4);
	fwd.daddr[10] = fwd.daddr[11] = 0xff;
	__builtin_memcpy(&fwd.daddr[12], &ip->daddr, 4);
	fwd.sport = bpf_ntohs(tcp->source);
	fwd.dport = bpf_ntohs(tcp->dest);
	fwd.proto = IPPROTO_TCP;
	fwd.dir = SP_CT_FORWARD;
	__builtin_memcpy(v.nat_addr, be->addr, 16);
	v.nat_port = be->port;
	v.backend_id = slot->backend_id;
	v.svc_id = 1;
	v.last_seen = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&probe_ct, &fwd, &v, BPF_ANY))
		return TC_ACT_SHOT;
	__builtin_memcpy(rev.saddr, be->addr, 16);
	__builtin_memcpy(rev.daddr, fwd.saddr, 16);
	rev.sport = be->port;
	rev.dport = fwd.sport;
	rev.proto = IPPROTO_TCP;
	rev.dir = SP_CT_REPLY;
	__builtin_memcpy(v.nat_addr, fwd.daddr, 16);
	v.nat_port = fwd.dport;
	if (bpf_map_update_elem(&probe_ct, &rev, &v, BPF_ANY))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
