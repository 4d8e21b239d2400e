/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * ICMP and ICMPv6 errors about a translated flow (port unreachable, packet
 * too big, time exceeded...), translated as the flow's own packets are:
 * the quoted packet, the outer address that named the same host, and every
 * checksum over them.
 */
#ifndef SP_LIB_ICMP_H
#define SP_LIB_ICMP_H

#include <linux/pkt_cls.h>
#include "conntrack.h"
#include "hairpin.h"
#include "parse.h"
#include "stats.h"

/* ICMP and ICMPv6 error types that quote the packet they are about
 * (linux/icmp.h and linux/icmpv6.h, whose userspace includes pull in
 * libc headers a BPF build does not have). */
#define ICMP_DEST_UNREACH 3
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PKT_TOOBIG 2
#define ICMPV6_TIME_EXCEED 3
#define ICMPV6_PARAMPROB 4
/* The checksum of both is at byte 2 of their header; the quoted packet
 * starts at byte 8 (RFC 792, RFC 4443). */
#define ICMP_CSUM_OFF 2
#define ICMP_QUOTE_OFF 8

/*
 * An ICMP error about a TCP or UDP packet: the quoted packet's tuple and
 * where the parts are. parse_icmp() takes only errors addressed to the
 * quoted packet's sender, so the outer destination is saddr; from_dst
 * says whether the outer source is daddr. Small on purpose: it lives on
 * the stack of programs that also run dnat() (512 bytes in all).
 */
struct icmp_err {
	__u8 saddr[16]; /* the quoted packet's source and destination, map form */
	__u8 daddr[16];
	__u32 icmp_off; /* the ICMP header */
	__u32 ip_off;   /* the quoted IP header */
	__u32 l4_off;   /* the quoted TCP/UDP header */
	__u32 end;      /* end of the outer IP packet: nothing beyond is read
			 * or written (Ethernet padding, a lying length) */
	__be16 sport;   /* the quoted ports, network order */
	__be16 dport;
	__u8 proto;    /* the quoted IPPROTO_TCP or IPPROTO_UDP */
	__u8 v6;
	__u8 from_dst; /* the error comes from the quoted destination */
	__u8 pad;
};

