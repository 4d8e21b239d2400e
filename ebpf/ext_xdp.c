// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * XDP on an external interface (the node's uplink), in front of its tc
 * ingress (ext_ingress.c), which stays complete on its own: XDP only ends
 * early what tc would end the same way, and hands everything else on with
 * XDP_PASS, untouched (at most metadata in front of it), for tc to see as
 * if XDP were not there
 * (docs/semantics.md, "XDP on the external interfaces").
 *
 *  - A packet whose source loadBalancerSourceRanges refuse is dropped
 *    before the kernel allocates anything for it, counted as tc counts it.
 *  - With forwarding on (sp_xdp_cfg.forward), a packet to an external
 *    frontend whose backend the kernel would route out of an external
 *    interface (a backend on another node) is translated as tc's ingress
 *    and egress would translate it (DNAT, and SNAT under
 *    externalTrafficPolicy Cluster; the same conntrack entries, written by
 *    the same nat.h functions) and sent: back out of this interface with
 *    XDP_TX, or redirected to another external interface that runs this
 *    program in native mode (sp_uplinks_v5, a node with two uplinks). A
 *    backend on this node, a route out of any other interface, a
 *    neighbour not resolved yet or a TTL about to expire: handed to tc
 *    with XDP's decision, the flow recorded here if new (xdp_handoff):
 *    metadata in front of the frame (struct sp_xdp_meta) carrying a
 *    cookie random per load (sp_xdp_cfg.cookie), the backend and the
 *    verdict, which tc's ingress applies instead of deciding again
 *    (lib/handoff.h) and ignores with any other size or cookie (another
 *    tool's XDP program). A driver without metadata support: handed on
 *    without, nothing recorded, tc decides it in full.
 *  - Replies, ICMP errors, fragments and everything else: handed to tc.
 *  - While `sliceproxy trace` runs, everything: its tap sees packets only
 *    at tc, and tc decides each one as XDP would have (trace.h,
 *    trace_running).
 */
#include "lib/handoff.h"
#include "lib/nat.h"
#include "lib/xdp.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif


/* A reply of a masqueraded flow (backend -> node:SNAT port)? tc's ingress
 * looks for these first (unsnat), and so must XDP: such a reply is tc's. */
static __always_inline int is_unsnat_reply(const struct pkt *p)
{
	struct sp_ct_key k = {};

	ct_key(&k, p->saddr, p->daddr, bpf_ntohs(p->sport), bpf_ntohs(p->dport), p->proto, SP_CT_UNSNAT);
	return bpf_map_lookup_elem(&SP_MAP(sp_ct), &k) != 0;
}

/*
 * Where the kernel would forward p once DNATed to be:be_port (network
 * order), as its routing decides it after the DNAT of tc's ingress (the
 * source still the client's: the masquerade comes after, at egress). The
 * egress interface's index, with the next hop's Ethernet addresses in
 * macs (destination, then source), when it goes to a resolved neighbour
 * out of the interface it came in by, or out of another interface in
 * sp_uplinks_v5 (one the agent attached this program to in native mode:
 * a driver transmits a redirected frame only where its own XDP is set
 * up); -1 for
 * anything else, which the kernel does better: any other interface (a
 * pod's on this node, an interface without our XDP), no neighbour entry
 * yet (the kernel resolves it), a packet too big for the route (an ICMP
 * error to send), forwarding off, or a TTL that ends here (ICMP time
 * exceeded). A subprogram: the lookup's stack is taken only while it runs.
 */
static __noinline int route_out(struct xdp_md *ctx, const struct pkt *p, const __u8 *be, __be16 be_port, __u8 *macs)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct bpf_fib_lookup fib = {};
	long rc;

	fib.ifindex = ctx->ingress_ifindex;
	fib.l4_protocol = p->proto;
	fib.sport = p->sport;
	fib.dport = be_port;
	if (p->v6) {
		struct ipv6hdr *ip6 = data + ETH_HLEN;

		if ((void *)(ip6 + 1) > data_end || ip6->hop_limit <= 1)
			return -1;
		fib.family = AF_INET6;
		fib.flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0fffffff);
		fib.tot_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
		__builtin_memcpy(fib.ipv6_src, p->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, be, 16);
	} else {
		struct iphdr *ip = data + ETH_HLEN;

		if ((void *)(ip + 1) > data_end || ip->ttl <= 1)
			return -1;
		fib.family = AF_INET;
		fib.tos = ip->tos;
		fib.tot_len = bpf_ntohs(ip->tot_len);
		fib.ipv4_src = addr_to_v4(p->saddr);
		fib.ipv4_dst = addr_to_v4(be);
	}
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS || fib.ifindex > 0x7fffffff)
		return -1;
	if (fib.ifindex != ctx->ingress_ifindex) {
		__u32 oif = fib.ifindex;

		if (!bpf_map_lookup_elem(&SP_MAP(sp_uplinks), &oif))
			return -1;
	}
	__builtin_memcpy(macs, fib.dmac, ETH_ALEN);
	__builtin_memcpy(macs + ETH_ALEN, fib.smac, ETH_ALEN);
	return fib.ifindex;
}

