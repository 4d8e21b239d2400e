/* The control plane's own native code (build/libsliceproxy.so), loaded by
 * ctrl/dataplane/native.py through cffi in ABI mode, like libbpf: compiled
 * once by clang with the BPF object, so a node needs no compiler.
 *
 * One function: the population of a Maglev table, the part of a table
 * build whose cost is about M ln M probes whatever the backends (20 ms in
 * Python at M = 16,381). ctrl/model/maglev.py (build) is the reference
 * this follows step by step; tests/unit/test_native.py compares the two.
 */
#include <stdint.h>
#include <stdlib.h>

/* The table of n backends over m entries: out[e] = ids[i] for the backend
 * i that claims entry e. Backends take turns in the order given (i = 0,
 * 1, ...), each claiming the next free entry of its permutation: perm[i]
 * holds its offset (low 32 bits) and skip (high 32 bits). With more
 * backends than entries the first m fill the table in their first turn.
 *
 * Returns 0, or -1 (out then undefined) when an argument is out of range:
 * m or n of 0, an offset >= m, a skip of 0 or >= m, or a skip whose walk
 * cannot reach a free entry (m not prime), which would otherwise loop. */
int sp_maglev_fill(const uint64_t *perm, const uint32_t *ids, uint32_t n, uint32_t m, uint32_t *out)
{
	uint32_t *next, *skip;
	uint8_t *taken;
	uint32_t filled = 0, i, c, s, k;
	int ret = -1;

	if (m == 0 || n == 0)
		return -1;
	if (n > m)
		n = m;
	next = malloc((size_t)n * sizeof(*next));
	skip = malloc((size_t)n * sizeof(*skip));
	taken = calloc(m, 1);
	if (!next || !skip || !taken)
		goto out;
	for (i = 0; i < n; i++) {
		next[i] = (uint32_t)perm[i];
		skip[i] = (uint32_t)(perm[i] >> 32);
		if (next[i] >= m || skip[i] == 0 || skip[i] >= m)
			goto out;
	}
	for (;;) {
		for (i = 0; i < n; i++) {
			c = next[i];
			s = skip[i];
			/* This backend's next free entry: at most m probes on its
			 * walk, all of them when m is prime. */
			for (k = 0; taken[c]; k++) {
				if (k == m)
					goto out;
				c += s;
				if (c >= m)
					c -= m;
			}
			taken[c] = 1;
			out[c] = ids[i];
			c += s;
			next[i] = c >= m ? c - m : c;
			if (++filled == m) {
				ret = 0;
				goto out;
			}
		}
	}
out:
	free(next);
	free(skip);
	free(taken);
	return ret;
}
