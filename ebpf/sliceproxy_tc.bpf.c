// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sliceproxy tc programs, attached at clsact of the host side of pod
 * interfaces. At ingress, a packet to a service frontend gets a backend with
 * one slot lookup and its destination rewritten (DNAT); the kernel then
 * routes it by its new destination. At egress, a reply of such a flow gets
 * its source rewritten back to the frontend. A pod given itself as backend
 * (hairpin) has its packets sent straight back into it, and ICMP errors
 * about a translated flow are translated as the flow's packets are. Every
 * other packet leaves untouched with TC_ACT_OK.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <stddef.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "sliceproxy.h"

/* Sizes are placeholders: the control plane sets max_entries before load
 * (flags --max-services, --max-backends...). The maps the datapath reads are
 * preallocated: no allocation on a write, batch writes about 40% faster than
 * without, and memory is taken once at load instead of failing under
 * pressure later. Only the names map, which packets never read, is not. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sp_svc_key);
	__type(value, struct sp_svc_val);
} sp_svc_v3 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct sp_slot_key);
	__type(value, struct sp_slot_val);
} sp_slot_v3 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, __u32);
	__type(value, struct sp_backend);
} sp_be_v3 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct sp_ct_key);
	__type(value, struct sp_ct_val);
} sp_ct_v3 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct sp_aff_key);
	__type(value, struct sp_aff_val);
} sp_aff_v3 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SP_V_MAX);
	__type(key, __u32);
	__type(value, struct sp_stat);
} sp_stats_v3 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct sp_svc_name);
} sp_names_v3 SEC(".maps");

/* loadBalancerSourceRanges: (svc_id, source prefix) -> allowed. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sp_src_key);
	__type(value, struct sp_src_val);
} sp_src_v3 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sp_cfg);
} sp_cfg_v3 SEC(".maps");

/*
 * Time. Every stamp in the maps (conntrack last_seen, affinity last_used) is
 * now_ns() of its last packet, and every age is idle_ns() of it: nothing
 * compares stamps by magnitude. The clock is CLOCK_MONOTONIC, which starts
 * near zero at boot, so "now - idle" of a flow idle longer than the uptime
 * is a stamp below zero; with unsigned wrap-around arithmetic it is still
 * exactly `idle` old, whatever the uptime.
 *
 * sp_clock_shift is added to the kernel's clock: always 0 in production
 * (nothing in the control plane writes it); the datapath tests set it to run
 * the programs as on a machine booted seconds ago. Its own data section
 * gives its map a name starting with a dot (libbpf names the maps of
 * .data.* sections after the section), which the loader neither pins nor
 * lists with the dataplane's maps.
 */
__u64 sp_clock_shift SEC(".data.clock") = 0;

static __always_inline __u64 now_ns(void)
{
	return bpf_ktime_get_ns() + sp_clock_shift;
}

/* How long ago stamp was: now - stamp modulo 2^64. A stamp ahead of now (a
 * packet on another CPU stamped the entry after this one read the clock)
 * is idle 0, not 584 years. */
static __always_inline __u64 idle_ns(__u64 now, __u64 stamp)
{
	__u64 d = now - stamp;

	return (__s64)d < 0 ? 0 : d;
}

/* The hairpin source addresses (struct sp_hairpin in sliceproxy.h). A
 * read-only global rather than a map field: the control plane writes it
 * into the object before load (ctrl/loader.py), no map layout changes, and
 * the verifier sees the values. Its own section, so the loader finds it at
 * offset 0 of its own internal map. */
const volatile struct sp_hairpin sp_hairpin SEC(".rodata.hairpin") = {};

/* Ethernet + the longest IPv4 header + a TCP header. */
#define PULL_LEN (ETH_HLEN + 60 + 20)

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* Offsets of the L4 checksum field inside the TCP and UDP headers. */
#define TCP_CSUM_OFF offsetof(struct tcphdr, check)
#define UDP_CSUM_OFF offsetof(struct udphdr, check)
#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SADDR_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))
#define IP6_SADDR_OFF (ETH_HLEN + offsetof(struct ipv6hdr, saddr))
#define IP6_DADDR_OFF (ETH_HLEN + offsetof(struct ipv6hdr, daddr))
#define NEXTHDR_FRAGMENT 44

static __always_inline int count(struct __sk_buff *skb, __u32 verdict, int action)
{
	struct sp_stat *st = bpf_map_lookup_elem(&sp_stats_v3, &verdict);

	if (st) {
		/* Per-CPU slot: no other CPU writes it, plain adds suffice. */
		st->packets += 1;
		st->bytes += skb->len;
	}
	return action;
}

static __always_inline void addr_from_v4(__u8 *a, __be32 ip)
{
	__u32 *w = (__u32 *)a;

	w[0] = 0;
	w[1] = 0;
	w[2] = bpf_htonl(0x0000ffff);
	w[3] = ip;
}

static __always_inline __be32 addr_to_v4(const __u8 *a)
{
	return ((const __u32 *)a)[3];
}

static __always_inline int addr_is_v4(const __u8 *a)
{
	const __u32 *w = (const __u32 *)a;

	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int addr_eq(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* The hairpin address of a family (map form), or 0 when none is set. */
static __always_inline const __u8 *hairpin_addr(int v6)
{
	const __u8 *a = v6 ? (const __u8 *)sp_hairpin.addr6 : (const __u8 *)sp_hairpin.addr4;
	const __u32 *w = (const __u32 *)a;

	return (w[0] | w[1] | w[2] | w[3]) ? a : 0;
}

/*
 * The address a flow from client to backend gets as its source, or 0 to
 * keep the client's: a pod whose packet to a frontend of its own scope is
 * given the pod itself as backend (hairpin). Left as it is, the packet
 * would enter the pod from its own address, which the pod drops as a
 * martian, and the pod's answer would go to itself over lo, bypassing the
 * reverse NAT. kube-proxy masquerades this case (KUBE-MARK-MASQ when the
 * source is the endpoint itself). Only pods' traffic (scope internal):
 * external traffic never comes from a pod of this node.
 */
static __always_inline const __u8 *hairpin_for(__u8 scope, const __u8 *backend, const __u8 *client)
{
	if (scope != SP_SCOPE_INTERNAL || !addr_eq(backend, client))
		return 0;
	return hairpin_addr(!addr_is_v4(client));
}

/*
 * Rewrite one address and one port of an IPv4 TCP/UDP packet, fixing the IP
 * header checksum and the L4 checksum (whose pseudo-header covers the
 * address). addr_off/port_off select source or destination.
 */
static __always_inline int rewrite_v4(struct __sk_buff *skb, __u32 l4_off, __u8 proto,
				      __u32 addr_off, __u32 port_off, __be32 old_ip,
				      __be32 new_ip, __be16 old_port, __be16 new_port)
{
	__u32 csum_off = l4_off + (proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
	/* A UDP checksum of zero means "none" (RFC 768): keep it zero, and
	 * never let a computed zero be stored as zero. */
	__u64 mangled = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (old_ip != new_ip) {
		if (bpf_l4_csum_replace(skb, csum_off, old_ip, new_ip,
					BPF_F_PSEUDO_HDR | mangled | sizeof(new_ip)))
			return -1;
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ip, new_ip, sizeof(new_ip)))
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, &new_ip, sizeof(new_ip), 0))
			return -1;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port,
					mangled | sizeof(new_port)))
			return -1;
		if (bpf_skb_store_bytes(skb, l4_off + port_off, &new_port, sizeof(new_port), 0))
			return -1;
	}
	return 0;
}

