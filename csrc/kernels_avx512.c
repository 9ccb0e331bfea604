/* AVX-512 (F/BW/VL) + AVX512-VNNI kernels: 512-bit vpdpbusd (Ice Lake, Sapphire Rapids, Zen 4+).
 * Compiled for the baseline with this file's target pragma; dispatch.c selects the table only
 * when lq_avx512_usable() (cpu_x86.c: cpuid and the OS's saved zmm/opmask state) says so.
 *
 * The arithmetic is that of kernels_avxvnni.c on registers twice as wide: vpdpbusd of unsigned
 * weight quants by signed Q8_K quants into int32 lanes (exact), one multiply by the sub-block
 * scale per lane, an exact integer reduction per block, then the scalar kernel's float operations
 * in its order, so results are bit-identical to kernels_scalar.c. Float rows and the Q8_K
 * quantiser are the AVX2 ones (memory-bound; wider registers buy nothing there). */
#if defined(__x86_64__) || defined(_M_X64)

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")

#include "kernels_x86.h"

/* Two 256-bit loads from p + a and p + b as one 512-bit register (a in the low half). */
static inline __m512i load_halves(const int8_t *p, int a, int b) {
    __m256i lo = _mm256_loadu_si256((const __m256i *)(p + a)), hi = _mm256_loadu_si256((const __m256i *)(p + b));
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* 16 int32 lanes: a in lanes 0-7, b in lanes 8-15 */
static inline __m512i halves_epi32(int32_t a, int32_t b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(a)), _mm256_set1_epi32(b), 1);
}

void lq_avx512_dot_q4k(int64_t nb, const void *w_row, const void *x_rows, int64_t x_stride, int T, float *out,
                    int64_t out_stride) {
    const block_q4_K *w = w_row;
    const block_q8_K *x = x_rows;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    float acc[LQ_MAX_T];
    for (int t = 0; t < T; t++) acc[t] = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const block_q4_K *wb = &w[b];
        LQ_PREFETCH(wb, 0), LQ_PREFETCH(wb, 64), LQ_PREFETCH(wb, 128);
        uint32_t sc4[2], mn4[2];
        q4k_unpack_scales(wb->scales, sc4, mn4);
        const uint8_t *sc = (const uint8_t *)sc4;
        /* qs bytes 0-63 hold sub-blocks 0 and 2 (low nibbles) and 1 and 3 (high); bytes 64-127
         * sub-blocks 4, 6 and 5, 7. q[k] pairs sub-blocks sub[k][0] (low half) and sub[k][1]. */
        static const int sub[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
        __m512i q[4], scale[4];
        for (int h = 0; h < 2; h++) {
            __m512i bytes = _mm512_loadu_si512((const void *)(wb->qs + 64 * h));
            q[2 * h] = _mm512_and_si512(bytes, m4);
            q[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), m4);
        }
        for (int k = 0; k < 4; k++) scale[k] = halves_epi32(sc[sub[k][0]], sc[sub[k][1]]);
        const __m128i mn16 = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)mn4[1], (int)mn4[0]));
        const float wd = _cvtsh_ss(wb->d), wdmin = _cvtsh_ss(wb->dmin); /* exact, as lq_fp16_to_fp32 */
        for (int t = 0; t < T; t++) {
            const block_q8_K *xb = &x[t * x_stride + b];
            /* sub-block j meets activations 32j..32j+31; totals fit int32 (see kernels_avxvnni.c) */
            __m512i s = _mm512_setzero_si512();
            for (int k = 0; k < 4; k++) {
                __m512i y = load_halves(xb->qs, 32 * sub[k][0], 32 * sub[k][1]);
                __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[k], y);
                s = _mm512_add_epi32(s, _mm512_mullo_epi32(p, scale[k]));
            }
            int32_t isum = _mm512_reduce_add_epi32(s), imin = q4k_min_term(xb, mn16);
            acc[t] = q4k_fold(acc[t], xb->d, wd, wdmin, isum, imin);
        }
    }
    for (int t = 0; t < T; t++) out[t * out_stride] = acc[t];
}

/* lane i of register k (values 64k..64k+63, groups 4k..4k+3) takes scale 4k + i / 4 */
static const int32_t q6k_group_idx[4][16] __attribute__((aligned(64))) = {
    {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3},
    {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7},
    {8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11},
    {12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15}};

void lq_avx512_dot_q6k(int64_t nb, const void *w_row, const void *x_rows, int64_t x_stride, int T, float *out,
                    int64_t out_stride) {
    const block_q6_K *w = w_row;
    const block_q8_K *x = x_rows;
    const __m512i m4 = _mm512_set1_epi8(0x0f), m2 = _mm512_set1_epi8(0x03);
    /* per-16-bit-lane shifts of the qh bits: low 256 bits one field, high 256 bits the next */
    const __m512i shift_a = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    const __m512i shift_b = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1);
    float acc[LQ_MAX_T];
    for (int t = 0; t < T; t++) acc[t] = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const block_q6_K *wb = &w[b];
        LQ_PREFETCH(wb, 0), LQ_PREFETCH(wb, 64), LQ_PREFETCH(wb, 128), LQ_PREFETCH(wb, 192);
        __m512i q[4], scale[4]; /* q[k]: unsigned 6-bit values (q + 32) 64k..64k+63 */
        for (int h = 0; h < 2; h++) {
            /* per 128 values: ql bytes 0-63 (low nibbles: values 0-63, high: 64-127) and qh bytes
             * 0-31 (2-bit fields at shifts 0, 2, 4, 6 for values 0-31, 32-63, 64-95, 96-127) */
            __m512i ql = _mm512_loadu_si512((const void *)(wb->ql + 64 * h));
            __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(wb->qh + 32 * h)));
            __m512i ha = _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, shift_a), m2), 4);
            __m512i hb = _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, shift_b), m2), 4);
            q[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, m4), ha);
            q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4), hb);
        }
        const __m512i sc32 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)wb->scales));
        for (int k = 0; k < 4; k++)
            scale[k] = _mm512_permutexvar_epi32(_mm512_load_si512((const void *)q6k_group_idx[k]), sc32);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wb->scales));
        const float wd = _cvtsh_ss(wb->d);
        for (int t = 0; t < T; t++) {
            const block_q8_K *xb = &x[t * x_stride + b];
            __m512i s = _mm512_setzero_si512();
            for (int k = 0; k < 4; k++) {
                __m512i y = _mm512_loadu_si512((const void *)(xb->qs + 64 * k));
                __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[k], y);
                s = _mm512_add_epi32(s, _mm512_mullo_epi32(p, scale[k]));
            }
            /* the stored values are q + 32: take back 32 * sum_g scale_g * bsum_g */
            __m256i off8 = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)xb->bsums), sc16);
            int32_t isum = _mm512_reduce_add_epi32(s) - 32 * hsum_epi32_256(off8);
            acc[t] = q6k_fold(acc[t], xb->d, wd, isum);
        }
    }
    for (int t = 0; t < T; t++) out[t * out_stride] = acc[t];
}

const lq_kernels lq_kernels_avx512 = {
    .name = "avx512",
    .dot = {[LQ_F32] = lq_avx2_dot_f32, [LQ_F16] = lq_avx2_dot_f16, [LQ_BF16] = lq_avx2_dot_bf16,
            [LQ_Q4_K] = lq_avx512_dot_q4k, [LQ_Q6_K] = lq_avx512_dot_q6k},
    .quantize_q8k = lq_avx2_quantize_q8k,
    .gelu_mul = lq_avx2_gelu_mul,
};

#endif
