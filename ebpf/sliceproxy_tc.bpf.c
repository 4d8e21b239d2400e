// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sliceproxy's programs, one object: the attach points compiled as
 * one translation unit, so they share every map of lib/maps.h (and the
 * loader pins each map once) with nothing to link. At the host side of pod
 * interfaces: DNAT of packets to a frontend (pod_ingress.c), reverse NAT of
 * their replies (pod_egress.c). At external interfaces: NodePorts,
 * LoadBalancer IPs and externalIPs (ext_ingress.c), the masquerade of
 * flows to other nodes' backends (ext_egress.c). Every other packet leaves
 * untouched with TC_ACT_OK. In front of the external interfaces' tc
 * ingress, an XDP program drops what loadBalancerSourceRanges refuse and
 * may send flows to other nodes' backends back out (ext_xdp.c). The host's
 * own sockets get their backend at connect() and sendmsg() time from cgroup socket programs (host_sock.c),
 * which the loader leaves out when host clients are off. ebpf/lib/ holds what they share: parsing,
 * checksums, conntrack, load balancing, NAT, ICMP errors, counters, clock.
 */
#include "pod_ingress.c"
#include "pod_egress.c"
#include "ext_ingress.c"
#include "ext_egress.c"
#include "ext_xdp.c"
#include "host_sock.c"

char LICENSE[] SEC("license") = "Dual BSD/GPL";
