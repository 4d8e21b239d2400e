// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The tap of `sliceproxy trace` (docs/inspecting.md): compiled by bcc when
 * an operator starts a trace, never by `make`, and attached to a hook in
 * front of our program there (a lower tc priority number), returning
 * TC_ACT_UNSPEC so that our program still decides every packet.
 *
 * For a TCP or UDP packet of a Service's flow that the filter matches, it
 * fills this CPU's sp_trace_v5 entry with the packet as it arrived, the
 * flow's service and frontend, and arms it; our program sends the event at
 * its verdict (ebpf/lib/trace.h). Everything else passes with the entry
 * disarmed, so a packet the tap did not match is never taken for one it
 * did.
 *
 * `sliceproxy trace` (ctrl/dataplane/trace.py) prepends the filter and the
 * pinned maps' paths as #defines: the filter is constants here, compiled
 * away when not asked for.
 *   TAP_PIN_SVC, TAP_PIN_CT, TAP_PIN_NAMES, TAP_PIN_TRACE: pin paths
 *   TAP_SVC_MATCH(name):     the flow's service name (sp_names_v5) is the
 *                            one asked for (--service)
 *   TAP_FRONT_MATCH(w, port): the frontend, as four __u32 words (--frontend)
 *   TAP_BACKEND_MATCH(w):    the backend (--backend); a new flow's is not
 *                            known before our program picks it: the reader
 *                            filters those
 *   TAP_NS_PER_TOKEN, TAP_BURST: this CPU's share of --rate
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include "sliceproxy.h"

BPF_TABLE_PINNED("hash", struct sp_svc_key, struct sp_svc_val, svcs, 1, TAP_PIN_SVC);
BPF_TABLE_PINNED("lru_hash", struct sp_ct_key, struct sp_ct_val, cts, 1, TAP_PIN_CT);
BPF_TABLE_PINNED("hash", __u32, struct sp_svc_name, names, 1, TAP_PIN_NAMES);
BPF_TABLE_PINNED("percpu_array", __u32, struct sp_trace, traces, 1, TAP_PIN_TRACE);

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define TAP_NTOHS(x) __builtin_bswap16(x)
#else
#define TAP_NTOHS(x) (x)
#endif
#define TAP_ETH_HLEN 14
#define TAP_NEXTHDR_FRAGMENT 44

/* Parse the packet into ev (addresses in map form, ports in host order):
 * 0 for a TCP or UDP packet with ports (what our programs translate). */
static __always_inline int tap_parse(struct __sk_buff *skb, struct sp_trace_event *ev)
{
	__u16 h_proto;
	__u32 l4;
	__u8 proto;
	__be16 ports[2];

	if (bpf_skb_load_bytes(skb, 12, &h_proto, 2))
		return -1;
	if (h_proto == TAP_NTOHS(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, TAP_ETH_HLEN, &ip, sizeof(ip)) || ip.version != 4 || ip.ihl < 5)
			return -1;
		if (ip.frag_off & TAP_NTOHS(0x1fff))
			return -1; /* no ports: not the first fragment */
		__builtin_memset(ev->saddr, 0, 10);
		__builtin_memset(ev->daddr, 0, 10);
		ev->saddr[10] = ev->saddr[11] = ev->daddr[10] = ev->daddr[11] = 0xff;
		__builtin_memcpy(ev->saddr + 12, &ip.saddr, 4);
		__builtin_memcpy(ev->daddr + 12, &ip.daddr, 4);
		proto = ip.protocol;
		l4 = TAP_ETH_HLEN + ip.ihl * 4;
		ev->v6 = 0;
	} else if (h_proto == TAP_NTOHS(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, TAP_ETH_HLEN, &ip6, sizeof(ip6)))
			return -1;
		__builtin_memcpy(ev->saddr, &ip6.saddr, 16);
		__builtin_memcpy(ev->daddr, &ip6.daddr, 16);
		proto = ip6.nexthdr;
		l4 = TAP_ETH_HLEN + sizeof(ip6);
		/* A Fragment header right after the IPv6 header, as our
		 * parser takes it (ebpf/lib/parse.h). */
		if (proto == TAP_NEXTHDR_FRAGMENT) {
			__u8 fh[8];

			if (bpf_skb_load_bytes(skb, l4, fh, 8) || (((fh[2] << 8) | fh[3]) & 0xfff8))
				return -1;
			proto = fh[0];
			l4 += 8;
		}
		ev->v6 = 1;
	} else {
		return -1;
	}
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return -1;
	if (bpf_skb_load_bytes(skb, l4, ports, 4))
		return -1;
	ev->proto = proto;
	ev->l4_off = l4;
	ev->sport = TAP_NTOHS(ports[0]);
	ev->dport = TAP_NTOHS(ports[1]);
	ev->tcp_flags = 0;
	if (proto == IPPROTO_TCP && bpf_skb_load_bytes(skb, l4 + 13, &ev->tcp_flags, 1))
		return -1;
	return 0;
}

static __always_inline void tap_ct_key(struct sp_ct_key *k, const struct sp_trace_event *ev, __u8 dir)
{
	__builtin_memcpy(k->saddr, ev->saddr, 16);
	__builtin_memcpy(k->daddr, ev->daddr, 16);
	k->sport = ev->sport;
	k->dport = ev->dport;
	k->proto = ev->proto;
	k->dir = dir;
}

