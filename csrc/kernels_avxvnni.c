/* AVX-VNNI kernels (256-bit vpdpbusd: Alder Lake and later, Sapphire Rapids, Zen 5). Compiled
 * for the baseline with this file's target pragma; dispatch.c selects the table only when
 * lq_avxvnni_usable() (cpu_x86.c: cpuid and the OS's saved register state) says so.
 *
 * Q4_K / Q6_K x Q8_K: vpdpbusd multiplies the unsigned weight quants (Q4_K nibbles 0..15, Q6_K
 * values stored as q + 32 in 0..63) by the signed Q8_K quants and adds each group of four
 * products into an int32 lane without saturation; one multiply by the sub-block scale per lane.
 * Every integer sum is exact (bounds in the comments), then each block is folded into the float
 * accumulator with the scalar kernel's very operations in its order, so results are
 * bit-identical to kernels_scalar.c. Float rows and the Q8_K quantiser are the AVX2 ones. */
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>
#include <string.h>

#include "kernels.h"

#if defined(LQ_TEST_EMULATE_VNNI)
/* Test builds only (tests/test_isa_native.py): an exact AVX2 stand-in for vpdpbusd, so that the
 * rest of this table (layouts, lanes, scales, the float fold) is tested against scalar on
 * AVX2-only machines too. u8 x s8 products widened to int16 (exact: |p| <= 255 * 128 fits after
 * madd's pairwise int32 sum), pairs summed by madd, then pairs of pairs. */
#pragma GCC target("avx2,fma,f16c")
static inline __m256i dpbusd(__m256i acc, __m256i u8, __m256i s8) {
    __m256i ulo = _mm256_unpacklo_epi8(u8, _mm256_setzero_si256());
    __m256i uhi = _mm256_unpackhi_epi8(u8, _mm256_setzero_si256());
    __m256i slo = _mm256_srai_epi16(_mm256_unpacklo_epi8(s8, s8), 8);
    __m256i shi = _mm256_srai_epi16(_mm256_unpackhi_epi8(s8, s8), 8);
    /* madd: int32 lanes of adjacent pairs, in unpack order (lo: bytes 0-7 of each 128-bit lane,
     * hi: bytes 8-15); then the two pairs of each 4-byte group, which sit in the same lane of
     * plo (bytes 0-7) or phi (bytes 8-15), are summed with a horizontal add */
    __m256i plo = _mm256_madd_epi16(ulo, slo), phi = _mm256_madd_epi16(uhi, shi);
    return _mm256_add_epi32(acc, _mm256_hadd_epi32(plo, phi));
}
#else
#pragma GCC target("avxvnni,avx2,fma,f16c")
static inline __m256i dpbusd(__m256i acc, __m256i u8, __m256i s8) {
    return _mm256_dpbusd_avx_epi32(acc, u8, s8); /* acc + sum of 4 (u8 x s8) per int32 lane, no saturation */
}
#endif

static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

static inline int32_t hsum_epi32_128(__m128i s) {
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

/* The 8 six-bit scales and mins of a Q4_K block as bytes (ggml's 12-byte packing). */
static inline void q4k_scales_mins(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
    uint32_t u[3], v[4];
    memcpy(u, s, 12);
    v[0] = u[0] & 0x3f3f3f3f;
    v[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
    v[2] = u[1] & 0x3f3f3f3f;
    v[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
    memcpy(sc, v, 8);
    memcpy(mn, v + 2, 8);
}

/* Sum over the 8 sub-blocks of mins[j] * (bsums[2j] + bsums[2j+1]): exact (|bsum| <= 2048). */
static inline int32_t q4k_min_term(const block_q8_K *xb, __m128i mn16) {
    __m128i bs = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)xb->bsums),
                                _mm_loadu_si128((const __m128i *)(xb->bsums + 8)));
    return hsum_epi32_128(_mm_madd_epi16(bs, mn16));
}

