/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Parsing Ethernet / IPv4 or IPv6 / TCP or UDP into struct pkt: what every
 * program needs of a packet, with every header bound checked before use.
 */
#ifndef SP_LIB_PARSE_H
#define SP_LIB_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <stddef.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "sliceproxy.h"
#include "addr.h"

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
#define IP6_SADDR_OFF (ETH_HLEN + offsetof(struct ipv6hdr, saddr))
#define IP6_DADDR_OFF (ETH_HLEN + offsetof(struct ipv6hdr, daddr))
#define NEXTHDR_FRAGMENT 44

/* What the programs need of an IPv4 or IPv6 TCP/UDP packet. */
struct pkt {
	__u8 saddr[16]; /* IPv4-mapped for IPv4, as in the maps */
	__u8 daddr[16];
	__u16 l4_off;   /* the TCP/UDP header: at most Ethernet + 60 bytes */
	__u16 csum_off; /* its checksum field, found once here for every
			 * rewrite of the packet (TCP and UDP keep it at
			 * different offsets) */
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 v6;
	__u8 syn; /* TCP SYN without ACK: the first packet of a connection */
	__u8 tcp_flags; /* TCP: the header's flags byte (TCP_F_*); else 0 */
	__u32 frag_id;  /* with frag: the datagram's identification */
	__u8 frag;      /* the first fragment of a fragmented datagram (IPv4
			 * MF and offset 0; IPv6 a Fragment header with M and
			 * offset 0): its other fragments follow what is done
			 * to it (frag.h) */
};

/* The IPv6 Fragment header (RFC 8200 4.5). */
struct frag6hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset in 8-byte units << 3, M in bit 0 */
	__be32 id;
};

#define IP6_MF 0x0001
#define IP6_OFFSET 0xfff8

/* Bits of the TCP flags byte (byte 13 of the header). */
#define TCP_F_FIN 0x01
#define TCP_F_SYN 0x02
#define TCP_F_RST 0x04
#define TCP_F_ACK 0x10

static __always_inline void tcp_flags(struct pkt *p, __u8 flags)
{
	p->tcp_flags = flags;
	p->syn = (flags & (TCP_F_SYN | TCP_F_ACK)) == TCP_F_SYN;
}

/*
 * The length of an IP datagram as its header gives it (IPv4 total length,
 * or IPv6 payload length; `before`: the bytes of the frame before what it
 * counts). 0 in a TCP GSO packet is BIG TCP's "more than 64 KiB": the
 * length is then the skb's, as the kernel reads it (iph_totlen(),
 * ipv6_payload_len() in Linux).
 */
static __always_inline __u32 ip_len(struct __sk_buff *skb, __u32 len, __u8 proto, __u32 before)
{
	if (len == 0 && proto == IPPROTO_TCP && skb->gso_size && skb->len > before)
		return skb->len - before;
	return len;
}