/* Send the translated frame out of interface oif (route_out's): TTL or
 * hop limit less one, as the kernel's forwarding would (IPv4's header
 * checksum with it), the next hop's Ethernet addresses (macs: destination,
 * then source), and XDP_TX back out of the interface it came in by, or a
 * redirect to oif, counted as such (xdp_tx, xdp_redirect; a redirect the
 * device map refuses: drop_error). */
static __always_inline int send_out(struct xdp_md *ctx, const struct pkt *p, const __u8 *macs, __u32 oif)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	long act;

	if ((void *)(eth + 1) > data_end)
		return XDP_DROP;
	if (p->v6) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return XDP_DROP;
		ip6->hop_limit--;
	} else {
		struct iphdr *ip = (void *)(eth + 1);
		__u16 old, new;

		if ((void *)(ip + 1) > data_end)
			return XDP_DROP;
		/* TTL is the high byte of the header's fifth 16-bit word. */
		__builtin_memcpy(&old, &ip->ttl, 2);
		ip->ttl--;
		__builtin_memcpy(&new, &ip->ttl, 2);
		ip->check = csum_finish(csum_delta((__u16)~ip->check, (__u8 *)&old, (__u8 *)&new, 2));
	}
	__builtin_memcpy(eth->h_dest, macs, ETH_ALEN);
	__builtin_memcpy(eth->h_source, macs + ETH_ALEN, ETH_ALEN);
	if (oif == ctx->ingress_ifindex)
		return xdp_count(ctx, SP_V_XDP_TX, XDP_TX);
	/* oif was in the map when route_out looked; removed since (its XDP
	 * detached, the interface gone), the frame, already rewritten for
	 * that next hop, is dropped and counted as an error: a packet lost
	 * as in a route change. */
	act = bpf_redirect_map(&SP_MAP(sp_uplinks), oif, XDP_DROP);
	return xdp_count(ctx, act == XDP_REDIRECT ? SP_V_XDP_REDIRECT : SP_V_DROP_ERROR, act);
}

/*
 * The flow xdp_dnat() works on, one per CPU, outside the stack: the chain
 * sp_ext_xdp -> xdp_dnat -> xdp_flow (lb.h's choice with its Maglev
 * lookup inlined) is otherwise 16 bytes over the verifier's 512. An XDP
 * program runs to its end on one CPU before that CPU runs it again, and
 * nothing else uses these. A node with more CPUs than this hands the
 * flows of the others to tc (XDP still drops refused sources there).
 */
#define XDP_FLOW_CPUS 512
static struct dnat_flow xdp_flows[XDP_FLOW_CPUS];

/* dnat_flow() and dnat_record() as subprograms: each one's stack is taken
 * only while it runs (the verifier's limit is on a call chain's total). */
static __noinline int xdp_flow(const struct pkt *p, struct dnat_flow *f)
{
	struct sp_svc_val *svc = 0;

	return dnat_flow(p, SP_SCOPE_EXTERNAL, f, &svc);
}

static __noinline int xdp_record(struct dnat_flow *f)
{
	return dnat_record(f);
}

/* The metadata m (in front of the frame) of a flow handed to tc with its
 * backend in f->nct and its verdict. A subprogram, which also puts struct
 * sp_xdp_meta in the object's BTF, where the control plane checks every
 * layout of sliceproxy.h. */
static __noinline void handoff_fill(struct sp_xdp_meta *m, const struct dnat_flow *f, __u8 verdict)
{
	m->cookie = sp_xdp_cfg.cookie;
	__builtin_memcpy(m->backend, f->nct.nat_addr, sizeof(m->backend));
	m->port = f->nct.nat_port;
	m->verdict = verdict;
	__builtin_memset(m->pad, 0, sizeof(m->pad));
}

/*
 * Hand tc a flow to a backend on this node that XDP decided (kind
 * DNAT_NEW or DNAT_ESTABLISHED, the backend in f->nct): the decision as
 * metadata in front of the frame (struct sp_xdp_meta, this load's cookie),
 * which tc's ingress applies instead of deciding again (handoff.h), and a
 * new flow recorded here, so that XDP and tc never both choose. A driver
 * without metadata support (bpf_xdp_adjust_meta fails): handed on without,
 * a new flow not recorded, and tc decides the packet in full, as without
 * the handoff. The XDP action. A subprogram: off the forwarding path's
 * stack.
 */
static __noinline int xdp_handoff(struct xdp_md *ctx, struct dnat_flow *f, int kind)
{
	struct sp_xdp_meta *m;
	void *data;

	if (!sp_xdp_cfg.cookie || bpf_xdp_adjust_meta(ctx, -(int)sizeof(*m)))
		return XDP_PASS;
	data = (void *)(long)ctx->data;
	m = (void *)(long)ctx->data_meta;
	if ((void *)(m + 1) > data) {
		/* Never so (the kernel just made the room): no metadata
		 * rather than whatever bytes the headroom holds. */
		bpf_xdp_adjust_meta(ctx, sizeof(*m));
		return XDP_PASS;
	}
	if (kind == DNAT_NEW && xdp_record(f))
		return xdp_count(ctx, SP_V_DROP_ERROR, XDP_DROP);
	handoff_fill(m, f, kind == DNAT_NEW ? SP_V_DNAT_NEW : SP_V_DNAT_ESTABLISHED);
	return XDP_PASS;
}