/*
 * The same for IPv6: no header checksum, and the 16-byte address enters the
 * L4 checksum through its pseudo-header as one precomputed difference.
 */
static __always_inline int rewrite_v6(struct __sk_buff *skb, __u32 l4_off, __u8 proto, __u32 addr_off,
				      __u32 port_off, const __u8 *old_addr, const __u8 *new_addr,
				      __be16 old_port, __be16 new_port)
{
	__u32 csum_off = l4_off + (proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
	__u64 mangled = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__u8 naddr[16];

	if (!addr_eq(old_addr, new_addr)) {
		__builtin_memcpy(naddr, new_addr, sizeof(naddr));
		__s64 diff = bpf_csum_diff((__be32 *)old_addr, 16, (__be32 *)naddr, 16, 0);

		if (diff < 0)
			return -1;
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangled))
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, naddr, sizeof(naddr), 0))
			return -1;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | sizeof(new_port)))
			return -1;
		if (bpf_skb_store_bytes(skb, l4_off + port_off, &new_port, sizeof(new_port), 0))
			return -1;
	}
	return 0;
}

/* The backend a forward conntrack entry points at, if it still exists with
 * the same address: a removed backend's flows are not silently kept. */
static __always_inline struct sp_backend *ct_backend(const struct sp_ct_val *ct, int syn)
{
	__u32 id = ct->backend_id;
	struct sp_backend *be = bpf_map_lookup_elem(&sp_be_v3, &id);

	if (!be)
		return 0;
	if (!addr_eq(be->addr, ct->nat_addr) || be->port != ct->nat_port)
		return 0;
	if (syn && (be->flags & SP_BE_F_DRAINING))
		return 0;
	return be;
}

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

	if (flags == BPF_NOEXIST && bpf_map_lookup_elem(&sp_ct_v3, k))
		return 0;
	__builtin_memcpy(v.nat_addr, nat_addr, sizeof(v.nat_addr));
	v.nat_port = nat_port;
	if (addr2)
		__builtin_memcpy(v.addr2, addr2, sizeof(v.addr2));
	v.port2 = port2;
	v.backend_id = of->backend_id;
	v.svc_id = of->svc_id;
	v.last_seen = of->last_seen;
	return bpf_map_update_elem(&sp_ct_v3, k, &v, flags);
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

/* What both programs need of an IPv4 TCP/UDP packet. */
struct pkt {
	__u8 saddr[16]; /* IPv4-mapped for IPv4, as in the maps */
	__u8 daddr[16];
	__u32 l4_off;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 v6;
	__u8 syn; /* TCP SYN without ACK: the first packet of a connection */
	__u8 tcp_flags; /* TCP: the header's flags byte (TCP_F_*); else 0 */
};

/* Bits of the TCP flags byte (byte 13 of the header). */
#define TCP_F_FIN 0x01
#define TCP_F_SYN 0x02
#define TCP_F_RST 0x04
#define TCP_F_ACK 0x10

/* Rewrite the destination (dst) or the source of p to addr (16 bytes, the
 * packet's family) and port (network order). */
static __always_inline int rewrite(struct __sk_buff *skb, const struct pkt *p, int dst, const __u8 *addr,
				   __be16 port)
{
	if (p->v6)
		return rewrite_v6(skb, p->l4_off, p->proto, dst ? IP6_DADDR_OFF : IP6_SADDR_OFF, dst ? 2 : 0,
				  dst ? p->daddr : p->saddr, addr, dst ? p->dport : p->sport, port);
	return rewrite_v4(skb, p->l4_off, p->proto, dst ? IP_DADDR_OFF : IP_SADDR_OFF, dst ? 2 : 0,
			  addr_to_v4(dst ? p->daddr : p->saddr), addr_to_v4(addr), dst ? p->dport : p->sport,
			  port);
}

static __always_inline void tcp_flags(struct pkt *p, __u8 flags)
{
	p->tcp_flags = flags;
	p->syn = (flags & (TCP_F_SYN | TCP_F_ACK)) == TCP_F_SYN;
}

/*
 * The length of an IP datagram as its header gives it (IPv4 total length,
 * or IPv6 payload length; `before`: the bytes of the frame before what it
 * counts). 0 in a TCP GSO packet is BIG TCP's "more than 64 KiB": the
 * length is then the skb's, as the kernel reads it (iph_totlen(),
 * ipv6_payload_len() in Linux).
 */
static __always_inline __u32 ip_len(struct __sk_buff *skb, __u32 len, __u8 proto, __u32 before)
{
	if (len == 0 && proto == IPPROTO_TCP && skb->gso_size && skb->len > before)
		return skb->len - before;
	return len;
}

