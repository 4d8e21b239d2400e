// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Ingress of an external interface (the node's uplink): packets from
 * outside. A reply of a masqueraded flow gets its destination back to the
 * client (unsnat); anything else to an external-scope frontend (NodePort
 * on a node address, a LoadBalancer IP, an externalIP) is DNATed; ICMP
 * errors about either kind of flow are translated as the flow is. A flow
 * to a backend on this node that the XDP program in front already decided
 * comes with its decision in metadata (handoff.h): translated as it says,
 * counted as if decided here.
 */
#include "lib/handoff.h"
#include "lib/hook.h"
#include "lib/nat.h"

SEC("tc")
int sp_ext_ingress(struct __sk_buff *skb)
{
	struct pkt p = {};
	int v = hook_start(skb, &p, SP_HOOK_EXT_INGRESS);

	if (v >= 0)
		return v;
	v = handoff_take(skb, &p);
	if (v < 0)
		v = unsnat(skb, &p);
	if (v < 0)
		v = dnat(skb, &p, SP_SCOPE_EXTERNAL);
	return hook_end(skb, &p, SP_HOOK_EXT_INGRESS, v);
}
