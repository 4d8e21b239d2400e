/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Address translation: DNAT of a packet to a frontend (the backend picked
 * by lb.h, the flow recorded in conntrack), reverse NAT of its replies,
 * the hairpin short cut back into a pod, and the masquerade (SNAT) of
 * external flows leaving the node with its reverse (UNSNAT).
 */
#ifndef SP_LIB_NAT_H
#define SP_LIB_NAT_H

#include <linux/pkt_cls.h>
#include "clock.h"
#include "conntrack.h"
#include "csum.h"
#include "hairpin.h"
#include "lb.h"
#include "reject.h"
#include "stats.h"

/*
 * A hairpin flow's packet, its destination already the pod itself: the
 * source becomes the hairpin address hp (the port stays: the reply entry
 * is keyed by it) and the packet goes straight back into the pod. The tc
 * action, or -1 when a rewrite failed. A subprogram: dnat() reaches it
 * from two places and only hairpin packets need it.
 */
static __noinline int hairpin_back(struct __sk_buff *skb, struct pkt *p, const __u8 *hp)
{
	if (rewrite(skb, p, 0, hp, p->sport))
		return -1;
	return reflect(skb);
}

/*
 * The last step of a DNAT: the destination becomes the backend be:port
 * (host order), counted as verdict; a hairpin flow's packet then goes back
 * into the pod (hairpin_back).
 */
static __always_inline int dnat_to(struct __sk_buff *skb, struct pkt *p, __u8 scope, const __u8 *be, __u16 port,
				   __u32 verdict)
{
	const __u8 *hp = hairpin_for(scope, be, p->saddr);
	int act = TC_ACT_OK;

	if (rewrite(skb, p, 1, be, bpf_htons(port)))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	if (hp)
		act = hairpin_back(skb, p, hp);
	if (act < 0)
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	return count(skb, verdict, act);
}

/* What dnat_flow() found for a packet to a frontend. */
enum dnat_kind {
	DNAT_NO_SERVICE,  /* no frontend of this scope there */
	DNAT_REFUSED,     /* the source is outside loadBalancerSourceRanges */
	DNAT_ESTABLISHED, /* a tracked flow: its backend in f->nct */
	DNAT_NEW,         /* a new flow: a backend chosen in f->nct, nothing
			   * recorded yet (dnat_record) */
	DNAT_NO_BACKEND,  /* the frontend has no backend */
	DNAT_ERROR,       /* maps that disagree */
};

/* A flow to a frontend as dnat_flow() leaves it. */
struct dnat_flow {
	struct sp_svc_key skey;  /* the frontend */
	struct sp_ct_key ckey;   /* the flow's forward key */
	struct sp_ct_val nct;    /* the backend (nat_addr, nat_port) and,
				  * for a new flow, its forward entry */
	__u32 svc_flags;         /* the frontend's (SP_SVC_F_*): no pointer
				  * here, XDP keeps this struct in a map */
};

/*
 * The decision of a DNAT, without touching the packet: the frontend of
 * this scope that p is for, whether its source may use it, and its
 * backend: the one its flow has (the flow's entries refreshed, as every
 * packet of it does), or for a new flow (or one whose backend went away)
 * lb.h's choice. Shared by the tc ingress programs (dnat) and the external
 * interfaces' XDP program (ext_xdp.c), so both choose alike and keep one
 * conntrack. DNAT_* kind; f filled as it says.
 */
static __always_inline int dnat_flow(const struct pkt *p, __u8 scope, struct dnat_flow *f,
				     struct sp_svc_val **svcp)
{
	struct sp_svc_val *svc;
	struct sp_ct_val *ct;
	struct lb_choice c = {};
	__u64 now;
	int r;

	svc = *svcp = lb_lookup(p->daddr, bpf_ntohs(p->dport), p->proto, scope, &f->skey);
	if (!svc)
		return DNAT_NO_SERVICE;
	f->svc_flags = svc->flags;
	/* kube-proxy's firewall chain: before any conntrack, every packet. */
	if (!lb_source_allowed(svc, p->saddr))
		return DNAT_REFUSED;

