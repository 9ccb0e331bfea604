/* Scalar reference kernels: plain C, one weight block at a time.
 *
 * Every SIMD table (kernels_avx2.c, kernels_neon.c, ...) is tested against this one, so it is
 * written for clarity, not speed. It is self-contained (kernels.h, libc, libm; no thread pool)
 * so a per-ISA test harness can link exactly this file plus one ISA file.
 */
#include <math.h>
#include <string.h>

#include "kernels.h"

/* ---- f16 <-> f32 ---- */

float lq_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        /* zero or subnormal: mant * 2^-24, exact in f32 */
        float v = (float)mant * 0x1p-24f;
        return sign ? -v : v;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13); /* inf or NaN (payload kept) */
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t lq_fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) /* NaN: keep it a (quiet) NaN */
        return sign | 0x7e00 | (uint16_t)((x >> 13) & 0x3ff);
    if (x >= 0x477ff000u) /* >= 65520 rounds to infinity (round-to-nearest-even) */
        return sign | 0x7c00;
    if (x < 0x38800000u) {
        /* below the smallest normal f16 (2^-14): the result is a subnormal multiple of 2^-24.
         * |f| * 2^24 is exact; round it to the nearest integer, ties to even. */
        float a;
        memcpy(&a, &x, 4);
        a *= 0x1p24f;
        uint32_t i = (uint32_t)a;
        float frac = a - (float)i;
        if (frac > 0.5f || (frac == 0.5f && (i & 1))) i++;
        return sign | (uint16_t)i; /* i == 0x400 is the smallest normal: encoded correctly */
    }
    uint32_t mant = x & 0x7fffff;
    uint32_t h = ((((x >> 23) - 112) << 10) | (mant >> 13));
    uint32_t rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++; /* a carry moves into the exponent */
    return sign | (uint16_t)h;
}

/* ---- helpers shared with nobody: keep this file standalone ---- */

/* 6-bit scale and min of sub-block j in a Q4_K block (ggml's packing). */
static inline void q4k_scale_min(int j, const uint8_t *s, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* ---- kernels ---- */

static void dot_q4k(int64_t nb, const void *w_row, const void *x_rows, int64_t x_stride, int T,
                    float *out, int64_t out_stride) {
    const block_q4_K *w = (const block_q4_K *)w_row;
    const block_q8_K *x = x_rows;
    for (int t = 0; t < T; t++) {
        const block_q8_K *xt = x + t * x_stride;
        float acc = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *q = w[b].qs;
            const int8_t *y = xt[b].qs;
            int32_t isum = 0, imin = 0;
            for (int j = 0; j < 4; j++) { /* 64 values: low nibbles then high nibbles */
                int sc0, mn0, sc1, mn1;
                q4k_scale_min(2 * j, w[b].scales, &sc0, &mn0);
                q4k_scale_min(2 * j + 1, w[b].scales, &sc1, &mn1);
                int32_t s0 = 0, s1 = 0;
                for (int l = 0; l < 32; l++) {
                    s0 += (q[l] & 0x0f) * y[l];
                    s1 += (q[l] >> 4) * y[l + 32];
                }
                isum += sc0 * s0 + sc1 * s1;
                /* the min term: sum over the sub-block of q8 is two bsums */
                imin += mn0 * (xt[b].bsums[4 * j] + xt[b].bsums[4 * j + 1]);
                imin += mn1 * (xt[b].bsums[4 * j + 2] + xt[b].bsums[4 * j + 3]);
                q += 32;
                y += 64;
            }
            float d = xt[b].d * lq_fp16_to_fp32(w[b].d);
            float dmin = xt[b].d * lq_fp16_to_fp32(w[b].dmin);
            acc += d * (float)isum;
            acc -= dmin * (float)imin;
        }
        out[t * out_stride] = acc;
    }
}

