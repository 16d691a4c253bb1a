/* SHA-256 of many equal-length messages with the x86 SHA extensions, two messages at a time:
 * the fast path of _blockhash.c for SHA-256 Merkle trees, salted or not (fs-verity's defaults,
 * erofs-fuse seal's trees, veritysetup's salted ones).
 *
 * Why two at a time: each SHA256RNDS2 waits for the one before it, so one message leaves the
 * CPU's SHA unit idle most of the time. The blocks of a Merkle level are independent messages,
 * so two chains of rounds can run side by side on one core (Linux hashes dm-verity and
 * fs-verity blocks the same way since 6.11). Written from FIPS 180-4 and Intel's description
 * of the instructions; tests compare every path with hashlib.
 *
 * The state sits in two registers as the instructions want it: (A, B, E, F) and (C, D, G, H),
 * A and C in the highest lane. Each group of four rounds uses four message words, computed
 * from the 16 before them by SHA256MSG1/SHA256MSG2 (W[t] = s1(W[t-2]) + W[t-7] + s0(W[t-15])
 * + W[t-16]).
 */
#include "sha256ni.h"

#if defined(__x86_64__) || defined(__i386__)

#include <cpuid.h>
#include <immintrin.h>
#include <string.h>

#define TARGET __attribute__((target("sha,ssse3,sse4.1")))

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static const uint32_t H0[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

int sha256ni_available(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_SSSE3) || !(c & bit_SSE4_1))
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    return (b >> 29) & 1; /* CPUID.(EAX=7,ECX=0):EBX.SHA */
}

typedef struct {
    __m128i abef, cdgh;
} State;

TARGET static inline State initial_state(void)
{
    __m128i t = _mm_loadu_si128((const __m128i *)&H0[0]); /* lanes a b c d */
    __m128i s = _mm_loadu_si128((const __m128i *)&H0[4]); /* e f g h */
    t = _mm_shuffle_epi32(t, 0xB1);                        /* b a d c */
    s = _mm_shuffle_epi32(s, 0x1B);                        /* h g f e */
    return (State){_mm_alignr_epi8(t, s, 8),               /* f e b a */
                   _mm_blend_epi16(s, t, 0xF0)};           /* h g d c */
}

TARGET static inline void store_digest(State st, unsigned char *out)
{
    const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i t = _mm_shuffle_epi32(st.abef, 0x1B); /* a b e f */
    __m128i s = _mm_shuffle_epi32(st.cdgh, 0xB1); /* g h c d */
    __m128i lo = _mm_blend_epi16(t, s, 0xF0);     /* a b c d */
    __m128i hi = _mm_alignr_epi8(s, t, 8);        /* e f g h */
    _mm_storeu_si128((__m128i *)out, _mm_shuffle_epi8(lo, swap));
    _mm_storeu_si128((__m128i *)(out + 16), _mm_shuffle_epi8(hi, swap));
}

/* The next four message words of group g >= 4 from the four groups before it (m[g & 3] holds
 * group g - 4 and is replaced). */
TARGET static inline __m128i schedule(const __m128i m[4], int g)
{
    __m128i w16 = m[g & 3], w12 = m[(g + 1) & 3], w8 = m[(g + 2) & 3], w4 = m[(g + 3) & 3];
    __m128i t = _mm_add_epi32(_mm_sha256msg1_epu32(w16, w12), _mm_alignr_epi8(w4, w8, 4));
    return _mm_sha256msg2_epu32(t, w4);
}

/* One 64-byte chunk of each of two messages (p and q) into their states. */
TARGET static inline void compress2(State *x, State *y, const unsigned char *p,
                                    const unsigned char *q)
{
    const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i mx[4], my[4];
    __m128i ax = x->abef, cx = x->cdgh, ay = y->abef, cy = y->cdgh;
#pragma GCC unroll 16
    for (int g = 0; g < 16; g++) {
        if (g < 4) {
            mx[g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * g)), swap);
            my[g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(q + 16 * g)), swap);
        } else {
            mx[g & 3] = schedule(mx, g);
            my[g & 3] = schedule(my, g);
        }
        __m128i k = _mm_loadu_si128((const __m128i *)&K[4 * g]);
        __m128i wx = _mm_add_epi32(mx[g & 3], k), wy = _mm_add_epi32(my[g & 3], k);
        /* two rounds make the old (A, B, E, F) the new (C, D, G, H) */
        cx = _mm_sha256rnds2_epu32(cx, ax, wx);
        cy = _mm_sha256rnds2_epu32(cy, ay, wy);
        ax = _mm_sha256rnds2_epu32(ax, cx, _mm_shuffle_epi32(wx, 0x0E));
        ay = _mm_sha256rnds2_epu32(ay, cy, _mm_shuffle_epi32(wy, 0x0E));
    }
    x->abef = _mm_add_epi32(x->abef, ax);
    x->cdgh = _mm_add_epi32(x->cdgh, cx);
    y->abef = _mm_add_epi32(y->abef, ay);
    y->cdgh = _mm_add_epi32(y->cdgh, cy);
}

