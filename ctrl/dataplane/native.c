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

#define SP_NO_ENTRY UINT32_MAX

/* The entry after c on a walk by s over m entries (c < m, s < m). */
static inline uint32_t step(uint32_t c, uint32_t s, uint32_t m)
{
	c += s;
	return c >= m ? c - m : c;
}

/* The first free entry of a walk from c by s, or SP_NO_ENTRY after m
 * probes (a prime m leaves none unvisited). Its first four entries are
 * read at once and the first free one picked with one branch: probed one
 * by one, the walks of a table filling up end on a branch the processor
 * cannot predict, about once a turn (20-30% of the fill's time at 16,381
 * entries). Past them, one at a time: a long walk's branch is predicted. */
static inline uint32_t next_free(const uint8_t *taken, uint32_t c, uint32_t s, uint32_t m)
{
	uint32_t c1 = step(c, s, m), c2 = step(c1, s, m), c3 = step(c2, s, m), k;
	unsigned free4 = !taken[c] | !taken[c1] << 1 | !taken[c2] << 2 | !taken[c3] << 3;

	if (free4) {
		uint32_t at[4] = {c, c1, c2, c3};

		return at[__builtin_ctz(free4)];
	}
	for (c = c3, k = 4; taken[c]; k++) {
		if (k >= m)
			return SP_NO_ENTRY;
		c = step(c, s, m);
	}
	return c;
}

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
	uint32_t filled, i, c, s;
	int ret = -1;

	if (m == 0 || n == 0)
		return -1;
	if (n > m)
		n = m;
	taken = calloc(m, 1);
	if (n < m) {
		next = malloc((size_t)n * sizeof(*next));
		skip = malloc((size_t)n * sizeof(*skip));
	}
	if (!taken || (n < m && (!next || !skip)))
		goto out;
	/* The first turns, from the permutations: the whole table when there
	 * are as many backends as entries. */
	for (i = 0; i < n; i++) {
		c = (uint32_t)perm[i];
		s = (uint32_t)(perm[i] >> 32);
		if (c >= m || s == 0 || s >= m)
			goto out;
		c = next_free(taken, c, s, m);
		if (c == SP_NO_ENTRY)
			goto out;
		taken[c] = 1;
		out[c] = ids[i];
		if (next) {
			next[i] = step(c, s, m);
			skip[i] = s;
		}
	}
	/* The next turns, until the table is full. */
	for (filled = n; filled < m;) {
		for (i = 0; i < n; i++) {
			s = skip[i];
			c = next_free(taken, next[i], s, m);
			if (c == SP_NO_ENTRY)
				goto out;
			taken[c] = 1;
			out[c] = ids[i];
			if (++filled == m)
				break;
			next[i] = step(c, s, m);
		}
	}
	ret = 0;
out:
	free(next);
	free(skip);
	free(taken);
	return ret;
}

/* A backend's permutation, as ctrl/model/maglev.py (hashed) makes it:
 * the 8-byte BLAKE2b (RFC 7693) of its identity (the first SP_IDENT
 * bytes of its turn), unkeyed, personalized "sp-maglev"; offset and skip
 * are the digest's two big-endian halves, modulo m and m - 1 (+ 1).
 * An identity is one block: one compression. */
#define SP_IDENT 18

static const uint64_t b2b_iv[8] = {
	0x6a09e667f3bcc908ull, 0xbb67ae8584caa73bull, 0x3c6ef372fe94f82bull, 0xa54ff53a5f1d36f1ull,
	0x510e527fade682d1ull, 0x9b05688c2b3e6c1full, 0x1f83d9abfb41bd6bull, 0x5be0cd19137e2179ull,
};

/* The message word order of each round (rounds 10 and 11 take 0 and 1). */
static const uint8_t b2b_sigma[10][16] = {
	{ 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 },
	{ 14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3 },
	{ 11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4 },
	{ 7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8 },
	{ 9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13 },
	{ 2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9 },
	{ 12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11 },
	{ 13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10 },
	{ 6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5 },
	{ 10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0 },
};

static uint64_t rotr64(uint64_t x, int n)
{
	return x >> n | x << (64 - n);
}

