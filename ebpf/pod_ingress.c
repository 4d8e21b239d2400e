// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Ingress of the host side of a pod interface: packets the pod sends. A
 * packet to a frontend is given a backend and its destination rewritten
 * (DNAT), before netfilter and routing see it; a hairpin flow's answer goes
 * back into the pod; an ICMP error the pod sends about a translated flow is
 * translated as the flow is. Replies are not touched here: see pod_egress.c.
 */
#include "lib/hook.h"
#include "lib/nat.h"

SEC("tc")
int sp_tc_ingress(struct __sk_buff *skb)
{
	struct pkt p = {};
	int v = hook_start(skb, &p, SP_HOOK_POD_INGRESS);

	if (v >= 0)
		return v;
	v = hairpin_reply(skb, &p);
	if (v < 0)
		v = dnat(skb, &p, SP_SCOPE_INTERNAL);
	return hook_end(skb, &p, SP_HOOK_POD_INGRESS, v);
}
