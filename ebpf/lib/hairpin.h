/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Hairpin: a pod that reaches one of its Services and is given itself as
 * backend. Its flow gets a source address of its own (sp_hairpin, set by
 * the control plane before load), and both directions are sent straight
 * back into the pod (docs/semantics.md, "Hairpin").
 */
#ifndef SP_LIB_HAIRPIN_H
#define SP_LIB_HAIRPIN_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include "addr.h"
#include "maps.h"

/* The hairpin source addresses (struct sp_hairpin in sliceproxy.h). A
 * read-only global rather than a map field: the control plane writes it
 * into the object before load (the loader), no map layout changes, and
 * the verifier sees the values. Its own section, so the loader finds it at
 * offset 0 of its own internal map. */
const volatile struct sp_hairpin sp_hairpin SEC(".rodata.hairpin") = {};

/* The hairpin address of a family (map form), or 0 when none is set. */
static __always_inline const __u8 *hairpin_addr(int v6)
{
	const __u8 *a = v6 ? (const __u8 *)sp_hairpin.addr6 : (const __u8 *)sp_hairpin.addr4;
	const __u32 *w = (const __u32 *)a;

	return (w[0] | w[1] | w[2] | w[3]) ? a : 0;
}

/*
 * The address a flow from client to backend gets as its source, or 0 to
 * keep the client's: a pod whose packet to a frontend of its own scope is
 * given the pod itself as backend (hairpin). Left as it is, the packet
 * would enter the pod from its own address, which the pod drops as a
 * martian, and the pod's answer would go to itself over lo, bypassing the
 * reverse NAT. kube-proxy masquerades this case (KUBE-MARK-MASQ when the
 * source is the endpoint itself). Only pods' traffic (scope internal):
 * external traffic never comes from a pod of this node.
 */
static __always_inline const __u8 *hairpin_for(__u8 scope, const __u8 *backend, const __u8 *client)
{
	if (scope != SP_SCOPE_INTERNAL || !addr_eq(backend, client))
		return 0;
	return hairpin_addr(!addr_is_v4(client));
}

/*
 * Send a packet back into the pod it came from: out of the interface it
 * came in by, with the Ethernet addresses swapped (the pod addressed the
 * frame to the host side; it takes only frames addressed to itself).
 * Returns the tc action, or -1 when the frame could not be rewritten.
 *
 * Both directions of a hairpin flow take this short cut, so they never
 * enter the node's IP stack: netfilter's conntrack sees none of the flow
 * rather than half of it (a reply it never saw the request of is INVALID,
 * which many rulesets drop), and neither routing nor rp_filter has to
 * accept the hairpin address, which is routed nowhere on the node.
 */
static __always_inline int reflect(struct __sk_buff *skb)
{
	__u8 macs[2 * ETH_ALEN], swapped[2 * ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, macs, sizeof(macs)))
		return -1;
	__builtin_memcpy(swapped, macs + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(swapped + ETH_ALEN, macs, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, swapped, sizeof(swapped), 0))
		return -1;
	return bpf_redirect(skb->ifindex, 0);
}

#endif /* SP_LIB_HAIRPIN_H */
