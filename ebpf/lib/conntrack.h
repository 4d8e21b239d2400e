/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Connection tracking in the LRU map sp_ct: the entries a flow leaves
 * (forward, reply; for a masqueraded one SNAT and UNSNAT), the backend a
 * forward entry still points at, how a masqueraded TCP connection closes,
 * and the compare-and-swap that hands an SNAT port from one flow to
 * another.
 */
#ifndef SP_LIB_CONNTRACK_H
#define SP_LIB_CONNTRACK_H

#include "addr.h"
#include "hairpin.h"
#include "maps.h"
#include "parse.h"

/* Fill a conntrack key: addresses in map form, ports in host order. */
static __always_inline void ct_key(struct sp_ct_key *k, const __u8 *saddr, const __u8 *daddr, __u16 sport,
				   __u16 dport, __u8 proto, __u8 dir)
{
	__builtin_memcpy(k->saddr, saddr, sizeof(k->saddr));
	__builtin_memcpy(k->daddr, daddr, sizeof(k->daddr));
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
	k->dir = dir;
}

/*
 * Write conntrack entry k: nat_addr/nat_port, addr2/port2 (0: none), and
 * the backend, service and time of the flow entry `of` it derives from.
 * With BPF_NOEXIST an existing entry is left as it is (one lookup, no
 * write).
 */
static __always_inline int put_ct(const struct sp_ct_key *k, const __u8 *nat_addr, __u16 nat_port, const __u8 *addr2,
				  __u16 port2, const struct sp_ct_val *of, __u64 flags)
{
	struct sp_ct_val v = {};

	if (flags == BPF_NOEXIST && bpf_map_lookup_elem(&SP_MAP(sp_ct), k))
		return 0;
	__builtin_memcpy(v.nat_addr, nat_addr, sizeof(v.nat_addr));
	v.nat_port = nat_port;
	if (addr2)
		__builtin_memcpy(v.addr2, addr2, sizeof(v.addr2));
	v.port2 = port2;
	v.backend_id = of->backend_id;
	v.svc_id = of->svc_id;
	v.last_seen = of->last_seen;
	return bpf_map_update_elem(&SP_MAP(sp_ct), k, &v, flags);
}

/*
 * The reply entry of a flow: backend -> client, rewritten back to the
 * frontend. fwd is the flow's forward key, fct its forward value.
 */
static __always_inline int put_reply(const struct sp_ct_key *fwd, const struct sp_svc_key *front,
				     const struct sp_ct_val *fct, __u64 flags)
{
	struct sp_ct_key rk = {};
	/* A hairpin flow's backend answers the hairpin address, not itself. */
	const __u8 *hp = hairpin_for(front->scope, fct->nat_addr, fwd->saddr);

	ct_key(&rk, fct->nat_addr, hp ? hp : fwd->saddr, fct->nat_port, fwd->sport, fwd->proto, SP_CT_REPLY);
	return put_ct(&rk, front->addr, front->port, 0, 0, fct, flags);
}

/* The SNAT entry of a masqueraded flow: keyed by the flow as it leaves
 * after DNAT (client -> backend); nat = node address and port (port 0: the
 * external egress allocates one), addr2/port2 = the frontend. */
static __always_inline int put_snat(const struct sp_ct_key *fwd, const struct sp_ct_val *fct, __u64 flags)
{
	struct sp_ct_key sk = {};

	ct_key(&sk, fwd->saddr, fct->nat_addr, fwd->sport, fct->nat_port, fwd->proto, SP_CT_SNAT);
	return put_ct(&sk, fct->addr2, fct->port2, fwd->daddr, fwd->dport, fct, flags);
}

/* The UNSNAT entry: the backend's reply to node:port -> back to the client. */
static __always_inline int put_unsnat(const struct sp_ct_key *sk, const struct sp_ct_val *sv, __u16 port,
				      __u64 flags)
{
	struct sp_ct_key uk = {};

	ct_key(&uk, sk->daddr, sv->nat_addr, sk->dport, port, sk->proto, SP_CT_UNSNAT);
	return put_ct(&uk, sk->saddr, sk->sport, 0, 0, sv, flags);
}

/* The backend a forward conntrack entry points at, if it still exists with
 * the same address: a removed backend's flows are not silently kept. */
static __always_inline struct sp_backend *ct_backend(const struct sp_ct_val *ct, int syn)
{
	__u32 id = ct->backend_id;
	struct sp_backend *be = bpf_map_lookup_elem(&SP_MAP(sp_be), &id);

	if (!be)
		return 0;
	if (!addr_eq(be->addr, ct->nat_addr) || be->port != ct->nat_port)
		return 0;
	if (syn && (be->flags & SP_BE_F_DRAINING))
		return 0;
	return be;
}