	now = now_ns();
	ct_key(&f->ckey, p->saddr, p->daddr, bpf_ntohs(p->sport), bpf_ntohs(p->dport), p->proto, SP_CT_FORWARD);
	ct = bpf_map_lookup_elem(&SP_MAP(sp_ct), &f->ckey);
	if (ct && ct->svc_id == svc->svc_id && ct_backend(ct, p->syn)) {
		ct->last_seen = now;
		/* The LRU may evict the reply entry alone: put it back, or the
		 * backend's answers would reach the client unrewritten. */
		put_reply(&f->ckey, &f->skey, ct, BPF_NOEXIST);
		/* The same for a masqueraded flow's SNAT entry, with the port
		 * it had (port2), so the backend keeps seeing one connection. */
		if (svc->flags & SP_SVC_F_MASQ)
			put_snat(&f->ckey, ct, BPF_NOEXIST);
		__builtin_memcpy(f->nct.nat_addr, ct->nat_addr, sizeof(f->nct.nat_addr));
		f->nct.nat_port = ct->nat_port;
		return DNAT_ESTABLISHED;
	}

	/* A new flow (or one whose backend went away): pick a backend. */
	r = lb_choose(svc, &f->ckey, p->v6, now, LB_NO_HINT, 0, &c);
	if (r == LB_NO_BACKEND)
		return DNAT_NO_BACKEND;
	if (r != LB_OK)
		return DNAT_ERROR;
	__builtin_memcpy(f->nct.nat_addr, c.be->addr, sizeof(f->nct.nat_addr));
	f->nct.nat_port = c.be->port;
	f->nct.backend_id = c.be_id;
	f->nct.svc_id = svc->svc_id;
	f->nct.last_seen = now;
	return DNAT_NEW;
}

/* Record the new flow dnat_flow() chose: its forward and reply entries
 * and, for a masqueraded frontend, its SNAT entry. 0, or -1 when a write
 * failed. */
static __always_inline int dnat_record(struct dnat_flow *f)
{
	if (bpf_map_update_elem(&SP_MAP(sp_ct), &f->ckey, &f->nct, BPF_ANY))
		return -1;
	if (put_reply(&f->ckey, &f->skey, &f->nct, BPF_ANY))
		return -1;
	/* Masquerade candidate: if the flow leaves through an external
	 * interface (its backend is on another node), that interface's egress
	 * allocates the port. A flow to a local pod never gets there. */
	if ((f->svc_flags & SP_SVC_F_MASQ) && put_snat(&f->ckey, &f->nct, BPF_ANY))
		return -1;
	return 0;
}

/*
 * A packet to a frontend of this scope gets a backend and its destination
 * rewritten (DNAT). Shared by the pod ingress (scope internal) and the
 * external ingress (scope external).
 */
static __always_inline int dnat(struct __sk_buff *skb, struct pkt *p, __u8 scope)
{
	struct dnat_flow f = {};
	struct sp_svc_val *svc = 0;

	switch (dnat_flow(p, scope, &f, &svc)) {
	case DNAT_NO_SERVICE:
		return count(skb, SP_V_PASS_NO_SERVICE, TC_ACT_OK);
	case DNAT_REFUSED:
		return count(skb, SP_V_DROP_SOURCE_RANGE, TC_ACT_SHOT);
	case DNAT_ESTABLISHED:
		return dnat_to(skb, p, scope, f.nct.nat_addr, f.nct.nat_port, SP_V_DNAT_ESTABLISHED);
	case DNAT_NO_BACKEND:
		return reject(skb, p, svc);
	case DNAT_NEW:
		if (dnat_record(&f))
			return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
		return dnat_to(skb, p, scope, f.nct.nat_addr, f.nct.nat_port, SP_V_DNAT_NEW);
	default:
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	}
}

