// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sliceproxy tc program, attached at clsact ingress of the host side of pod
 * interfaces. For a packet to a service frontend it picks a backend with one
 * slot lookup and rewrites the destination (DNAT); for a reply from a backend
 * it rewrites the source back to the frontend. Every other packet leaves
 * untouched with TC_ACT_OK. After a rewrite the kernel routes the packet by
 * its new destination.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <stddef.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "sliceproxy.h"

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
} sp_svc_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct sp_slot_key);
	__type(value, struct sp_slot_val);
} sp_slot_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, __u32);
	__type(value, struct sp_backend);
} sp_be_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct sp_ct_key);
	__type(value, struct sp_ct_val);
} sp_ct_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SP_V_MAX);
	__type(key, __u32);
	__type(value, struct sp_stat);
} sp_stats_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct sp_svc_name);
} sp_names_v1 SEC(".maps");

/* Ethernet + the longest IPv4 header + a TCP header. */
#define PULL_LEN (ETH_HLEN + 60 + 20)

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* Offsets of the L4 checksum field inside the TCP and UDP headers. */
#define TCP_CSUM_OFF offsetof(struct tcphdr, check)
#define UDP_CSUM_OFF offsetof(struct udphdr, check)
#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SADDR_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))

static __always_inline int count(struct __sk_buff *skb, __u32 verdict, int action)
{
	struct sp_stat *st = bpf_map_lookup_elem(&sp_stats_v1, &verdict);

	if (st) {
		/* Per-CPU slot: no other CPU writes it, plain adds suffice. */
		st->packets += 1;
		st->bytes += skb->len;
	}
	return action;
}

static __always_inline void addr_from_v4(__u8 *a, __be32 ip)
{
	__u32 *w = (__u32 *)a;

	w[0] = 0;
	w[1] = 0;
	w[2] = bpf_htonl(0x0000ffff);
	w[3] = ip;
}

static __always_inline __be32 addr_to_v4(const __u8 *a)
{
	return ((const __u32 *)a)[3];
}

static __always_inline int addr_is_v4(const __u8 *a)
{
	const __u32 *w = (const __u32 *)a;

	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int addr_eq(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/*
 * Rewrite one address and one port of an IPv4 TCP/UDP packet, fixing the IP
 * header checksum and the L4 checksum (whose pseudo-header covers the
 * address). addr_off/port_off select source or destination.
 */
static __always_inline int rewrite_v4(struct __sk_buff *skb, __u32 l4_off, __u8 proto,
				      __u32 addr_off, __u32 port_off, __be32 old_ip,
				      __be32 new_ip, __be16 old_port, __be16 new_port)
{
	__u32 csum_off = l4_off + (proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
	/* A UDP checksum of zero means "none" (RFC 768): keep it zero, and
	 * never let a computed zero be stored as zero. */
	__u64 mangled = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (old_ip != new_ip) {
		if (bpf_l4_csum_replace(skb, csum_off, old_ip, new_ip,
					BPF_F_PSEUDO_HDR | mangled | sizeof(new_ip)))
			return -1;
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ip, new_ip, sizeof(new_ip)))
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, &new_ip, sizeof(new_ip), 0))
			return -1;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port,
					mangled | sizeof(new_port)))
			return -1;
		if (bpf_skb_store_bytes(skb, l4_off + port_off, &new_port, sizeof(new_port), 0))
			return -1;
	}
	return 0;
}

/* The backend a forward conntrack entry points at, if it still exists with
 * the same address: a removed backend's flows are not silently kept. */
static __always_inline struct sp_backend *ct_backend(const struct sp_ct_val *ct)
{
	__u32 id = ct->backend_id;
	struct sp_backend *be = bpf_map_lookup_elem(&sp_be_v1, &id);

	if (!be)
		return 0;
	if (!addr_eq(be->addr, ct->nat_addr) || be->port != ct->nat_port)
		return 0;
	return be;
}

/*
 * The reply entry of a flow: backend -> client, rewritten back to the
 * frontend. fwd is the flow's forward key, fct its forward value. With
 * BPF_NOEXIST an existing entry is left as it is (one lookup, no write).
 */
static __always_inline int put_reply(const struct sp_ct_key *fwd, const struct sp_svc_key *front,
				     const struct sp_ct_val *fct, __u64 flags)
{
	struct sp_ct_key rk = {};
	struct sp_ct_val rv = {};

	__builtin_memcpy(rk.saddr, fct->nat_addr, sizeof(rk.saddr));
	__builtin_memcpy(rk.daddr, fwd->saddr, sizeof(rk.daddr));
	rk.sport = fct->nat_port;
	rk.dport = fwd->sport;
	rk.proto = fwd->proto;
	rk.dir = SP_CT_REPLY;
	if (flags == BPF_NOEXIST && bpf_map_lookup_elem(&sp_ct_v1, &rk))
		return 0;
	__builtin_memcpy(rv.nat_addr, front->addr, sizeof(rv.nat_addr));
	rv.nat_port = front->port;
	rv.backend_id = fct->backend_id;
	rv.svc_id = fct->svc_id;
	rv.last_seen = fct->last_seen;
	return bpf_map_update_elem(&sp_ct_v1, &rk, &rv, flags);
}

