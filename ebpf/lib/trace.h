/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * `sliceproxy trace`: the program's half of a trace event. The tap that
 * bcc compiles at trace time (ebpf/trace/tap.c) runs in front of our
 * program on the same hook, and arms this CPU's sp_trace entry for a packet
 * its filter matches, with the packet as it arrived. At the packet's
 * verdict (count()), an armed entry becomes one event in the ring buffer:
 * the verdict, the tc action and the packet as the program left it.
 *
 * What the production path pays when no trace runs: the per-CPU array
 * lookup in trace_verdict (inlined by the verifier) and one test. The rest
 * is a subprogram, so its frame sits on the stack only while a trace runs
 * and only past the verdict, and the record is written in the ring
 * buffer's memory, never on the stack: the deepest call chain keeps its
 * room (docs/architecture.md, "The C side").
 */
#ifndef SP_LIB_TRACE_H
#define SP_LIB_TRACE_H

#include <linux/pkt_cls.h>
#include "maps.h"
#include "parse.h"

/* The packet's addresses and ports as they are now, into e (map form, host
 * order). The tap found where they are (v6, l4_off); a rewrite moves
 * neither. A failed load leaves zeros. */
static __always_inline void trace_after(struct __sk_buff *skb, struct sp_trace_event *e)
{
	if (e->v6) {
		bpf_skb_load_bytes(skb, IP6_SADDR_OFF, e->nat_saddr, 16);
		bpf_skb_load_bytes(skb, IP6_DADDR_OFF, e->nat_daddr, 16);
	} else {
		bpf_skb_load_bytes(skb, IP_SADDR_OFF, e->nat_saddr + 12, 4);
		bpf_skb_load_bytes(skb, IP_DADDR_OFF, e->nat_daddr + 12, 4);
		e->nat_saddr[10] = e->nat_saddr[11] = 0xff;
		e->nat_daddr[10] = e->nat_daddr[11] = 0xff;
	}
	bpf_skb_load_bytes(skb, e->l4_off, &e->nat_sport, 2);
	bpf_skb_load_bytes(skb, e->l4_off + 2, &e->nat_dport, 2);
	e->nat_sport = bpf_ntohs(e->nat_sport);
	e->nat_dport = bpf_ntohs(e->nat_dport);
}

/* An armed entry t at the verdict of the packet it was armed for: disarm,
 * and send its event if the verdict is asked for and the rate allows. A
 * subprogram: only traced packets call it. */
static __noinline void trace_emit(struct __sk_buff *skb, struct sp_trace *t, __u32 verdict, int action)
{
	struct sp_trace_event *e;
	__u32 armed = t->armed;

	t->armed = 0;
	/* Armed on another interface: the tap matched a packet our program
	 * never counted (not attached there), and this one is not it. */
	if (armed != skb->ifindex || verdict >= 64 || !((t->verdicts >> verdict) & 1))
		return;
	if (!t->tokens) {
		t->limited++;
		return;
	}
	e = bpf_ringbuf_reserve(&SP_MAP(sp_events), sizeof(*e), 0);
	if (!e) {
		t->lost++;
		return;
	}
	t->tokens--;
	t->emitted++;
	__builtin_memcpy(e, &t->ev, sizeof(*e));
	e->verdict = verdict;
	e->action = action;
	/* A dropped packet left nothing; a rejected one became the ICMP error
	 * sent back, which is no translation of it. */
	if (action != TC_ACT_SHOT && verdict != SP_V_REJECT_NO_BACKEND)
		trace_after(skb, e);
	bpf_ringbuf_submit(e, 0);
}

/* At every verdict (count()): the gate. */
static __always_inline void trace_verdict(struct __sk_buff *skb, __u32 verdict, int action)
{
	__u32 zero = 0;
	struct sp_trace *t = bpf_map_lookup_elem(&SP_MAP(sp_trace), &zero);

	if (t && t->armed)
		trace_emit(skb, t, verdict, action);
}

/* A trace runs on this pin directory: this CPU's entry asks for some
 * verdict (`trace` writes every CPU's at start, zero at its end). The XDP
 * program hands every packet to tc while it does (ext_xdp.c): the tap
 * sees packets only at tc. The same lookup as the gate above. */
static __always_inline int trace_running(void)
{
	__u32 zero = 0;
	struct sp_trace *t = bpf_map_lookup_elem(&SP_MAP(sp_trace), &zero);

	return t && t->verdicts;
}

#endif /* SP_LIB_TRACE_H */
