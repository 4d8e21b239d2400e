/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * What the XDP program (ext_xdp.c) needs that the tc helpers do with an
 * skb: parsing a frame into struct pkt, counting a verdict, and rewriting
 * addresses and ports by direct packet access with the checksums updated
 * incrementally (RFC 1624). Only what XDP finishes itself passes through
 * here: anything unusual (fragments, extension headers, IP lengths that
 * disagree with the frame) is handed to tc untouched, which knows it.
 */
#ifndef SP_LIB_XDP_H
#define SP_LIB_XDP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "addr.h"
#include "maps.h"
#include "parse.h"

/*
 * Parse Ethernet / IPv4 (options allowed) or IPv6 (no extension header) /
 * TCP or UDP, whole in the frame's linear part, into p. 0 when XDP may
 * look further; -1 for anything it leaves to tc untouched: another
 * protocol (ICMP errors, which tc translates), a fragment or a first
 * fragment (tc remembers what it did to a datagram's first for the rest:
 * frag.h), an IPv6 extension header, or lengths tc looks at closer.
 */
static __always_inline int xdp_parse(struct xdp_md *ctx, struct pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__be16 *ports;
	__u32 l4_off;

	if ((void *)(eth + 1) > data_end)
		return -1;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
			return -1;
		if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
			return -1;
		l4_off = ETH_HLEN + sizeof(*ip6);
		p->v6 = 1;
		p->proto = ip6->nexthdr;
		/* The datagram must hold the whole L4 header (and a jumbogram,
		 * length 0, is tc's). */
		if (bpf_ntohs(ip6->payload_len) < (p->proto == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr)))
			return -1;
		__builtin_memcpy(p->saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr, &ip6->daddr, 16);
	} else if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5)
			return -1;
		if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
			return -1;
		if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
			return -1;
		l4_off = ETH_HLEN + ip->ihl * 4;
		p->proto = ip->protocol;
		if (bpf_ntohs(ip->tot_len) < ip->ihl * 4 + (p->proto == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr)))
			return -1;
		addr_from_v4(p->saddr, ip->saddr);
		addr_from_v4(p->daddr, ip->daddr);
	} else {
		return -1;
	}
	/* l4_off is at most Ethernet + 60: the bound lets the verifier follow
	 * the variable offset. */
	if (l4_off > ETH_HLEN + 60)
		return -1;
	if (data + l4_off + (p->proto == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr)) > data_end)
		return -1;
	ports = data + l4_off;
	if ((void *)(ports + 2) > data_end)
		return -1;
	p->l4_off = l4_off;
	p->csum_off = l4_off + (p->proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
	p->sport = ports[0];
	p->dport = ports[1];
	if (p->proto == IPPROTO_TCP) {
		__u8 *flags = (__u8 *)ports + 13;

		if ((void *)(flags + 1) > data_end)
			return -1;
		tcp_flags(p, *flags);
	}
	return 0;
}

/* Count a verdict XDP finished a packet with, in the counters tc uses
 * (stats.h): the same verdict names, so `sliceproxy dump` and the metrics
 * show them. A packet XDP hands to tc is counted there, not here. */
static __always_inline int xdp_count(struct xdp_md *ctx, __u32 verdict, int action)
{
	struct sp_stat *st = bpf_map_lookup_elem(&SP_MAP(sp_stats), &verdict);

	if (st) {
		st->packets += 1;
		st->bytes += ctx->data_end - ctx->data;
	}
	return action;
}

/* Fold a 32-bit one's complement sum into 16 bits. */
static __always_inline __u16 xdp_fold16(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* Add to sum (the one's complement of a checksum, unfolded) the change of n
 * bytes (even) from old to new: ~old + new, 16 bits at a time, read in
 * place as the checksum field is (the sum's byte order is the reader's on
 * both sides, RFC 1071). old and new are 2-byte aligned (header fields,
 * map values, stack). */
static __always_inline __u32 csum_delta(__u32 sum, const __u8 *old, const __u8 *new, int n)
{
	for (int i = 0; i < n; i += 2) {
		sum += (__u16) ~*(const __u16 *)(old + i);
		sum += *(const __u16 *)(new + i);
	}
	return sum;
}

/* A checksum field updated by a delta sum computed with csum_delta from
 * ~field: RFC 1624's HC' = ~(~HC + ~m + m'). */
static __always_inline __u16 csum_finish(__u32 sum)
{
	return (__u16)~xdp_fold16(sum);
}

/*
 * Rewrite the destination (dst) or the source of the frame p was parsed
 * from to addr (16 bytes, map form, p's family) and port (network order),
 * with the IPv4 header checksum and the TCP/UDP checksum (whose
 * pseudo-header covers the address) updated. A UDP checksum of zero means
 * none (RFC 768) and stays zero; a computed zero is stored as 0xffff.
 * 0, or -1 when the frame is not where p says. A subprogram: called
 * twice per forwarded packet, from deep call chains.
 */
static __noinline int xdp_rewrite(struct xdp_md *ctx, const struct pkt *p, int dst, const __u8 *addr,
				       __be16 port)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 l4_off = p->l4_off;
	__u16 *csum, *pp;
	__u32 sum;

	if (l4_off > ETH_HLEN + 60)
		return -1;
	if (data + l4_off + sizeof(struct udphdr) > data_end)
		return -1;
	pp = data + l4_off + (dst ? 2 : 0);
	if (p->proto == IPPROTO_TCP) {
		if (data + l4_off + sizeof(struct tcphdr) > data_end)
			return -1;
		csum = data + l4_off + TCP_CSUM_OFF;
	} else {
		csum = data + l4_off + UDP_CSUM_OFF;
	}
	sum = (__u16)~*csum;
	if (p->v6) {
		struct ipv6hdr *ip6 = data + ETH_HLEN;
		__u8 *a;

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		a = dst ? (__u8 *)&ip6->daddr : (__u8 *)&ip6->saddr;
		sum = csum_delta(sum, a, addr, 16);
		__builtin_memcpy(a, addr, 16);
	} else {
		struct iphdr *ip = data + ETH_HLEN;
		__u32 *a;
		__u32 hsum;

		if ((void *)(ip + 1) > data_end)
			return -1;
		a = dst ? &ip->daddr : &ip->saddr;
		sum = csum_delta(sum, (__u8 *)a, addr + 12, 4);
		hsum = csum_delta((__u16)~ip->check, (__u8 *)a, addr + 12, 4);
		ip->check = csum_finish(hsum);
		__builtin_memcpy(a, addr + 12, 4);
	}
	sum = csum_delta(sum, (__u8 *)pp, (__u8 *)&port, 2);
	*pp = port;
	if (p->proto == IPPROTO_UDP && *csum == 0)
		return 0;
	*csum = csum_finish(sum);
	if (p->proto == IPPROTO_UDP && *csum == 0)
		*csum = 0xffff;
	return 0;
}

#endif /* SP_LIB_XDP_H */
