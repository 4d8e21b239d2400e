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

/* A pick from a Maglev table is recorded (affinity, a host socket's hint)
 * as its entry's index with this bit: "slot" LB_MGL_SLOT | i is entry i of
 * the frontend's table. Tables hold fewer than 2^31 entries. */
#define LB_MGL_SLOT 0x80000000U

/* Entry index of Maglev table `table`: a backend id, or 0 when its chunk
 * is missing (being written) or the entry is empty. A function of its own
 * (a BPF-to-BPF call, on a Maglev frontend's new flows only): inlined into
 * the tc programs it grew their stack frames past the verifier's 512
 * bytes with the callers' spills. */
static __noinline __u32 lb_mgl_backend(__u32 table, __u32 index)
{
	struct sp_mgl_key k = { .id = table, .chunk = index / SP_MGL_CHUNK };
	struct sp_mgl_val *c;
	__u32 off = index % SP_MGL_CHUNK;

	c = bpf_map_lookup_elem(&SP_MAP(sp_mgl), &k);
	/* The compiler knows off < SP_MGL_CHUNK; the verifier is shown. */
	asm volatile("" : "+r"(off));
	if (!c || off >= SP_MGL_CHUNK)
		return 0;
	return c->backend[off];
}

/* The backend at index of the Maglev table frontend svc_id reads (its
 * pointer names it), or 0. */
static __always_inline __u32 lb_mgl_entry(__u32 svc_id, __u32 index)
{
	struct sp_mgl_ptr *p = bpf_map_lookup_elem(&SP_MAP(sp_mglptr), &svc_id);

	if (!p || index >= p->size)
		return 0;
	return lb_mgl_backend(p->table, index);
}

/* The key of svc's slot table: its slots_id, or its own svc_id for an
 * entry carried over from layout 3 (slots_id 0). */
static __always_inline __u32 lb_slots_id(const struct sp_svc_val *svc)
{
	return svc->slots_id ? svc->slots_id : svc->svc_id;
}

/* Does slot `slot` of svc (count n) still name backend be_id? A slot
 * rewritten by a removal names another one, or lies past the count. For a
 * Maglev entry (LB_MGL_SLOT), the same of the table's entry. A slot of the
 * table svc shared with other frontends holds for all of them alike. */
static __always_inline int lb_slot_holds(const struct sp_svc_val *svc, __u32 slot, __u32 n, __u32 be_id)
{
	struct sp_slot_key k = { .svc_id = lb_slots_id(svc), .slot = slot };
	struct sp_slot_val *sl;

	if (slot & LB_MGL_SLOT)
		return lb_mgl_entry(svc->svc_id, slot & ~LB_MGL_SLOT) == be_id;
	if (slot >= n)
		return 0;
	sl = bpf_map_lookup_elem(&SP_MAP(sp_slot), &k);
	return sl && sl->backend_id == be_id;
}

#define LB_FNV_OFFSET 0x811c9dc5U
#define LB_FNV_PRIME 0x01000193U

static __always_inline __u32 lb_fnv(__u32 h, __u8 b)
{
	return (h ^ b) * LB_FNV_PRIME;
}

/*
 * The hash of a flow that picks its Maglev entry: FNV-1a over the source
 * address (map form), the source port and the frontend's port (each
 * big-endian) and the protocol, then murmur3's finaliser so the low bits
 * the modulo reads depend on every byte. Ports in host order. Not the
 * destination address: a NodePort flow moved to another node arrives at
 * that node's address, and must find the same entry there. The control
 * plane computes the same (ctrl/model/maglev.py, flow_hash).
 */
static __always_inline __u32 lb_flow_hash(const __u8 *saddr, __u16 sport, __u16 dport, __u8 proto)
{
	__u32 h = LB_FNV_OFFSET;

#pragma unroll
	for (int i = 0; i < 16; i++)
		h = lb_fnv(h, saddr[i]);
	h = lb_fnv(h, sport >> 8);
	h = lb_fnv(h, sport & 0xff);
	h = lb_fnv(h, dport >> 8);
	h = lb_fnv(h, dport & 0xff);
	h = lb_fnv(h, proto);
	h ^= h >> 16;
	h *= 0x85ebca6bU;
	h ^= h >> 13;
	h *= 0xc2b2ae35U;
	h ^= h >> 16;
	return h;
}

/*
 * The backend of entry (flow hash % M) of the Maglev table svc reads (its
 * pointer names the table and M), and that entry as a slot
 * (LB_MGL_SLOT | index); 0 when the pointer or the entry is missing
 * (being written, or not yet: the caller takes a random slot). Two
 * lookups: the pointer, the entry's chunk.
 * Under ClientIP affinity the source port is left out of the hash: every
 * flow of a client takes the same entry, on every node, which is what the
 * affinity asks for and what a node that never saw the client can agree
 * with.
 */
