/* Part of the control plane's own native code (build/libsliceproxy.so,
 * with native.c; loaded by ctrl/dataplane/native.py, scan_endpoints).
 *
 * An EndpointSlice's endpoints, read from their JSON as columns: the
 * decoder (ctrl/k8s/slicejson.py) hands over the raw "endpoints" array of
 * each slice, and gets back the fields a proxy reads of each endpoint
 * without a Python object made per field. It takes only what it knows to
 * be clean and leaves everything else to the exact decoding: any escape,
 * byte outside printable ASCII, hint, repeated field, value of an
 * unexpected type or address that does not parse makes it return -1, and
 * the caller then decodes the same bytes with msgspec and converts them
 * as it always did (which accepts, or declines the page). So this file
 * never decides what is valid: it only says "clean, and here it is".
 * tests/unit/test_slicejson.py compares both ways on the same slices.
 */
#include <arpa/inet.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Nesting a skipped value may have: deeper is left to the exact path. */
#define SP_SKIP_DEPTH 64
/* The longest address string read (an IPv6 address is at most 45). */
#define SP_ADDR_MAX 63

struct scan {
	const uint8_t *p, *end;
};

static void ws(struct scan *s)
{
	while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
		s->p++;
}

/* The next byte after whitespace, consumed if it is c. */
static int eat(struct scan *s, uint8_t c)
{
	ws(s);
	if (s->p < s->end && *s->p == c) {
		s->p++;
		return 1;
	}
	return 0;
}

#define ONES 0x0101010101010101ull
#define HIGHS 0x8080808080808080ull

/* Whether some byte of w is zero (its high bit set in the result). */
static uint64_t zero_byte(uint64_t w)
{
	return (w - ONES) & ~w & HIGHS;
}

/* Bytes of w (eight of the string, the first at the lowest address) a
 * string may not hold as they are: a quote, a backslash, a control
 * character, DEL or past ASCII. The lowest byte flagged is one of them;
 * the ones above it may be flagged by the borrow. */
static uint64_t stops(uint64_t w)
{
	return zero_byte(w ^ (ONES * '"')) | zero_byte(w ^ (ONES * '\\')) | zero_byte(w ^ (ONES * 0x7f)) |
	       ((w - ONES * 0x20) & ~w & HIGHS) | (w & HIGHS);
}

/* A string (the opening quote next, after whitespace): its bytes in
 * [*str, *str + *len). Only printable ASCII without escapes: -1 else.
 * Eight bytes at a time: the first byte that stops the string is its
 * closing quote, or it is not clean; the last few byte by byte. */
static int string(struct scan *s, const uint8_t **str, uint32_t *len)
{
	const uint8_t *c;
	uint64_t w, m;

	if (!eat(s, '"'))
		return -1;
	c = s->p;
	while (s->end - c >= 8) {
		memcpy(&w, c, 8);
		m = stops(w);
		if (m) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
			c += __builtin_ctzll(m) >> 3;
			if (*c != '"')
				return -1;
			goto done;
#else
			break;
#endif
		}
		c += 8;
	}
	for (; c < s->end && *c != '"'; c++)
		if (*c < 0x20 || *c >= 0x7f || *c == '\\')
			return -1;
	if (c == s->end)
		return -1;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
done:
#endif
	*str = s->p;
	*len = (uint32_t)(c - s->p);
	s->p = c + 1;
	return 0;
}

static int literal_n(struct scan *s, const char *word, size_t n)
{
	if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0)
		return 0;
	s->p += n;
	return 1;
}

#define literal(s, word) literal_n((s), (word), sizeof(word) - 1)

/* true (1), false (0), null (2); -1 for anything else. */
static int tristate(struct scan *s)
{
	ws(s);
	if (literal(s, "true"))
		return 1;
	if (literal(s, "false"))
		return 0;
	if (literal(s, "null"))
		return 2;
	return -1;
}