static __always_inline int tap(struct __sk_buff *skb, __u8 hook)
{
	__u32 zero = 0;
	struct sp_trace *t = traces.lookup(&zero);
	struct sp_trace_event *ev;
	struct sp_svc_key sk = {};
	struct sp_ct_key ck = {};
	struct sp_ct_val *ct;
	struct sp_svc_val *svc;
	const __u8 *backend = 0;
	__u64 now, n;

	if (!t)
		return TC_ACT_UNSPEC;
	t->armed = 0;
	ev = &t->ev;
	if (tap_parse(skb, ev))
		return TC_ACT_UNSPEC;
	ev->svc_id = 0;
	__builtin_memset(ev->front_addr, 0, 16);
	ev->front_port = 0;
	/* The flow's service, as the program behind us will find it: a
	 * packet to a frontend of this hook's scope (ingress hooks), or one
	 * of a flow in conntrack (replies, and masqueraded flows). */
	if (hook == SP_TRACE_HOOK_POD_INGRESS || hook == SP_TRACE_HOOK_EXT_INGRESS) {
		__builtin_memcpy(sk.addr, ev->daddr, 16);
		sk.port = ev->dport;
		sk.proto = ev->proto;
		sk.scope = hook == SP_TRACE_HOOK_POD_INGRESS ? SP_SCOPE_INTERNAL : SP_SCOPE_EXTERNAL;
		svc = svcs.lookup(&sk);
		if (svc) {
			ev->svc_id = svc->svc_id;
			__builtin_memcpy(ev->front_addr, ev->daddr, 16);
			ev->front_port = ev->dport;
			tap_ct_key(&ck, ev, SP_CT_FORWARD);
			ct = cts.lookup(&ck);
			if (ct && ct->svc_id == svc->svc_id)
				backend = ct->nat_addr; /* an established flow's */
		}
	}
	if (!ev->svc_id) {
		tap_ct_key(&ck, ev, SP_CT_REPLY);
		ct = cts.lookup(&ck);
		if (ct) {
			ev->svc_id = ct->svc_id;
			__builtin_memcpy(ev->front_addr, ct->nat_addr, 16);
			ev->front_port = ct->nat_port;
			backend = ev->saddr;
		}
	}
	if (!ev->svc_id && hook == SP_TRACE_HOOK_EXT_INGRESS) {
		tap_ct_key(&ck, ev, SP_CT_UNSNAT);
		ct = cts.lookup(&ck);
		if (ct) {
			ev->svc_id = ct->svc_id;
			backend = ev->saddr;
		}
	}
	if (!ev->svc_id && hook == SP_TRACE_HOOK_EXT_EGRESS) {
		tap_ct_key(&ck, ev, SP_CT_SNAT);
		ct = cts.lookup(&ck);
		if (ct) {
			ev->svc_id = ct->svc_id;
			__builtin_memcpy(ev->front_addr, ct->addr2, 16);
			ev->front_port = ct->port2;
			backend = ev->daddr;
		}
	}
	if (!ev->svc_id)
		return TC_ACT_UNSPEC;
	{
		const __u32 *fw = (const __u32 *)ev->front_addr;

		if (!(TAP_FRONT_MATCH(fw, ev->front_port)))
			return TC_ACT_UNSPEC;
	}
	if (backend) {
		const __u32 *bw = (const __u32 *)backend;

		if (!(TAP_BACKEND_MATCH(bw)))
			return TC_ACT_UNSPEC;
	}
#ifdef TAP_SVC_FILTER
	struct sp_svc_name *name = names.lookup(&ev->svc_id);

	if (!name || !(TAP_SVC_MATCH(name->name)))
		return TC_ACT_UNSPEC;
#endif
	/* This CPU's share of --rate: tokens added for the time since the
	 * last refill, up to a second's worth. */
	now = bpf_ktime_get_ns();
	n = (now - t->refilled) / TAP_NS_PER_TOKEN;
	if (n) {
		n += t->tokens;
		t->tokens = n > TAP_BURST ? TAP_BURST : n;
		t->refilled = now;
	}
	ev->time = now;
	ev->ifindex = skb->ifindex;
	ev->hook = hook;
	ev->verdict = 0;
	ev->action = 0;
	__builtin_memset(ev->nat_saddr, 0, 16);
	__builtin_memset(ev->nat_daddr, 0, 16);
	ev->nat_sport = ev->nat_dport = 0;
	t->armed = skb->ifindex;
	return TC_ACT_UNSPEC;
}

int tap_pod_ingress(struct __sk_buff *skb)
{
	return tap(skb, SP_TRACE_HOOK_POD_INGRESS);
}

int tap_pod_egress(struct __sk_buff *skb)
{
	return tap(skb, SP_TRACE_HOOK_POD_EGRESS);
}

int tap_ext_ingress(struct __sk_buff *skb)
{
	return tap(skb, SP_TRACE_HOOK_EXT_INGRESS);
}

int tap_ext_egress(struct __sk_buff *skb)
{
	return tap(skb, SP_TRACE_HOOK_EXT_EGRESS);
}