/* A reply of a flow we DNATed: its source back to the frontend. */
static __always_inline int revnat(struct __sk_buff *skb, struct pkt *p)
{
	struct sp_ct_key ckey = {};
	struct sp_ct_val *ct;

	ct_key(&ckey, p->saddr, p->daddr, bpf_ntohs(p->sport), bpf_ntohs(p->dport), p->proto, SP_CT_REPLY);
	ct = bpf_map_lookup_elem(&SP_MAP(sp_ct), &ckey);
	if (!ct || addr_is_v4(ct->nat_addr) == p->v6)
		return -1;
	ct->last_seen = now_ns();
	if (rewrite(skb, p, 0, ct->nat_addr, bpf_htons(ct->nat_port)))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	return count(skb, SP_V_REVNAT, TC_ACT_OK);
}

/*
 * A pod's packet to the hairpin address: the answer of a hairpin flow's
 * backend to the pod itself as client. Its source goes back to the
 * frontend (the flow's reply entry is keyed by the hairpin address), its
 * destination to the pod's own address, and it goes straight back into the
 * pod. -1: not such a packet.
 */
static __always_inline int hairpin_reply(struct __sk_buff *skb, struct pkt *p)
{
	const __u8 *hp = hairpin_addr(p->v6);
	int v;

	if (!hp || !addr_eq(p->daddr, hp))
		return -1;
	v = revnat(skb, p);
	if (v != TC_ACT_OK)
		return v; /* no flow (-1), or a failed rewrite, counted */
	if (rewrite(skb, p, 1, p->saddr, p->dport))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	v = reflect(skb);
	return v < 0 ? count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT) : v;
}

/*
 * At an external interface's ingress, a reply of a masqueraded flow
 * (backend -> node:SNAT port) gets only its destination back to the client:
 * its source stays the backend, as netfilter's conntrack expects (it saw
 * client -> backend), and the kernel routes it to the client, whose
 * interface's egress reverses the DNAT. The tc action, or -1: not such a
 * reply.
 */
static __always_inline int unsnat(struct __sk_buff *skb, struct pkt *p)
{
	struct sp_ct_key ukey = {};
	struct sp_ct_val *ct;

	ct_key(&ukey, p->saddr, p->daddr, bpf_ntohs(p->sport), bpf_ntohs(p->dport), p->proto, SP_CT_UNSNAT);
	ct = bpf_map_lookup_elem(&SP_MAP(sp_ct), &ukey);
	if (!ct)
		return -1;
	/* The stamp first, then the client it names (see ct_touch). A port
	 * being handed to another flow was idle past its hold: this late
	 * packet of the flow that lost it is dropped, as is one that found the
	 * entry changing too often (TCP resends). */
	if (ct_touch(ct, now_ns()))
		return count(skb, SP_V_DROP_SNAT, TC_ACT_SHOT);
	if (addr_is_v4(ct->nat_addr) == p->v6)
		return -1;
	track_close(ct, p, 1);
	if (rewrite(skb, p, 1, ct->nat_addr, bpf_htons(ct->nat_port)))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	return count(skb, SP_V_UNSNAT, TC_ACT_OK);
}

/* Tries at finding a free SNAT port: one random start, then the next
 * ports. A bounded loop the verifier unrolls. */
#define SNAT_TRIES 32

/*
 * A free SNAT port in the configured range for a flow's UNSNAT entry uk
 * (its dport set per try) with value uv, taken in the map: the port, or 0
 * when there is no range or no port of SNAT_TRIES was free.
 */