SEC("tc")
int sp_tc_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct sp_svc_key skey = {};
	struct sp_ct_key ckey = {};
	struct sp_ct_val *ct, nct = {};
	struct sp_svc_val *svc;
	struct sp_backend *be;
	struct iphdr *ip;
	__be16 *ports;
	__u32 l4_off, l4_min, ihl;
	__u64 now;

	/* Headers split over a non-linear skb (GRO, some drivers): pull what
	 * we may need into the linear part, once, before any bound check. */
	if (data + PULL_LEN > data_end && skb->len > (__u32)(data_end - data)) {
		bpf_skb_pull_data(skb, skb->len < PULL_LEN ? skb->len : PULL_LEN);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		eth = data;
	}
	if ((void *)(eth + 1) > data_end)
		return count(skb, SP_V_PASS_TRUNCATED, TC_ACT_OK);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return count(skb, SP_V_PASS_NOT_IP, TC_ACT_OK);

	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return count(skb, SP_V_PASS_TRUNCATED, TC_ACT_OK);
	if (ip->version != 4)
		return count(skb, SP_V_PASS_NOT_IP, TC_ACT_OK);
	ihl = ip->ihl;
	if (ihl < 5)
		return count(skb, SP_V_PASS_TRUNCATED, TC_ACT_OK);
	/* Only the first fragment carries ports, and we do not reassemble. */
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return count(skb, SP_V_PASS_FRAGMENT, TC_ACT_OK);
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return count(skb, SP_V_PASS_OTHER_PROTO, TC_ACT_OK);

	l4_off = ETH_HLEN + ihl * 4;
	/* The whole L4 header must be there: we rewrite its checksum. */
	l4_min = ip->protocol == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr);
	if (l4_off > 60 + ETH_HLEN || data + l4_off + l4_min > data_end)
		return count(skb, SP_V_PASS_TRUNCATED, TC_ACT_OK);
	ports = data + l4_off;
	if ((void *)(ports + 2) > data_end)
		return count(skb, SP_V_PASS_TRUNCATED, TC_ACT_OK);

	__u8 proto = ip->protocol;
	__be32 saddr = ip->saddr, daddr = ip->daddr;
	__be16 sport = ports[0], dport = ports[1];

	now = bpf_ktime_get_ns();

	addr_from_v4(skey.addr, daddr);
	skey.port = bpf_ntohs(dport);
	skey.proto = proto;
	skey.scope = SP_SCOPE_INTERNAL;

	addr_from_v4(ckey.saddr, saddr);
	addr_from_v4(ckey.daddr, daddr);
	ckey.sport = bpf_ntohs(sport);
	ckey.dport = bpf_ntohs(dport);
	ckey.proto = proto;

	svc = bpf_map_lookup_elem(&sp_svc_v1, &skey);
	if (!svc) {
		/* Not for a frontend: maybe a reply from a backend. */
		ckey.dir = SP_CT_REPLY;
		ct = bpf_map_lookup_elem(&sp_ct_v1, &ckey);
		if (!ct || !addr_is_v4(ct->nat_addr))
			return count(skb, SP_V_PASS_NO_SERVICE, TC_ACT_OK);
		ct->last_seen = now;
		if (rewrite_v4(skb, l4_off, proto, IP_SADDR_OFF, 0, saddr, addr_to_v4(ct->nat_addr),
			       sport, bpf_htons(ct->nat_port)))
			return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
		return count(skb, SP_V_REVNAT, TC_ACT_OK);
	}

	ckey.dir = SP_CT_FORWARD;
	ct = bpf_map_lookup_elem(&sp_ct_v1, &ckey);
	if (ct && ct->svc_id == svc->svc_id && ct_backend(ct)) {
		ct->last_seen = now;
		/* The LRU may evict the reply entry alone: put it back, or the
		 * backend's answers would reach the client unrewritten. */
		put_reply(&ckey, &skey, ct, BPF_NOEXIST);
		if (rewrite_v4(skb, l4_off, proto, IP_DADDR_OFF, 2, daddr, addr_to_v4(ct->nat_addr),
			       dport, bpf_htons(ct->nat_port)))
			return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
		return count(skb, SP_V_DNAT_ESTABLISHED, TC_ACT_OK);
	}

	/* A new flow (or one whose backend went away): pick a slot. The
	 * control plane writes slots before raising count, and lowers count
	 * before deleting slots, so every slot below count exists. */
	__u32 n = svc->count;
	if (n == 0)
		return count(skb, SP_V_DROP_NO_BACKEND, TC_ACT_SHOT);
	struct sp_slot_key slkey = {
		.svc_id = svc->svc_id,
		.slot = bpf_get_prandom_u32() % n,
	};
	struct sp_slot_val *sl = bpf_map_lookup_elem(&sp_slot_v1, &slkey);
	if (!sl)
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	__u32 be_id = sl->backend_id;
	be = bpf_map_lookup_elem(&sp_be_v1, &be_id);
	if (!be || !addr_is_v4(be->addr))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);

	__builtin_memcpy(nct.nat_addr, be->addr, sizeof(nct.nat_addr));
	nct.nat_port = be->port;
	nct.backend_id = be_id;
	nct.svc_id = svc->svc_id;
	nct.last_seen = now;
	if (bpf_map_update_elem(&sp_ct_v1, &ckey, &nct, BPF_ANY))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);

	if (put_reply(&ckey, &skey, &nct, BPF_ANY))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);

	if (rewrite_v4(skb, l4_off, proto, IP_DADDR_OFF, 2, daddr, addr_to_v4(nct.nat_addr), dport,
		       bpf_htons(nct.nat_port)))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	return count(skb, SP_V_DNAT_NEW, TC_ACT_OK);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
