// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Host-network clients: cgroup socket programs, attached to the root of
 * the node's cgroup v2 hierarchy (or --cgroup), for processes in the
 * node's own network namespace (the kubelet, hostNetwork pods, node
 * agents). They get their backend when the socket is given its
 * destination, with no per-packet NAT and no conntrack entry:
 *
 *  - connect4/6: TCP and connected UDP to a frontend connect to the
 *    backend instead (connect() fails with ECONNREFUSED when the frontend
 *    has no backend, as kube-proxy's REJECT makes it);
 *  - sendmsg4/6: each datagram of an unconnected UDP socket goes to a
 *    backend, the same one per frontend while its slot still names it;
 *  - recvmsg4/6: a datagram from that backend reads as from the frontend;
 *  - getpeername4/6: a connected socket names the frontend as its peer.
 *
 * The endpoint choice is lb.h's, the tc programs' own: a host client is an
 * in-cluster client (frontends of scope internal, where
 * internalTrafficPolicy applies and externalTrafficPolicy does not), whose
 * address for session affinity and source ranges is the node's (sp_cfg).
 * Sockets of other network namespaces (pods) are left to the tc programs,
 * so nothing is translated twice. What a socket reached is kept in its own
 * storage (sp_sock), which the kernel frees with the socket.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "lib/lb.h"

#define SP_ECONNREFUSED 111

/* Is the socket in the node's network namespace (the agent's)? */
static __always_inline int host_netns(struct bpf_sock_addr *ctx)
{
	__u32 zero = 0;
	struct sp_host_cfg *cfg = bpf_map_lookup_elem(&SP_MAP(sp_host), &zero);

	return cfg && cfg->netns_cookie && cfg->netns_cookie == bpf_get_netns_cookie(ctx);
}

/* The socket address the call carries, in map form (an AF_INET6 socket's
 * IPv4-mapped address is already in it: served as the IPv4 frontend). */
static __always_inline void ctx_addr(const struct bpf_sock_addr *ctx, int inet6, __u8 *a)
{
	__u32 *w = (__u32 *)a;

	if (!inet6) {
		addr_from_v4(a, ctx->user_ip4);
		return;
	}
	w[0] = ctx->user_ip6[0];
	w[1] = ctx->user_ip6[1];
	w[2] = ctx->user_ip6[2];
	w[3] = ctx->user_ip6[3];
}

static __always_inline void ctx_set_addr(struct bpf_sock_addr *ctx, int inet6, const __u8 *a, __u16 port)
{
	const __u32 *w = (const __u32 *)a;

	if (!inet6) {
		ctx->user_ip4 = w[3];
	} else {
		ctx->user_ip6[0] = w[0];
		ctx->user_ip6[1] = w[1];
		ctx->user_ip6[2] = w[2];
		ctx->user_ip6[3] = w[3];
	}
	ctx->user_port = bpf_htons(port);
}

/* The node's address of a family (sp_cfg), the host client's address for
 * affinity and source ranges; zeros before the agent wrote one. */
static __always_inline void node_addr(int v6, __u8 *out)
{
	__u32 zero = 0;
	struct sp_cfg *cfg = bpf_map_lookup_elem(&SP_MAP(sp_cfg), &zero);

	if (cfg)
		__builtin_memcpy(out, v6 ? cfg->addr6 : cfg->addr4, 16);
}

/* The call fails with ECONNREFUSED: connect() and sendmsg() return it. */
static __always_inline int refuse(void)
{
	bpf_set_retval(-SP_ECONNREFUSED);
	return 0;
}

#define SOCK_ENTS 4

/*
 * A call that gives the socket its destination (connect, or an
 * unconnected datagram): a frontend's address becomes a backend's. The
 * program's return value (1: go on; 0: refused, errno set).
 */
static __always_inline int host_forward(struct bpf_sock_addr *ctx, int inet6, int datagram)
{
	struct sp_svc_key skey = {};
	struct sp_svc_val *svc;
	struct lb_choice c = {};
	struct sp_ct_key fl = {}; /* the flow, for lb_choose: internal scope,
				   * never a Maglev frontend, so only the
				   * source (the affinity key) matters */
	struct sp_sock *st;
	struct sp_sock_ent *e = 0;
	__u32 hint_slot = LB_NO_HINT, hint_be = 0, proto = ctx->protocol;
	__u8 addr[16], node[16] = {};
	__u16 port;
	int v6, r;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 1;
	if (!host_netns(ctx))
		return 1;
	ctx_addr(ctx, inet6, addr);
	port = bpf_ntohs(ctx->user_port);
	svc = lb_lookup(addr, port, proto, SP_SCOPE_INTERNAL, &skey);
	if (!svc)
		return 1;
	v6 = !addr_is_v4(addr);
	node_addr(v6, node);
	/* kube-proxy's firewall chain sees the node's own packets to an LB
	 * IP with the node's address as their source. */
	if (!lb_source_allowed(svc, node))
		return refuse();

	st = bpf_sk_storage_get(&SP_MAP(sp_sock), ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (st) {
#pragma unroll
		for (int i = 0; i < SOCK_ENTS; i++) {
			if (st->ent[i].backend_port && st->ent[i].frontend_port == port &&
			    addr_eq(st->ent[i].frontend, addr)) {
				e = &st->ent[i];
				break;
			}
		}
		if (!e) {
			e = &st->ent[st->next & (SOCK_ENTS - 1)];
			st->next++;
		} else if (datagram && e->svc_id == svc->svc_id) {
			/* netfilter keeps a socket's datagrams to one frontend
			 * on one backend (one conntrack entry); so do we,
			 * while its slot still names it. */
			hint_slot = e->slot;
			hint_be = e->backend_id;
		}
	}
	__builtin_memcpy(fl.saddr, node, sizeof(fl.saddr));
	fl.dport = port;
	fl.proto = proto;
	r = lb_choose(svc, &fl, v6, now_ns(), hint_slot, hint_be, &c);
	if (r != LB_OK)
		return refuse(); /* no backend (or maps that disagree) */
	if (e) {
		__builtin_memcpy(e->frontend, addr, sizeof(e->frontend));
		__builtin_memcpy(e->backend, c.be->addr, sizeof(e->backend));
		e->frontend_port = port;
		e->backend_port = c.be->port;
		e->backend_id = c.be_id;
		e->svc_id = svc->svc_id;
		e->slot = c.slot;
	}
	ctx_set_addr(ctx, inet6, c.be->addr, c.be->port);
	return 1;
}

/*
 * A call that reports the socket's peer (getpeername, or the source of a
 * received datagram): a backend the socket was given for a frontend
 * becomes that frontend again. Always 1 (these hooks cannot refuse).
 */
static __always_inline int host_reverse(struct bpf_sock_addr *ctx, int inet6)
{
	struct sp_sock *st = bpf_sk_storage_get(&SP_MAP(sp_sock), ctx->sk, 0, 0);
	__u8 addr[16];
	__u16 port;

	if (!st)
		return 1; /* never given a backend by us */
	ctx_addr(ctx, inet6, addr);
	port = bpf_ntohs(ctx->user_port);
#pragma unroll
	for (int i = 0; i < SOCK_ENTS; i++) {
		if (st->ent[i].backend_port == port && addr_eq(st->ent[i].backend, addr)) {
			ctx_set_addr(ctx, inet6, st->ent[i].frontend, st->ent[i].frontend_port);
			break;
		}
	}
	return 1;
}

SEC("cgroup/connect4")
int sp_host_connect4(struct bpf_sock_addr *ctx)
{
	return host_forward(ctx, 0, 0);
}

SEC("cgroup/connect6")
int sp_host_connect6(struct bpf_sock_addr *ctx)
{
	return host_forward(ctx, 1, 0);
}

SEC("cgroup/sendmsg4")
int sp_host_sendmsg4(struct bpf_sock_addr *ctx)
{
	return host_forward(ctx, 0, 1);
}

SEC("cgroup/sendmsg6")
int sp_host_sendmsg6(struct bpf_sock_addr *ctx)
{
	return host_forward(ctx, 1, 1);
}

SEC("cgroup/recvmsg4")
int sp_host_recvmsg4(struct bpf_sock_addr *ctx)
{
	return host_reverse(ctx, 0);
}

SEC("cgroup/recvmsg6")
int sp_host_recvmsg6(struct bpf_sock_addr *ctx)
{
	return host_reverse(ctx, 1);
}

SEC("cgroup/getpeername4")
int sp_host_getpeername4(struct bpf_sock_addr *ctx)
{
	return host_reverse(ctx, 0);
}

SEC("cgroup/getpeername6")
int sp_host_getpeername6(struct bpf_sock_addr *ctx)
{
	return host_reverse(ctx, 1);
}
