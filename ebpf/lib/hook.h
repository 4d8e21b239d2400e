/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * What every attach point does first: parse the packet; translate an ICMP
 * error about a flow of ours as that attach point translates the flow's
 * packets; count and pass anything else that is no TCP or UDP packet to
 * look at. The entry files (pod_ingress.c...) go on from there.
 */
#ifndef SP_LIB_HOOK_H
#define SP_LIB_HOOK_H

#include <linux/pkt_cls.h>
#include "frag.h"
#include "icmp.h"
#include "parse.h"
#include "stats.h"

/* The attach points. A constant at each call: the compiler keeps only the
 * branch of the hook it was given (BPF has no calls through pointers). */
enum sp_hook {
	SP_HOOK_POD_INGRESS, /* pod interfaces' ingress: packets pods send */
	SP_HOOK_POD_EGRESS,  /* pod interfaces' egress: packets into pods */
	SP_HOOK_EXT_INGRESS, /* external interfaces' ingress: from outside */
	SP_HOOK_EXT_EGRESS,  /* external interfaces' egress: leaving the node */
};

/* An ICMP error at this hook, translated: the tc action, or -1 when it is
 * about no flow of ours. */
static __always_inline int icmp_at(struct __sk_buff *skb, enum sp_hook hook)
{
	switch (hook) {
	case SP_HOOK_POD_INGRESS:
		return icmp_from_pod(skb);
	case SP_HOOK_POD_EGRESS:
		return icmp_out(skb, 0);
	case SP_HOOK_EXT_INGRESS:
		return icmp_ext_in(skb);
	default:
		return icmp_out(skb, 1);
	}
}

/*
 * Parse the packet into p: -1 when it is a TCP or UDP packet the hook goes
 * on with, else the tc action it gets here (an ICMP error translated, a
 * fragment other than the first given what its first fragment got here,
 * or the packet counted with its SP_V_PASS_* verdict and passed untouched).
 */
static __always_inline int hook_start(struct __sk_buff *skb, struct pkt *p, enum sp_hook hook)
{
	int v = parse(skb, p), icmp;

	if (v == SP_V_PASS_OTHER_PROTO && (icmp = icmp_at(skb, hook)) >= 0)
		return icmp;
	if (v == SP_V_PASS_FRAGMENT && (icmp = frag_follow(skb, hook)) >= 0)
		return icmp;
	if (v >= 0)
		return count(skb, v, TC_ACT_OK);
	return -1;
}

/* The tc action act this hook gave p, and for a first fragment what its
 * other fragments are to get (frag_first). */
static __always_inline int hook_end(struct __sk_buff *skb, const struct pkt *p, enum sp_hook hook, int act)
{
	return p->frag ? frag_first(skb, p, hook, act) : act;
}

#endif /* SP_LIB_HOOK_H */