static __always_inline int icmp_error_type(__u8 type, int v6)
{
	if (v6)
		return type == ICMPV6_DEST_UNREACH || type == ICMPV6_PKT_TOOBIG || type == ICMPV6_TIME_EXCEED ||
		       type == ICMPV6_PARAMPROB;
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

/*
 * Parse an ICMP (IPv4) or ICMPv6 error quoting a TCP or UDP packet: 0 and
 * ie filled, or -1 for anything else. Its own parser, not parse(): only
 * packets parse() found neither TCP nor UDP come here. Headers are copied
 * out with bpf_skb_load_bytes (the quoted IP header's options move what
 * follows it; copies need no packet bounds proofs), and the outer IP length
 * bounds every read: a quote may be cut anywhere after its ports (RFC 792
 * promises 8 bytes of the quoted L4 header). A subprogram, not inlined:
 * its buffers take stack only while it runs.
 */
static __noinline int parse_icmp(struct __sk_buff *skb, struct icmp_err *ie)
{
	/* One buffer for each header in turn; h6: an IPv6 header's fixed
	 * part before its addresses (version, payload length, next header). */
	union {
		struct iphdr ip;
		__u8 h6[8];
	} h;
	__u8 osrc[16], odst[16];
	__be16 proto;
	__u8 type;

	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)))
		return -1;
	if (proto == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &h.ip, sizeof(h.ip)))
			return -1;
		if (h.ip.version != 4 || h.ip.ihl < 5 || h.ip.protocol != IPPROTO_ICMP ||
		    (h.ip.frag_off & bpf_htons(IP_MF | IP_OFFSET)))
			return -1;
		ie->end = ETH_HLEN + bpf_ntohs(h.ip.tot_len);
		ie->icmp_off = ETH_HLEN + h.ip.ihl * 4;
		ie->ip_off = ie->icmp_off + ICMP_QUOTE_OFF;
		if (ie->end > skb->len || ie->ip_off + sizeof(h.ip) > ie->end)
			return -1;
		addr_from_v4(osrc, h.ip.saddr);
		addr_from_v4(odst, h.ip.daddr);
		if (bpf_skb_load_bytes(skb, ie->icmp_off, &type, 1) || !icmp_error_type(type, 0))
			return -1;
		if (bpf_skb_load_bytes(skb, ie->ip_off, &h.ip, sizeof(h.ip)))
			return -1;
		/* A quoted fragment other than the first has no ports. */
		if (h.ip.version != 4 || h.ip.ihl < 5 || (h.ip.frag_off & bpf_htons(IP_OFFSET)))
			return -1;
		ie->proto = h.ip.protocol;
		ie->l4_off = ie->ip_off + h.ip.ihl * 4;
		addr_from_v4(ie->saddr, h.ip.saddr);
		addr_from_v4(ie->daddr, h.ip.daddr);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN, h.h6, sizeof(h.h6)))
			return -1;
		/* As parse(): extension headers are not walked. */
		if (h.h6[0] >> 4 != 6 || h.h6[6] != IPPROTO_ICMPV6)
			return -1;
		ie->end = ETH_HLEN + sizeof(struct ipv6hdr) + (h.h6[4] << 8 | h.h6[5]);
		ie->icmp_off = ETH_HLEN + sizeof(struct ipv6hdr);
		ie->ip_off = ie->icmp_off + ICMP_QUOTE_OFF;
		if (ie->end > skb->len || ie->ip_off + sizeof(struct ipv6hdr) > ie->end)
			return -1;
		if (bpf_skb_load_bytes(skb, IP6_SADDR_OFF, osrc, 16) || bpf_skb_load_bytes(skb, IP6_DADDR_OFF, odst, 16))
			return -1;
		if (bpf_skb_load_bytes(skb, ie->icmp_off, &type, 1) || !icmp_error_type(type, 1))
			return -1;
		if (bpf_skb_load_bytes(skb, ie->ip_off, h.h6, sizeof(h.h6)) || h.h6[0] >> 4 != 6)
			return -1;
		ie->v6 = 1;
		ie->proto = h.h6[6];
		ie->l4_off = ie->ip_off + sizeof(struct ipv6hdr);
		if (bpf_skb_load_bytes(skb, ie->ip_off + offsetof(struct ipv6hdr, saddr), ie->saddr, 16) ||
		    bpf_skb_load_bytes(skb, ie->ip_off + offsetof(struct ipv6hdr, daddr), ie->daddr, 16))
			return -1;
	} else {
		return -1;
	}
	if (ie->proto != IPPROTO_TCP && ie->proto != IPPROTO_UDP)
		return -1;
	/* An error goes to the sender of the packet it quotes (RFC 1122
	 * 3.2.2, RFC 4443 2.2); anything else is not one to translate. */
	if (!addr_eq(odst, ie->saddr))
		return -1;
	ie->from_dst = addr_eq(osrc, ie->daddr);
	if (ie->l4_off + 4 > ie->end || bpf_skb_load_bytes(skb, ie->l4_off, &ie->sport, 4))
		return -1;
	return 0;
}

/*
 * The three steps of icmp_rewrite(): the quoted TCP/UDP checksum; the
 * quoted port and address; the outer address. Subprograms, not inlined:
 * their spills take stack only while they run, on top of the frame of the
 * program that calls them, which dnat() fills to 312-352 of the 512 bytes
 * a BPF program has in all. Each returns 0, or -1 when a helper failed.
 */
static __noinline int icmp_rewrite_l4csum(struct __sk_buff *skb, const struct icmp_err *ie, int dst, const __u8 *addr,
					  __be16 port)
{
	const __u32 *ow = (const __u32 *)(dst ? ie->daddr : ie->saddr);
	const __u32 *nw = (const __u32 *)addr;
	__be16 oport = dst ? ie->dport : ie->sport;
	__u32 l4csum = ie->l4_off + (ie->proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
	__u64 mangled = ie->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	int first = ie->v6 ? 0 : 3;
	__u16 before, after;

	if (l4csum + 2 > ie->end)
		return 0;
	if (bpf_skb_load_bytes(skb, l4csum, &before, 2))
		return -1;
#pragma unroll
	for (int i = 0; i < 4; i++)
		if (i >= first && ow[i] != nw[i] &&
		    bpf_l4_csum_replace(skb, l4csum, ow[i], nw[i], mangled | sizeof(__u32)))
			return -1;
	if (oport != port && bpf_l4_csum_replace(skb, l4csum, oport, port, mangled | sizeof(port)))
		return -1;
	if (bpf_skb_load_bytes(skb, l4csum, &after, 2))
		return -1;
	if (before != after && bpf_l4_csum_replace(skb, ie->icmp_off + ICMP_CSUM_OFF, before, after, sizeof(after)))
		return -1;
	return 0;
}

static __noinline int icmp_rewrite_quote(struct __sk_buff *skb, const struct icmp_err *ie, int dst, const __u8 *addr,
					 __be16 port)
{
	const __u32 *ow = (const __u32 *)(dst ? ie->daddr : ie->saddr);
	const __u32 *nw = (const __u32 *)addr;
	__be16 oport = dst ? ie->dport : ie->sport;
	__u32 icsum = ie->icmp_off + ICMP_CSUM_OFF;
	int v6 = ie->v6, first = v6 ? 0 : 3;

	if (oport != port) {
		if (bpf_l4_csum_replace(skb, icsum, oport, port, sizeof(port)) ||
		    bpf_skb_store_bytes(skb, ie->l4_off + (dst ? 2 : 0), &port, sizeof(port), 0))
			return -1;
	}
	/* The quoted address: offset by the quoted IPv4 header checksum, which
	 * the ICMP checksum covers too; IPv6 has none, the ICMPv6 checksum
	 * takes the change. */
#pragma unroll
	for (int i = 0; i < 4; i++)
		if (i >= first && ow[i] != nw[i] &&
		    (v6 ? bpf_l4_csum_replace(skb, icsum, ow[i], nw[i], sizeof(__u32))
			: bpf_l3_csum_replace(skb, ie->ip_off + offsetof(struct iphdr, check), ow[i], nw[i],
					      sizeof(__u32))))
			return -1;
	if (v6)
		return bpf_skb_store_bytes(skb, ie->ip_off + (dst ? offsetof(struct ipv6hdr, daddr)
								   : offsetof(struct ipv6hdr, saddr)),
					   addr, 16, 0);
	return bpf_skb_store_bytes(skb, ie->ip_off + (dst ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr)),
				   addr + 12, 4, 0);
}