/* Past one value of any type, nested ones too. */
static int skip(struct scan *s)
{
	int depth = 0;
	const uint8_t *str;
	uint32_t len;

	for (;;) {
		ws(s);
		if (s->p == s->end)
			return -1;
		switch (*s->p) {
		case '"':
			if (string(s, &str, &len))
				return -1;
			break;
		case '{':
		case '[':
			if (++depth > SP_SKIP_DEPTH)
				return -1;
			s->p++;
			continue; /* its first member or element, or its end */
		case '}':
		case ']':
			if (depth == 0)
				return -1;
			depth--;
			s->p++;
			break;
		case 't':
		case 'f':
		case 'n':
			if (!literal(s, "true") && !literal(s, "false") && !literal(s, "null"))
				return -1;
			break;
		default:
			if (*s->p != '-' && (*s->p < '0' || *s->p > '9'))
				return -1;
			while (s->p < s->end && (*s->p == '-' || *s->p == '+' || *s->p == '.' || *s->p == 'e' ||
						 *s->p == 'E' || (*s->p >= '0' && *s->p <= '9')))
				s->p++;
			break;
		}
		/* A value ended: the next one in its container, or the end. */
		if (depth == 0)
			return 0;
		ws(s);
		if (s->p == s->end)
			return -1;
		if (*s->p == ',') {
			s->p++;
			ws(s);
			if (s->p < s->end && (*s->p == '}' || *s->p == ']'))
				return -1; /* a comma before the end */
			continue;
		}
		if (*s->p == ':') {
			s->p++;
			continue;
		}
		if (*s->p != '}' && *s->p != ']')
			return -1;
	}
}

/* An open-addressing index of the numbers 1 to n of a numbered table
 * (the names, the kinds): a slot holds a number, 0 when free, and the
 * index is kept at most half full. */
struct index {
	uint32_t *slots;
	uint32_t mask;
};

/* The free slot where a number of this hash goes. */
static uint32_t index_free(const struct index *ix, uint32_t hash)
{
	uint32_t i;

	for (i = hash & ix->mask; ix->slots[i]; i = (i + 1) & ix->mask)
		;
	return i;
}

/* Room in ix for number n + 1: when it would be more than half full, it
 * is made again twice as large, each number k's slot found from
 * hash(k). 0, or -1 (out of memory). */
static int index_room(struct index *ix, uint32_t n, uint32_t (*hash)(uint32_t k))
{
	uint32_t size, k;
	uint32_t *p;

	if (ix->slots && 2 * (n + 1) <= ix->mask + 1)
		return 0;
	size = ix->slots ? 2 * (ix->mask + 1) : 512;
	p = calloc(size, sizeof(uint32_t));
	if (!p)
		return -1;
	free(ix->slots);
	ix->slots = p;
	ix->mask = size - 1;
	for (k = 1; k <= n; k++)
		ix->slots[index_free(ix, hash(k))] = k;
	return 0;
}

/* Node and zone names: a cluster has at most thousands, repeated over
 * its endpoints. Each gets a number once for the life of the process
 * (until sp_names_reset), and the caller keeps the list of them in the
 * same order: an endpoint's name is that number, never a string made
 * again. Calls are not concurrent (native.py holds a lock). */
static struct {
	char *arena; /* the names one after the other */
	size_t used, size;
	uint32_t *off, *len; /* per name (number - 1) */
	uint32_t n, cap;
	struct index ix;
} names;

static void kinds_reset(void);

void sp_names_reset(void)
{
	free(names.arena);
	free(names.off);
	free(names.len);
	free(names.ix.slots);
	memset(&names, 0, sizeof(names));
	kinds_reset();
}

static uint32_t name_hash(const uint8_t *str, uint32_t len)
{
	uint32_t h = 2166136261u, i;

	for (i = 0; i < len; i++)
		h = (h ^ str[i]) * 16777619u;
	return h;
}

/* Name k's hash (as name_hash hashed it). */
static uint32_t name_hash_of(uint32_t k)
{
	return name_hash((uint8_t *)names.arena + names.off[k - 1], names.len[k - 1]);
}