static __always_inline __u16 snat_port(const struct sp_cfg *cfg, struct sp_ct_key *uk, const struct sp_ct_val *uv,
				       __u64 now)
{
	__u32 lo = cfg->snat_port_min, hi = cfg->snat_port_max;

	if (lo == 0 || hi < lo)
		return 0;
	__u32 span = hi - lo + 1;
	__u32 start = bpf_get_prandom_u32() % span;

	for (int i = 0; i < SNAT_TRIES; i++) {
		__u16 cand = lo + (start + i) % span;
		struct sp_ct_val *old, claim;
		__u64 hold, s;

		uk->dport = cand;
		/* Collision probe: a port is free for this backend when no
		 * UNSNAT entry holds it, or the one that does has been idle
		 * longer than its flow's hold (snat_hold: snat_reclaim, or
		 * shorter once its TCP connection closed). */
		old = bpf_map_lookup_elem(&SP_MAP(sp_ct), uk);
		if (!old) {
			/* The map's bucket lock makes this insert atomic. */
			if (bpf_map_update_elem(&SP_MAP(sp_ct), uk, uv, BPF_NOEXIST))
				continue; /* taken by another CPU meanwhile */
			return cand;
		}
		/* Flags only change right after a refresh, while the stamp is
		 * fresh: read with a stamp idle past the hold, they are the
		 * entry's. */
		s = *(volatile __u64 *)&old->last_seen;
		hold = snat_hold(cfg, old);
		if (s == CT_CLAIMING || !hold || idle_ns(now, s) <= hold)
			continue;
		/* Claim it (see ct_touch): mark, write, publish. */
		if (__sync_val_compare_and_swap(&old->last_seen, s, CT_CLAIMING) != s)
			continue; /* refreshed or claimed on another CPU meanwhile */
		claim = *uv;
		claim.last_seen = CT_CLAIMING;
		__builtin_memcpy(old, &claim, sizeof(claim));
		__sync_val_compare_and_swap(&old->last_seen, CT_CLAIMING, now);
		return cand;
	}
	return 0;
}

/*
 * The source a masqueraded flow's packet p (client -> backend, after its
 * DNAT) leaves the node with: the node's address and the SNAT port its flow
 * holds, or on its first packet out (or once its port went to another
 * flow) a new one, into addr (16 bytes) and *port (host order). The
 * verdict: SP_V_SNAT with addr and port filled, SP_V_PASS_NO_FLOW (no
 * masqueraded flow), SP_V_DROP_SNAT or SP_V_DROP_ERROR. The packet is not
 * touched: the tc egress (snat) and the XDP program (ext_xdp.c) rewrite it
 * each their way. A subprogram: two programs call it, and inlined in
 * sp_ext_egress the compiler spilled a register the helper calls of the
 * port search had clobbered (the verifier refused it).
 */
