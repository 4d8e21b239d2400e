/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * sliceproxy: every map key and value the dataplane and the control plane
 * share. This header is the single source of truth for their layouts: the
 * control plane feeds the block between the sp:layout markers to cffi and
 * checks the result against the BTF of the compiled object at start.
 *
 * Byte order: addresses are 16 raw bytes in network byte order; an IPv4
 * address is stored IPv4-mapped (::ffff:a.b.c.d), so one layout serves both
 * families. Every other multi-byte integer (ports, ids, counts, timeouts) is
 * in host byte order, so `bpftool map dump` prints them as plain numbers.
 *
 * Every struct has explicit padding and no implicit holes: the same bytes
 * on both sides of the syscall, whatever the compiler.
 *
 * Map names carry a layout version (`_v4`): a layout change is a new map
 * name, never a silent misread of an old pinned map.
 */
#ifndef SLICEPROXY_H
#define SLICEPROXY_H

#include <linux/types.h>

/* sp:layout:begin */

#define SP_LAYOUT_VERSION 5

/* Where the traffic for a frontend comes from. Part of the frontend key so
 * a service can answer in-cluster and external clients differently in one
 * lookup (traffic policies). */
#define SP_SCOPE_INTERNAL 0
#define SP_SCOPE_EXTERNAL 1

/* Conntrack direction, part of the conntrack key. */
#define SP_CT_FORWARD 0 /* client -> frontend: value holds the backend */
#define SP_CT_REPLY 1   /* backend -> client: value holds the frontend */
/* Masquerade of external flows (externalTrafficPolicy Cluster) whose
 * backend is on another node: the SNAT happens at the external interface's
 * egress, which only packets routed off the node reach. */
#define SP_CT_SNAT 2   /* client -> backend (after DNAT): value holds the node
			* address and SNAT port (0: none allocated yet) and,
			* in addr2/port2, the frontend */
#define SP_CT_UNSNAT 3 /* backend -> node:SNAT port: value holds the client */

/* Index into the per-CPU counters map: one slot per verdict. */
enum sp_verdict {
	SP_V_PASS_NOT_IP = 0,      /* neither IPv4 nor IPv6: passed untouched */
	SP_V_PASS_TRUNCATED = 1,   /* headers shorter than they claim, or an IP
				    * length too short for them: passed */
	SP_V_PASS_FRAGMENT = 2,    /* IP fragment other than the first whose
				    * first fragment was not translated (or
				    * not seen yet): passed untouched */
	SP_V_PASS_OTHER_PROTO = 3, /* neither TCP nor UDP: passed */
	SP_V_PASS_NO_SERVICE = 4,  /* ingress: no frontend: passed */
	SP_V_DNAT_NEW = 5,         /* new flow: backend chosen and rewritten */
	SP_V_DNAT_ESTABLISHED = 6, /* known flow: its backend kept */
	SP_V_REVNAT = 7,           /* egress: reply's source back to the frontend */
	SP_V_DROP_NO_BACKEND = 8,  /* frontend with no backend and no
				    * SP_SVC_F_REJECT (a Local traffic policy
				    * with no local endpoint), or a source no
				    * error may be sent to: dropped */
	SP_V_DROP_ERROR = 9,       /* inconsistent maps or a failed rewrite */
	SP_V_PASS_NO_FLOW = 10,    /* egress: not a reply of a tracked flow */
	SP_V_SNAT = 11,            /* external egress: source masqueraded */
	SP_V_UNSNAT = 12,          /* external ingress: a masqueraded reply's
				    * destination back to the client */
	SP_V_DROP_SOURCE_RANGE = 13, /* source outside loadBalancerSourceRanges */
	SP_V_DROP_SNAT = 14,       /* no node address or no free SNAT port */
	SP_V_REJECT_NO_BACKEND = 15, /* frontend with no backend, flagged
				      * SP_SVC_F_REJECT: answered with an ICMP
				      * port unreachable, sent back to the
				      * client */
	SP_V_FRAGMENT = 16,        /* IP fragment other than the first, given
				    * what its first fragment got: the same
				    * address rewrite, sent the same way, or
				    * dropped (see sp_frag_v5) */
	SP_V_XDP_TX = 17,          /* external interface, XDP: a frame it
				    * translated itself sent back out of the
				    * interface it came in by (XDP_TX); also
				    * counted under its translation's verdicts
				    * (dnat_*, snat) */
	SP_V_XDP_REDIRECT = 18,    /* the same, sent out of another external
				    * interface with XDP in native mode
				    * (sp_uplinks_v5, XDP_REDIRECT) */
	SP_V_MAX = 19,
};

