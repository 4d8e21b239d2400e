/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The handoff of a flow to a backend on this node from the external
 * interfaces' XDP program (ext_xdp.c) to their tc ingress (ext_ingress.c):
 * XDP, which already found the flow's backend (and recorded a new flow),
 * writes its decision as metadata in front of the frame (struct
 * sp_xdp_meta), and tc applies it instead of deciding again. The metadata
 * carries this load's cookie (sp_xdp_cfg.cookie, random per load): tc
 * ignores metadata of any other size or cookie (another tool's XDP
 * program, an older load of ours) and decides the packet itself.
 */
#ifndef SP_LIB_HANDOFF_H
#define SP_LIB_HANDOFF_H

#include "addr.h"
#include "maps.h"
#include "nat.h"
#include "parse.h"

/* The XDP program's settings (struct sp_xdp_cfg in sliceproxy.h), set by
 * the control plane before load (--xdp-forward, the handoff's cookie).
 * Read by tc's external ingress too: one object, one global. */
const volatile struct sp_xdp_cfg sp_xdp_cfg SEC(".rodata.xdp") = {};

/*
 * At tc's external ingress, a packet p (parsed) XDP handed on with its
 * decision: when the metadata in front of it is exactly a struct
 * sp_xdp_meta of this load's XDP program, with a verdict it hands on and
 * a backend of p's family, the packet is translated as it says (dnat_to:
 * the same rewrite, hairpin decision, verdict and trace event as tc's own
 * decision would give) and counted in sp_handoff_v5. The tc action, or
 * -1: no handoff (the packet is decided in full). A subprogram: the
 * metadata's copy is on its stack, not on the ingress program's.
 */
static __noinline int handoff_take(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *meta = (void *)(long)skb->data_meta;
	struct sp_xdp_meta *m = meta;
	struct sp_stat *st;
	__u8 be[16];
	__u16 port;
	__u8 verdict;

	/* The verifier's bound first, kept apart from the exact-size test
	 * (the compiler would merge the two into one it cannot follow). */
	if ((void *)(m + 1) > data || !sp_xdp_cfg.cookie)
		return -1;
	asm volatile("" ::: "memory");
	if ((void *)(m + 1) != data)
		return -1;
	if (m->cookie != sp_xdp_cfg.cookie)
		return -1;
	verdict = m->verdict;
	if (verdict != SP_V_DNAT_NEW && verdict != SP_V_DNAT_ESTABLISHED)
		return -1;
	if (addr_is_v4(m->backend) == p->v6)
		return -1;
	/* Copied out: the rewrite moves the packet (and its metadata). The
	 * stack is tight here: 16 bytes, the counter's key among them. */
	port = m->port;
	__builtin_memset(be, 0, sizeof(be));
	st = bpf_map_lookup_elem(&SP_MAP(sp_handoff), (__u32 *)be);
	if (st) {
		st->packets += 1;
		st->bytes += skb->len;
	}
	data = (void *)(long)skb->data;
	m = (void *)(long)skb->data_meta;
	if ((void *)(m + 1) > data)
		return -1;
	__builtin_memcpy(be, m->backend, sizeof(be));
	return dnat_to(skb, p, SP_SCOPE_EXTERNAL, be, port, verdict);
}

#endif /* SP_LIB_HANDOFF_H */
