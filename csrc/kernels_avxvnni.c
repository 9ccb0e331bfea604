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

#if defined(LQ_TEST_EMULATE_VNNI)
/* Test builds only (tests/test_isa_native.py): an exact AVX2 stand-in for vpdpbusd, so that the
 * rest of this table (layouts, lanes, scales, the float fold) is tested against scalar on
 * AVX2-only machines too. u8 x s8 products widened to int16 (exact: |p| <= 255 * 128 fits after
 * madd's pairwise int32 sum), pairs summed by madd, then pairs of pairs. */
#pragma GCC target("avx2,fma,f16c")
#include "kernels_x86.h"
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
#include "kernels_x86.h"
static inline __m256i dpbusd(__m256i acc, __m256i u8, __m256i s8) {
    return _mm256_dpbusd_avx_epi32(acc, u8, s8); /* acc + sum of 4 (u8 x s8) per int32 lane, no saturation */
}
#endif

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
        uint32_t sc4[2], mn4[2];
        q4k_unpack_scales(wb->scales, sc4, mn4);
        const uint8_t *sc = (const uint8_t *)sc4;
        __m256i q[8], scale[8]; /* q[j]: the 32 nibbles of sub-block j, values 32j..32j+31 */
        for (int c = 0; c < 4; c++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(wb->qs + 32 * c));
            q[2 * c] = _mm256_and_si256(bytes, m4);
            q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m4);
        }
        for (int j = 0; j < 8; j++) scale[j] = _mm256_set1_epi32(sc[j]);
        const __m128i mn16 = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)mn4[1], (int)mn4[0]));
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
            int32_t isum = hsum_epi32_256(s), imin = q4k_min_term(xb, mn16);
            acc[t] = q4k_fold(acc[t], xb->d, wd, wdmin, isum, imin);
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
    float acc[LQ_MAX_T];
    for (int t = 0; t < T; t++) acc[t] = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const block_q6_K *wb = &w[b];
        LQ_PREFETCH(wb, 0), LQ_PREFETCH(wb, 64), LQ_PREFETCH(wb, 128), LQ_PREFETCH(wb, 192);
        __m256i q[8], scale[8]; /* q[m]: unsigned 6-bit values (q + 32) 32m..32m+31 */
        q6k_unpack_256(wb, q);
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
            int32_t off = hsum_epi32_256(_mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)xb->bsums), sc16));
            int32_t isum = hsum_epi32_256(s) - 32 * off;
            acc[t] = q6k_fold(acc[t], xb->d, wd, isum);
        }
    }
    for (int t = 0; t < T; t++) out[t * out_stride] = acc[t];
}

const lq_kernels lq_kernels_avxvnni = {
    .name = "avxvnni",
    .dot = {[LQ_F32] = lq_avx2_dot_f32, [LQ_F16] = lq_avx2_dot_f16, [LQ_BF16] = lq_avx2_dot_bf16,
            [LQ_Q4_K] = dot_q4k, [LQ_Q6_K] = dot_q6k},
    .quantize_q8k = lq_avx2_quantize_q8k,
    .gelu_mul = lq_avx2_gelu_mul,
};

#endif
