/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Load balancing: the frontend a packet is for (one hash lookup), whether
 * its source may use it, and the backend a new flow gets (one slot lookup,
 * no loop over backends), sticky per client under sessionAffinity.
 */
#ifndef SP_LIB_LB_H
#define SP_LIB_LB_H

#include "clock.h"
#include "maps.h"
#include "parse.h"

/* The frontend of this scope p is addressed to (key filled in skey, which
 * the flow's conntrack entries name), or 0: not a service. */
static __always_inline struct sp_svc_val *lb_frontend(const struct pkt *p, __u8 scope, struct sp_svc_key *skey)
{
	__builtin_memcpy(skey->addr, p->daddr, sizeof(skey->addr));
	skey->port = bpf_ntohs(p->dport);
	skey->proto = p->proto;
	skey->scope = scope;
	return bpf_map_lookup_elem(&SP_MAP(sp_svc), skey);
}

/* Is the packet's source allowed by its frontend's loadBalancerSourceRanges? */
static __always_inline int source_allowed(const struct sp_svc_val *svc, const struct pkt *p)
{
	struct sp_src_key k = {};

	if (!(svc->flags & SP_SVC_F_SRC_RANGES))
		return 1;
	k.prefixlen = 32 + 128;
	k.svc_id = svc->svc_id;
	__builtin_memcpy(k.addr, p->saddr, sizeof(k.addr));
	return bpf_map_lookup_elem(&SP_MAP(sp_src), &k) != 0;
}

/*
 * The backend id of a new flow from client to frontend svc, whose count
 * (n) is not 0: slot (random % n). The control plane writes slots before
 * raising count, and lowers count before deleting slots, so every slot
 * below count exists; 0 when one is missing all the same (maps that
 * disagree), else 1 and *be_id set.
 */
static __always_inline int lb_pick(const struct sp_svc_val *svc, __u32 n, const __u8 *client, __u64 now,
				   __u32 *be_id)
{
	struct sp_slot_key slkey = {
		.svc_id = svc->svc_id,
		.slot = bpf_get_prandom_u32() % n,
	};
	struct sp_slot_val *sl;
	struct sp_aff_key akey = {};
	struct sp_aff_val *aff = 0;
	int sticky = 0;

	if (svc->flags & SP_SVC_F_AFFINITY) {
		/* ClientIP affinity: the backend of this client's last new
		 * flow, if recent enough and still in the slot it came from
		 * (a slot rewritten by a removal ends the affinity, as a
		 * removed endpoint does in kube-proxy). */
		akey.svc_id = svc->svc_id;
		__builtin_memcpy(akey.addr, client, sizeof(akey.addr));
		aff = bpf_map_lookup_elem(&SP_MAP(sp_aff), &akey);
		if (aff && idle_ns(now, aff->last_used) < (__u64)svc->affinity_timeout * 1000000000ULL &&
		    aff->slot < n) {
			struct sp_slot_key ak = { .svc_id = svc->svc_id, .slot = aff->slot };
			sl = bpf_map_lookup_elem(&SP_MAP(sp_slot), &ak);
			if (sl && sl->backend_id == aff->backend_id) {
				slkey.slot = aff->slot;
				sticky = 1;
			}
		}
	}
	sl = bpf_map_lookup_elem(&SP_MAP(sp_slot), &slkey);
	if (!sl)
		return 0;
	*be_id = sl->backend_id;
	if (svc->flags & SP_SVC_F_AFFINITY) {
		struct sp_aff_val av = { .backend_id = *be_id, .slot = slkey.slot, .last_used = now };

		if (sticky && aff)
			aff->last_used = now;
		else
			bpf_map_update_elem(&SP_MAP(sp_aff), &akey, &av, BPF_ANY);
	}
	return 1;
}

#endif /* SP_LIB_LB_H */