static __always_inline int lb_maglev(const struct sp_svc_val *svc, const struct sp_ct_key *f, __u32 *be_id,
				     __u32 *slot)
{
	/* Keyed by the frontend entry's own svc_id: no copy on the stack. */
	struct sp_mgl_ptr *p = bpf_map_lookup_elem(&SP_MAP(sp_mglptr), (void *)&svc->svc_id);
	__u16 sport = (svc->flags & SP_SVC_F_AFFINITY) ? 0 : f->sport;
	__u32 index, be;

	if (!p || p->size == 0 || p->size >= LB_MGL_SLOT)
		return 0;
	index = lb_flow_hash(f->saddr, sport, f->dport, f->proto) % p->size;
	be = lb_mgl_backend(p->table, index);
	if (!be)
		return 0;
	*be_id = be;
	*slot = LB_MGL_SLOT | index;
	return 1;
}

/* No earlier choice to keep (lb_choose's hint). */
#define LB_NO_HINT 0xffffffffU

/*
 * The backend id (and its slot) of a new flow f to frontend svc, whose
 * count (n) is not 0: the hinted slot when it still names the hinted
 * backend (an unconnected UDP socket keeps its backend per frontend, as
 * netfilter's conntrack keeps a socket's datagrams on one); else under
 * ClientIP affinity the backend of this client's last new flow, if recent
 * enough and still in the slot it came from (a slot rewritten by a removal
 * ends the affinity, as a removed endpoint does in kube-proxy); else, for a
 * frontend flagged SP_SVC_F_MAGLEV, its Maglev table's entry for the flow;
 * else slot (random % n). The control plane writes slots before raising
 * count, and lowers count before deleting slots, so every slot below count
 * exists; 0 when one is missing all the same (maps that disagree), else 1.
 */
static __always_inline int lb_pick(const struct sp_svc_val *svc, __u32 n, const struct sp_ct_key *f, __u64 now,
				   __u32 hint_slot, __u32 hint_be, __u32 *be_id, __u32 *slot)
{
	struct sp_slot_key slkey = {
		.svc_id = lb_slots_id(svc),
		.slot = bpf_get_prandom_u32() % n,
	};
	struct sp_slot_val *sl;
	struct sp_aff_key akey = {};
	struct sp_aff_val *aff = 0;
	int sticky = 0;

	if (hint_slot != LB_NO_HINT && lb_slot_holds(svc, hint_slot, n, hint_be)) {
		slkey.slot = hint_slot;
		sticky = 1;
	} else if (svc->flags & SP_SVC_F_AFFINITY) {
		akey.svc_id = svc->svc_id;
		__builtin_memcpy(akey.addr, f->saddr, sizeof(akey.addr));
		aff = bpf_map_lookup_elem(&SP_MAP(sp_aff), &akey);
		if (aff && idle_ns(now, aff->last_used) < (__u64)svc->affinity_timeout * 1000000000ULL &&
		    lb_slot_holds(svc, aff->slot, n, aff->backend_id)) {
			slkey.slot = aff->slot;
			sticky = 2;
		}
	}
	if (sticky && (slkey.slot & LB_MGL_SLOT)) {
		/* An earlier Maglev pick, checked above: its backend. */
		*be_id = sticky == 1 ? hint_be : aff->backend_id;
		*slot = slkey.slot;
	} else if (sticky || !(svc->flags & SP_SVC_F_MAGLEV) || !lb_maglev(svc, f, be_id, slot)) {
		sl = bpf_map_lookup_elem(&SP_MAP(sp_slot), &slkey);
		if (!sl)
			return 0;
		*be_id = sl->backend_id;
		*slot = slkey.slot;
	}
	if (svc->flags & SP_SVC_F_AFFINITY) {
		struct sp_aff_val av = { .backend_id = *be_id, .slot = *slot, .last_used = now };

		if (sticky == 2 && aff)
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
 * The endpoint choice: the backend a new flow f (its forward conntrack
 * key: the source in map form is the affinity key; source, ports and
 * protocol the Maglev hash) to frontend svc gets, for a flow of family v6. What the
 * control plane planned decides the rest: the traffic policies, topology,
 * and the terminating fallback are in which backends fill the slots of
 * which frontend scope. hint_slot/hint_be: an earlier choice to keep while
 * its slot still names it (LB_NO_HINT: none). LB_* result; c filled on
 * LB_OK.
 */
static __always_inline int lb_choose(const struct sp_svc_val *svc, const struct sp_ct_key *f, int v6, __u64 now,
				     __u32 hint_slot, __u32 hint_be, struct lb_choice *c)
{
	__u32 n = svc->count;

	if (n == 0)
		return LB_NO_BACKEND;
	if (!lb_pick(svc, n, f, now, hint_slot, hint_be, &c->be_id, &c->slot))
		return LB_ERROR;
	c->be = bpf_map_lookup_elem(&SP_MAP(sp_be), &c->be_id);
	/* The control plane never mixes families in one frontend. */
	if (!c->be || addr_is_v4(c->be->addr) == v6)
		return LB_ERROR;
	return LB_OK;
}

#endif /* SP_LIB_LB_H */
