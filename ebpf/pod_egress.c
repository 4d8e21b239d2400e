// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Egress of the host side of a pod interface: packets on their way into the
 * pod. A reply of a flow we DNATed gets its source rewritten back to the
 * frontend the client talked to. Here, after netfilter and routing, the
 * kernel's own conntrack has seen the reply as backend -> client, matching
 * the client -> backend it saw for the request (a rewrite at the backend's
 * ingress would show it a reply that matches nothing, INVALID to rulesets
 * that drop those). And it works wherever the backend is: a local pod, or
 * another node whose reply reaches this pod through the node's uplink.
 */
#include "lib/hook.h"
#include "lib/nat.h"

SEC("tc")
int sp_tc_egress(struct __sk_buff *skb)
{
	struct pkt p = {};
	int v = hook_start(skb, &p, SP_HOOK_POD_EGRESS);

	if (v >= 0)
		return v;
	v = revnat(skb, &p);
	if (v < 0)
		v = count(skb, SP_V_PASS_NO_FLOW, TC_ACT_OK);
	return hook_end(skb, &p, SP_HOOK_POD_EGRESS, v);
}
