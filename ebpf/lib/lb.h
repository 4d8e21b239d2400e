/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Load balancing: the frontend a connection is for (one hash lookup),
 * whether its source may use it, and the backend a new flow gets (one slot
 * lookup, no loop over backends), sticky per client under sessionAffinity.
 * The one endpoint choice of every hook: the tc programs call it per new
 * flow (nat.h), the host's socket programs per connect() or datagram
 * (host_sock.c), so a host client and a pod get the same backends.
 */
#ifndef SP_LIB_LB_H
#define SP_LIB_LB_H

#include "addr.h"
#include "clock.h"
#include "maps.h"

/* The frontend of this scope at addr:port (host order) over proto (key
 * filled in skey, which a flow's records name), or 0: not a service. */
static __always_inline struct sp_svc_val *lb_lookup(const __u8 *addr, __u16 port, __u8 proto, __u8 scope,
						     struct sp_svc_key *skey)
{
	__builtin_memcpy(skey->addr, addr, sizeof(skey->addr));
	skey->port = port;
	skey->proto = proto;
	skey->scope = scope;
	return bpf_map_lookup_elem(&SP_MAP(sp_svc), skey);
}

/* Is source allowed by its frontend's loadBalancerSourceRanges? */
static __always_inline int lb_source_allowed(const struct sp_svc_val *svc, const __u8 *source)
{
	struct sp_src_key k = {};

	if (!(svc->flags & SP_SVC_F_SRC_RANGES))
		return 1;
	k.prefixlen = 32 + 128;
	k.svc_id = svc->svc_id;
	__builtin_memcpy(k.addr, source, sizeof(k.addr));
	return bpf_map_lookup_elem(&SP_MAP(sp_src), &k) != 0;
}

/* Does slot `slot` of svc (count n) still name backend be_id? A slot
 * rewritten by a removal names another one, or lies past the count. */
static __always_inline int lb_slot_holds(__u32 svc_id, __u32 slot, __u32 n, __u32 be_id)
{
	struct sp_slot_key k = { .svc_id = svc_id, .slot = slot };
	struct sp_slot_val *sl;

	if (slot >= n)
		return 0;
	sl = bpf_map_lookup_elem(&SP_MAP(sp_slot), &k);
	return sl && sl->backend_id == be_id;
}

/* No earlier choice to keep (lb_choose's hint). */
#define LB_NO_HINT 0xffffffffU

/*
 * The backend id (and its slot) of a new flow from client to frontend svc,
 * whose count (n) is not 0: the hinted slot when it still names the hinted
 * backend (an unconnected UDP socket keeps its backend per frontend, as
 * netfilter's conntrack keeps a socket's datagrams on one); else under
 * ClientIP affinity the backend of this client's last new flow, if recent
 * enough and still in the slot it came from (a slot rewritten by a removal
 * ends the affinity, as a removed endpoint does in kube-proxy); else slot
 * (random % n). The control plane writes slots before raising count, and
 * lowers count before deleting slots, so every slot below count exists; 0
 * when one is missing all the same (maps that disagree), else 1.
 */
static __always_inline int lb_pick(const struct sp_svc_val *svc, __u32 n, const __u8 *client, __u64 now,
				   __u32 hint_slot, __u32 hint_be, __u32 *be_id, __u32 *slot)
{
	struct sp_slot_key slkey = {
		.svc_id = svc->svc_id,
		.slot = bpf_get_prandom_u32() % n,
	};
	struct sp_slot_val *sl;
	struct sp_aff_key akey = {};
	struct sp_aff_val *aff = 0;
	int sticky = 0;

	if (hint_slot != LB_NO_HINT && lb_slot_holds(svc->svc_id, hint_slot, n, hint_be))
		slkey.slot = hint_slot;
	else if (svc->flags & SP_SVC_F_AFFINITY) {
		akey.svc_id = svc->svc_id;
		__builtin_memcpy(akey.addr, client, sizeof(akey.addr));
		aff = bpf_map_lookup_elem(&SP_MAP(sp_aff), &akey);
		if (aff && idle_ns(now, aff->last_used) < (__u64)svc->affinity_timeout * 1000000000ULL &&
		    lb_slot_holds(svc->svc_id, aff->slot, n, aff->backend_id)) {
			slkey.slot = aff->slot;
			sticky = 1;
		}
	}
	sl = bpf_map_lookup_elem(&SP_MAP(sp_slot), &slkey);
	if (!sl)
		return 0;
	*be_id = sl->backend_id;
	*slot = slkey.slot;
	if (svc->flags & SP_SVC_F_AFFINITY) {
		struct sp_aff_val av = { .backend_id = *be_id, .slot = slkey.slot, .last_used = now };

		if (sticky && aff)
			aff->last_used = now;
		else
			bpf_map_update_elem(&SP_MAP(sp_aff), &akey, &av, BPF_ANY);
	}
	return 1;
}

/* What lb_choose found. */
enum lb_result {
	LB_OK = 0,
	LB_NO_BACKEND = 1, /* the frontend has no backend (count 0) */
	LB_ERROR = 2,      /* maps that disagree: a missing slot or backend, a
			    * backend of the other family */
};

struct lb_choice {
	struct sp_backend *be;
	__u32 be_id;
	__u32 slot;
};

/*
 * The endpoint choice: the backend a new flow from client (map form; the
 * affinity key) to frontend svc gets, for a flow of family v6. What the
 * control plane planned decides the rest: the traffic policies, topology,
 * and the terminating fallback are in which backends fill the slots of
 * which frontend scope. hint_slot/hint_be: an earlier choice to keep while
 * its slot still names it (LB_NO_HINT: none). LB_* result; c filled on
 * LB_OK.
 */
static __always_inline int lb_choose(const struct sp_svc_val *svc, const __u8 *client, int v6, __u64 now,
				     __u32 hint_slot, __u32 hint_be, struct lb_choice *c)
{
	__u32 n = svc->count;

	if (n == 0)
		return LB_NO_BACKEND;
	if (!lb_pick(svc, n, client, now, hint_slot, hint_be, &c->be_id, &c->slot))
		return LB_ERROR;
	c->be = bpf_map_lookup_elem(&SP_MAP(sp_be), &c->be_id);
	/* The control plane never mixes families in one frontend. */
	if (!c->be || addr_is_v4(c->be->addr) == v6)
		return LB_ERROR;
	return LB_OK;
}

#endif /* SP_LIB_LB_H */
