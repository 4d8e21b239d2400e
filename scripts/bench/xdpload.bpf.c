// SPDX-License-Identifier: GPL-2.0
/* The two ends of the load bench's segment (scripts/bench/xdpload.py;
 * docs/benchmarks.md, "External traffic under load").
 *
 * load_tx: the sender. Never attached: the bench runs it with
 * BPF_PROG_TEST_RUN and BPF_F_TEST_XDP_LIVE_FRAMES, which makes the kernel
 * a traffic generator: every repetition hands it a frame from a page pool
 * and XDP_TX sends it out of the sender's veth into the node's uplink,
 * where the node's receive path (its XDP program, or the skb the veth
 * builds for tc and netfilter) sees it as it would see a frame from a NIC.
 * The pool's pages come back once the node is done with them, as the node
 * left them (a DNAT, a masquerade, a TTL less one): so every repetition
 * writes the whole Ethernet, IPv4 and UDP header again from load_cfg, with
 * the next of load_cfg.flows source ports, and the UDP checksum for that
 * port computed from the template's own (the payload is never touched).
 *
 * load_sink: the segment's far end, attached to the sender's veth: every
 * frame the node sends back out (what it forwarded to the other node's
 * backend) is counted and dropped. load_seen[0] counts the frames
 * translated as expected (load_cfg's destination address and port, its
 * masquerade source) with both checksums right, [1] those translated with
 * a wrong checksum, [2] every other frame. Attached to the node's uplink
 * instead, it is the floor: what the generator and a veth cost a frame
 * that an XDP program drops at once. */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define LOAD_HDR_LEN (ETH_HLEN + sizeof(struct iphdr) + sizeof(struct udphdr))
/* The UDP datagram the bench sends: its header and 20 bytes of payload (a
 * multiple of 4, which bpf_csum_diff wants). */
#define LOAD_UDP_LEN 28

struct load_cfg {
	__u8 hdr[44];	  /* Ethernet, IPv4 and UDP headers (42 bytes) */
	__u32 flows;	  /* source ports: sport .. sport + flows - 1 */
	__u16 sport;	  /* the template's source port (host order) */
	__u16 csum;	  /* the template's UDP checksum (as on the wire) */
	__be32 fwd_daddr; /* a forwarded frame: to this address and port */
	__be16 fwd_dport;
	__u16 pad;
	__be32 fwd_saddr; /* ... from this one (the node's, masqueraded) */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct load_cfg);
} load_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} load_seen SEC(".maps");

/* Frames the sender built, per CPU (and the next source port's index). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} load_seq SEC(".maps");

static __always_inline __u16 fold(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

SEC("xdp")
int load_tx(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct udphdr *udp = data + ETH_HLEN + sizeof(struct iphdr);
	struct load_cfg *cfg;
	__u32 zero = 0, k;
	__u64 *seq, sum;
	__u16 port;

	if (data + LOAD_HDR_LEN > data_end)
		return XDP_ABORTED;
	cfg = bpf_map_lookup_elem(&load_cfg, &zero);
	seq = bpf_map_lookup_elem(&load_seq, &zero);
	if (!cfg || !seq || !cfg->flows)
		return XDP_ABORTED;
	__builtin_memcpy(data, cfg->hdr, LOAD_HDR_LEN);
	k = (__u32)((*seq)++ % cfg->flows);
	port = cfg->sport + k;
	udp->source = bpf_htons(port);
	/* RFC 1624: HC' = ~(~HC + ~m + m'), the template's checksum for its
	 * own port as HC (a checksum of zero means none, RFC 768). */
	if (cfg->csum) {
		sum = (__u16)~cfg->csum;
		sum += (__u16)~bpf_htons(cfg->sport);
		sum += bpf_htons(port);
		udp->check = (__u16)~fold(sum) ?: 0xffff;
	}
	return XDP_TX;
}

/* Both checksums of an IPv4 UDP frame of the bench's size add up. */
static __always_inline int csum_ok(struct iphdr *ip, struct udphdr *udp, void *data_end)
{
	__s64 s;
	__u64 sum;

	if ((void *)udp + LOAD_UDP_LEN > data_end || udp->len != bpf_htons(LOAD_UDP_LEN))
		return 0;
	s = bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0);
	if (s < 0 || fold(s) != 0xffff)
		return 0;
	if (!udp->check)
		return 1;
	/* The pseudo-header (addresses, protocol, length), then the datagram. */
	s = bpf_csum_diff(0, 0, (__be32 *)&ip->saddr, 8, 0);
	if (s < 0)
		return 0;
	sum = (__u32)s + bpf_htons(IPPROTO_UDP) + udp->len;
	s = bpf_csum_diff(0, 0, (__be32 *)udp, LOAD_UDP_LEN, fold(sum));
	return s >= 0 && fold(s) == 0xffff;
}

SEC("xdp")
int load_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *udp = (void *)(ip + 1);
	struct load_cfg *cfg;
	__u32 zero = 0, key = 2;
	__u64 *n;

	cfg = bpf_map_lookup_elem(&load_cfg, &zero);
	if (cfg && (void *)(udp + 1) <= data_end && eth->h_proto == bpf_htons(ETH_P_IP) && ip->ihl == 5 &&
	    ip->protocol == IPPROTO_UDP && ip->daddr == cfg->fwd_daddr && udp->dest == cfg->fwd_dport &&
	    ip->saddr == cfg->fwd_saddr)
		key = csum_ok(ip, udp, data_end) ? 0 : 1;
	n = bpf_map_lookup_elem(&load_seen, &key);
	if (n)
		*n += 1;
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "GPL";