static __noinline int icmp_rewrite_outer(struct __sk_buff *skb, const struct icmp_err *ie, int dst, const __u8 *addr)
{
	const __u32 *ow = (const __u32 *)(dst ? ie->daddr : ie->saddr);
	const __u32 *nw = (const __u32 *)addr;
	__u32 icsum = ie->icmp_off + ICMP_CSUM_OFF;
	int v6 = ie->v6, first = v6 ? 0 : 3;

	/* The IPv4 header checksum, or the ICMPv6 pseudo-header. */
#pragma unroll
	for (int i = 0; i < 4; i++)
		if (i >= first && ow[i] != nw[i] &&
		    (v6 ? bpf_l4_csum_replace(skb, icsum, ow[i], nw[i], sizeof(__u32))
			: bpf_l3_csum_replace(skb, IP_CSUM_OFF, ow[i], nw[i], sizeof(__u32))))
			return -1;
	if (v6)
		return bpf_skb_store_bytes(skb, dst ? IP6_SADDR_OFF : IP6_DADDR_OFF, addr, 16, 0);
	return bpf_skb_store_bytes(skb, dst ? IP_SADDR_OFF : IP_DADDR_OFF, addr + 12, 4, 0);
}

/*
 * Rewrite the quoted packet's source (dst 0) or destination (dst 1) to
 * addr:port (map form, network order), and the outer address that named
 * the same host: the outer destination for a quoted source (always: an
 * error goes to the quoted sender; the node's SNAT address becomes the
 * client), the outer source for a quoted destination when the error came
 * from there (a backend reporting on a packet sent to it becomes the
 * frontend). An outer source naming another host, a router on the way,
 * stays. 0, or -1 when a helper failed.
 *
 * Checksums: the quoted IPv4 header's, the quoted TCP/UDP checksum when
 * the quote holds it (its pseudo-header has the address), and the ICMP
 * checksum over the whole quote (ICMPv6: and over the outer addresses, in
 * its pseudo-header). Every change inside the ICMP message is offset by a
 * checksum inside it, and an outer IPv6 address by the ICMPv6 checksum: the
 * sum over the packet stays what it was, so a CHECKSUM_COMPLETE skb->csum
 * stays right and no BPF_F_PSEUDO_HDR is used (it would adjust skb->csum).
 * An ICMP error is never CHECKSUM_PARTIAL (stacks checksum it when they
 * build it), which the plain replaces rely on.
 */
static __always_inline int icmp_rewrite(struct __sk_buff *skb, const struct icmp_err *ie, int dst, const __u8 *addr,
					__be16 port)
{
	if (icmp_rewrite_l4csum(skb, ie, dst, addr, port) || icmp_rewrite_quote(skb, ie, dst, addr, port))
		return -1;
	if (dst && !ie->from_dst)
		return 0;
	return icmp_rewrite_outer(skb, ie, dst, addr);
}

/*
 * The flow an ICMP error is about, from its conntrack entry of direction
 * dir. The quoted packet went the other way from the error, so the entry
 * is keyed by the quoted tuple reversed: an error travelling like a reply
 * (to the client) quotes a forward packet, client -> backend, and finds the
 * flow's reply entry backend -> client; one travelling like a request
 * quotes a reply and finds the forward entry.
 */