static void dot_q4k(int64_t nb, const void *w_row, const void *x_rows, int64_t x_stride, int T, float *out,
                    int64_t out_stride) {
    const block_q4_K *w = w_row;
    const block_q8_K *x = x_rows;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    float acc[LQ_MAX_T];
    for (int t = 0; t < T; t++) acc[t] = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const block_q4_K *wb = &w[b];
        LQ_PREFETCH(wb, 0), LQ_PREFETCH(wb, 64), LQ_PREFETCH(wb, 128);
        uint8_t sc[8], mn[8];
        q4k_scales_mins(wb->scales, sc, mn);
        __m256i q[8], scale[8]; /* q[j]: the 32 nibbles of sub-block j, values 32j..32j+31 */
        for (int c = 0; c < 4; c++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(wb->qs + 32 * c));
            q[2 * c] = _mm256_and_si256(bytes, m4);
            q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m4);
        }
        for (int j = 0; j < 8; j++) scale[j] = _mm256_set1_epi32(sc[j]);
        int64_t mn64;
        memcpy(&mn64, mn, 8);
        const __m128i mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn64));
        const float wd = _cvtsh_ss(wb->d), wdmin = _cvtsh_ss(wb->dmin); /* exact, as lq_fp16_to_fp32 */
        for (int t = 0; t < T; t++) {
            const block_q8_K *xb = &x[t * x_stride + b];
            /* per sub-block |sum| <= 32 * 15 * 128, times a scale <= 63: the total fits int32 */
            __m256i s = _mm256_setzero_si256();
            for (int j = 0; j < 8; j++) {
                __m256i y = _mm256_loadu_si256((const __m256i *)(xb->qs + 32 * j));
                __m256i p = dpbusd(_mm256_setzero_si256(), q[j], y);
                s = _mm256_add_epi32(s, _mm256_mullo_epi32(p, scale[j]));
            }
            int32_t isum = hsum_epi32(s), imin = q4k_min_term(xb, mn16);
            float d = xb->d * wd, dmin = xb->d * wdmin;
            acc[t] += d * (float)isum;
            acc[t] -= dmin * (float)imin;
        }
    }
    for (int t = 0; t < T; t++) out[t * out_stride] = acc[t];
}

/* lanes [2m x 4, 2m+1 x 4] of eight int32 scales: register m of a Q6_K block holds values
 * 32m..32m+31, two groups of 16 that share a scale, four vpdpbusd lanes each */
static const int32_t q6k_pair_idx[4][8] __attribute__((aligned(32))) = {
    {0, 0, 0, 0, 1, 1, 1, 1}, {2, 2, 2, 2, 3, 3, 3, 3}, {4, 4, 4, 4, 5, 5, 5, 5}, {6, 6, 6, 6, 7, 7, 7, 7}};

static void dot_q6k(int64_t nb, const void *w_row, const void *x_rows, int64_t x_stride, int T, float *out,
                    int64_t out_stride) {
    const block_q6_K *w = w_row;
    const block_q8_K *x = x_rows;
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(0x03);
    float acc[LQ_MAX_T];
    for (int t = 0; t < T; t++) acc[t] = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const block_q6_K *wb = &w[b];
        LQ_PREFETCH(wb, 0), LQ_PREFETCH(wb, 64), LQ_PREFETCH(wb, 128), LQ_PREFETCH(wb, 192);
        __m256i q[8], scale[8]; /* q[m]: unsigned 6-bit values (q + 32) 32m..32m+31 */
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
        const __m256i sc_lo = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)wb->scales));
        const __m256i sc_hi = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wb->scales + 8)));
        for (int m = 0; m < 8; m++)
            scale[m] = _mm256_permutevar8x32_epi32(m < 4 ? sc_lo : sc_hi,
                                                   _mm256_load_si256((const __m256i *)q6k_pair_idx[m % 4]));
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wb->scales));
        const float wd = _cvtsh_ss(wb->d);
        for (int t = 0; t < T; t++) {
            const block_q8_K *xb = &x[t * x_stride + b];
            /* per group |sum| <= 16 * 63 * 128, times |scale| <= 128, 16 groups: fits int32 */
            __m256i s = _mm256_setzero_si256();
            for (int m = 0; m < 8; m++) {
                __m256i y = _mm256_loadu_si256((const __m256i *)(xb->qs + 32 * m));
                __m256i p = dpbusd(_mm256_setzero_si256(), q[m], y);
                s = _mm256_add_epi32(s, _mm256_mullo_epi32(p, scale[m]));
            }
            /* the stored values are q + 32: take back 32 * sum_g scale_g * bsum_g */
            int32_t off = hsum_epi32(_mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)xb->bsums), sc16));
            int32_t isum = hsum_epi32(s) - 32 * off;
            acc[t] += (xb->d * wd) * (float)isum;
        }
    }
    for (int t = 0; t < T; t++) out[t * out_stride] = acc[t];
}

const lq_kernels lq_kernels_avxvnni = {
    .name = "avxvnni",
    .dot = {[LQ_F32] = lq_avx2_dot_f32, [LQ_F16] = lq_avx2_dot_f16, [LQ_BF16] = lq_avx2_dot_bf16,
            [LQ_Q4_K] = dot_q4k, [LQ_Q6_K] = dot_q6k},
    .quantize_q8k = lq_avx2_quantize_q8k,
};

#endif
