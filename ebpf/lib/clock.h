/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The programs' clock: the stamps in the maps and the ages computed from them. */
#ifndef SP_LIB_CLOCK_H
#define SP_LIB_CLOCK_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>

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

#endif /* SP_LIB_CLOCK_H */