/*
 * Parse Ethernet / IPv4 or IPv6 / TCP or UDP. Returns -1 and fills p for a packet we
 * may own, or the SP_V_PASS_* verdict of one we pass untouched. The TCP or
 * UDP header must lie within the frame and within the IP datagram: bytes
 * past the datagram's length (Ethernet padding, or garbage behind a short
 * length) are no header to translate or track.
 */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth;
	struct iphdr *ip;
	__be16 *ports;
	__u32 l4_off, l4_min, ihl, tot_len;

	/* Headers split over a non-linear skb (GRO, some drivers): pull what
	 * we may need into the linear part, once, before any bound check. */
	if (data + PULL_LEN > data_end && skb->len > (__u32)(data_end - data)) {
		bpf_skb_pull_data(skb, skb->len < PULL_LEN ? skb->len : PULL_LEN);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return SP_V_PASS_TRUNCATED;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return SP_V_PASS_TRUNCATED;
		if (ip6->version != 6)
			return SP_V_PASS_NOT_IP;
		/* Extension headers are not walked: a fragment header, or
		 * any other before TCP/UDP, and the packet is passed. */
		if (ip6->nexthdr == NEXTHDR_FRAGMENT)
			return SP_V_PASS_FRAGMENT;
		if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
			return SP_V_PASS_OTHER_PROTO;
		l4_off = ETH_HLEN + sizeof(*ip6);
		l4_min = ip6->nexthdr == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr);
		if (data + l4_off + l4_min > data_end ||
		    ip_len(skb, bpf_ntohs(ip6->payload_len), ip6->nexthdr, l4_off) < l4_min)
			return SP_V_PASS_TRUNCATED;
		ports = data + l4_off;
		if ((void *)(ports + 2) > data_end)
			return SP_V_PASS_TRUNCATED;
		p->l4_off = l4_off;
		p->proto = ip6->nexthdr;
		p->v6 = 1;
		__builtin_memcpy(p->saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr, &ip6->daddr, 16);
		p->sport = ports[0];
		p->dport = ports[1];
		if (p->proto == IPPROTO_TCP)
			tcp_flags(p, ((__u8 *)ports)[13]);
		return -1;
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return SP_V_PASS_NOT_IP;

	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return SP_V_PASS_TRUNCATED;
	if (ip->version != 4)
		return SP_V_PASS_NOT_IP;
	ihl = ip->ihl;
	if (ihl < 5)
		return SP_V_PASS_TRUNCATED;
	tot_len = ip_len(skb, bpf_ntohs(ip->tot_len), ip->protocol, ETH_HLEN);
	if (tot_len < ihl * 4)
		return SP_V_PASS_TRUNCATED; /* shorter than its own header */
	/* Only the first fragment carries ports, and we do not reassemble. */
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return SP_V_PASS_FRAGMENT;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return SP_V_PASS_OTHER_PROTO;

	l4_off = ETH_HLEN + ihl * 4;
	/* The whole L4 header must be there, in the frame and in the
	 * datagram: we rewrite its checksum. */
	l4_min = ip->protocol == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr);
	if (l4_off > 60 + ETH_HLEN || data + l4_off + l4_min > data_end || ihl * 4 + l4_min > tot_len)
		return SP_V_PASS_TRUNCATED;
	ports = data + l4_off;
	if ((void *)(ports + 2) > data_end)
		return SP_V_PASS_TRUNCATED;

	p->l4_off = l4_off;
	p->proto = ip->protocol;
	addr_from_v4(p->saddr, ip->saddr);
	addr_from_v4(p->daddr, ip->daddr);
	p->sport = ports[0];
	p->dport = ports[1];
	/* The TCP header is whole (checked above): flags are at byte 13. */
	if (p->proto == IPPROTO_TCP)
		tcp_flags(p, ((__u8 *)ports)[13]);
	return -1;
}

/* Is the packet's source allowed by its frontend's loadBalancerSourceRanges? */
static __always_inline int source_allowed(const struct sp_svc_val *svc, const struct pkt *p)
{
	struct sp_src_key k = {};

	if (!(svc->flags & SP_SVC_F_SRC_RANGES))
		return 1;
	k.prefixlen = 32 + 128;
	k.svc_id = svc->svc_id;
	__builtin_memcpy(k.addr, p->saddr, sizeof(k.addr));
	return bpf_map_lookup_elem(&sp_src_v3, &k) != 0;
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

/*
 * Send a packet back into the pod it came from: out of the interface it
 * came in by, with the Ethernet addresses swapped (the pod addressed the
 * frame to the host side; it takes only frames addressed to itself).
 * Returns the tc action, or -1 when the frame could not be rewritten.
 *
 * Both directions of a hairpin flow take this short cut, so they never
 * enter the node's IP stack: netfilter's conntrack sees none of the flow
 * rather than half of it (a reply it never saw the request of is INVALID,
 * which many rulesets drop), and neither routing nor rp_filter has to
 * accept the hairpin address, which is routed nowhere on the node.
 */
static __always_inline int reflect(struct __sk_buff *skb)
{
	__u8 macs[2 * ETH_ALEN], swapped[2 * ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, macs, sizeof(macs)))
		return -1;
	__builtin_memcpy(swapped, macs + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(swapped + ETH_ALEN, macs, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, swapped, sizeof(swapped), 0))
		return -1;
	return bpf_redirect(skb->ifindex, 0);
}

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

/*
 * A packet to a frontend of this scope gets a backend and its destination
 * rewritten (DNAT). Shared by the pod ingress (scope internal) and the
 * external ingress (scope external).
 */