/* Room for one more name of len bytes: 0, or -1 (out of memory). */
static int names_room(uint32_t len)
{
	void *p;

	if (names.used + len > names.size) {
		size_t want = names.size ? names.size : 4096;

		while (want < names.used + len)
			want *= 2;
		p = realloc(names.arena, want);
		if (!p)
			return -1;
		names.arena = p;
		names.size = want;
	}
	if (names.n == names.cap) {
		uint32_t cap = names.cap ? 2 * names.cap : 256;

		p = realloc(names.off, cap * sizeof(uint32_t));
		if (!p)
			return -1;
		names.off = p;
		p = realloc(names.len, cap * sizeof(uint32_t));
		if (!p)
			return -1;
		names.len = p;
		names.cap = cap;
	}
	return index_room(&names.ix, names.n, name_hash_of);
}

/* An endpoint's kind: its conditions and its node's and zone's numbers,
 * the fields besides its address that the caller makes its Endpoint of
 * (native.py keeps one Endpoint's worth of them per kind, in the kinds'
 * order: a row names its kind, and its Endpoint is its address and that).
 * A cluster has a few per node. Numbered like the names (and forgotten
 * with them, whose numbers a kind holds). */
static struct {
	uint64_t *key; /* per kind number - 1: kind_key */
	uint32_t n, cap;
	struct index ix;
} kinds;

static void kinds_reset(void)
{
	free(kinds.key);
	free(kinds.ix.slots);
	memset(&kinds, 0, sizeof(kinds));
}

/* Conditions (3 bits), node number (30 bits), zone number: as native.py
 * reads a fresh kind. */
static uint64_t kind_key(uint8_t cond, uint32_t node, uint32_t zone)
{
	return (uint64_t)cond | (uint64_t)node << 3 | (uint64_t)zone << 33;
}

static uint32_t kind_hash(uint64_t key)
{
	return (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32);
}

/* Kind k's hash. */
static uint32_t kind_hash_of(uint32_t k)
{
	return kind_hash(kinds.key[k - 1]);
}

/* Room for one more kind: 0, or -1 (out of memory). */
static int kinds_room(void)
{
	void *p;

	if (kinds.n == kinds.cap) {
		uint32_t cap = kinds.cap ? 2 * kinds.cap : 256;

		p = realloc(kinds.key, cap * sizeof(uint64_t));
		if (!p)
			return -1;
		kinds.key = p;
		kinds.cap = cap;
	}
	return index_room(&kinds.ix, kinds.n, kind_hash_of);
}

/* Where a scan writes: the slice being read (seg, its JSON at js), and
 * the names and kinds numbered so far in the call. */
struct rows {
	const uint8_t *js;
	uint32_t seg;
	uint32_t *fresh, nfresh, max_fresh;
	uint64_t *fkinds;
	uint32_t nfkinds, max_fkinds;
};

/* The kind's number (from 0), given one when new (its key then appended
 * to r's fkinds); UINT32_MAX when out of memory or room. */
static uint32_t kind_of(struct rows *r, uint64_t key)
{
	uint32_t h = kind_hash(key), i, k;

	if (kinds.ix.slots) {
		for (i = h & kinds.ix.mask; (k = kinds.ix.slots[i]); i = (i + 1) & kinds.ix.mask)
			if (kinds.key[k - 1] == key)
				return k - 1;
	}
	if (r->nfkinds == r->max_fkinds || kinds_room())
		return UINT32_MAX;
	kinds.key[kinds.n] = key;
	kinds.ix.slots[index_free(&kinds.ix, h)] = ++kinds.n;
	r->fkinds[r->nfkinds++] = key;
	return kinds.n - 1;
}

/* The name's number (from 1), given one when new; its place, when new,
 * appended to r's fresh ((slice, offset in its JSON, length) triples,
 * nfresh of them). 0: out of memory. */