static __noinline __u32 snat_source(const struct pkt *p, __u8 *addr, __u16 *port_out)
{
	struct sp_ct_key skey = {};
	struct sp_ct_val *ct;
	struct sp_cfg *cfg;
	__u32 zero = 0;
	__u64 now;

	ct_key(&skey, p->saddr, p->daddr, bpf_ntohs(p->sport), bpf_ntohs(p->dport), p->proto, SP_CT_SNAT);
	ct = bpf_map_lookup_elem(&SP_MAP(sp_ct), &skey);
	if (!ct)
		return SP_V_PASS_NO_FLOW;
	now = now_ns();
	ct->last_seen = now;
	if (ct->nat_port) {
		struct sp_ct_key ok = {};
		struct sp_ct_val *u;
		int t = 0;

		ct_key(&ok, skey.daddr, ct->nat_addr, skey.dport, ct->nat_port, skey.proto, SP_CT_UNSNAT);
		u = bpf_map_lookup_elem(&SP_MAP(sp_ct), &ok);
		if (!u) {
			/* Put back an UNSNAT entry the LRU evicted. */
			put_unsnat(&skey, ct, ct->nat_port, BPF_NOEXIST);
			u = bpf_map_lookup_elem(&SP_MAP(sp_ct), &ok);
		}
		if (u)
			t = ct_touch(u, now);
		if (t == TOUCH_BUSY)
			return SP_V_DROP_SNAT;
		/* Refreshed, and the entry still names this client: the port
		 * is the flow's. Otherwise (being claimed, or naming another
		 * client) the flow was idle past its hold and the port went
		 * to another flow: this one gets a new port below. */
		if (!u || (!t && addr_eq(u->nat_addr, skey.saddr) && u->nat_port == skey.sport)) {
			if (u)
				track_close(u, p, 0);
			if (addr_is_v4(ct->nat_addr) == p->v6)
				return SP_V_DROP_ERROR;
			__builtin_memcpy(addr, ct->nat_addr, 16);
			*port_out = ct->nat_port;
			return SP_V_SNAT;
		}
	}

	/* The first packet of the flow out here: a node address and a port. */
	cfg = bpf_map_lookup_elem(&SP_MAP(sp_cfg), &zero);
	if (!cfg)
		return SP_V_DROP_SNAT;
	const __u8 *node = p->v6 ? cfg->addr6 : cfg->addr4;
	const __u32 *w = (const __u32 *)node;
	if (!(w[0] | w[1] | w[2] | w[3]))
		return SP_V_DROP_SNAT;
	struct sp_ct_key uk = {};
	struct sp_ct_val uv = {};
	__u16 port;

	ct_key(&uk, skey.daddr, node, skey.dport, 0, skey.proto, SP_CT_UNSNAT); /* dport: each try */
	__builtin_memcpy(uv.nat_addr, skey.saddr, sizeof(uv.nat_addr));
	uv.nat_port = skey.sport;
	uv.backend_id = ct->backend_id;
	uv.svc_id = ct->svc_id;
	uv.last_seen = now;
	/* A late packet of a flow whose port was given away comes here for a
	 * new one: its RST is recorded, so that port is held for the closed
	 * grace only (the backend, which knows no such connection, answers
	 * anything else with an RST, recorded at ingress). */
	if (p->tcp_flags & TCP_F_RST)
		uv.flags = SP_CT_F_RST;
	port = snat_port(cfg, &uk, &uv, now);
	if (!port)
		return SP_V_DROP_SNAT;
	__builtin_memcpy(ct->nat_addr, node, sizeof(ct->nat_addr));
	ct->nat_port = port;

	/* Remember the port in the forward entry (found through the frontend
	 * in addr2/port2), so an evicted SNAT entry comes back the same. */
	struct sp_ct_key fk = {};
	struct sp_ct_val *fwd;

	ct_key(&fk, skey.saddr, ct->addr2, skey.sport, ct->port2, skey.proto, SP_CT_FORWARD);
	fwd = bpf_map_lookup_elem(&SP_MAP(sp_ct), &fk);
	if (fwd) {
		__builtin_memcpy(fwd->addr2, node, sizeof(fwd->addr2));
		fwd->port2 = port;
	}
	__builtin_memcpy(addr, node, 16);
	*port_out = port;
	return SP_V_SNAT;
}

/*
 * At an external interface's egress, a masqueraded flow's packet (external
 * traffic, policy Cluster, DNATed to a backend on another node: only such
 * flows are routed out here) gets the node's address and an SNAT port as
 * its source (snat_source), after netfilter saw it as client -> backend.
 * The tc action; a packet of no masqueraded flow passes.
 */
static __always_inline int snat(struct __sk_buff *skb, struct pkt *p)
{
	__u8 addr[16];
	__u16 port = 0;
	__u32 v = snat_source(p, addr, &port);

	if (v == SP_V_PASS_NO_FLOW)
		return count(skb, v, TC_ACT_OK);
	if (v != SP_V_SNAT)
		return count(skb, v, TC_ACT_SHOT);
	if (rewrite(skb, p, 0, addr, bpf_htons(port)))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	return count(skb, SP_V_SNAT, TC_ACT_OK);
}

#endif /* SP_LIB_NAT_H */