static __always_inline int dnat(struct __sk_buff *skb, struct pkt *p, __u8 scope)
{
	struct sp_svc_key skey = {};
	struct sp_ct_key ckey = {};
	struct sp_ct_val *ct, nct = {};
	struct sp_svc_val *svc;
	struct sp_backend *be;
	__u64 now;

	__builtin_memcpy(skey.addr, p->daddr, sizeof(skey.addr));
	skey.port = bpf_ntohs(p->dport);
	skey.proto = p->proto;
	skey.scope = scope;
	svc = bpf_map_lookup_elem(&sp_svc_v3, &skey);
	if (!svc)
		return count(skb, SP_V_PASS_NO_SERVICE, TC_ACT_OK);
	/* kube-proxy's firewall chain: before any conntrack, every packet. */
	if (!source_allowed(svc, p))
		return count(skb, SP_V_DROP_SOURCE_RANGE, TC_ACT_SHOT);

	now = now_ns();
	ct_key(&ckey, p->saddr, p->daddr, bpf_ntohs(p->sport), bpf_ntohs(p->dport), p->proto, SP_CT_FORWARD);
	ct = bpf_map_lookup_elem(&sp_ct_v3, &ckey);
	if (ct && ct->svc_id == svc->svc_id && ct_backend(ct, p->syn)) {
		ct->last_seen = now;
		/* The LRU may evict the reply entry alone: put it back, or the
		 * backend's answers would reach the client unrewritten. */
		put_reply(&ckey, &skey, ct, BPF_NOEXIST);
		/* The same for a masqueraded flow's SNAT entry, with the port
		 * it had (port2), so the backend keeps seeing one connection. */
		if (svc->flags & SP_SVC_F_MASQ)
			put_snat(&ckey, ct, BPF_NOEXIST);
		return dnat_to(skb, p, scope, ct->nat_addr, ct->nat_port, SP_V_DNAT_ESTABLISHED);
	}

	/* A new flow (or one whose backend went away): pick a slot. The
	 * control plane writes slots before raising count, and lowers count
	 * before deleting slots, so every slot below count exists. */
	__u32 n = svc->count;
	if (n == 0)
		return count(skb, SP_V_DROP_NO_BACKEND, TC_ACT_SHOT);
	struct sp_slot_key slkey = {
		.svc_id = svc->svc_id,
		.slot = bpf_get_prandom_u32() % n,
	};
	struct sp_slot_val *sl;
	struct sp_aff_key akey = {};
	struct sp_aff_val *aff = 0;
	__u32 be_id = 0;
	int sticky = 0;

	if (svc->flags & SP_SVC_F_AFFINITY) {
		/* ClientIP affinity: the backend of this client's last new
		 * flow, if recent enough and still in the slot it came from
		 * (a slot rewritten by a removal ends the affinity, as a
		 * removed endpoint does in kube-proxy). */
		akey.svc_id = svc->svc_id;
		__builtin_memcpy(akey.addr, ckey.saddr, sizeof(akey.addr));
		aff = bpf_map_lookup_elem(&sp_aff_v3, &akey);
		if (aff && idle_ns(now, aff->last_used) < (__u64)svc->affinity_timeout * 1000000000ULL &&
		    aff->slot < n) {
			struct sp_slot_key ak = { .svc_id = svc->svc_id, .slot = aff->slot };
			sl = bpf_map_lookup_elem(&sp_slot_v3, &ak);
			if (sl && sl->backend_id == aff->backend_id) {
				slkey.slot = aff->slot;
				sticky = 1;
			}
		}
	}
	sl = bpf_map_lookup_elem(&sp_slot_v3, &slkey);
	if (!sl)
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	be_id = sl->backend_id;
	if (svc->flags & SP_SVC_F_AFFINITY) {
		struct sp_aff_val av = { .backend_id = be_id, .slot = slkey.slot, .last_used = now };

		if (sticky && aff)
			aff->last_used = now;
		else
			bpf_map_update_elem(&sp_aff_v3, &akey, &av, BPF_ANY);
	}
	be = bpf_map_lookup_elem(&sp_be_v3, &be_id);
	/* A backend of the other family would mean maps that disagree: the
	 * control plane never mixes families in one frontend. */
	if (!be || addr_is_v4(be->addr) == p->v6)
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);

	__builtin_memcpy(nct.nat_addr, be->addr, sizeof(nct.nat_addr));
	nct.nat_port = be->port;
	nct.backend_id = be_id;
	nct.svc_id = svc->svc_id;
	nct.last_seen = now;
	if (bpf_map_update_elem(&sp_ct_v3, &ckey, &nct, BPF_ANY))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);

	if (put_reply(&ckey, &skey, &nct, BPF_ANY))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	/* Masquerade candidate: if the flow leaves through an external
	 * interface (its backend is on another node), that interface's egress
	 * allocates the port. A flow to a local pod never gets there. */
	if ((svc->flags & SP_SVC_F_MASQ) && put_snat(&ckey, &nct, BPF_ANY))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);

	return dnat_to(skb, p, scope, nct.nat_addr, nct.nat_port, SP_V_DNAT_NEW);
}