static uint32_t name_of(struct rows *r, const uint8_t *str, uint32_t len)
{
	uint32_t h = name_hash(str, len), i, k;

	if (names.ix.slots) {
		for (i = h & names.ix.mask; (k = names.ix.slots[i]); i = (i + 1) & names.ix.mask)
			if (names.len[k - 1] == len && memcmp(names.arena + names.off[k - 1], str, len) == 0)
				return k;
	}
	if (names_room(len))
		return 0;
	memcpy(names.arena + names.used, str, len);
	names.off[names.n] = (uint32_t)names.used;
	names.len[names.n] = len;
	names.used += len;
	names.ix.slots[index_free(&names.ix, h)] = ++names.n;
	r->fresh[3 * r->nfresh] = r->seg;
	r->fresh[3 * r->nfresh + 1] = (uint32_t)(str - r->js);
	r->fresh[3 * r->nfresh + 2] = len;
	r->nfresh++;
	return names.n;
}

struct field {
	const char *name;
	uint32_t len;
};

#define FIELD(name) { name, sizeof(name) - 1 }

/* An object (its opening brace next, after whitespace): each member
 * named in fields (at most 32) given to take(s, its index, ctx), at most
 * once; the others skipped. */
static int object(struct scan *s, const struct field *fields, int nfields,
		  int (*take)(struct scan *s, int i, void *ctx), void *ctx)
{
	uint32_t seen = 0, len;
	const uint8_t *key;
	int i;

	if (!eat(s, '{'))
		return -1;
	if (eat(s, '}'))
		return 0;
	do {
		if (string(s, &key, &len) || !eat(s, ':'))
			return -1;
		for (i = 0; i < nfields; i++)
			if (fields[i].len == len && fields[i].name[0] == key[0] && !memcmp(fields[i].name, key, len))
				break;
		if (i == nfields) {
			if (skip(s))
				return -1;
			continue;
		}
		if (seen & 1u << i)
			return -1;
		seen |= 1u << i;
		if (take(s, i, ctx))
			return -1;
	} while (eat(s, ','));
	return eat(s, '}') ? 0 : -1;
}

static const struct field condition_fields[] = { FIELD("ready"), FIELD("serving"), FIELD("terminating") };

/* A condition: true (1), false (0) or null (2). */
static int take_condition(struct scan *s, int i, void *ctx)
{
	int *v = ctx;

	v[i] = tristate(s);
	return v[i] < 0 ? -1 : 0;
}

/* "conditions": null, or an object of ready, serving, terminating (each
 * true, false or null) and fields not read. cond gets bit 0 ready (not
 * false), bit 1 serving (not false), bit 2 terminating (true), as the
 * decoder reads them. */
static int conditions(struct scan *s, uint8_t *cond)
{
	int v[3] = { 2, 2, 2 };

	ws(s);
	if (!literal(s, "null") && object(s, condition_fields, 3, take_condition, v))
		return -1;
	*cond = (uint8_t)((v[0] != 0) | (v[1] != 0) << 1 | (v[2] == 1) << 2);
	return 0;
}

/* "addresses": an array of one string or more; the first one parsed
 * into addr (16 bytes, IPv4 mapped) for family AF_INET or AF_INET6, only
 * checked to be there for 0 (FQDN). */
static int addresses(struct scan *s, int family, uint8_t *addr)
{
	const uint8_t *str;
	uint32_t len, n = 0;
	char buf[SP_ADDR_MAX + 1];

	if (!eat(s, '[') || eat(s, ']'))
		return -1; /* null or empty: the exact path declines it */
	do {
		if (string(s, &str, &len))
			return -1;
		if (n++ == 0 && family) {
			if (len > SP_ADDR_MAX)
				return -1;
			memcpy(buf, str, len);
			buf[len] = 0;
			if (family == AF_INET) {
				memset(addr, 0, 10);
				addr[10] = addr[11] = 0xff;
				if (inet_pton(AF_INET, buf, addr + 12) != 1)
					return -1;
			} else if (inet_pton(AF_INET6, buf, addr) != 1) {
				return -1;
			}
		}
	} while (eat(s, ','));
	return eat(s, ']') ? 0 : -1;
}