/* sp_svc_v5 (hash): one entry per frontend (service port). */
struct sp_svc_key {
	__u8 addr[16]; /* frontend address, network order, IPv4-mapped */
	__u16 port;    /* frontend port, host order */
	__u8 proto;    /* IPPROTO_TCP (6) or IPPROTO_UDP (17) */
	__u8 scope;    /* SP_SCOPE_* */
};

#define SP_SVC_F_NONE 0
#define SP_SVC_F_AFFINITY 1 /* sessionAffinity ClientIP: see sp_aff_v5 */
#define SP_SVC_F_SRC_RANGES 2 /* loadBalancerSourceRanges: see sp_src_v5 */
#define SP_SVC_F_MASQ 4 /* external scope, externalTrafficPolicy Cluster: a
			 * flow that leaves the node is masqueraded */
#define SP_SVC_F_REJECT 8 /* the Service has no endpoint anywhere: a new
			   * flow finding no backend is answered with an ICMP
			   * port unreachable (kube-proxy's REJECT) instead of
			   * dropped (its DROP, for a Local traffic policy
			   * with no local endpoint) */
#define SP_SVC_F_MAGLEV 16 /* external frontend under --external-lb=maglev:
			    * a new flow takes the entry of its frontend's
			    * Maglev table (sp_mgl_v5) its flow hash picks, the
			    * same on every node, instead of a random slot */

struct sp_svc_val {
	__u32 svc_id;           /* the frontend's id: key of its name, source
				 * ranges, affinity and Maglev pointer; what
				 * conntrack records */
	__u32 count;            /* slots 0..count-1 are valid; 0: no backend */
	__u32 flags;            /* SP_SVC_F_* */
	__u32 affinity_timeout; /* seconds; 0: no session affinity */
	__u32 slots_id;         /* key of its slot table (sp_slot_v5); 0: its
				 * own svc_id (an entry carried over from
				 * layout 3, which had no shared tables) */
};

/* sp_slot_v5 (hash): slot tables. A new flow picks slot (random % count)
 * of its frontend's table: one lookup, no loop over backends. Frontends of
 * one Service that select the same backends (under Cluster policies its
 * cluster IP, NodePorts and load-balancer IPs of one port) share one table,
 * so one endpoint change writes one table, not one per frontend; each
 * frontend's count is that table's size. */
struct sp_slot_key {
	__u32 svc_id; /* a table id (sp_svc_val.slots_id), from the same
		       * number space as the frontends' svc_id */
	__u32 slot;
};

struct sp_slot_val {
	__u32 backend_id; /* key of the backends map */
};

/* sp_mgl_v5 (hash): the Maglev lookup tables of the frontends flagged
 * SP_SVC_F_MAGLEV (docs/semantics.md, "Maglev"), in chunks of
 * SP_MGL_CHUNK entries: (table id, k) holds entries k * SP_MGL_CHUNK and
 * on of the table, a backend id each (0: none). A table of M entries is
 * ceil(M / SP_MGL_CHUNK) chunks, each written by one update: a change
 * rewrites the chunks whose entries changed, not each entry. A chunk's
 * 4,000 bytes and the kernel's element header fit one 4 KiB allocation.
 * Every node computes the same table from the same endpoints (by their
 * address and port, not their node-local ids). */
#define SP_MGL_CHUNK 1000

struct sp_mgl_key {
	__u32 id;    /* a table id */
	__u32 chunk; /* 0..ceil(M / SP_MGL_CHUNK) - 1 */
};

struct sp_mgl_val {
	__u32 backend[SP_MGL_CHUNK]; /* key of the backends map; 0: none */
};

/* sp_mglptr_v5 (hash): a Maglev frontend's svc_id -> the table it reads
 * and that table's M, so a new flow takes entry (lb_flow_hash % M) in two
 * lookups. Frontends of one Service with the same backends share a table.
 * No pointer, no table or a missing entry: the flow takes a random slot,
 * as without the flag. */
struct sp_mgl_ptr {
	__u32 table; /* key id of its chunks in sp_mgl_v5 */
	__u32 size;  /* M: entries of the table */
};

/* sp_be_v5 (hash): backend id -> where to send. Ids are shared by every
 * service that uses the same address, port and protocol. */
struct sp_backend {
	__u8 addr[16];   /* backend address, network order, IPv4-mapped */
	__u16 port;      /* backend port, host order */
	__u8 proto;      /* IPPROTO_* */
	__u8 flags;      /* SP_BE_F_* */
	__u32 pad;       /* zero */
	__u64 drain_end; /* with SP_BE_F_DRAINING: CLOCK_MONOTONIC ns (the
			  * clock of bpf_ktime_get_ns) when the control plane
			  * deletes it; kept here so a restarted or resyncing
			  * agent reads the deadline back. 0 otherwise */
};

/* The backend left every service and drains: flows on it go on, but a TCP
 * SYN that finds an old conntrack entry naming it (a reused client port) is
 * a new connection and gets a serving backend. */
#define SP_BE_F_DRAINING 1

/* sp_ct_v5 (LRU hash): connection tracking. A forward entry keeps a flow on
 * its backend while slots are rewritten; a reply entry turns the backend's
 * source back into the frontend the client talked to. */
struct sp_ct_key {
	__u8 saddr[16]; /* source address of the packet, IPv4-mapped */
	__u8 daddr[16]; /* destination address of the packet */
	__u16 sport;    /* host order */
	__u16 dport;    /* host order */
	__u8 proto;     /* IPPROTO_* */
	__u8 dir;       /* SP_CT_FORWARD or SP_CT_REPLY */
	__u8 pad[2];    /* zero */
};

struct sp_ct_val {
	__u8 nat_addr[16]; /* forward: backend address; reply: frontend;
			    * snat: node address; unsnat: client */
	__u16 nat_port;    /* the port that goes with nat_addr */
	__u16 port2;       /* with addr2 */
	__u32 backend_id;  /* backend the flow was given */
	__u32 svc_id;      /* service the flow was given by */
	__u32 flags;       /* unsnat: SP_CT_F_* (TCP close seen); else zero */
	__u64 last_seen;   /* bpf_ktime_get_ns() of the last packet */
	__u8 addr2[16];    /* forward: the SNAT address (port2: its port, 0 when
			    * the flow is not masqueraded); snat: the frontend,
			    * to find the forward entry; else zero */
};

/* Flags of an UNSNAT entry: how its TCP connection ended, as seen on the
 * node's uplink. Forward: the client's packets (ext egress, SNAT path);
 * reply: the backend's (ext ingress, UNSNAT path). A client SYN (no ACK)
 * on the same tuple clears them: a new connection. They decide how long
 * the SNAT port stays held once the flow is idle (sp_ext_egress):
 *  - RST, or both FINs with the client's first: --snat-reclaim-closed (the
 *    backend's socket ends CLOSED, no TIME_WAIT on its side);
 *  - both FINs with the backend's first (FIN_REPLY_FIRST): 60 s, Linux's
 *    TIME_WAIT, which the backend's socket sits in;
 *  - anything else (open, half-closed, UDP): --snat-reclaim. */
#define SP_CT_F_FIN_FWD 1         /* the client sent a FIN */
#define SP_CT_F_FIN_REPLY 2       /* the backend sent a FIN */
#define SP_CT_F_FIN_REPLY_FIRST 4 /* ... before the client's was seen */
#define SP_CT_F_RST 8             /* either side sent an RST */

/* sp_frag_v5 (LRU hash): what an attach point did to the first fragment
 * of a fragmented datagram, for its other fragments, which carry no ports
 * (docs/semantics.md, "Fragments"). Keyed by the datagram as it arrived
 * there; the value holds the addresses its IP header left with. */
struct sp_frag_key {
	__u8 saddr[16]; /* as the first fragment arrived, IPv4-mapped */
	__u8 daddr[16];
	__u32 id;       /* IPv4 identification (16 bits) or IPv6 Fragment
			 * header identification, host order */
	__u8 proto;     /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 hook;      /* the attach point (enum sp_hook in ebpf/lib/hook.h) */
	__u8 pad[2];    /* zero */
};

#define SP_FRAG_F_REDIRECT 1 /* sent back out of the interface it came in by
			      * (hairpin) */
#define SP_FRAG_F_DROP 2     /* dropped, or rejected: the rest is dropped */

struct sp_frag_val {
	__u8 saddr[16];  /* the first fragment's addresses as it left */
	__u8 daddr[16];
	__u64 first_seen; /* bpf_ktime_get_ns() of the first fragment */
	__u32 flags;      /* SP_FRAG_F_* */
	__u32 pad;        /* zero */
};

/* sp_aff_v5 (LRU hash): sessionAffinity ClientIP. A client's new flows to a
 * service go to the backend its last new flow got, while that was less than
 * affinity_timeout seconds ago and the backend still holds the same slot. */
struct sp_aff_key {
	__u32 svc_id;
	__u32 pad;     /* zero */
	__u8 addr[16]; /* client address, IPv4-mapped */
};

struct sp_aff_val {
	__u32 backend_id;
	__u32 slot;      /* the slot it was picked from; must still name it */
	__u64 last_used; /* bpf_ktime_get_ns() of the client's last new flow */
};

/* sp_stats_v5 (per-CPU array, SP_V_MAX entries): counters per verdict. */
struct sp_stat {
	__u64 packets;
	__u64 bytes;
};

/* sp_names_v5 (hash): svc_id -> "namespace/name:port/PROTO", for people
 * (bpftool, sliceproxy dump) and for restarts; the datapath never reads it. */
struct sp_svc_name {
	/* NUL-terminated. Kubernetes names are at most 63 bytes (namespace,
	 * Service, and a Service port's name, a DNS label):
	 * "63/63:63/SCTP" is 196 bytes. The control plane refuses a frontend
	 * whose name does not fit rather than cut it: a restart reads the
	 * owner back from here. */
	char name[200];
};

/* sp_src_v5 (LPM trie): loadBalancerSourceRanges of the frontends flagged
 * SP_SVC_F_SRC_RANGES. A source with no entry under its frontend's svc_id
 * is dropped. prefixlen counts the svc_id's 32 bits, then the bits of the
 * IPv4-mapped address (an IPv4 /24 is 32 + 96 + 24). */
struct sp_src_key {
	__u32 prefixlen;
	__u32 svc_id;
	__u8 addr[16];
};

struct sp_src_val {
	__u32 allow; /* 1 */
};

/* sp_cfg_v5 (array, one entry): node-wide settings the control plane
 * writes: the node's address per family, the source of masqueraded flows,
 * and the SNAT port range. */
struct sp_cfg {
	__u8 addr4[16];      /* IPv4-mapped; all zero: none, no IPv4 SNAT */
	__u8 addr6[16];      /* all zero: none */
	__u16 snat_port_min; /* host order, inclusive */
	__u16 snat_port_max;
	__u32 snat_reclaim;  /* seconds: an SNAT port idle this long is reused;
			      * 0: never */
	__u32 snat_reclaim_closed; /* seconds: the same, for a TCP flow that
				    * closed (SP_CT_F_*); 0: close not tracked,
				    * snat_reclaim applies */
};

/* sp_hairpin: not a map entry but the program's read-only global of the
 * same name (section .rodata.hairpin), which the control plane fills in
 * before load (--hairpin-ipv4, --hairpin-ipv6). A pod whose packet to a
 * frontend is given the pod itself as backend gets this source address
 * instead of its own (docs/semantics.md, "Hairpin"). */
struct sp_hairpin {
	__u8 addr4[16]; /* IPv4-mapped; all zero: no IPv4 hairpin */
	__u8 addr6[16]; /* all zero: no IPv6 hairpin */
};

/* sp_uplinks_v5 (device map, hash): the external interfaces the agent
 * attached the XDP program to in native mode, key and value each a bare
 * __u32 ifindex. A flow XDP translates whose route leaves by another
 * interface is redirected there only when that interface is in this map
 * (its driver then has XDP's transmit path ready; a generic-mode one may
 * have none); any other egress is tc's. Written by the control plane at
 * attach, entries removed when native XDP leaves an interface (the kernel
 * removes those of interfaces that disappear). */

/* sp_xdp_cfg: not a map entry but the XDP program's read-only global of
 * the same name (section .rodata.xdp, ebpf/ext_xdp.c), which the control
 * plane fills in before load (--xdp-forward). */
struct sp_xdp_cfg {
	__u32 forward; /* 1: translate and send out the flows to backends on
			* other nodes (XDP_TX, or XDP_REDIRECT to another
			* interface of sp_uplinks_v5); 0: only drop what
			* loadBalancerSourceRanges refuse, pass the rest to tc */
	__u32 pad;     /* zero */
	__u64 cookie;  /* random per load, never 0: what XDP writes in the
			* metadata it hands a flow to tc with (struct
			* sp_xdp_meta), and what tc trusts metadata by */
};

/* The metadata (bpf_xdp_adjust_meta, in front of the frame) with which XDP
 * hands tc a flow to a backend on this node it already decided (forward
 * on): the translation tc's ingress applies without deciding it again
 * (docs/semantics.md, "XDP on the external interfaces"). tc trusts it only
 * when the metadata is exactly this size and its cookie is its own load's
 * sp_xdp_cfg.cookie. 32 bytes: the most metadata the kernel allows. */
struct sp_xdp_meta {
	__u64 cookie;     /* sp_xdp_cfg.cookie of the load that wrote it */
	__u8 backend[16]; /* the flow's backend, network order, IPv4-mapped */
	__u16 port;       /* the backend's port, host order */
	__u8 verdict;     /* SP_V_DNAT_NEW (XDP recorded the flow) or
			   * SP_V_DNAT_ESTABLISHED */
	__u8 pad[5];      /* zero */
};

/* sp_handoff_v5 (per-CPU array, one entry, struct sp_stat): the packets
 * (and their bytes) tc's external ingress translated from XDP's metadata
 * instead of deciding them itself. Each also has its verdict (dnat_new,
 * dnat_established) in sp_stats_v5, as without XDP. */

/* sp_host_v5 (array, one entry): host clients, served by the cgroup socket
 * programs (host_sock.c) at connect() and sendmsg() time. */
struct sp_host_cfg {
	__u64 netns_cookie; /* the node's network namespace (SO_NETNS_COOKIE of
			     * the agent's own): only sockets of that namespace
			     * are served; pods keep the tc path. 0: none */
};

/* Frontends a host socket reached, remembered per socket (sp_sock_v5, a
 * socket-local storage map: freed with the socket). Reverse translation:
 * getpeername() and the source of a received datagram turn the backend
 * back into the frontend. An unconnected UDP socket keeps its backend per
 * frontend while slot `slot` still names it. 4 entries: a socket
 * reaching a fifth frontend takes the oldest entry's place. */
struct sp_sock_ent {
	__u8 frontend[16];   /* map form (IPv4-mapped) */
	__u8 backend[16];
	__u16 frontend_port; /* host order */
	__u16 backend_port;  /* host order; 0: unused entry */
	__u32 backend_id;
	__u32 svc_id;
	__u32 slot;          /* the slot the backend was picked from */
};

struct sp_sock {
	struct sp_sock_ent ent[4];
	__u32 next; /* the entry a new frontend takes (modulo 4) */
	__u32 pad;  /* zero */
};

/* `sliceproxy trace` (docs/inspecting.md): a tap compiled by bcc at trace
 * time (ebpf/trace/tap.c) runs in front of the programs on each hook, and
 * for a packet its filter matches it fills this CPU's sp_trace_v5 entry and
 * arms it; the program's verdict (count() in ebpf/lib/stats.h) then sends
 * one struct sp_trace_event into the ring buffer sp_events_v5 and
 * disarms it. No trace, nothing armed: one per-CPU array lookup and a test
 * per packet. */
struct sp_trace_event {
	__u64 time;          /* bpf_ktime_get_ns() when the tap saw the packet */
	__u8 saddr[16];      /* the packet as it arrived, IPv4-mapped */
	__u8 daddr[16];
	__u8 nat_saddr[16];  /* as the program left it (all zero when it was
			      * dropped or answered with an ICMP error) */
	__u8 nat_daddr[16];
	__u8 front_addr[16]; /* the frontend of its flow; zero: unknown */
	__u16 sport;         /* host order, as every port below */
	__u16 dport;
	__u16 nat_sport;
	__u16 nat_dport;
	__u16 front_port;
	__u16 l4_off;        /* where its TCP/UDP header starts (the tap's) */
	__u32 ifindex;
	__u32 svc_id;        /* the flow's service (sp_names_v5); 0: none */
	__s32 action;        /* the tc action the program returned */
	__u8 proto;
	__u8 v6;
	__u8 hook;           /* SP_TRACE_HOOK_* */
	__u8 verdict;        /* enum sp_verdict */
	__u8 tcp_flags;
	__u8 pad[3];         /* zero */
};

/* The attach point of an event (the program the tap sits in front of). */
#define SP_TRACE_HOOK_POD_INGRESS 0
#define SP_TRACE_HOOK_POD_EGRESS 1
#define SP_TRACE_HOOK_EXT_INGRESS 2
#define SP_TRACE_HOOK_EXT_EGRESS 3

/* sp_trace_v5 (per-CPU array, one entry): this CPU's trace state. tc runs
 * a hook's filters one after the other on one CPU with bottom halves off,
 * so the packet the tap armed is the next one our program counts there. */
struct sp_trace {
	__u32 armed;     /* the tap's: ifindex of the packet it matched; 0:
			  * none. The program clears it at its verdict */
	__u32 tokens;    /* events this CPU may still send: the program takes
			  * one per event, the tap adds them at the rate asked */
	__u64 verdicts;  /* the verdicts that send an event: bit 1 << SP_V_* */
	__u64 refilled;  /* the tap's: bpf_ktime_get_ns() of its last refill */
	__u64 emitted;   /* events sent */
	__u64 limited;   /* matched, but over the rate: not sent */
	__u64 lost;      /* matched, but the ring buffer was full */
	struct sp_trace_event ev; /* the tap's half of the event: the packet as
				   * it arrived, its flow's service and
				   * frontend */
};

/* sp:layout:end */

#endif /* SLICEPROXY_H */
