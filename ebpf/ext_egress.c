// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Egress of an external interface: packets leaving the node. A reply to an
 * outside client gets its source back to the frontend (as at a pod's
 * egress); a masqueraded flow's packet gets the node's address and an SNAT
 * port as its source (snat); ICMP errors about either kind of flow are
 * translated as the flow is.
 */
#include "lib/hook.h"
#include "lib/nat.h"

SEC("tc")
int sp_ext_egress(struct __sk_buff *skb)
{
	struct pkt p = {};
	int v = hook_start(skb, &p, SP_HOOK_EXT_EGRESS);

	if (v >= 0)
		return v;
	v = revnat(skb, &p);
	if (v < 0)
		v = snat(skb, &p);
	return hook_end(skb, &p, SP_HOOK_EXT_EGRESS, v);
}