/* A string or null: its name's number (0 for null). */
static int name_field(struct scan *s, struct rows *r, uint32_t *out)
{
	const uint8_t *str;
	uint32_t len;

	ws(s);
	if (literal(s, "null")) {
		*out = 0;
		return 0;
	}
	if (string(s, &str, &len) || r->nfresh == r->max_fresh)
		return -1;
	*out = name_of(r, str, len);
	return *out ? 0 : -1;
}

/* One endpoint: where its row goes. */
struct endpoint {
	int family, has_addresses;
	struct rows *r;
	uint8_t *addr, *cond;
	uint32_t *node, *zone;
};

static const struct field endpoint_fields[] = { FIELD("addresses"), FIELD("conditions"), FIELD("nodeName"),
						FIELD("zone"), FIELD("hints") };

static int take_endpoint_field(struct scan *s, int i, void *ctx)
{
	struct endpoint *e = ctx;

	switch (i) {
	case 0:
		e->has_addresses = 1;
		return addresses(s, e->family, e->addr);
	case 1:
		return conditions(s, e->cond);
	case 2:
		return name_field(s, e->r, e->node);
	case 3:
		return name_field(s, e->r, e->zone);
	default: /* hints: only null is read here */
		ws(s);
		return literal(s, "null") ? 0 : -1;
	}
}

/* One endpoint object into its row (its address, its kind's number): it
 * must have addresses. */
static int endpoint(struct scan *s, int family, struct rows *r, uint8_t *addr, uint32_t *kind)
{
	uint8_t cond = 3; /* no conditions: ready and serving */
	uint32_t node = 0, zone = 0;
	struct endpoint e = { family, 0, r, addr, &cond, &node, &zone };

	if (object(s, endpoint_fields, 5, take_endpoint_field, &e) || !e.has_addresses)
		return -1;
	*kind = kind_of(r, kind_key(cond, node, zone));
	return *kind == UINT32_MAX ? -1 : 0;
}

/* Where a scan writes: cap rows of addrs (16 bytes each) and kind (its
 * kind's number: conditions, bits as in conditions(), and node and zone,
 * a name's number, 0 for null or absent); fresh gets the names numbered
 * in a call, in their order, as (slice, offset in its JSON, length),
 * nfresh of them (room for 2 * cap), and fkinds the kinds numbered in
 * the call, in their order (kind_key), nfkinds of them (room for cap). */
struct sp_scan_rows {
	uint8_t *addrs;
	uint32_t *kind, *fresh;
	uint64_t *fkinds;
	uint32_t cap, nfresh, nfkinds;
};

/* One slice's endpoints array, s over its JSON (null or an array of
 * endpoint objects) of address family `family` (AF_INET, AF_INET6, or 0
 * for FQDN: checked, none returned), into rows from row `first` on: the
 * number of rows, or -1 (not clean, see the top of this file, or more
 * endpoints than rows). */
static int64_t slice_endpoints(struct scan *s, int family, struct sp_scan_rows *rows, struct rows *r,
			       uint32_t first)
{
	uint32_t n = first, cap = rows->cap;

	if (family != AF_INET && family != AF_INET6 && family != 0)
		return -1;
	ws(s);
	if (literal(s, "null")) {
		ws(s);
		return s->p == s->end ? 0 : -1;
	}
	if (!eat(s, '['))
		return -1;
	if (!eat(s, ']')) {
		do {
			if (n == cap)
				return -1;
			if (endpoint(s, family, r, rows->addrs + (size_t)16 * n, rows->kind + n))
				return -1;
			n++;
		} while (eat(s, ','));
		if (!eat(s, ']'))
			return -1;
	}
	ws(s);
	if (s->p != s->end)
		return -1;
	return family ? n - first : 0;
}

/* The endpoints arrays of nseg slices: slice i's is segs[i] (lens[i]
 * bytes) of address family families[i] (as above). Its rows follow the
 * rows of the slices before it that were taken; counts[i] is set to its
 * number of rows, or -1 when it is not taken (its rows are then the next
 * slice's). nfresh and nfkinds are set whatever the results: the caller
 * keeps every name and kind numbered. Returns the rows written. */
