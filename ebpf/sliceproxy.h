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
 * Map names carry a layout version (`_v1`): a layout change is a new map
 * name, never a silent misread of an old pinned map.
 */
#ifndef SLICEPROXY_H
#define SLICEPROXY_H

#include <linux/types.h>

/* sp:layout:begin */

#define SP_LAYOUT_VERSION 1

/* Where the traffic for a frontend comes from. Part of the frontend key so
 * a service can answer in-cluster and external clients differently in one
 * lookup (traffic policies). */
#define SP_SCOPE_INTERNAL 0
#define SP_SCOPE_EXTERNAL 1

/* Conntrack direction, part of the conntrack key. */
#define SP_CT_FORWARD 0 /* client -> frontend: value holds the backend */
#define SP_CT_REPLY 1   /* backend -> client: value holds the frontend */

/* Index into the per-CPU counters map: one slot per verdict. */
enum sp_verdict {
	SP_V_PASS_NOT_IP = 0,      /* neither IPv4 nor IPv6: passed untouched */
	SP_V_PASS_TRUNCATED = 1,   /* headers shorter than they claim: passed */
	SP_V_PASS_FRAGMENT = 2,    /* IP fragment: passed untouched */
	SP_V_PASS_OTHER_PROTO = 3, /* neither TCP nor UDP: passed */
	SP_V_PASS_NO_SERVICE = 4,  /* ingress: no frontend: passed */
	SP_V_DNAT_NEW = 5,         /* new flow: backend chosen and rewritten */
	SP_V_DNAT_ESTABLISHED = 6, /* known flow: its backend kept */
	SP_V_REVNAT = 7,           /* egress: reply's source back to the frontend */
	SP_V_DROP_NO_BACKEND = 8,  /* frontend with no backend: dropped */
	SP_V_DROP_ERROR = 9,       /* inconsistent maps or a failed rewrite */
	SP_V_PASS_NO_FLOW = 10,    /* egress: not a reply of a tracked flow */
	SP_V_MAX = 11,
};

/* sp_svc_v1 (hash): one entry per frontend (service port). */
struct sp_svc_key {
	__u8 addr[16]; /* frontend address, network order, IPv4-mapped */
	__u16 port;    /* frontend port, host order */
	__u8 proto;    /* IPPROTO_TCP (6) or IPPROTO_UDP (17) */
	__u8 scope;    /* SP_SCOPE_* */
};

#define SP_SVC_F_NONE 0
#define SP_SVC_F_AFFINITY 1 /* sessionAffinity ClientIP: see sp_aff_v1 */

struct sp_svc_val {
	__u32 svc_id;           /* key of the slots and names maps */
	__u32 count;            /* slots 0..count-1 are valid; 0: no backend */
	__u32 flags;            /* SP_SVC_F_* */
	__u32 affinity_timeout; /* seconds; 0: no session affinity */
};

/* sp_slot_v1 (hash): backend slots of a service. A new flow picks slot
 * (random % count): one lookup, no loop over backends. */
struct sp_slot_key {
	__u32 svc_id;
	__u32 slot;
};

struct sp_slot_val {
	__u32 backend_id; /* key of the backends map */
};

/* sp_be_v1 (hash): backend id -> where to send. Ids are shared by every
 * service that uses the same address, port and protocol. */
struct sp_backend {
	__u8 addr[16]; /* backend address, network order, IPv4-mapped */
	__u16 port;    /* backend port, host order */
	__u8 proto;    /* IPPROTO_* */
	__u8 flags;    /* SP_BE_F_* */
};

/* The backend left every service and drains: flows on it go on, but a TCP
 * SYN that finds an old conntrack entry naming it (a reused client port) is
 * a new connection and gets a serving backend. */
#define SP_BE_F_DRAINING 1

/* sp_ct_v1 (LRU hash): connection tracking. A forward entry keeps a flow on
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
	__u8 nat_addr[16]; /* forward: backend address; reply: frontend */
	__u16 nat_port;    /* forward: backend port; reply: frontend port */
	__u8 pad[2];       /* zero */
	__u32 backend_id;  /* backend the flow was given */
	__u32 svc_id;      /* service the flow was given by */
	__u32 pad2;        /* zero */
	__u64 last_seen;   /* bpf_ktime_get_ns() of the last packet */
};

/* sp_aff_v1 (LRU hash): sessionAffinity ClientIP. A client's new flows to a
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

/* sp_stats_v1 (per-CPU array, SP_V_MAX entries): counters per verdict. */
struct sp_stat {
	__u64 packets;
	__u64 bytes;
};

/* sp_names_v1 (hash): svc_id -> "namespace/name:port/PROTO", for people
 * (bpftool, sliceproxy dump) and for restarts; the datapath never reads it. */
struct sp_svc_name {
	char name[128]; /* NUL-terminated */
};

/* sp:layout:end */

#endif /* SLICEPROXY_H */