/* A reply of a flow we DNATed: its source back to the frontend. */
static __always_inline int revnat(struct __sk_buff *skb, struct pkt *p)
{
	struct sp_ct_key ckey = {};
	struct sp_ct_val *ct;

	ct_key(&ckey, p->saddr, p->daddr, bpf_ntohs(p->sport), bpf_ntohs(p->dport), p->proto, SP_CT_REPLY);
	ct = bpf_map_lookup_elem(&sp_ct_v3, &ckey);
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

/* ICMP and ICMPv6 error types that quote the packet they are about
 * (linux/icmp.h and linux/icmpv6.h, whose userspace includes pull in
 * libc headers a BPF build does not have). */
#define ICMP_DEST_UNREACH 3
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PKT_TOOBIG 2
#define ICMPV6_TIME_EXCEED 3
#define ICMPV6_PARAMPROB 4
/* The checksum of both is at byte 2 of their header; the quoted packet
 * starts at byte 8 (RFC 792, RFC 4443). */
#define ICMP_CSUM_OFF 2
#define ICMP_QUOTE_OFF 8

/*
 * An ICMP error about a TCP or UDP packet: the quoted packet's tuple and
 * where the parts are. parse_icmp() takes only errors addressed to the
 * quoted packet's sender, so the outer destination is saddr; from_dst
 * says whether the outer source is daddr. Small on purpose: it lives on
 * the stack of programs that also run dnat() (512 bytes in all).
 */
struct icmp_err {
	__u8 saddr[16]; /* the quoted packet's source and destination, map form */
	__u8 daddr[16];
	__u32 icmp_off; /* the ICMP header */
	__u32 ip_off;   /* the quoted IP header */
	__u32 l4_off;   /* the quoted TCP/UDP header */
	__u32 end;      /* end of the outer IP packet: nothing beyond is read
			 * or written (Ethernet padding, a lying length) */
	__be16 sport;   /* the quoted ports, network order */
	__be16 dport;
	__u8 proto;    /* the quoted IPPROTO_TCP or IPPROTO_UDP */
	__u8 v6;
	__u8 from_dst; /* the error comes from the quoted destination */
	__u8 pad;
};

static __always_inline int icmp_error_type(__u8 type, int v6)
{
	if (v6)
		return type == ICMPV6_DEST_UNREACH || type == ICMPV6_PKT_TOOBIG || type == ICMPV6_TIME_EXCEED ||
		       type == ICMPV6_PARAMPROB;
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

/*
 * Parse an ICMP (IPv4) or ICMPv6 error quoting a TCP or UDP packet: 0 and
 * ie filled, or -1 for anything else. Its own parser, not parse(): only
 * packets parse() found neither TCP nor UDP come here. Headers are copied
 * out with bpf_skb_load_bytes (the quoted IP header's options move what
 * follows it; copies need no packet bounds proofs), and the outer IP length
 * bounds every read: a quote may be cut anywhere after its ports (RFC 792
 * promises 8 bytes of the quoted L4 header). A subprogram, not inlined:
 * its buffers take stack only while it runs.
 */
static __noinline int parse_icmp(struct __sk_buff *skb, struct icmp_err *ie)
{
	/* One buffer for each header in turn; h6: an IPv6 header's fixed
	 * part before its addresses (version, payload length, next header). */
	union {
		struct iphdr ip;
		__u8 h6[8];
	} h;
	__u8 osrc[16], odst[16];
	__be16 proto;
	__u8 type;

	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)))
		return -1;
	if (proto == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &h.ip, sizeof(h.ip)))
			return -1;
		if (h.ip.version != 4 || h.ip.ihl < 5 || h.ip.protocol != IPPROTO_ICMP ||
		    (h.ip.frag_off & bpf_htons(IP_MF | IP_OFFSET)))
			return -1;
		ie->end = ETH_HLEN + bpf_ntohs(h.ip.tot_len);
		ie->icmp_off = ETH_HLEN + h.ip.ihl * 4;
		ie->ip_off = ie->icmp_off + ICMP_QUOTE_OFF;
		if (ie->end > skb->len || ie->ip_off + sizeof(h.ip) > ie->end)
			return -1;
		addr_from_v4(osrc, h.ip.saddr);
		addr_from_v4(odst, h.ip.daddr);
		if (bpf_skb_load_bytes(skb, ie->icmp_off, &type, 1) || !icmp_error_type(type, 0))
			return -1;
		if (bpf_skb_load_bytes(skb, ie->ip_off, &h.ip, sizeof(h.ip)))
			return -1;
		/* A quoted fragment other than the first has no ports. */
		if (h.ip.version != 4 || h.ip.ihl < 5 || (h.ip.frag_off & bpf_htons(IP_OFFSET)))
			return -1;
		ie->proto = h.ip.protocol;
		ie->l4_off = ie->ip_off + h.ip.ihl * 4;
		addr_from_v4(ie->saddr, h.ip.saddr);
		addr_from_v4(ie->daddr, h.ip.daddr);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN, h.h6, sizeof(h.h6)))
			return -1;
		/* As parse(): extension headers are not walked. */
		if (h.h6[0] >> 4 != 6 || h.h6[6] != IPPROTO_ICMPV6)
			return -1;
		ie->end = ETH_HLEN + sizeof(struct ipv6hdr) + (h.h6[4] << 8 | h.h6[5]);
		ie->icmp_off = ETH_HLEN + sizeof(struct ipv6hdr);
		ie->ip_off = ie->icmp_off + ICMP_QUOTE_OFF;
		if (ie->end > skb->len || ie->ip_off + sizeof(struct ipv6hdr) > ie->end)
			return -1;
		if (bpf_skb_load_bytes(skb, IP6_SADDR_OFF, osrc, 16) || bpf_skb_load_bytes(skb, IP6_DADDR_OFF, odst, 16))
			return -1;
		if (bpf_skb_load_bytes(skb, ie->icmp_off, &type, 1) || !icmp_error_type(type, 1))
			return -1;
		if (bpf_skb_load_bytes(skb, ie->ip_off, h.h6, sizeof(h.h6)) || h.h6[0] >> 4 != 6)
			return -1;
		ie->v6 = 1;
		ie->proto = h.h6[6];
		ie->l4_off = ie->ip_off + sizeof(struct ipv6hdr);
		if (bpf_skb_load_bytes(skb, ie->ip_off + offsetof(struct ipv6hdr, saddr), ie->saddr, 16) ||
		    bpf_skb_load_bytes(skb, ie->ip_off + offsetof(struct ipv6hdr, daddr), ie->daddr, 16))
			return -1;
	} else {
		return -1;
	}
	if (ie->proto != IPPROTO_TCP && ie->proto != IPPROTO_UDP)
		return -1;
	/* An error goes to the sender of the packet it quotes (RFC 1122
	 * 3.2.2, RFC 4443 2.2); anything else is not one to translate. */
	if (!addr_eq(odst, ie->saddr))
		return -1;
	ie->from_dst = addr_eq(osrc, ie->daddr);
	if (ie->l4_off + 4 > ie->end || bpf_skb_load_bytes(skb, ie->l4_off, &ie->sport, 4))
		return -1;
	return 0;
}

/*
 * The three steps of icmp_rewrite(): the quoted TCP/UDP checksum; the
 * quoted port and address; the outer address. Subprograms, not inlined:
 * their spills take stack only while they run, on top of the frame of the
 * program that calls them, which dnat() fills to 344-392 of the 512 bytes
 * a BPF program has in all. Each returns 0, or -1 when a helper failed.
 */
static __noinline int icmp_rewrite_l4csum(struct __sk_buff *skb, const struct icmp_err *ie, int dst, const __u8 *addr,
					  __be16 port)
{
	const __u32 *ow = (const __u32 *)(dst ? ie->daddr : ie->saddr);
	const __u32 *nw = (const __u32 *)addr;
	__be16 oport = dst ? ie->dport : ie->sport;
	__u32 l4csum = ie->l4_off + (ie->proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
	__u64 mangled = ie->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	int first = ie->v6 ? 0 : 3;
	__u16 before, after;

	if (l4csum + 2 > ie->end)
		return 0;
	if (bpf_skb_load_bytes(skb, l4csum, &before, 2))
		return -1;
#pragma unroll
	for (int i = 0; i < 4; i++)
		if (i >= first && ow[i] != nw[i] &&
		    bpf_l4_csum_replace(skb, l4csum, ow[i], nw[i], mangled | sizeof(__u32)))
			return -1;
	if (oport != port && bpf_l4_csum_replace(skb, l4csum, oport, port, mangled | sizeof(port)))
		return -1;
	if (bpf_skb_load_bytes(skb, l4csum, &after, 2))
		return -1;
	if (before != after && bpf_l4_csum_replace(skb, ie->icmp_off + ICMP_CSUM_OFF, before, after, sizeof(after)))
		return -1;
	return 0;
}

static __noinline int icmp_rewrite_quote(struct __sk_buff *skb, const struct icmp_err *ie, int dst, const __u8 *addr,
					 __be16 port)
{
	const __u32 *ow = (const __u32 *)(dst ? ie->daddr : ie->saddr);
	const __u32 *nw = (const __u32 *)addr;
	__be16 oport = dst ? ie->dport : ie->sport;
	__u32 icsum = ie->icmp_off + ICMP_CSUM_OFF;
	int v6 = ie->v6, first = v6 ? 0 : 3;

	if (oport != port) {
		if (bpf_l4_csum_replace(skb, icsum, oport, port, sizeof(port)) ||
		    bpf_skb_store_bytes(skb, ie->l4_off + (dst ? 2 : 0), &port, sizeof(port), 0))
			return -1;
	}
	/* The quoted address: offset by the quoted IPv4 header checksum, which
	 * the ICMP checksum covers too; IPv6 has none, the ICMPv6 checksum
	 * takes the change. */
#pragma unroll
	for (int i = 0; i < 4; i++)
		if (i >= first && ow[i] != nw[i] &&
		    (v6 ? bpf_l4_csum_replace(skb, icsum, ow[i], nw[i], sizeof(__u32))
			: bpf_l3_csum_replace(skb, ie->ip_off + offsetof(struct iphdr, check), ow[i], nw[i],
					      sizeof(__u32))))
			return -1;
	if (v6)
		return bpf_skb_store_bytes(skb, ie->ip_off + (dst ? offsetof(struct ipv6hdr, daddr)
								   : offsetof(struct ipv6hdr, saddr)),
					   addr, 16, 0);
	return bpf_skb_store_bytes(skb, ie->ip_off + (dst ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr)),
				   addr + 12, 4, 0);
}

