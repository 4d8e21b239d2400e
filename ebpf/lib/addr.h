/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Addresses in map form: 16 bytes, IPv4 stored IPv4-mapped (::ffff:a.b.c.d)
 * as ebpf/sliceproxy.h says, so one key layout serves both families.
 */
#ifndef SP_LIB_ADDR_H
#define SP_LIB_ADDR_H

#include <linux/types.h>
#include <bpf/bpf_endian.h>

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

#endif /* SP_LIB_ADDR_H */