/*
 * Parse Ethernet / IPv4 or IPv6 / TCP or UDP. Returns -1 and fills p for a packet we
 * may own, or the SP_V_PASS_* verdict of one we pass untouched. The TCP or
 * UDP header must lie within the frame and within the IP datagram: bytes
 * past the datagram's length (Ethernet padding, or garbage behind a short
 * length) are no header to translate or track.
 */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth;
	struct iphdr *ip;
	__be16 *ports;
	__u32 l4_off, l4_min, ihl, tot_len;

	/* Headers split over a non-linear skb (GRO, some drivers): pull what
	 * we may need into the linear part, once, before any bound check. */
	if (data + PULL_LEN > data_end && skb->len > (__u32)(data_end - data)) {
		bpf_skb_pull_data(skb, skb->len < PULL_LEN ? skb->len : PULL_LEN);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return SP_V_PASS_TRUNCATED;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return SP_V_PASS_TRUNCATED;
		if (ip6->version != 6)
			return SP_V_PASS_NOT_IP;
		__u8 nh = ip6->nexthdr;
		__u32 ext = 0;

		l4_off = ETH_HLEN + sizeof(*ip6);
		/* Extension headers are not walked, but for a Fragment header
		 * right after the IPv6 header (the common case: only the
		 * sender inserts it, after no other header in practice). A
		 * fragment other than the first has no ports: frag.h. */
		if (nh == NEXTHDR_FRAGMENT) {
			struct frag6hdr *fh = data + l4_off;

			if ((void *)(fh + 1) > data_end)
				return SP_V_PASS_TRUNCATED;
			if (fh->frag_off & bpf_htons(IP6_OFFSET))
				return SP_V_PASS_FRAGMENT;
			/* M clear: an atomic fragment (RFC 6946), a whole
			 * datagram, translated as one. */
			p->frag = !!(fh->frag_off & bpf_htons(IP6_MF));
			p->frag_id = bpf_ntohl(fh->id);
			nh = fh->nexthdr;
			ext = sizeof(*fh);
			l4_off += ext;
		}
		if (nh != IPPROTO_TCP && nh != IPPROTO_UDP)
			return SP_V_PASS_OTHER_PROTO;
		l4_min = nh == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr);
		if (data + l4_off + l4_min > data_end ||
		    ip_len(skb, bpf_ntohs(ip6->payload_len), nh, l4_off - ext) < ext + l4_min)
			return SP_V_PASS_TRUNCATED;
		ports = data + l4_off;
		if ((void *)(ports + 2) > data_end)
			return SP_V_PASS_TRUNCATED;
		p->l4_off = l4_off;
		p->csum_off = l4_off + (nh == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
		p->proto = nh;
		p->v6 = 1;
		__builtin_memcpy(p->saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr, &ip6->daddr, 16);
		p->sport = ports[0];
		p->dport = ports[1];
		if (p->proto == IPPROTO_TCP) {
			/* Checked again for the verifier, which loses the
			 * bound above when l4_off is one of two values. */
			__u8 *flags = (__u8 *)ports + 13;

			if ((void *)(flags + 1) > data_end)
				return SP_V_PASS_TRUNCATED;
			tcp_flags(p, *flags);
		}
		return -1;
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return SP_V_PASS_NOT_IP;

	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return SP_V_PASS_TRUNCATED;
	if (ip->version != 4)
		return SP_V_PASS_NOT_IP;
	ihl = ip->ihl;
	if (ihl < 5)
		return SP_V_PASS_TRUNCATED;
	tot_len = ip_len(skb, bpf_ntohs(ip->tot_len), ip->protocol, ETH_HLEN);
	if (tot_len < ihl * 4)
		return SP_V_PASS_TRUNCATED; /* shorter than its own header */
	/* Only the first fragment carries ports, and we do not reassemble:
	 * the others follow what is done to it (frag.h). */
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		return SP_V_PASS_FRAGMENT;
	if (ip->frag_off & bpf_htons(IP_MF)) {
		p->frag = 1;
		p->frag_id = bpf_ntohs(ip->id);
	}
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return SP_V_PASS_OTHER_PROTO;

	l4_off = ETH_HLEN + ihl * 4;
	/* The whole L4 header must be there, in the frame and in the
	 * datagram: we rewrite its checksum. */
	l4_min = ip->protocol == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr);
	if (l4_off > 60 + ETH_HLEN || data + l4_off + l4_min > data_end || ihl * 4 + l4_min > tot_len)
		return SP_V_PASS_TRUNCATED;
	ports = data + l4_off;
	if ((void *)(ports + 2) > data_end)
		return SP_V_PASS_TRUNCATED;

	p->l4_off = l4_off;
	p->csum_off = l4_off + (ip->protocol == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
	p->proto = ip->protocol;
	addr_from_v4(p->saddr, ip->saddr);
	addr_from_v4(p->daddr, ip->daddr);
	p->sport = ports[0];
	p->dport = ports[1];
	/* The TCP header is whole (checked above): flags are at byte 13. */
	if (p->proto == IPPROTO_TCP)
		tcp_flags(p, ((__u8 *)ports)[13]);
	return -1;
}

#endif /* SP_LIB_PARSE_H */
