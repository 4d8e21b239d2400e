/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Rewriting a packet's address and port with its checksums kept right: the
 * IPv4 header checksum, and the TCP/UDP checksum whose pseudo-header covers
 * the addresses. Incremental updates (RFC 1624) through the kernel's
 * helpers, which also keep a CHECKSUM_PARTIAL or CHECKSUM_COMPLETE skb
 * consistent.
 */
#ifndef SP_LIB_CSUM_H
#define SP_LIB_CSUM_H

#include "parse.h"

/*
 * Rewrite one address and one port of an IPv4 TCP/UDP packet p, fixing the
 * IP header checksum and the L4 checksum (whose pseudo-header covers the
 * address). addr_off/port_off select source or destination.
 */
static __always_inline int rewrite_v4(struct __sk_buff *skb, const struct pkt *p, __u32 addr_off, __u32 port_off,
				      __be32 old_ip, __be32 new_ip, __be16 old_port, __be16 new_port)
{
	__u32 csum_off = p->csum_off;
	/* A UDP checksum of zero means "none" (RFC 768): keep it zero, and
	 * never let a computed zero be stored as zero. */
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

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
		if (bpf_skb_store_bytes(skb, p->l4_off + port_off, &new_port, sizeof(new_port), 0))
			return -1;
	}
	return 0;
}

/*
 * The same for IPv6: no header checksum, and the 16-byte address enters the
 * L4 checksum through its pseudo-header as one precomputed difference.
 */
static __always_inline int rewrite_v6(struct __sk_buff *skb, const struct pkt *p, __u32 addr_off, __u32 port_off,
				      const __u8 *old_addr, const __u8 *new_addr, __be16 old_port, __be16 new_port)
{
	__u32 csum_off = p->csum_off;
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__u8 naddr[16];

	if (!addr_eq(old_addr, new_addr)) {
		__builtin_memcpy(naddr, new_addr, sizeof(naddr));
		__s64 diff = bpf_csum_diff((__be32 *)old_addr, 16, (__be32 *)naddr, 16, 0);

		if (diff < 0)
			return -1;
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangled))
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, naddr, sizeof(naddr), 0))
			return -1;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | sizeof(new_port)))
			return -1;
		if (bpf_skb_store_bytes(skb, p->l4_off + port_off, &new_port, sizeof(new_port), 0))
			return -1;
	}
	return 0;
}

/* Rewrite the destination (dst) or the source of p to addr (16 bytes, the
 * packet's family) and port (network order). */
static __always_inline int rewrite(struct __sk_buff *skb, const struct pkt *p, int dst, const __u8 *addr,
				   __be16 port)
{
	if (p->v6)
		return rewrite_v6(skb, p, dst ? IP6_DADDR_OFF : IP6_SADDR_OFF, dst ? 2 : 0, dst ? p->daddr : p->saddr,
				  addr, dst ? p->dport : p->sport, port);
	return rewrite_v4(skb, p, dst ? IP_DADDR_OFF : IP_SADDR_OFF, dst ? 2 : 0, addr_to_v4(dst ? p->daddr : p->saddr),
			  addr_to_v4(addr), dst ? p->dport : p->sport, port);
}

#endif /* SP_LIB_CSUM_H */
