/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Fragmented datagrams. Only the first fragment carries the TCP/UDP header,
 * and a tc program cannot reassemble (netfilter, which kube-proxy's rules
 * run on, reassembles before NAT). So each attach point remembers, in the
 * LRU map sp_frag, what it did to a datagram's first fragment (keyed by
 * the datagram's addresses, identification and protocol as they arrived
 * there), and gives its other fragments the same: the same addresses in
 * the IP header (the TCP/UDP checksum, whose pseudo-header covers them,
 * lives in the first fragment and was updated there), the same way out
 * (back into the pod, for hairpin), or a drop (docs/semantics.md,
 * "Fragments").
 */
#ifndef SP_LIB_FRAG_H
#define SP_LIB_FRAG_H

#include <linux/pkt_cls.h>
#include "clock.h"
#include "hairpin.h"
#include "maps.h"
#include "parse.h"
#include "stats.h"

/* How long a first fragment's translation is kept for the rest: Linux's
 * reassembly timeouts (net.ipv4.ipfrag_time, net.ipv6.ip6frag_time). A
 * fragment later than that would find no datagram to join anyway. */
#define FRAG_TIMEOUT4_NS (30ULL * 1000000000ULL)
#define FRAG_TIMEOUT6_NS (60ULL * 1000000000ULL)

/*
 * After the attach point `hook` gave the first fragment p the tc action
 * act: remember it for the datagram's other fragments. Dropped (TC_ACT_SHOT)
 * or turned into an ICMP error (reject.h: its protocol is no longer p's):
 * the rest is dropped. Sent back out (TC_ACT_REDIRECT, hairpin): the rest
 * too, with the same addresses. Left with other addresses: the rest gets
 * them. Left untouched: nothing to remember. Returns act. A subprogram:
 * its key and value take stack only while it runs.
 */
static __noinline int frag_first(struct __sk_buff *skb, const struct pkt *p, __u8 hook, int act)
{
	struct sp_frag_key k = {};
	struct sp_frag_val v = {};
	__u8 proto = 0;

	__builtin_memcpy(k.saddr, p->saddr, sizeof(k.saddr));
	__builtin_memcpy(k.daddr, p->daddr, sizeof(k.daddr));
	k.id = p->frag_id;
	k.proto = p->proto;
	k.hook = hook;
	if (act == TC_ACT_SHOT) {
		v.flags = SP_FRAG_F_DROP;
	} else if (p->v6) {
		if (bpf_skb_load_bytes(skb, IP6_SADDR_OFF, v.saddr, 16) ||
		    bpf_skb_load_bytes(skb, IP6_DADDR_OFF, v.daddr, 16) ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, nexthdr), &proto, 1))
			return act;
		/* A first fragment still has its Fragment header next. */
		if (proto != NEXTHDR_FRAGMENT)
			v.flags = SP_FRAG_F_DROP;
	} else {
		__be32 a[2];

		if (bpf_skb_load_bytes(skb, IP_SADDR_OFF, a, sizeof(a)) ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct iphdr, protocol), &proto, 1))
			return act;
		addr_from_v4(v.saddr, a[0]);
		addr_from_v4(v.daddr, a[1]);
		if (proto != p->proto)
			v.flags = SP_FRAG_F_DROP;
	}
	if (!v.flags) {
		if (act == TC_ACT_REDIRECT)
			v.flags = SP_FRAG_F_REDIRECT;
		else if (addr_eq(v.saddr, p->saddr) && addr_eq(v.daddr, p->daddr))
			return act;
	}
	v.first_seen = now_ns();
	bpf_map_update_elem(&SP_MAP(sp_frag), &k, &v, BPF_ANY);
	return act;
}

/*
 * A fragment other than the first (parse() said SP_V_PASS_FRAGMENT) at the
 * attach point hook: given what its first fragment got there, counted as
 * SP_V_FRAGMENT; -1 when nothing is known of its datagram here (its first
 * fragment was not translated, or has not come yet: see docs/semantics.md
 * for fragments that overtake their first), and it passes untouched.
 * Only an IPv6 Fragment header right after the IPv6 header is looked at,
 * as in parse().
 */
static __noinline int frag_follow(struct __sk_buff *skb, __u8 hook)
{
	struct sp_frag_key k = {};
	struct sp_frag_val *fv, v;
	__be16 eth_proto;
	int act = TC_ACT_OK, v6 = 0;

	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &eth_proto, sizeof(eth_proto)))
		return -1;
	if (eth_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
			return -1;
		addr_from_v4(k.saddr, ip.saddr);
		addr_from_v4(k.daddr, ip.daddr);
		k.id = bpf_ntohs(ip.id);
		k.proto = ip.protocol;
	} else if (eth_proto == bpf_htons(ETH_P_IPV6)) {
		struct frag6hdr fh;
		__u8 nh;

		if (bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, nexthdr), &nh, 1) ||
		    nh != NEXTHDR_FRAGMENT ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(struct ipv6hdr), &fh, sizeof(fh)) ||
		    bpf_skb_load_bytes(skb, IP6_SADDR_OFF, k.saddr, 16) ||
		    bpf_skb_load_bytes(skb, IP6_DADDR_OFF, k.daddr, 16))
			return -1;
		k.id = bpf_ntohl(fh.id);
		k.proto = fh.nexthdr;
		v6 = 1;
	} else {
		return -1;
	}
	if (k.proto != IPPROTO_TCP && k.proto != IPPROTO_UDP)
		return -1;
	k.hook = hook;
	fv = bpf_map_lookup_elem(&SP_MAP(sp_frag), &k);
	if (!fv)
		return -1;
	v = *fv;
	if (idle_ns(now_ns(), v.first_seen) > (v6 ? FRAG_TIMEOUT6_NS : FRAG_TIMEOUT4_NS))
		return -1;
	if (v.flags & SP_FRAG_F_DROP)
		return count(skb, SP_V_FRAGMENT, TC_ACT_SHOT);
	if (v6) {
		/* No header checksum, and no L4 checksum in this fragment: the
		 * bytes only, and a CHECKSUM_COMPLETE skb's csum with them. */
		if (bpf_skb_store_bytes(skb, IP6_SADDR_OFF, v.saddr, 16, BPF_F_RECOMPUTE_CSUM) ||
		    bpf_skb_store_bytes(skb, IP6_DADDR_OFF, v.daddr, 16, BPF_F_RECOMPUTE_CSUM))
			return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	} else {
		__be32 os = addr_to_v4(k.saddr), od = addr_to_v4(k.daddr);
		__be32 ns = addr_to_v4(v.saddr), nd = addr_to_v4(v.daddr);

		/* The IPv4 header checksum follows each address. */
		if (os != ns && (bpf_l3_csum_replace(skb, IP_CSUM_OFF, os, ns, sizeof(ns)) ||
				 bpf_skb_store_bytes(skb, IP_SADDR_OFF, &ns, sizeof(ns), 0)))
			return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
		if (od != nd && (bpf_l3_csum_replace(skb, IP_CSUM_OFF, od, nd, sizeof(nd)) ||
				 bpf_skb_store_bytes(skb, IP_DADDR_OFF, &nd, sizeof(nd), 0)))
			return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	}
	if (v.flags & SP_FRAG_F_REDIRECT) {
		act = reflect(skb);
		if (act < 0)
			return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	}
	return count(skb, SP_V_FRAGMENT, act);
}

#endif /* SP_LIB_FRAG_H */