/* Q6_K block -> 256 signed 6-bit values in [-32, 31] (ggml's planar layout). */
static void q6k_unpack(const block_q6_K *b, int8_t *q) {
    const uint8_t *ql = b->ql, *qh = b->qh;
    for (int n = 0; n < QK_K; n += 128) {
        for (int l = 0; l < 32; l++) {
            q[n + l] = (int8_t)(((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32);
            q[n + l + 32] = (int8_t)(((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32);
            q[n + l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            q[n + l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
        ql += 64;
        qh += 32;
    }
}

static void dot_q6k(int64_t nb, const void *w_row, const void *x_rows, int64_t x_stride, int T,
                    float *out, int64_t out_stride) {
    const block_q6_K *w = (const block_q6_K *)w_row;
    const block_q8_K *x = x_rows;
    for (int t = 0; t < T; t++) {
        const block_q8_K *xt = x + t * x_stride;
        float acc = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            int8_t q[QK_K];
            q6k_unpack(&w[b], q);
            int32_t isum = 0;
            for (int g = 0; g < 16; g++) { /* one int8 scale per 16 values */
                int32_t s = 0;
                for (int l = 0; l < 16; l++) s += q[16 * g + l] * xt[b].qs[16 * g + l];
                isum += w[b].scales[g] * s;
            }
            acc += (xt[b].d * lq_fp16_to_fp32(w[b].d)) * (float)isum;
        }
        out[t * out_stride] = acc;
    }
}

/* bf16 is the top half of an f32: widening is exact */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline float el_f32(const void *w, int64_t i) { return ((const float *)w)[i]; }
static inline float el_f16(const void *w, int64_t i) { return lq_fp16_to_fp32(((const uint16_t *)w)[i]); }
static inline float el_bf16(const void *w, int64_t i) { return bf16_to_f32(((const uint16_t *)w)[i]); }

/* The float rows: one running sum per activation row, in index order. */
static inline __attribute__((always_inline)) void float_dot(float (*el)(const void *, int64_t), int64_t n,
                                                            const void *w, const void *x_rows,
                                                            int64_t x_stride, int T, float *out,
                                                            int64_t out_stride) {
    for (int t = 0; t < T; t++) {
        const float *xt = (const float *)x_rows + t * x_stride;
        float acc = 0.f;
        for (int64_t i = 0; i < n; i++) acc += el(w, i) * xt[i];
        out[t * out_stride] = acc;
    }
}

static void dot_f32(int64_t n, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os) {
    float_dot(el_f32, n, w, x, xs, T, out, os);
}
static void dot_f16(int64_t n, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os) {
    float_dot(el_f16, n, w, x, xs, T, out, os);
}
static void dot_bf16(int64_t n, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os) {
    float_dot(el_bf16, n, w, x, xs, T, out, os);
}

/* f32 -> Q8_K: d = max|x| / 127, q = round(x / d) (ties to even), bsums per 16 quants.
 * Every ISA must produce the same bytes: iscale = 127 / amax, q = round(x * iscale). */
static void quantize_q8k(const float *x, block_q8_K *y, int64_t n) {
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        float amax = 0.f;
        for (int i = 0; i < QK_K; i++) {
            float a = fabsf(x[i]);
            if (a > amax) amax = a;
        }
        if (!(amax > 0.f)) { /* all zero (or NaN): a zero block */
            memset(&y[b], 0, sizeof(block_q8_K));
            continue;
        }
        float iscale = 127.f / amax;
        for (int i = 0; i < QK_K; i++) {
            /* lrintf (ties to even in the default rounding mode) takes the rounded f32 product,
             * so no compiler can fuse the multiply into the rounding step */
            long v = lrintf(x[i] * iscale);
            y[b].qs[i] = (int8_t)(v > 127 ? 127 : (v < -127 ? -127 : v));
        }
        for (int g = 0; g < QK_K / 16; g++) {
            int s = 0;
            for (int l = 0; l < 16; l++) s += y[b].qs[16 * g + l];
            y[b].bsums[g] = (int16_t)s;
        }
        y[b].d = amax / 127.f;
    }
}

static void gelu_mul(const float *gate, const float *up, int64_t n, float *out) {
    lq_gelu_mul_f32(gate, up, n, out);
}

const lq_kernels lq_kernels_scalar = {
    .name = "scalar",
    .dot = {[LQ_F32] = dot_f32, [LQ_F16] = dot_f16, [LQ_BF16] = dot_bf16, [LQ_Q4_K] = dot_q4k, [LQ_Q6_K] = dot_q6k},
    .quantize_q8k = quantize_q8k,
    .gelu_mul = gelu_mul,
};
