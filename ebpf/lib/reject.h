/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * kube-proxy's REJECT for a Service with no endpoint: the client's packet
 * is turned, in place, into the ICMP port unreachable (ICMPv6 port
 * unreachable) that netfilter's REJECT target sends, and goes straight
 * back out of the interface it came in by. A TCP client's connect() then
 * fails at once with ECONNREFUSED, and a connected UDP socket gets
 * ECONNREFUSED on its next call, instead of waiting for a timeout
 * (docs/semantics.md, "The datapath").
 */
#ifndef SP_LIB_REJECT_H
#define SP_LIB_REJECT_H

#include <linux/pkt_cls.h>
#include "hairpin.h"
#include "icmp.h"
#include "parse.h"
#include "stats.h"

#define ICMP_PORT_UNREACH 3   /* code of ICMP_DEST_UNREACH */
#define ICMPV6_PORT_UNREACH 4 /* code of ICMPV6_DEST_UNREACH */

/*
 * How much of the client's packet the error quotes: as much as fits in 576
 * bytes for IPv4 (RFC 1812 4.3.2.3; Linux's icmp_send() cuts there), and
 * in the IPv6 minimum MTU, 1280 bytes, for IPv6 (RFC 4443 2.4 (c) asks for
 * exactly that). RFC 792's "IP header and 64 bits" is the least a client
 * needs to find its socket; more costs nothing here.
 */
#define REJECT_MAX4 576
#define REJECT_MAX6 1280
#define REJECT_HDR4 (sizeof(struct iphdr) + ICMP_QUOTE_OFF)
#define REJECT_HDR6 (sizeof(struct ipv6hdr) + ICMP_QUOTE_OFF)

/* What Linux puts in the errors it makes: the default TTL and hop limit
 * (net.ipv4.ip_default_ttl, net.ipv6.conf.*.hop_limit), and for IPv4 the
 * client's TOS bits (IPTOS_TOS_MASK) with the "internetwork control"
 * precedence, as icmp_send() does for an error. */
#define REJECT_TTL 64
#ifndef IPTOS_PREC_INTERNETCONTROL
#define IPTOS_PREC_INTERNETCONTROL 0xc0 /* linux/ip.h: IPTOS_TOS_MASK is there */
#endif

/*
 * The ones' complement sum of the packet's bytes [off, end) on top of seed,
 * as bpf_csum_diff() sums (32 bits, unfolded); bytes past end count as
 * zeros, which is how an odd length is padded (RFC 1071). Read 32 bytes at
 * a time with bpf_skb_load_bytes, so a non-linear skb needs no pull and
 * the verifier sees one bounded loop. At most REJECT_MAX6 bytes; -1 on a
 * helper's failure. A subprogram: its buffer takes stack only while it
 * runs; 32 bytes, not more: with dnat's frame below it, the deepest chain
 * (program, reject4/6, this) must stay within the verifier's 512 bytes.
 */
static __noinline __s64 csum_bytes(struct __sk_buff *skb, __u32 off, __u32 end, __u32 seed)
{
	__u8 buf[32];
	__s64 s = seed;

	for (int i = 0; i < REJECT_MAX6 / sizeof(buf) + 1; i++) {
		__u32 n;

		if (off >= end)
			break;
		n = end - off;
		if (n >= sizeof(buf)) {
			if (bpf_skb_load_bytes(skb, off, buf, sizeof(buf)))
				return -1;
		} else {
			__builtin_memset(buf, 0, sizeof(buf));
			n &= sizeof(buf) - 1;
			if (!n || bpf_skb_load_bytes(skb, off, buf, n))
				return -1;
		}
		s = bpf_csum_diff(0, 0, (__be32 *)buf, sizeof(buf), (__u32)s);
		if (s < 0)
			return -1;
		off += sizeof(buf);
	}
	return s;
}

