/* The control plane's own native code (build/libsliceproxy.so), loaded by
 * ctrl/dataplane/native.py through cffi in ABI mode, like libbpf: compiled
 * once by clang with the BPF object, so a node needs no compiler.
 *
 * Two functions of Maglev tables. sp_maglev_fill populates a table, the
 * part of a table build whose cost is about M ln M probes whatever the
 * backends (20 ms in Python at M = 16,381); ctrl/model/maglev.py (build)
 * is the reference it follows step by step. sp_turns_merge edits the
 * first M turns of a turn order (ctrl/dataplane/tables.py, Turns) in one
 * pass of copies; native.py holds its Python reference.
 * tests/unit/test_native.py compares each with its reference.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* A turn (ctrl/dataplane/tables.py): the backend's place (address 16
 * bytes, port 2 big-endian, protocol 1), then its id (4, big-endian),
 * compared as bytes (memcmp). */
#define SP_TURN 23

static uint32_t turn_id(const uint8_t *t)
{
	return (uint32_t)t[19] << 24 | (uint32_t)t[20] << 16 | (uint32_t)t[21] << 8 | t[22];
}

/* The first position in turns[lo, n) not below t. */
static uint32_t turn_bound(const uint8_t *turns, uint32_t lo, uint32_t n, const uint8_t *t)
{
	while (lo < n) {
		uint32_t mid = lo + (n - lo) / 2;

		if (memcmp(turns + (size_t)mid * SP_TURN, t, SP_TURN) < 0)
			lo = mid + 1;
		else
			n = mid;
	}
	return lo;
}

/* out = turns (n, sorted, each with its id and permutation: ids[i],
 * perms[i]) without the ng turns gone (sorted, each one of turns) and
 * with the na turns added (sorted, none of turns; their permutations in
 * aperms, their ids read from them), sorted: n - ng + na turns into okeys,
 * oids, operms, which hold cap. A gone turn and an added one may be equal
 * (out, then in).
 * Each change is found by bisection and the turns between changes are
 * copied whole: about 100 changes to 16,381 turns cost the copy of the
 * arrays, not a comparison per turn.
 *
 * Returns the number of turns out, or -1 (out then undefined) when a
 * gone turn is not there or an added one is, or out would pass cap (a
 * gone turn not there, found only later). */
int64_t sp_turns_merge(const uint8_t *turns, const uint32_t *ids, const uint64_t *perms, uint32_t n,
		       const uint8_t *gone, uint32_t ng, const uint8_t *added, const uint64_t *aperms, uint32_t na,
		       uint8_t *okeys, uint32_t *oids, uint64_t *operms, uint32_t cap)
{
	uint32_t at = 0, g = 0, a = 0, o = 0, p, run;

	while (g < ng || a < na) {
		/* The next change in order; a gone turn before an equal added one. */
		int out = a == na || (g < ng && memcmp(gone + (size_t)g * SP_TURN, added + (size_t)a * SP_TURN, SP_TURN) <= 0);
		const uint8_t *t = out ? gone + (size_t)g * SP_TURN : added + (size_t)a * SP_TURN;
		int here;

		p = turn_bound(turns, at, n, t);
		here = p < n && memcmp(turns + (size_t)p * SP_TURN, t, SP_TURN) == 0;
		if (out != here)
			return -1;
		run = p - at;
		if (run + !out > cap - o)
			return -1;
		memcpy(okeys + (size_t)o * SP_TURN, turns + (size_t)at * SP_TURN, (size_t)run * SP_TURN);
		memcpy(oids + o, ids + at, (size_t)run * sizeof(*ids));
		memcpy(operms + o, perms + at, (size_t)run * sizeof(*perms));
		o += run;
		if (out) {
			at = p + 1;
			g++;
		} else {
			at = p;
			memcpy(okeys + (size_t)o * SP_TURN, t, SP_TURN);
			oids[o] = turn_id(t);
			operms[o] = aperms[a];
			o++;
			a++;
		}
	}
	run = n - at;
	if (run > cap - o)
		return -1;
	memcpy(okeys + (size_t)o * SP_TURN, turns + (size_t)at * SP_TURN, (size_t)run * SP_TURN);
	memcpy(oids + o, ids + at, (size_t)run * sizeof(*ids));
	memcpy(operms + o, perms + at, (size_t)run * sizeof(*perms));
	return (int64_t)o + run;
}