static __always_inline struct sp_ct_val *icmp_flow(const struct icmp_err *ie, __u8 dir)
{
	struct sp_ct_key k = {};
	struct sp_ct_val *ct;

	ct_key(&k, ie->daddr, ie->saddr, bpf_ntohs(ie->dport), bpf_ntohs(ie->sport), ie->proto, dir);
	ct = bpf_map_lookup_elem(&SP_MAP(sp_ct), &k);
	/* An SNAT entry without a port: the flow never left the node. */
	if (!ct || addr_is_v4(ct->nat_addr) == ie->v6 || (dir == SP_CT_SNAT && !ct->nat_port))
		return 0;
	return ct;
}

/*
 * Translate an ICMP error as the flow's own packets in its direction are:
 * through the flow's entry of direction dir (icmp_flow), whose address and
 * port replace the quoted destination (reply and SNAT entries: the error
 * goes to the client, or out masqueraded) or the quoted source (forward
 * and UNSNAT entries). Counted as verdict; -1: no such flow.
 */
static __always_inline int icmp_xlate(struct __sk_buff *skb, const struct icmp_err *ie, __u8 dir, __u32 verdict)
{
	struct sp_ct_val *ct = icmp_flow(ie, dir);

	if (!ct)
		return -1;
	if (icmp_rewrite(skb, ie, dir == SP_CT_REPLY || dir == SP_CT_SNAT, ct->nat_addr, bpf_htons(ct->nat_port)))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	return count(skb, verdict, TC_ACT_OK);
}

/*
 * An ICMP error a pod sends. About a reply it got from a frontend (its
 * socket is gone: port unreachable): to the flow's backend, as the pod's
 * own packets of the flow are. About a hairpin flow it serves (sent to the
 * hairpin address): back into the pod, as if from the frontend, about the
 * packet the pod sent as client. -1: neither.
 */
static __always_inline int icmp_from_pod(struct __sk_buff *skb)
{
	struct icmp_err ie = {};
	const __u8 *hp;
	struct sp_ct_val *ct;
	int act;

	if (parse_icmp(skb, &ie))
		return -1;
	hp = hairpin_addr(ie.v6);
	if (!hp || !addr_eq(ie.saddr, hp))
		return icmp_xlate(skb, &ie, SP_CT_FORWARD, SP_V_DNAT_ESTABLISHED);
	/* It quotes hairpin -> pod:backend port; the pod sent pod -> frontend. */
	ct = icmp_flow(&ie, SP_CT_REPLY);
	if (!ct)
		return -1;
	if (icmp_rewrite(skb, &ie, 1, ct->nat_addr, bpf_htons(ct->nat_port)) ||
	    icmp_rewrite(skb, &ie, 0, ie.daddr, ie.sport))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	act = reflect(skb);
	return act < 0 ? count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT) : count(skb, SP_V_REVNAT, act);
}

/*
 * An ICMP error leaving through an interface's egress (to a pod, or out of
 * the node). About a flow's request (client -> backend, quoted by the
 * backend or a router on the way): reverse NAT, as the flow's replies. At
 * an external interface also about a masqueraded flow's reply (backend ->
 * client, quoted by the client or a router near it, on its way to the
 * backend): masqueraded, as the flow's requests. -1: neither.
 */
static __always_inline int icmp_out(struct __sk_buff *skb, int external)
{
	struct icmp_err ie = {};
	int v;

	if (parse_icmp(skb, &ie))
		return -1;
	v = icmp_xlate(skb, &ie, SP_CT_REPLY, SP_V_REVNAT);
	if (v >= 0 || !external)
		return v;
	return icmp_xlate(skb, &ie, SP_CT_SNAT, SP_V_SNAT);
}

/*
 * An ICMP error arriving at an external interface. About a masqueraded
 * flow's request (node:SNAT port -> backend): its quoted source and outer
 * destination back to the client, as UNSNAT does for the flow's replies;
 * the client's interface then reverses the DNAT (icmp_out). About a reply
 * an outside client got (frontend -> client): to the flow's backend, as
 * the flow's requests. -1: neither.
 */
static __always_inline int icmp_ext_in(struct __sk_buff *skb)
{
	struct icmp_err ie = {};
	int v;

	if (parse_icmp(skb, &ie))
		return -1;
	v = icmp_xlate(skb, &ie, SP_CT_UNSNAT, SP_V_UNSNAT);
	if (v >= 0)
		return v;
	return icmp_xlate(skb, &ie, SP_CT_FORWARD, SP_V_DNAT_ESTABLISHED);
}

#endif /* SP_LIB_ICMP_H */