static __always_inline __u16 csum_fold32(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/*
 * May an error be sent about this packet? Not to a source that names no
 * single host (RFC 1122 3.2.2: zero, loopback, broadcast, multicast, class
 * E; RFC 4443 2.4 (e): multicast, unspecified), nor about a frame sent to
 * a link-layer broadcast or multicast address: Linux's icmp_send() and
 * icmp6_send() refuse these too, and an error to a forged source would
 * reflect traffic at a victim.
 */
static __always_inline int reject_allowed(struct __sk_buff *skb, const struct pkt *p)
{
	__u8 dmac0;

	if (bpf_skb_load_bytes(skb, 0, &dmac0, 1) || (dmac0 & 1))
		return 0;
	if (p->v6) {
		const __u32 *w = (const __u32 *)p->saddr;

		if (p->saddr[0] == 0xff)
			return 0;
		/* :: and ::1 */
		if (!w[0] && !w[1] && !w[2] && (w[3] == 0 || w[3] == bpf_htonl(1)))
			return 0;
		return 1;
	}
	__u8 a = p->saddr[12];

	return a != 0 && a != 127 && a < 224;
}

/*
 * Turn an IPv4 TCP/UDP packet into the ICMP port unreachable about it:
 * Ethernet / IPv4 frontend -> client / ICMP (3, 3) / the client's datagram
 * (header, options and all) cut at REJECT_MAX4 bytes in all. Ethernet
 * padding and whatever lies past the datagram's own length is not quoted.
 * 0, or -1 when a helper failed (the packet is then half rewritten: drop it).
 */
static __noinline int reject4(struct __sk_buff *skb, const struct pkt *p)
{
	struct {
		struct iphdr ip;
		__u8 icmp[ICMP_QUOTE_OFF];
	} h = {};
	__u32 qlen;
	__s64 s;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &h.ip, sizeof(h.ip)))
		return -1;
	qlen = bpf_ntohs(h.ip.tot_len);
	if (qlen > skb->len - ETH_HLEN)
		qlen = skb->len - ETH_HLEN;
	if (qlen > REJECT_MAX4 - REJECT_HDR4)
		qlen = REJECT_MAX4 - REJECT_HDR4;
	if (qlen < skb->len - ETH_HLEN && bpf_skb_change_tail(skb, ETH_HLEN + qlen, 0))
		return -1;
	/* Room for the new IP and ICMP headers between Ethernet and the
	 * quoted datagram. */
	if (bpf_skb_adjust_room(skb, REJECT_HDR4, BPF_ADJ_ROOM_MAC, 0))
		return -1;

	h.ip.tos = (h.ip.tos & IPTOS_TOS_MASK) | IPTOS_PREC_INTERNETCONTROL;
	h.ip.version = 4;
	h.ip.ihl = 5;
	h.ip.tot_len = bpf_htons(REJECT_HDR4 + qlen);
	/* Not DF, as Linux's errors: a fresh identification (RFC 6864). */
	h.ip.id = (__be16)bpf_get_prandom_u32();
	h.ip.frag_off = 0;
	h.ip.ttl = REJECT_TTL;
	h.ip.protocol = IPPROTO_ICMP;
	h.ip.check = 0;
	h.ip.saddr = addr_to_v4(p->daddr);
	h.ip.daddr = addr_to_v4(p->saddr);
	s = bpf_csum_diff(0, 0, (__be32 *)&h.ip, sizeof(h.ip), 0);
	if (s < 0)
		return -1;
	h.ip.check = csum_fold32((__u32)s);
	h.icmp[0] = ICMP_DEST_UNREACH;
	h.icmp[1] = ICMP_PORT_UNREACH;
	/* BPF_F_RECOMPUTE_CSUM: a CHECKSUM_COMPLETE skb's csum follows. */
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, sizeof(h), BPF_F_RECOMPUTE_CSUM))
		return -1;
	s = csum_bytes(skb, ETH_HLEN + sizeof(h.ip), ETH_HLEN + REJECT_HDR4 + qlen, 0);
	if (s < 0)
		return -1;
	__u16 c = csum_fold32((__u32)s);

	return bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(h.ip) + ICMP_CSUM_OFF, &c, sizeof(c),
				   BPF_F_RECOMPUTE_CSUM);
}

/*
 * The same for IPv6: Ethernet / IPv6 frontend -> client / ICMPv6 (1, 4) /
 * the client's packet (extension headers and all) cut at REJECT_MAX6 bytes
 * in all; the ICMPv6 checksum covers the pseudo-header (RFC 4443 2.3).
 */
