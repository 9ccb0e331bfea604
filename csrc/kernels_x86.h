/* Small helpers shared by the x86 kernel files (kernels_avx2.c, kernels_avxvnni.c,
 * kernels_avx512.c). Static inline, included after each file's `#pragma GCC target`, so every
 * file compiles them for its own instruction set. */
#ifndef LARQL_KERNELS_X86_H
#define LARQL_KERNELS_X86_H

#include <immintrin.h>
#include <string.h>

#include "kernels.h"

/* The 8 six-bit scales and 8 mins of a Q4_K block, unpacked to bytes (ggml's 12-byte packing:
 * bytes 0-3 scales 0-3, bytes 4-7 mins 0-3, bytes 8-11 the low nibbles of scales/mins 4-7 whose
 * top two bits sit in the spare bits 6-7 of bytes 0-3 / 4-7). sc and mn: 8 bytes each. */
static inline void q4k_unpack_scales(const uint8_t *s, uint32_t sc[2], uint32_t mn[2]) {
    uint32_t u0, u1, u2; /* three loads: one 12-byte memcpy went through the stack */
    memcpy(&u0, s, 4), memcpy(&u1, s + 4, 4), memcpy(&u2, s + 8, 4);
    sc[0] = u0 & 0x3f3f3f3f;
    mn[0] = u1 & 0x3f3f3f3f;
    sc[1] = (u2 & 0x0f0f0f0f) | (((u0 >> 6) & 0x03030303) << 4);
    mn[1] = ((u2 >> 4) & 0x0f0f0f0f) | (((u1 >> 6) & 0x03030303) << 4);
}

/* sum of the 4 int32 lanes (exact: callers' bounds keep it inside int32) */
static inline int32_t hsum_epi32_128(__m128i s) {
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

static inline int32_t hsum_epi32_256(__m256i v) {
    return hsum_epi32_128(_mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
}

/* Q4_K's min term for one Q8_K block: sum over sub-blocks j of mins[j] * (bsums[2j] + bsums[2j+1])
 * (mn16: the 8 mins widened to int16). Exact: |bsum| <= 16 * 128, so the pair sums fit int16. */
static inline int32_t q4k_min_term(const block_q8_K *xb, __m128i mn16) {
    __m128i bs = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)xb->bsums),
                                _mm_loadu_si128((const __m128i *)(xb->bsums + 8)));
    return hsum_epi32_128(_mm_madd_epi16(bs, mn16));
}

/* A Q6_K block's 256 values as stored (q + 32, unsigned 6 bits) in eight registers: q[m] holds
 * values 32m..32m+31. Per 128 values ggml stores 64 bytes of ql (low nibbles: values 0-63, high
 * nibbles: 64-127) and 32 bytes of qh (2-bit fields at shifts 0, 2, 4, 6 for values 0-31, 32-63,
 * 64-95, 96-127). */
static inline void q6k_unpack_256(const block_q6_K *wb, __m256i q[8]) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(0x03);
    for (int h = 0; h < 2; h++) {
        __m256i ql0 = _mm256_loadu_si256((const __m256i *)(wb->ql + 64 * h));
        __m256i ql1 = _mm256_loadu_si256((const __m256i *)(wb->ql + 64 * h + 32));
        __m256i qh = _mm256_loadu_si256((const __m256i *)(wb->qh + 32 * h));
        __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4);
        __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4);
        __m256i h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4);
        __m256i h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4);
        q[4 * h + 0] = _mm256_or_si256(_mm256_and_si256(ql0, m4), h0);
        q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), h1);
        q[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), h2);
        q[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), h3);
    }
}

/* One block folded into a column's float sum with kernels_scalar.c's own operations in its order
 * (no fused multiply-add: the library is built with -ffp-contract=off). The VNNI tables' integer
 * sums are exact, so with these folds their results equal the scalar kernels' bit for bit. */
static inline float q4k_fold(float acc, float xd, float wd, float wdmin, int32_t isum, int32_t imin) {
    float d = xd * wd, dmin = xd * wdmin;
    acc += d * (float)isum;
    acc -= dmin * (float)imin;
    return acc;
}

static inline float q6k_fold(float acc, float xd, float wd, int32_t isum) { return acc + (xd * wd) * (float)isum; }

/* A table's Q4_K and Q6_K rows entries (lq_rows_fn) from its one K-quant rows body, called with
 * a constant format so each entry is that body specialised (kernels_avx2.c, kernels_amx.c). */
#define LQ_KQUANT_ROWS_ENTRIES(body)                                                                          \
    static void rows_q4k(int64_t nb, const void *w, size_t row_bytes, int64_t n_rows, const void *x,      \
                         int64_t xs, int T, float *out, int64_t ors, int64_t os) {                       \
        body(LQ_Q4_K, nb, w, row_bytes, n_rows, x, xs, T, out, ors, os);                                  \
    }                                                                                                     \
    static void rows_q6k(int64_t nb, const void *w, size_t row_bytes, int64_t n_rows, const void *x,      \
                         int64_t xs, int T, float *out, int64_t ors, int64_t os) {                       \
        body(LQ_Q6_K, nb, w, row_bytes, n_rows, x, xs, T, out, ors, os);                                  \
    }

#endif
