/* AVX2 + FMA (+ F16C) kernels. Compiled for the baseline target with this file's own target
 * pragma; dispatch.c only selects the table when cpuid reports avx2 and fma.
 *
 * Q4_K / Q6_K x Q8_K: the weight block is unpacked once into eight 32-byte registers of
 * unsigned quants (one per 32 values), then for each activation row: maddubs (u8 x s8 -> s16
 * pairs), madd with the sub-block scale (-> s32), one float multiply-add per block with the
 * combined scale. The Q4_K min term and the Q6_K -32 offset are folded in through the Q8_K
 * bsums (sums of 16 activations), so neither costs a pass over the values.
 */
#if defined(__x86_64__) || defined(_M_X64)

#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>
#include <string.h>

#include "kernels.h"

#define LQ_TMAX 64

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 8 six-bit scales and 8 mins of a Q4_K block, unpacked to bytes (ggml's 12-byte packing:
 * bytes 0-3 scales 0-3, bytes 4-7 mins 0-3, bytes 8-11 the low nibbles of scales/mins 4-7 whose
 * top two bits sit in the spare bits 6-7 of bytes 0-3 / 4-7). */
static inline void q4k_unpack_scales(const uint8_t *s, uint32_t sc[2], uint32_t mn[2]) {
    uint32_t u[3];
    memcpy(u, s, 12);
    sc[0] = u[0] & 0x3f3f3f3f;
    mn[0] = u[1] & 0x3f3f3f3f;
    sc[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
    mn[1] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
}

/* shuffle controls broadcasting int16 lane j of a 128-bit vector to all 16 lanes */
static const uint8_t lane16_ctrl[8][32] __attribute__((aligned(32))) = {
#define L(j) {2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, \
              2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1}
    L(0), L(1), L(2), L(3), L(4), L(5), L(6), L(7)
#undef L
};

static inline __attribute__((always_inline)) void q4k_rows(int64_t nb, const block_q4_K *w, const block_q8_K *x,
                                                           int64_t x_stride, int T, float *out,
                                                           int64_t out_stride) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc[LQ_TMAX];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const block_q4_K *wb = &w[b];
        uint32_t sc[2], mn[2];
        q4k_unpack_scales(wb->scales, sc, mn);
        const __m128i sc16 = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)sc[1], (int)sc[0]));
        const __m128i mn16 = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)mn[1], (int)mn[0]));
        const __m256i sc256 = _mm256_broadcastsi128_si256(sc16);
        __m256i q[8], scale[8];
        for (int c = 0; c < 4; c++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(wb->qs + 32 * c));
            q[2 * c] = _mm256_and_si256(bytes, m4);
            q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m4);
        }
        for (int j = 0; j < 8; j++)
            scale[j] = _mm256_shuffle_epi8(sc256, _mm256_load_si256((const __m256i *)lane16_ctrl[j]));
        const float d = _cvtsh_ss(wb->d), dmin = _cvtsh_ss(wb->dmin); /* F16C */
        for (int t = 0; t < T; t++) {
            const block_q8_K *xb = &x[t * x_stride + b];
            __m256i sumi = _mm256_setzero_si256();
            for (int j = 0; j < 8; j++) {
                __m256i y = _mm256_loadu_si256((const __m256i *)(xb->qs + 32 * j));
                __m256i p = _mm256_maddubs_epi16(q[j], y); /* <= 2*15*127: no saturation */
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scale[j]));
            }
            /* the min term: sub-block j covers bsums 2j and 2j+1 */
            __m128i bs = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)xb->bsums),
                                        _mm_loadu_si128((const __m128i *)(xb->bsums + 8)));
            __m128i pm = _mm_madd_epi16(bs, mn16);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(xb->d * d), _mm256_cvtepi32_ps(sumi), acc[t]);
            acc[t] = _mm256_fnmadd_ps(_mm256_set1_ps(xb->d * dmin), _mm256_cvtepi32_ps(_mm256_zextsi128_si256(pm)),
                                      acc[t]);
        }
    }
    for (int t = 0; t < T; t++) out[t * out_stride] = hsum_ps(acc[t]);
}

/* One activation row (decode): stream 64 values at a time instead of unpacking the whole block
 * first, so nothing spills out of the 16 ymm registers. */