static __noinline int reject6(struct __sk_buff *skb, const struct pkt *p)
{
	struct {
		struct ipv6hdr ip;
		__u8 icmp[ICMP_QUOTE_OFF];
	} h = {};
	__be32 tail[2];
	__u32 qlen;
	__s64 s;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &h.ip, sizeof(h.ip)))
		return -1;
	qlen = sizeof(h.ip) + bpf_ntohs(h.ip.payload_len);
	if (qlen > skb->len - ETH_HLEN)
		qlen = skb->len - ETH_HLEN;
	if (qlen > REJECT_MAX6 - REJECT_HDR6)
		qlen = REJECT_MAX6 - REJECT_HDR6;
	if (qlen < skb->len - ETH_HLEN && bpf_skb_change_tail(skb, ETH_HLEN + qlen, 0))
		return -1;
	if (bpf_skb_adjust_room(skb, REJECT_HDR6, BPF_ADJ_ROOM_MAC, 0))
		return -1;

	/* Traffic class and flow label 0, as Linux's errors. */
	h.ip.priority = 0;
	h.ip.flow_lbl[0] = h.ip.flow_lbl[1] = h.ip.flow_lbl[2] = 0;
	h.ip.version = 6;
	h.ip.payload_len = bpf_htons(ICMP_QUOTE_OFF + qlen);
	h.ip.nexthdr = IPPROTO_ICMPV6;
	h.ip.hop_limit = REJECT_TTL;
	__builtin_memcpy(&h.ip.saddr, p->daddr, 16);
	__builtin_memcpy(&h.ip.daddr, p->saddr, 16);
	h.icmp[0] = ICMPV6_DEST_UNREACH;
	h.icmp[1] = ICMPV6_PORT_UNREACH;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, sizeof(h), BPF_F_RECOMPUTE_CSUM))
		return -1;
	/* The pseudo-header: both addresses, the upper-layer length and the
	 * next header, each as a 32-bit word. */
	tail[0] = bpf_htonl(ICMP_QUOTE_OFF + qlen);
	tail[1] = bpf_htonl(IPPROTO_ICMPV6);
	s = bpf_csum_diff(0, 0, (__be32 *)&h.ip.saddr, 32, 0);
	if (s < 0)
		return -1;
	s = bpf_csum_diff(0, 0, tail, sizeof(tail), (__u32)s);
	if (s < 0)
		return -1;
	s = csum_bytes(skb, ETH_HLEN + sizeof(h.ip), ETH_HLEN + REJECT_HDR6 + qlen, (__u32)s);
	if (s < 0)
		return -1;
	__u16 c = csum_fold32((__u32)s);

	return bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(h.ip) + ICMP_CSUM_OFF, &c, sizeof(c),
				   BPF_F_RECOMPUTE_CSUM);
}

/*
 * A new flow to a frontend with no backend. Flagged SP_SVC_F_REJECT (the
 * Service has no endpoint anywhere): the packet becomes the ICMP port
 * unreachable, from the frontend the client used to the client, and leaves
 * by the interface it came in by, as the pod's or the outside client's
 * next hop sent it (reflect(): the Ethernet addresses swapped). Else (a
 * Local traffic policy with no local endpoint: kube-proxy's DROP), a
 * source no error may go to, or a GSO packet (several datagrams in one
 * skb, which one error cannot quote): dropped.
 *
 * No rate limit: kube-proxy's rules have none, but its errors are made by
 * the kernel, whose icmp_ratelimit and icmp_msgs_per_sec throttle them per
 * client; these are made here, one per rejected packet, never bigger than
 * the packet plus 48 bytes of headers, and only ever sent back towards
 * the packet's source through the interface it came from.
 */
static __always_inline int reject(struct __sk_buff *skb, const struct pkt *p, const struct sp_svc_val *svc)
{
	int act;

	if (!(svc->flags & SP_SVC_F_REJECT) || skb->gso_size || !reject_allowed(skb, p))
		return count(skb, SP_V_DROP_NO_BACKEND, TC_ACT_SHOT);
	if (p->v6 ? reject6(skb, p) : reject4(skb, p))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	act = reflect(skb);
	if (act < 0)
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	return count(skb, SP_V_REJECT_NO_BACKEND, act);
}

#endif /* SP_LIB_REJECT_H */