/*
 * Record how a masqueraded TCP connection closes in its UNSNAT entry u
 * (SP_CT_F_*): p is the client's packet (reply 0, at ext egress) or the
 * backend's (reply 1, at ext ingress), after its ct_touch() succeeded. The
 * two directions may run on two CPUs at once: bits are set with an atomic
 * or, so none is lost. FIN_REPLY_FIRST is decided on the flags read before:
 * a backend FIN crossing the client's on another CPU may be taken for the
 * first, which only holds the port for TIME_WAIT. FIN_REPLY and
 * FIN_REPLY_FIRST are set together.
 */
static __always_inline void track_close(struct sp_ct_val *u, const struct pkt *p, int reply)
{
	__u32 cur = u->flags, set = 0;

	if (p->proto != IPPROTO_TCP)
		return;
	if (!reply && p->syn) {
		/* The client opens a new connection on the same tuple (it
		 * reused its port): the old one's close no longer counts. */
		if (cur)
			u->flags = 0;
		return;
	}
	if (p->tcp_flags & TCP_F_RST)
		set |= SP_CT_F_RST;
	if (p->tcp_flags & TCP_F_FIN) {
		if (!reply)
			set |= SP_CT_F_FIN_FWD;
		else if (!(cur & SP_CT_F_FIN_REPLY))
			set |= SP_CT_F_FIN_REPLY | (cur & SP_CT_F_FIN_FWD ? 0 : SP_CT_F_FIN_REPLY_FIRST);
	}
	if (set & ~cur)
		__sync_fetch_and_or(&u->flags, set);
}

/* Linux's TIME_WAIT (TCP_TIMEWAIT_LEN, fixed at 60 s). */
#define TIME_WAIT_NS (60ULL * 1000000000ULL)

/*
 * How long an SNAT port stays held after the last packet of the flow its
 * UNSNAT entry u belongs to; 0: for ever. See SP_CT_F_* in sliceproxy.h.
 */
static __always_inline __u64 snat_hold(const struct sp_cfg *cfg, const struct sp_ct_val *u)
{
	__u64 open = (__u64)cfg->snat_reclaim * 1000000000ULL;
	__u64 closed = (__u64)cfg->snat_reclaim_closed * 1000000000ULL;
	__u32 f = u->flags;
	__u64 hold;

	if (!closed)
		return open; /* close tracking off */
	if (f & SP_CT_F_RST)
		hold = closed;
	else if ((f & (SP_CT_F_FIN_FWD | SP_CT_F_FIN_REPLY)) != (SP_CT_F_FIN_FWD | SP_CT_F_FIN_REPLY))
		return open; /* open or half-closed */
	else if (f & SP_CT_F_FIN_REPLY_FIRST)
		hold = closed > TIME_WAIT_NS ? closed : TIME_WAIT_NS;
	else
		hold = closed;
	/* A closed flow never holds its port longer than an open one. */
	return open && open < hold ? open : hold;
}

/*
 * An SNAT port changes hands atomically. The UNSNAT entry of a port (backend
 * -> node:port, value: the client) says which flow holds it, and its
 * last_seen doubles as the entry's version word, which every writer changes
 * with a compare-and-swap (bpf_spin_lock is not allowed in LRU hash values):
 *  - the flow's packets (its client's at ext egress, its backend's at ext
 *    ingress) refresh it with ct_touch(): a CAS from the stamp they read to
 *    now, and only after it succeeded do they read who owns the entry;
 *  - a new flow taking an idle port (sp_ext_egress) CASes the stamp it found
 *    idle past the hold to CT_CLAIMING, writes its own client into the
 *    entry, and publishes it with a CAS from CT_CLAIMING to now.
 * The first CAS to land wins. After a refresh the stamp is fresh, so the
 * claim's CAS fails (and no new claim can start until the entry has been
 * idle for its hold, a second at least: the fields read after the refresh
 * stay as read). After a claim the refresh's CAS fails, and its retry reads
 * CT_CLAIMING or the new owner: the old flow takes another port. With a
 * plain write (BPF_EXIST) both flows could go on using the port. The CAS is
 * fully ordered, so reading the owner after it never sees a half-written
 * claim, on weakly ordered CPUs too.
 *
 * The mark reads as a stamp in the future (idle 0) for the first 292 years
 * of uptime: no other claimer and no reader of the map (sliceproxy dump)
 * takes an entry being claimed for an idle one.
 */
#define CT_CLAIMING 0x7fffffffffffffffULL
/* Tries at a CAS on a stamp that other CPUs keep refreshing. */
#define TOUCH_TRIES 4
#define TOUCH_LOST 1 /* the entry is being given to another flow */
#define TOUCH_BUSY 2 /* it kept changing under us: TOUCH_TRIES CASes failed */

static __always_inline int ct_touch(struct sp_ct_val *u, __u64 now)
{
	for (int i = 0; i < TOUCH_TRIES; i++) {
		__u64 s = *(volatile __u64 *)&u->last_seen;

		if (s == CT_CLAIMING)
			return TOUCH_LOST;
		if (__sync_val_compare_and_swap(&u->last_seen, s, now) == s)
			return 0;
	}
	return TOUCH_BUSY;
}

#endif /* SP_LIB_CONNTRACK_H */