static float q4k_row1(int64_t nb, const block_q4_K *w, const block_q8_K *x) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc = _mm256_setzero_ps();
    __m128 acc_m = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const block_q4_K *wb = &w[b];
        const block_q8_K *xb = &x[b];
        uint32_t sc[2], mn[2];
        q4k_unpack_scales(wb->scales, sc, mn);
        const __m128i mn16 = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)mn[1], (int)mn[0]));
        const __m256i sc256 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)sc[1], (int)sc[0])));
        __m128i bs = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)xb->bsums),
                                    _mm_loadu_si128((const __m128i *)(xb->bsums + 8)));
        __m128 pm = _mm_cvtepi32_ps(_mm_madd_epi16(bs, mn16));
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(wb->qs + 32 * c));
            __m256i lo = _mm256_and_si256(bytes, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m4);
            __m256i y0 = _mm256_loadu_si256((const __m256i *)(xb->qs + 64 * c));
            __m256i y1 = _mm256_loadu_si256((const __m256i *)(xb->qs + 64 * c + 32));
            __m256i k0 = _mm256_shuffle_epi8(sc256, _mm256_load_si256((const __m256i *)lane16_ctrl[2 * c]));
            __m256i k1 = _mm256_shuffle_epi8(sc256, _mm256_load_si256((const __m256i *)lane16_ctrl[2 * c + 1]));
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), k0));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y1), k1));
        }
        const float d = xb->d * _cvtsh_ss(wb->d), dmin = xb->d * _cvtsh_ss(wb->dmin);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)), acc);
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), pm, acc_m);
    }
    __m128 a = _mm_sub_ps(_mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)), acc_m);
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

static void dot_q4k(int64_t nb, const void *w_row, const block_q8_K *x, int64_t x_stride, int T,
                    float *out, int64_t out_stride) {
    if (T == 1)
        out[0] = q4k_row1(nb, (const block_q4_K *)w_row, x);
    else
        q4k_rows(nb, (const block_q4_K *)w_row, x, x_stride, T, out, out_stride);
}

/* int16 lanes [scale 2m x 8, scale 2m+1 x 8]: register m of a Q6_K block holds values
 * 32m..32m+31, and each int8 scale covers 16 of them */
static const uint8_t q6k_pair_ctrl[8][16] __attribute__((aligned(16))) = {
#define P(m) {2*m, 2*m, 2*m, 2*m, 2*m, 2*m, 2*m, 2*m, 2*m+1, 2*m+1, 2*m+1, 2*m+1, 2*m+1, 2*m+1, 2*m+1, 2*m+1}
    P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7)
#undef P
};

static inline __m256i q6k_scale_pair(__m128i sc8, int m) {
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, _mm_load_si128((const __m128i *)q6k_pair_ctrl[m])));
}

static inline __attribute__((always_inline)) void q6k_rows(int64_t nb, const block_q6_K *w, const block_q8_K *x,
                                                           int64_t x_stride, int T, float *out,
                                                           int64_t out_stride) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(0x03);
    __m256 acc[LQ_TMAX];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const block_q6_K *wb = &w[b];
        __m256i q[8], scale[8]; /* q[m]: unsigned 6-bit values 32m..32m+31 */
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
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)wb->scales);
        for (int m = 0; m < 8; m++) scale[m] = q6k_scale_pair(sc8, m);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wb->scales));
        const float d = _cvtsh_ss(wb->d);
        for (int t = 0; t < T; t++) {
            const block_q8_K *xb = &x[t * x_stride + b];
            __m256i sumi = _mm256_setzero_si256();
            for (int m = 0; m < 8; m++) {
                __m256i y = _mm256_loadu_si256((const __m256i *)(xb->qs + 32 * m));
                __m256i p = _mm256_maddubs_epi16(q[m], y); /* <= 2*63*127: no saturation */
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scale[m]));
            }
            /* the stored values are q + 32: subtract 32 * sum_g scale_g * bsum_g */
            __m256i off = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)xb->bsums), sc16);
            sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(off, 5));
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(xb->d * d), _mm256_cvtepi32_ps(sumi), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) out[t * out_stride] = hsum_ps(acc[t]);
}