/*
 * The ingress half: the frontend p is for, its source checked, its
 * backend found (dnat_flow, as tc's ingress does). The XDP action when
 * the packet ends here or goes on to tc; -1 when XDP is to send it out of
 * interface *oif (macs filled): its flow then recorded if new, the frame
 * DNATed and counted as tc's ingress would count it, and p now client ->
 * backend, as tc's egress would see it. A subprogram: its stack is free
 * again for the SNAT half.
 */
static __noinline int xdp_dnat(struct xdp_md *ctx, struct pkt *p, __u8 *macs, __u32 *oif)
{
	struct dnat_flow *fp;
	__u32 cpu;
	__be16 be_port;
	int kind, out;

	cpu = bpf_get_smp_processor_id();
	if (!sp_xdp_cfg.forward || cpu >= XDP_FLOW_CPUS) {
		/* Only the drop: the frontend and its source check, the two
		 * first steps of dnat_flow(), and nothing a flow tc serves
		 * would pay for twice (its conntrack lookup, a backend
		 * choice). The verifier drops the rest as dead code. */
		struct sp_svc_key skey = {};
		struct sp_svc_val *svc = lb_lookup(p->daddr, bpf_ntohs(p->dport), p->proto, SP_SCOPE_EXTERNAL, &skey);

		if (svc && !lb_source_allowed(svc, p->saddr))
			return xdp_count(ctx, SP_V_DROP_SOURCE_RANGE, XDP_DROP);
		return XDP_PASS;
	}
	fp = &xdp_flows[cpu];
	__builtin_memset(fp, 0, sizeof(*fp));
	kind = xdp_flow(p, fp);
	if (kind == DNAT_REFUSED)
		return xdp_count(ctx, SP_V_DROP_SOURCE_RANGE, XDP_DROP);
	/* No frontend, no backend (tc drops, or rejects with an ICMP error
	 * it builds), maps that disagree: tc's, decided there. */
	if (kind != DNAT_NEW && kind != DNAT_ESTABLISHED)
		return XDP_PASS;
	be_port = bpf_htons(fp->nct.nat_port);
	/* A flow the kernel is to route (a backend on this node, a neighbour
	 * to resolve, a TTL that ends here...): tc's ingress applies the
	 * DNAT decided here, the kernel routes it as ever. */
	out = route_out(ctx, p, fp->nct.nat_addr, be_port, macs);
	if (out < 0)
		return xdp_handoff(ctx, fp, kind);
	*oif = out;
	if (kind == DNAT_NEW && xdp_record(fp))
		return xdp_count(ctx, SP_V_DROP_ERROR, XDP_DROP);
	if (xdp_rewrite(ctx, p, 1, fp->nct.nat_addr, be_port))
		return xdp_count(ctx, SP_V_DROP_ERROR, XDP_DROP);
	xdp_count(ctx, kind == DNAT_NEW ? SP_V_DNAT_NEW : SP_V_DNAT_ESTABLISHED, 0);
	__builtin_memcpy(p->daddr, fp->nct.nat_addr, sizeof(p->daddr));
	p->dport = be_port;
	return -1;
}

/* The egress half of a packet xdp_dnat() DNATed (p: client -> backend):
 * the masquerade tc's egress would apply (snat_source), counted as it
 * would count it, and the frame sent out of interface oif. */
static __noinline int xdp_snat(struct xdp_md *ctx, struct pkt *p, const __u8 *macs, __u32 oif)
{
	__u8 addr[16];
	__u16 port = 0;
	__u32 v = snat_source(p, addr, &port);

	if (v == SP_V_SNAT) {
		if (xdp_rewrite(ctx, p, 0, addr, bpf_htons(port)))
			return xdp_count(ctx, SP_V_DROP_ERROR, XDP_DROP);
	} else if (v != SP_V_PASS_NO_FLOW) {
		return xdp_count(ctx, v, XDP_DROP);
	}
	xdp_count(ctx, v, 0);
	return send_out(ctx, p, macs, oif);
}

SEC("xdp")
int sp_ext_xdp(struct xdp_md *ctx)
{
	struct pkt p = {};
	__u8 macs[2 * ETH_ALEN];
	__u32 oif = 0;
	int act;

	if (trace_running())
		return XDP_PASS;
	if (xdp_parse(ctx, &p))
		return XDP_PASS;
	if (is_unsnat_reply(&p))
		return XDP_PASS;
	act = xdp_dnat(ctx, &p, macs, &oif);
	if (act >= 0)
		return act;
	return xdp_snat(ctx, &p, macs, oif);
}