uint32_t sp_endpoints_scan(const uint8_t *const *segs, const uint32_t *lens, uint32_t nseg, const int32_t *families,
			   struct sp_scan_rows *rows, int32_t *counts)
{
	struct rows r = { NULL, 0, rows->fresh, 0, 2 * rows->cap, rows->fkinds, 0, rows->cap };
	uint32_t used = 0;

	for (uint32_t i = 0; i < nseg; i++) {
		struct scan s = { segs[i], segs[i] ? segs[i] + lens[i] : NULL };
		int64_t n;

		r.js = segs[i];
		r.seg = i;
		n = slice_endpoints(&s, families[i], rows, &r, used);
		counts[i] = (int32_t)n;
		if (n > 0)
			used += (uint32_t)n;
	}
	rows->nfresh = r.nfresh;
	rows->nfkinds = r.nfkinds;
	return used;
}

/* One sp_endpoints_scan call run on a thread of this library's own, so
 * that the caller (Python) makes the Endpoints of the call before it while
 * this one reads its JSON: sp_scan_start hands the thread one call's
 * arguments, sp_scan_wait waits for it and returns what the call returned
 * (the buffers must stay as they are until then). One call at a time; the
 * caller (native.py, under its scan lock) starts the next only after
 * waiting for the last, so the calls, and the names they number, follow
 * one another as if made in turn. The thread needs no Python: it never
 * waits for the interpreter's lock. A process forked from one that
 * started it starts its own. */
static struct {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	pid_t pid; /* of the process whose thread this is; 0: none yet */
	int state; /* 0 idle, 1 a call given, 2 its result ready */
	const uint8_t *const *segs;
	const uint32_t *lens;
	const int32_t *families;
	struct sp_scan_rows *rows;
	int32_t *counts;
	uint32_t nseg, result;
} worker;

static void *scan_worker(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&worker.lock);
	for (;;) {
		while (worker.state != 1)
			pthread_cond_wait(&worker.cond, &worker.lock);
		pthread_mutex_unlock(&worker.lock);
		uint32_t n = sp_endpoints_scan(worker.segs, worker.lens, worker.nseg, worker.families, worker.rows,
					       worker.counts);
		pthread_mutex_lock(&worker.lock);
		worker.result = n;
		worker.state = 2;
		pthread_cond_broadcast(&worker.cond);
	}
	return NULL;
}

/* Returns 0, or -1 when the thread cannot be started (the caller then
 * scans in its own thread). */
int sp_scan_start(const uint8_t *const *segs, const uint32_t *lens, uint32_t nseg, const int32_t *families,
		  struct sp_scan_rows *rows, int32_t *counts)
{
	if (worker.pid != getpid()) {
		pthread_t t;
		pthread_attr_t attr;
		int err;

		pthread_mutex_init(&worker.lock, NULL);
		pthread_cond_init(&worker.cond, NULL);
		worker.state = 0;
		if (pthread_attr_init(&attr))
			return -1;
		pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
		err = pthread_create(&t, &attr, scan_worker, NULL);
		pthread_attr_destroy(&attr);
		if (err)
			return -1;
		worker.pid = getpid();
	}
	pthread_mutex_lock(&worker.lock);
	worker.segs = segs;
	worker.lens = lens;
	worker.nseg = nseg;
	worker.families = families;
	worker.rows = rows;
	worker.counts = counts;
	worker.state = 1;
	pthread_cond_broadcast(&worker.cond);
	pthread_mutex_unlock(&worker.lock);
	return 0;
}

uint32_t sp_scan_wait(void)
{
	uint32_t n;

	pthread_mutex_lock(&worker.lock);
	while (worker.state != 2)
		pthread_cond_wait(&worker.cond, &worker.lock);
	n = worker.result;
	worker.state = 0;
	pthread_mutex_unlock(&worker.lock);
	return n;
}