static __noinline int icmp_rewrite_outer(struct __sk_buff *skb, const struct icmp_err *ie, int dst, const __u8 *addr)
{
	const __u32 *ow = (const __u32 *)(dst ? ie->daddr : ie->saddr);
	const __u32 *nw = (const __u32 *)addr;
	__u32 icsum = ie->icmp_off + ICMP_CSUM_OFF;
	int v6 = ie->v6, first = v6 ? 0 : 3;

	/* The IPv4 header checksum, or the ICMPv6 pseudo-header. */
#pragma unroll
	for (int i = 0; i < 4; i++)
		if (i >= first && ow[i] != nw[i] &&
		    (v6 ? bpf_l4_csum_replace(skb, icsum, ow[i], nw[i], sizeof(__u32))
			: bpf_l3_csum_replace(skb, IP_CSUM_OFF, ow[i], nw[i], sizeof(__u32))))
			return -1;
	if (v6)
		return bpf_skb_store_bytes(skb, dst ? IP6_SADDR_OFF : IP6_DADDR_OFF, addr, 16, 0);
	return bpf_skb_store_bytes(skb, dst ? IP_SADDR_OFF : IP_DADDR_OFF, addr + 12, 4, 0);
}

/*
 * Rewrite the quoted packet's source (dst 0) or destination (dst 1) to
 * addr:port (map form, network order), and the outer address that named
 * the same host: the outer destination for a quoted source (always: an
 * error goes to the quoted sender; the node's SNAT address becomes the
 * client), the outer source for a quoted destination when the error came
 * from there (a backend reporting on a packet sent to it becomes the
 * frontend). An outer source naming another host, a router on the way,
 * stays. 0, or -1 when a helper failed.
 *
 * Checksums: the quoted IPv4 header's, the quoted TCP/UDP checksum when
 * the quote holds it (its pseudo-header has the address), and the ICMP
 * checksum over the whole quote (ICMPv6: and over the outer addresses, in
 * its pseudo-header). Every change inside the ICMP message is offset by a
 * checksum inside it, and an outer IPv6 address by the ICMPv6 checksum: the
 * sum over the packet stays what it was, so a CHECKSUM_COMPLETE skb->csum
 * stays right and no BPF_F_PSEUDO_HDR is used (it would adjust skb->csum).
 * An ICMP error is never CHECKSUM_PARTIAL (stacks checksum it when they
 * build it), which the plain replaces rely on.
 */
static __always_inline int icmp_rewrite(struct __sk_buff *skb, const struct icmp_err *ie, int dst, const __u8 *addr,
					__be16 port)
{
	if (icmp_rewrite_l4csum(skb, ie, dst, addr, port) || icmp_rewrite_quote(skb, ie, dst, addr, port))
		return -1;
	if (dst && !ie->from_dst)
		return 0;
	return icmp_rewrite_outer(skb, ie, dst, addr);
}

/*
 * The flow an ICMP error is about, from its conntrack entry of direction
 * dir. The quoted packet went the other way from the error, so the entry
 * is keyed by the quoted tuple reversed: an error travelling like a reply
 * (to the client) quotes a forward packet, client -> backend, and finds the
 * flow's reply entry backend -> client; one travelling like a request
 * quotes a reply and finds the forward entry.
 */
static __always_inline struct sp_ct_val *icmp_flow(const struct icmp_err *ie, __u8 dir)
{
	struct sp_ct_key k = {};
	struct sp_ct_val *ct;

	ct_key(&k, ie->daddr, ie->saddr, bpf_ntohs(ie->dport), bpf_ntohs(ie->sport), ie->proto, dir);
	ct = bpf_map_lookup_elem(&sp_ct_v3, &k);
	/* An SNAT entry without a port: the flow never left the node. */
	if (!ct || addr_is_v4(ct->nat_addr) == ie->v6 || (dir == SP_CT_SNAT && !ct->nat_port))
		return 0;
	return ct;
}

/*
 * Translate an ICMP error as the flow's own packets in its direction are:
 * through the flow's entry of direction dir (icmp_flow), whose address and
 * port replace the quoted destination (reply and SNAT entries: the error
 * goes to the client, or out masqueraded) or the quoted source (forward
 * and UNSNAT entries). Counted as verdict; -1: no such flow.
 */
static __always_inline int icmp_xlate(struct __sk_buff *skb, const struct icmp_err *ie, __u8 dir, __u32 verdict)
{
	struct sp_ct_val *ct = icmp_flow(ie, dir);

	if (!ct)
		return -1;
	if (icmp_rewrite(skb, ie, dir == SP_CT_REPLY || dir == SP_CT_SNAT, ct->nat_addr, bpf_htons(ct->nat_port)))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	return count(skb, verdict, TC_ACT_OK);
}

/*
 * An ICMP error a pod sends. About a reply it got from a frontend (its
 * socket is gone: port unreachable): to the flow's backend, as the pod's
 * own packets of the flow are. About a hairpin flow it serves (sent to the
 * hairpin address): back into the pod, as if from the frontend, about the
 * packet the pod sent as client. -1: neither.
 */