static uint64_t load64_le(const uint8_t *p)
{
	uint64_t v = 0;
	int i;

	for (i = 7; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

#define B2B_G(a, b, c, d, x, y)                       \
	do {                                          \
		v[a] = v[a] + v[b] + (x);             \
		v[d] = rotr64(v[d] ^ v[a], 32);       \
		v[c] = v[c] + v[d];                   \
		v[b] = rotr64(v[b] ^ v[c], 24);       \
		v[a] = v[a] + v[b] + (y);             \
		v[d] = rotr64(v[d] ^ v[a], 16);       \
		v[c] = v[c] + v[d];                   \
		v[b] = rotr64(v[b] ^ v[c], 63);       \
	} while (0)

/* The first word of the 8-byte digest of a message of len <= 128 bytes,
 * from the state h0 the parameters gave. */
static uint64_t b2b_one_block(const uint64_t h0[8], const uint8_t *msg, uint32_t len)
{
	uint8_t block[128] = { 0 };
	uint64_t m[16], v[16];
	int i, r;

	memcpy(block, msg, len);
	for (i = 0; i < 16; i++)
		m[i] = load64_le(block + 8 * i);
	for (i = 0; i < 8; i++) {
		v[i] = h0[i];
		v[i + 8] = b2b_iv[i];
	}
	v[12] ^= len; /* bytes hashed so far (the counter's high word stays 0) */
	v[14] = ~v[14]; /* the last block */
	for (r = 0; r < 12; r++) {
		const uint8_t *s = b2b_sigma[r % 10];

		B2B_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
		B2B_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
		B2B_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
		B2B_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
		B2B_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
		B2B_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
		B2B_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
		B2B_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
	}
	return h0[0] ^ v[0] ^ v[8];
}

static uint32_t bswap32(uint32_t x)
{
	return x >> 24 | (x >> 8 & 0xff00) | (x << 8 & 0xff0000) | x << 24;
}

/* The permutations of n backends whose identities start records of
 * `stride` bytes (a turn: stride 23), for a table of m entries (m >= 2),
 * packed as sp_maglev_fill reads them (offset | skip << 32). */
void sp_maglev_perms(const uint8_t *recs, uint32_t stride, uint32_t n, uint32_t m, uint64_t *out)
{
	static const uint8_t person[16] = "sp-maglev";
	uint64_t h0[8], d;
	uint32_t i, offset, skip;

	memcpy(h0, b2b_iv, sizeof(h0));
	/* Parameter block: digest length 8, no key, fanout 1, depth 1;
	 * the personalization in its last 16 bytes. */
	h0[0] ^= 0x01010000ull | 8;
	h0[6] ^= load64_le(person);
	h0[7] ^= load64_le(person + 8);
	for (i = 0; i < n; i++) {
		d = b2b_one_block(h0, recs + (size_t)i * stride, SP_IDENT);
		/* Digest bytes 0-3 and 4-7 (little-endian in d), each read big-endian. */
		offset = bswap32((uint32_t)d);
		skip = bswap32((uint32_t)(d >> 32));
		out[i] = (uint64_t)(offset % m) | (uint64_t)(skip % (m - 1) + 1) << 32;
	}
}

/* A turn (ctrl/dataplane/tables.py): the backend's place (address 16
 * bytes, port 2 big-endian, protocol 1), then its id (4, big-endian),
 * compared as bytes (turn_cmp). */
#define SP_TURN 23

/* 8 bytes read as a big-endian number. */
static inline uint64_t load_be64(const uint8_t *p)
{
	uint64_t x;

	memcpy(&x, p, 8);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	x = __builtin_bswap64(x);
#endif
	return x;
}

/* Two turns compared as memcmp compares them (< 0, 0, > 0), eight bytes
 * at a time (the last eight overlap the eight before by one byte, equal
 * by then), inline: a turn taken from the heap is compared with 16
 * others a level, and a call to memcmp cost more than the comparison. */
static inline int turn_cmp(const uint8_t *a, const uint8_t *b)
{
	static const uint32_t at[3] = { 0, 8, SP_TURN - 8 };

	for (int k = 0; k < 3; k++) {
		uint64_t x = load_be64(a + at[k]), y = load_be64(b + at[k]);

		if (x != y)
			return x < y ? -1 : 1;
	}
	return 0;
}

static uint32_t turn_id(const uint8_t *t)
{
	return (uint32_t)t[19] << 24 | (uint32_t)t[20] << 16 | (uint32_t)t[21] << 8 | t[22];
}

/* The first position in turns[lo, n) not below t. */
static uint32_t turn_bound(const uint8_t *turns, uint32_t lo, uint32_t n, const uint8_t *t)
{
	while (lo < n) {
		uint32_t mid = lo + (n - lo) / 2;

		if (turn_cmp(turns + (size_t)mid * SP_TURN, t) < 0)
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
		int out = a == na || (g < ng && turn_cmp(gone + (size_t)g * SP_TURN, added + (size_t)a * SP_TURN) <= 0);
		const uint8_t *t = out ? gone + (size_t)g * SP_TURN : added + (size_t)a * SP_TURN;
		int here;

		p = turn_bound(turns, at, n, t);
		here = p < n && turn_cmp(turns + (size_t)p * SP_TURN, t) == 0;
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

/* The tail of a turn order (Turns in ctrl/dataplane/tables.py): a min-heap
 * of turns, SP_TURN bytes each, one after the other in one buffer, 16
 * children a node (those of i at 16i + 1 to 16i + 16): a quarter as many
 * levels as a binary heap, so a turn taken at 100,000 turns goes down 5
 * of them, not 17. The lower levels are not in the cache: a level's 16
 * children are 6 adjacent cache lines, read at once, where each level is
 * a wait (100 turns taken from 84,000: 60 -> 44 us against 4 children,
 * the comparisons inline). A turn sifted moves once, into the hole its
 * path leaves. */
#define SP_ARITY 16

static const uint8_t *turn_at(const uint8_t *h, uint32_t i)
{
	return h + (size_t)i * SP_TURN;
}

/* The turn t sifted down from the hole at i of the heap h of n. */
static void heap_down(uint8_t *h, uint32_t n, uint32_t i, const uint8_t *t)
{
	for (;;) {
		uint32_t c = SP_ARITY * i + 1, least, end;

		if (c >= n)
			break;
		end = c + SP_ARITY < n ? c + SP_ARITY : n;
		for (least = c++; c < end; c++)
			if (turn_cmp(turn_at(h, c), turn_at(h, least)) < 0)
				least = c;
		if (turn_cmp(turn_at(h, least), t) >= 0)
			break;
		memcpy(h + (size_t)i * SP_TURN, turn_at(h, least), SP_TURN);
		i = least;
	}
	memcpy(h + (size_t)i * SP_TURN, t, SP_TURN);
}

/* The heap h of n0 turns, with the turns from n0 to n (appended after
 * them) taken in: a heap of n. Each sifted up, or, when they outnumber
 * the heap, the whole heap made again (a sift down from each node with
 * children, the last first). */
void sp_heap_grow(uint8_t *h, uint32_t n0, uint32_t n)
{
	uint8_t t[SP_TURN];
	uint32_t i, j, up;

	if (n - n0 > n0) {
		for (i = n > 1 ? (n - 2) / SP_ARITY + 1 : 0; i-- > 0;) {
			memcpy(t, turn_at(h, i), SP_TURN);
			heap_down(h, n, i, t);
		}
		return;
	}
	for (i = n0; i < n; i++) {
		memcpy(t, turn_at(h, i), SP_TURN);
		for (j = i; j > 0; j = up) {
			up = (j - 1) / SP_ARITY;
			if (turn_cmp(t, turn_at(h, up)) >= 0)
				break;
			memcpy(h + (size_t)j * SP_TURN, turn_at(h, up), SP_TURN);
		}
		memcpy(h + (size_t)j * SP_TURN, t, SP_TURN);
	}
}

/* The k smallest turns of the heap h of n (all n when k is more) moved
 * into out, in order; h then holds a heap of the rest, its first turns.
 * Returns how many were moved. */
uint32_t sp_heap_take(uint8_t *h, uint32_t n, uint32_t k, uint8_t *out)
{
	uint8_t t[SP_TURN];
	uint32_t j;

	if (k > n)
		k = n;
	for (j = 0; j < k; j++) {
		memcpy(out + (size_t)j * SP_TURN, h, SP_TURN);
		n--;
		/* The last turn, sifted down from the root's hole (a copy:
		 * its own place may be on the path). */
		memcpy(t, turn_at(h, n), SP_TURN);
		heap_down(h, n, 0, t);
	}
	return k;
}
