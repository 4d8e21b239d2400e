/* The control plane's own native code (build/libsliceproxy.so), loaded by
 * ctrl/dataplane/native.py through cffi in ABI mode, like libbpf: compiled
 * once by clang with the BPF object, so a node needs no compiler.
 *
 * The work of Maglev tables. sp_maglev_fill populates a table, the
 * part of a table build whose cost is about M ln M probes whatever the
 * backends (20 ms in Python at M = 16,381); ctrl/model/maglev.py (build)
 * is the reference it follows step by step. sp_turns_merge edits the
 * first M turns of a turn order (ctrl/dataplane/tables.py, Turns) in one
 * pass of copies, and sp_heap_grow and sp_heap_take keep the rest of it
 * as a heap; native.py holds their Python references.
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
	/* Where each backend's walk goes on after its first turn: needed only
	 * with fewer backends than entries (with as many, each takes one turn
	 * and reads its permutation once). */
	uint32_t *next = NULL, *skip = NULL;
	uint8_t *taken;
	uint32_t filled = 0, first = 1, i, c, s, k;
	int ret = -1;

	if (m == 0 || n == 0)
		return -1;
	if (n > m)
		n = m;
	for (i = 0; i < n; i++)
		if ((uint32_t)perm[i] >= m || perm[i] >> 32 == 0 || perm[i] >> 32 >= m)
			return -1;
	taken = calloc(m, 1);
	if (n < m) {
		next = malloc((size_t)n * sizeof(*next));
		skip = malloc((size_t)n * sizeof(*skip));
	}
	if (!taken || (n < m && (!next || !skip)))
		goto out;
	for (;; first = 0) {
		for (i = 0; i < n; i++) {
			if (first) {
				c = (uint32_t)perm[i];
				s = (uint32_t)(perm[i] >> 32);
			} else {
				c = next[i];
				s = skip[i];
			}
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
			if (++filled == m) {
				ret = 0;
				goto out;
			}
			if (next) {
				c += s;
				next[i] = c >= m ? c - m : c;
				skip[i] = s;
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

/* The tail of a turn order (Turns in ctrl/dataplane/tables.py): a binary
 * min-heap of turns, SP_TURN bytes each, one after the other in one
 * buffer. A turn added is a sift up, the smallest taken a sift down:
 * about 17 comparisons at 100,000 turns, each one memcmp. */
static void turn_swap(uint8_t *a, uint8_t *b)
{
	uint8_t t[SP_TURN];

	memcpy(t, a, SP_TURN);
	memcpy(a, b, SP_TURN);
	memcpy(b, t, SP_TURN);
}

static void heap_down(uint8_t *h, uint32_t n, uint32_t i)
{
	for (;;) {
		uint32_t l = 2 * i + 1, least = i;

		if (l < n && memcmp(h + (size_t)l * SP_TURN, h + (size_t)least * SP_TURN, SP_TURN) < 0)
			least = l;
		if (l + 1 < n && memcmp(h + (size_t)(l + 1) * SP_TURN, h + (size_t)least * SP_TURN, SP_TURN) < 0)
			least = l + 1;
		if (least == i)
			return;
		turn_swap(h + (size_t)i * SP_TURN, h + (size_t)least * SP_TURN);
		i = least;
	}
}

/* The heap h of n0 turns, with the turns from n0 to n (appended after
 * them) taken in: a heap of n. Each sifted up, or, when they outnumber
 * the heap, the whole heap made again (n / 2 sifts down). */
void sp_heap_grow(uint8_t *h, uint32_t n0, uint32_t n)
{
	uint32_t i, j;

	if (n - n0 > n0) {
		for (i = n / 2; i-- > 0;)
			heap_down(h, n, i);
		return;
	}
	for (i = n0; i < n; i++)
		for (j = i; j > 0 && memcmp(h + (size_t)j * SP_TURN, h + (size_t)((j - 1) / 2) * SP_TURN, SP_TURN) < 0;
		     j = (j - 1) / 2)
			turn_swap(h + (size_t)j * SP_TURN, h + (size_t)((j - 1) / 2) * SP_TURN);
}

/* The k smallest turns of the heap h of n (all n when k is more) moved
 * into out, in order; h then holds a heap of the rest, its first turns.
 * Returns how many were moved. */
uint32_t sp_heap_take(uint8_t *h, uint32_t n, uint32_t k, uint8_t *out)
{
	uint32_t j;

	if (k > n)
		k = n;
	for (j = 0; j < k; j++) {
		memcpy(out + (size_t)j * SP_TURN, h, SP_TURN);
		n--;
		memcpy(h, h + (size_t)n * SP_TURN, SP_TURN);
		heap_down(h, n, 0);
	}
	return k;
}