static __always_inline int icmp_from_pod(struct __sk_buff *skb)
{
	struct icmp_err ie = {};
	const __u8 *hp;
	struct sp_ct_val *ct;
	int act;

	if (parse_icmp(skb, &ie))
		return -1;
	hp = hairpin_addr(ie.v6);
	if (!hp || !addr_eq(ie.saddr, hp))
		return icmp_xlate(skb, &ie, SP_CT_FORWARD, SP_V_DNAT_ESTABLISHED);
	/* It quotes hairpin -> pod:backend port; the pod sent pod -> frontend. */
	ct = icmp_flow(&ie, SP_CT_REPLY);
	if (!ct)
		return -1;
	if (icmp_rewrite(skb, &ie, 1, ct->nat_addr, bpf_htons(ct->nat_port)) ||
	    icmp_rewrite(skb, &ie, 0, ie.daddr, ie.sport))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	act = reflect(skb);
	return act < 0 ? count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT) : count(skb, SP_V_REVNAT, act);
}

/*
 * An ICMP error leaving through an interface's egress (to a pod, or out of
 * the node). About a flow's request (client -> backend, quoted by the
 * backend or a router on the way): reverse NAT, as the flow's replies. At
 * an external interface also about a masqueraded flow's reply (backend ->
 * client, quoted by the client or a router near it, on its way to the
 * backend): masqueraded, as the flow's requests. -1: neither.
 */
static __always_inline int icmp_out(struct __sk_buff *skb, int external)
{
	struct icmp_err ie = {};
	int v;

	if (parse_icmp(skb, &ie))
		return -1;
	v = icmp_xlate(skb, &ie, SP_CT_REPLY, SP_V_REVNAT);
	if (v >= 0 || !external)
		return v;
	return icmp_xlate(skb, &ie, SP_CT_SNAT, SP_V_SNAT);
}

/*
 * An ICMP error arriving at an external interface. About a masqueraded
 * flow's request (node:SNAT port -> backend): its quoted source and outer
 * destination back to the client, as UNSNAT does for the flow's replies;
 * the client's interface then reverses the DNAT (icmp_out). About a reply
 * an outside client got (frontend -> client): to the flow's backend, as
 * the flow's requests. -1: neither.
 */
static __always_inline int icmp_ext_in(struct __sk_buff *skb)
{
	struct icmp_err ie = {};
	int v;

	if (parse_icmp(skb, &ie))
		return -1;
	v = icmp_xlate(skb, &ie, SP_CT_UNSNAT, SP_V_UNSNAT);
	if (v >= 0)
		return v;
	return icmp_xlate(skb, &ie, SP_CT_FORWARD, SP_V_DNAT_ESTABLISHED);
}

/*
 * Ingress of the host side of a pod interface: packets the pod sends. A
 * packet to a frontend is given a backend and its destination rewritten
 * (DNAT), before netfilter and routing see it. Replies are not touched here:
 * see sp_tc_egress.
 */
SEC("tc")
int sp_tc_ingress(struct __sk_buff *skb)
{
	struct pkt p = {};
	int v, icmp;

	v = parse(skb, &p);
	if (v == SP_V_PASS_OTHER_PROTO && (icmp = icmp_from_pod(skb)) >= 0)
		return icmp;
	if (v >= 0)
		return count(skb, v, TC_ACT_OK);
	v = hairpin_reply(skb, &p);
	if (v >= 0)
		return v;
	return dnat(skb, &p, SP_SCOPE_INTERNAL);
}

/*
 * Egress of the host side of a pod interface: packets on their way into the
 * pod. A reply of a flow we DNATed gets its source rewritten back to the
 * frontend the client talked to. Here, after netfilter and routing, the
 * kernel's own conntrack has seen the reply as backend -> client, matching
 * the client -> backend it saw for the request (a rewrite at the backend's
 * ingress would show it a reply that matches nothing, INVALID to rulesets
 * that drop those). And it works wherever the backend is: a local pod, or
 * another node whose reply reaches this pod through the node's uplink.
 */
SEC("tc")
int sp_tc_egress(struct __sk_buff *skb)
{
	struct pkt p = {};
	int v, icmp;

	v = parse(skb, &p);
	if (v == SP_V_PASS_OTHER_PROTO && (icmp = icmp_out(skb, 0)) >= 0)
		return icmp;
	if (v >= 0)
		return count(skb, v, TC_ACT_OK);
	v = revnat(skb, &p);
	if (v >= 0)
		return v;
	return count(skb, SP_V_PASS_NO_FLOW, TC_ACT_OK);
}

/*
 * Ingress of an external interface (the node's uplink): packets from
 * outside. A reply of a masqueraded flow (backend -> node:SNAT port) gets
 * only its destination back to the client: its source stays the backend,
 * as netfilter's conntrack expects (it saw client -> backend), and the
 * kernel routes it to the client, whose interface's egress reverses the
 * DNAT. Anything else to an external-scope frontend (NodePort on a node
 * address, a LoadBalancer IP, an externalIP) is DNATed.
 */
SEC("tc")
int sp_ext_ingress(struct __sk_buff *skb)
{
	struct sp_ct_key ukey = {};
	struct sp_ct_val *ct;
	struct pkt p = {};
	int v, icmp;

	v = parse(skb, &p);
	if (v == SP_V_PASS_OTHER_PROTO && (icmp = icmp_ext_in(skb)) >= 0)
		return icmp;
	if (v >= 0)
		return count(skb, v, TC_ACT_OK);

	ct_key(&ukey, p.saddr, p.daddr, bpf_ntohs(p.sport), bpf_ntohs(p.dport), p.proto, SP_CT_UNSNAT);
	ct = bpf_map_lookup_elem(&sp_ct_v3, &ukey);
	if (ct) {
		/* The stamp first, then the client it names (see ct_touch).
		 * A port being handed to another flow was idle past its hold:
		 * this late packet of the flow that lost it is dropped, as is
		 * one that found the entry changing too often (TCP resends). */
		if (ct_touch(ct, now_ns()))
			return count(skb, SP_V_DROP_SNAT, TC_ACT_SHOT);
		if (addr_is_v4(ct->nat_addr) != p.v6) {
			track_close(ct, &p, 1);
			if (rewrite(skb, &p, 1, ct->nat_addr, bpf_htons(ct->nat_port)))
				return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
			return count(skb, SP_V_UNSNAT, TC_ACT_OK);
		}
	}
	return dnat(skb, &p, SP_SCOPE_EXTERNAL);
}

/* Tries at finding a free SNAT port: one random start, then the next
 * ports. A bounded loop the verifier unrolls. */
#define SNAT_TRIES 32