/* One activation row: 128 values (4 registers of quants) at a time. */
static float q6k_row1(int64_t nb, const block_q6_K *w, const block_q8_K *x) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(0x03);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const block_q6_K *wb = &w[b];
        const block_q8_K *xb = &x[b];
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)wb->scales);
        const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
        /* the stored values are q + 32: start from -32 * sum_g scale_g * bsum_g */
        __m256i off = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)xb->bsums), sc16);
        __m256i s0 = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(off, 5));
        __m256i s1 = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i ql0 = _mm256_loadu_si256((const __m256i *)(wb->ql + 64 * h));
            __m256i ql1 = _mm256_loadu_si256((const __m256i *)(wb->ql + 64 * h + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i *)(wb->qh + 32 * h));
            __m256i q0 = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4));
            __m256i q1 = _mm256_or_si256(_mm256_and_si256(ql1, m4),
                                         _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4));
            __m256i q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                                         _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4));
            __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                         _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4));
            const int8_t *ys = xb->qs + 128 * h;
            __m256i k0 = q6k_scale_pair(sc8, 4 * h + 0), k1 = q6k_scale_pair(sc8, 4 * h + 1);
            __m256i k2 = q6k_scale_pair(sc8, 4 * h + 2), k3 = q6k_scale_pair(sc8, 4 * h + 3);
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(
                                          _mm256_maddubs_epi16(q0, _mm256_loadu_si256((const __m256i *)ys)), k0));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(
                                          _mm256_maddubs_epi16(q1, _mm256_loadu_si256((const __m256i *)(ys + 32))), k1));
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(
                                          _mm256_maddubs_epi16(q2, _mm256_loadu_si256((const __m256i *)(ys + 64))), k2));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(
                                          _mm256_maddubs_epi16(q3, _mm256_loadu_si256((const __m256i *)(ys + 96))), k3));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(xb->d * _cvtsh_ss(wb->d)), _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)),
                              acc);
    }
    return hsum_ps(acc);
}

static void dot_q6k(int64_t nb, const void *w_row, const block_q8_K *x, int64_t x_stride, int T,
                    float *out, int64_t out_stride) {
    if (T == 1)
        out[0] = q6k_row1(nb, (const block_q6_K *)w_row, x);
    else
        q6k_rows(nb, (const block_q6_K *)w_row, x, x_stride, T, out, out_stride);
}

static void dot_f32(int64_t n, const void *w_row, const float *x, int64_t x_stride, int T, float *out,
                    int64_t out_stride) {
    const float *w = (const float *)w_row;
    for (int t = 0; t < T; t++) {
        const float *xt = x + t * x_stride;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 32 <= n; i += 32) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(xt + i), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(xt + i + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(xt + i + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(xt + i + 24), a3);
        }
        for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(xt + i), a0);
        float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        for (; i < n; i++) s += w[i] * xt[i];
        out[t * out_stride] = s;
    }
}

static void dot_f16(int64_t n, const void *w_row, const float *x, int64_t x_stride, int T, float *out,
                    int64_t out_stride) {
    const uint16_t *w = (const uint16_t *)w_row;
    for (int t = 0; t < T; t++) {
        const float *xt = x + t * x_stride;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
            __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i)));
            __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i + 8)));
            a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt + i), a0);
            a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt + i + 8), a1);
        }
        float s = hsum_ps(_mm256_add_ps(a0, a1));
        for (; i < n; i++) s += lq_fp16_to_fp32(w[i]) * xt[i];
        out[t * out_stride] = s;
    }
}

/* Same bytes as the scalar quantiser: iscale = 127/amax, round half to even (the default
 * MXCSR mode of cvtps2dq), d = amax/127. */
static void quantize_q8k(const float *x, block_q8_K *y, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        __m256 mx = _mm256_setzero_ps();
        for (int i = 0; i < QK_K; i += 8) mx = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)), mx);
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        float amax = _mm_cvtss_f32(m);
        if (!(amax > 0.f)) {
            memset(&y[b], 0, sizeof(block_q8_K));
            continue;
        }
        const __m256 is = _mm256_set1_ps(127.f / amax);
        const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
        for (int i = 0; i < QK_K; i += 32) {
            __m256i v[4];
            for (int k = 0; k < 4; k++) {
                v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * k), is));
                v[k] = _mm256_max_epi32(_mm256_min_epi32(v[k], lim), nlim);
            }
            /* packs work per 128-bit lane: fix the order with one permute */
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
            p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(y[b].qs + i), p);
        }
        for (int g = 0; g < QK_K / 16; g++) {
            __m256i w16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(y[b].qs + 16 * g)));
            __m256i s32 = _mm256_madd_epi16(w16, _mm256_set1_epi16(1));
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
            s = _mm_hadd_epi32(s, s);
            s = _mm_hadd_epi32(s, s);
            y[b].bsums[g] = (int16_t)_mm_cvtsi128_si32(s);
        }
        y[b].d = amax / 127.f;
    }
}

const lq_kernels lq_kernels_avx2 = {
    .name = "avx2",
    .dot_q4k = dot_q4k,
    .dot_q6k = dot_q6k,
    .dot_f32 = dot_f32,
    .dot_f16 = dot_f16,
    .quantize_q8k = quantize_q8k,
};

#endif
