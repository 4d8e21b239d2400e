/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Per-CPU counters per verdict (enum sp_verdict): every packet is counted
 * once, by the verdict it leaves with; a packet `sliceproxy trace` armed
 * sends its event there too (trace.h). */
#ifndef SP_LIB_STATS_H
#define SP_LIB_STATS_H

#include "maps.h"
#include "trace.h"

static __always_inline int count(struct __sk_buff *skb, __u32 verdict, int action)
{
	struct sp_stat *st = bpf_map_lookup_elem(&SP_MAP(sp_stats), &verdict);

	if (st) {
		/* Per-CPU slot: no other CPU writes it, plain adds suffice. */
		st->packets += 1;
		st->bytes += skb->len;
	}
	trace_verdict(skb, verdict, action);
	return action;
}

#endif /* SP_LIB_STATS_H */