/*
 * Egress of an external interface: packets leaving the node. A reply to an
 * outside client gets its source back to the frontend (as at a pod's
 * egress). A masqueraded flow's packet (external traffic, policy Cluster,
 * DNATed to a backend on another node: only such flows are routed out here)
 * gets the node's address and an SNAT port as its source, after netfilter
 * saw it as client -> backend.
 */
SEC("tc")
int sp_ext_egress(struct __sk_buff *skb)
{
	struct sp_ct_key skey = {};
	struct sp_ct_val *ct;
	struct sp_cfg *cfg;
	struct pkt p = {};
	__u32 zero = 0;
	__u64 now;
	int v, icmp;

	v = parse(skb, &p);
	if (v == SP_V_PASS_OTHER_PROTO && (icmp = icmp_out(skb, 1)) >= 0)
		return icmp;
	if (v >= 0)
		return count(skb, v, TC_ACT_OK);
	v = revnat(skb, &p);
	if (v >= 0)
		return v;

	ct_key(&skey, p.saddr, p.daddr, bpf_ntohs(p.sport), bpf_ntohs(p.dport), p.proto, SP_CT_SNAT);
	ct = bpf_map_lookup_elem(&sp_ct_v3, &skey);
	if (!ct)
		return count(skb, SP_V_PASS_NO_FLOW, TC_ACT_OK);
	now = now_ns();
	ct->last_seen = now;
	if (ct->nat_port) {
		struct sp_ct_key ok = {};
		struct sp_ct_val *u;
		int t = 0;

		ct_key(&ok, skey.daddr, ct->nat_addr, skey.dport, ct->nat_port, skey.proto, SP_CT_UNSNAT);
		u = bpf_map_lookup_elem(&sp_ct_v3, &ok);
		if (!u) {
			/* Put back an UNSNAT entry the LRU evicted. */
			put_unsnat(&skey, ct, ct->nat_port, BPF_NOEXIST);
			u = bpf_map_lookup_elem(&sp_ct_v3, &ok);
		}
		if (u)
			t = ct_touch(u, now);
		if (t == TOUCH_BUSY)
			return count(skb, SP_V_DROP_SNAT, TC_ACT_SHOT);
		/* Refreshed, and the entry still names this client: the port
		 * is the flow's. Otherwise (being claimed, or naming another
		 * client) the flow was idle past its hold and the port went
		 * to another flow: this one gets a new port below. */
		if (!u || (!t && addr_eq(u->nat_addr, skey.saddr) && u->nat_port == skey.sport)) {
			if (u)
				track_close(u, &p, 0);
			if (addr_is_v4(ct->nat_addr) == p.v6 ||
			    rewrite(skb, &p, 0, ct->nat_addr, bpf_htons(ct->nat_port)))
				return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
			return count(skb, SP_V_SNAT, TC_ACT_OK);
		}
	}

	/* The first packet of the flow out here: a node address and a port. */
	cfg = bpf_map_lookup_elem(&sp_cfg_v3, &zero);
	if (!cfg)
		return count(skb, SP_V_DROP_SNAT, TC_ACT_SHOT);
	const __u8 *node = p.v6 ? cfg->addr6 : cfg->addr4;
	const __u32 *w = (const __u32 *)node;
	if (!(w[0] | w[1] | w[2] | w[3]))
		return count(skb, SP_V_DROP_SNAT, TC_ACT_SHOT);
	__u32 lo = cfg->snat_port_min, hi = cfg->snat_port_max;
	if (lo == 0 || hi < lo)
		return count(skb, SP_V_DROP_SNAT, TC_ACT_SHOT);
	__u32 span = hi - lo + 1;
	__u32 start = bpf_get_prandom_u32() % span;
	struct sp_ct_key uk = {};
	struct sp_ct_val uv = {};
	__u16 port = 0;

	ct_key(&uk, skey.daddr, node, skey.dport, 0, skey.proto, SP_CT_UNSNAT); /* dport: each try below */
	__builtin_memcpy(uv.nat_addr, skey.saddr, sizeof(uv.nat_addr));
	uv.nat_port = skey.sport;
	uv.backend_id = ct->backend_id;
	uv.svc_id = ct->svc_id;
	uv.last_seen = now;
	/* A late packet of a flow whose port was given away comes here for a
	 * new one: its RST is recorded, so that port is held for the closed
	 * grace only (the backend, which knows no such connection, answers
	 * anything else with an RST, recorded at ingress). */
	if (p.tcp_flags & TCP_F_RST)
		uv.flags = SP_CT_F_RST;
	for (int i = 0; i < SNAT_TRIES; i++) {
		__u16 cand = lo + (start + i) % span;
		struct sp_ct_val *old, claim;
		__u64 hold, s;

		uk.dport = cand;
		/* Collision probe: a port is free for this backend when no
		 * UNSNAT entry holds it, or the one that does has been idle
		 * longer than its flow's hold (snat_hold: snat_reclaim, or
		 * shorter once its TCP connection closed). */
		old = bpf_map_lookup_elem(&sp_ct_v3, &uk);
		if (!old) {
			/* The map's bucket lock makes this insert atomic. */
			if (bpf_map_update_elem(&sp_ct_v3, &uk, &uv, BPF_NOEXIST))
				continue; /* taken by another CPU meanwhile */
			port = cand;
			break;
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
		claim = uv;
		claim.last_seen = CT_CLAIMING;
		__builtin_memcpy(old, &claim, sizeof(claim));
		__sync_val_compare_and_swap(&old->last_seen, CT_CLAIMING, now);
		port = cand;
		break;
	}
	if (!port)
		return count(skb, SP_V_DROP_SNAT, TC_ACT_SHOT);
	__builtin_memcpy(ct->nat_addr, node, sizeof(ct->nat_addr));
	ct->nat_port = port;

	/* Remember the port in the forward entry (found through the frontend
	 * in addr2/port2), so an evicted SNAT entry comes back the same. */
	struct sp_ct_key fk = {};
	struct sp_ct_val *fwd;

	ct_key(&fk, skey.saddr, ct->addr2, skey.sport, ct->port2, skey.proto, SP_CT_FORWARD);
	fwd = bpf_map_lookup_elem(&sp_ct_v3, &fk);
	if (fwd) {
		__builtin_memcpy(fwd->addr2, node, sizeof(fwd->addr2));
		fwd->port2 = port;
	}
	if (rewrite(skb, &p, 0, node, bpf_htons(port)))
		return count(skb, SP_V_DROP_ERROR, TC_ACT_SHOT);
	return count(skb, SP_V_SNAT, TC_ACT_OK);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