/* The messages of a call: prefix || block || suffix (a salt before or after, or neither),
 * each block `len` bytes, then SHA-256's padding (0x80, zeros, the length in bits). What
 * follows the block is the same for every message: kept once in `tail`. */
typedef struct {
    const unsigned char *prefix;
    size_t prefix_len, len, chunks;
    unsigned char tail[SHA256NI_MAX_SUFFIX + 72 + 64];
} Layout;

/* Chunk i (64 bytes) of the message whose block is at `block`: a pointer into the prefix, the
 * block or the tail where the chunk lies inside one of them (nearly all chunks), else
 * assembled in `tmp`. */
static const unsigned char *chunk(const Layout *m, const unsigned char *block, size_t i,
                                  unsigned char tmp[64])
{
    size_t start = 64 * i, end = start + 64, after = m->prefix_len + m->len;
    if (end <= m->prefix_len)
        return m->prefix + start;
    if (start >= m->prefix_len && end <= after)
        return block + (start - m->prefix_len);
    if (start >= after)
        return m->tail + (start - after);
    for (size_t k = 0; k < 64; k++) {
        size_t pos = start + k;
        tmp[k] = pos < m->prefix_len ? m->prefix[pos]
                 : pos < after       ? block[pos - m->prefix_len]
                                     : m->tail[pos - after];
    }
    return tmp;
}

/* The digests of the messages of blocks p and q. */
TARGET static void digest2(const Layout *m, const unsigned char *p, const unsigned char *q,
                           unsigned char *out_p, unsigned char *out_q)
{
    unsigned char tp[64], tq[64];
    State x = initial_state(), y = x;
    /* the chunks inside the block, read in place, in a loop of their own */
    size_t lo = (m->prefix_len + 63) / 64, hi = (m->prefix_len + m->len) / 64, i = 0;
    for (; i < lo && i < m->chunks; i++)
        compress2(&x, &y, chunk(m, p, i, tp), chunk(m, q, i, tq));
    for (; i < hi; i++)
        compress2(&x, &y, p + (64 * i - m->prefix_len), q + (64 * i - m->prefix_len));
    for (; i < m->chunks; i++)
        compress2(&x, &y, chunk(m, p, i, tp), chunk(m, q, i, tq));
    store_digest(x, out_p);
    store_digest(y, out_q);
}

void sha256ni_digests(const unsigned char *prefix, size_t prefix_len,
                      const unsigned char *suffix, size_t suffix_len,
                      const unsigned char *data, size_t len, size_t first, size_t stop,
                      unsigned char *out, size_t slot)
{
    Layout m;
    m.prefix = prefix;
    m.prefix_len = prefix_len;
    m.len = len;
    size_t total = prefix_len + len + suffix_len;
    m.chunks = (total + 9 + 63) / 64; /* room for 0x80 and the 8-byte length */
    size_t tail_len = 64 * m.chunks - (prefix_len + len);
    memset(m.tail, 0, tail_len);
    memcpy(m.tail, suffix, suffix_len);
    m.tail[suffix_len] = 0x80;
    unsigned long long bits = (unsigned long long)total * 8;
    for (int k = 0; k < 8; k++)
        m.tail[tail_len - 1 - (size_t)k] = (unsigned char)(bits >> (8 * k));
    size_t b = first;
    for (; b + 1 < stop; b += 2)
        digest2(&m, data + b * len, data + (b + 1) * len, out + b * slot, out + (b + 1) * slot);
    if (b < stop) { /* an odd one out: hashed alongside itself, one result kept */
        unsigned char spare[32];
        digest2(&m, data + b * len, data + b * len, out + b * slot, spare);
    }
}

#else /* no SHA extensions to use: _blockhash.c hashes with OpenSSL */

int sha256ni_available(void)
{
    return 0;
}

void sha256ni_digests(const unsigned char *prefix, size_t prefix_len,
                      const unsigned char *suffix, size_t suffix_len,
                      const unsigned char *data, size_t len, size_t first, size_t stop,
                      unsigned char *out, size_t slot)
{
    (void)prefix, (void)prefix_len, (void)suffix, (void)suffix_len;
    (void)data, (void)len, (void)first, (void)stop, (void)out, (void)slot;
}

#endif
