/* Quantisers and dequantisers: f32 <-> Q4_K, Q6_K, Q8_K, F16, BF16, F32.
 *
 * The dequantisers reproduce ggml's (and gguf-py's) arithmetic operation for operation, so their
 * output is bit-identical: Q4_K value = (d*scale)*q - (dmin*min), Q6_K value = (d*scale)*q.
 * (build_ext.py compiles with -ffp-contract=off so no multiply-add is fused behind our back.)
 *
 * The K-quant quantisers search the scale (and Q4_K min) of each sub-block by least squares
 * over a small set of candidate grids, then quantise those scales to 6 (Q4_K) or 8 (Q6_K) bits
 * against a per-block f16 super-scale and requantise the values with the scales actually stored.
 */
#include <math.h>
#include <string.h>

#include "kernels.h"

/* round to nearest, ties to even, for |v| < 2^22 (the f32 magic-number trick) */
static inline int nearest_int(float v) {
    float t = v + 12582912.f; /* 1.5 * 2^23 */
    int32_t i;
    memcpy(&i, &t, 4);
    return (i & 0x007fffff) - 0x00400000;
}

static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* ---- Q4_K ---- */

/* Fit x[i] ~ s*q[i] - m with q in 0..15, m >= 0, minimising sum (s*q - m - x)^2.
 * Candidate grids: iscale = (15 + k/10) / (max - min) for a few k; for each grid the
 * rounding fixes q, and (s, m) then come from 2x2 least squares (m clamped at 0).
 * The closed-form error uses sums only, so each candidate is one pass over 32 values.
 * The pass is written as 8 independent lanes (clamp in float, then round) so the compiler
 * vectorises it without changing a single rounding: results are the same on every machine. */
#define Q4_KMIN (-1)
#define Q4_KMAX 8

/* 4-lane helpers in GCC's portable vector extension (kernels.h's lq_v4f; SSE2 on x86-64, NEON
 * on aarch64): each lane does exactly the IEEE operations the scalar code would, so results do
 * not depend on the ISA. */

static inline lq_v4f round4(lq_v4f v) { /* ties to even, |v| < 2^22 */
    const lq_v4f magic = {12582912.f, 12582912.f, 12582912.f, 12582912.f}; /* 1.5 * 2^23 */
    return (v + magic) - magic;
}

static inline lq_v4f clamp4(lq_v4f v, float lo, float hi) {
    const lq_v4f vlo = {lo, lo, lo, lo}, vhi = {hi, hi, hi, hi};
    v = LQ_SEL(v > vlo, v, vlo, lq_v4f, lq_v4i);
    return LQ_SEL(v < vhi, v, vhi, lq_v4f, lq_v4i);
}

static inline float hsum4(lq_v4f v) { return (v[0] + v[1]) + (v[2] + v[3]); }

static void fit_q4_sub(const float *x, float *s_out, float *m_out) {
    float xmin = x[0], xmax = x[0], sx = 0.f, sx2 = 0.f;
    for (int i = 0; i < 32; i++) {
        xmin = x[i] < xmin ? x[i] : xmin;
        xmax = x[i] > xmax ? x[i] : xmax;
        sx += x[i];
        sx2 += x[i] * x[i];
    }
    if (xmin > 0.f) xmin = 0.f; /* the stored min is subtracted: it can only shift down */
    if (xmax <= xmin) {
        *s_out = 0.f;
        *m_out = -xmin;
        return;
    }
    float xs[32];
    for (int i = 0; i < 32; i++) xs[i] = x[i] - xmin;
    const float n = 32.f;
    float best_err = INFINITY, best_s = 0.f, best_m = -xmin;
    for (int k = Q4_KMIN; k <= Q4_KMAX; k++) {
        float iscale = (15.f + 0.1f * (float)k) / (xmax - xmin);
        const lq_v4f vis = {iscale, iscale, iscale, iscale};
        lq_v4f aq = {0}, aq2 = {0}, aqx = {0};
        for (int i = 0; i < 32; i += 4) {
            lq_v4f xv, sv;
            memcpy(&xv, x + i, 16);
            memcpy(&sv, xs + i, 16);
            lq_v4f q = round4(clamp4(vis * sv, 0.f, 15.f));
            aq += q;
            aq2 += q * q;
            aqx += q * xv;
        }
        float fq = hsum4(aq), fq2 = hsum4(aq2), sqx = hsum4(aqx);
        if (fq2 == 0.f) continue;
        float det = n * fq2 - fq * fq; /* 0 when every q is equal: no offset to fit */
        float s = det > 0.f ? (n * sqx - sx * fq) / det : 0.f;
        float b = det > 0.f ? (fq2 * sx - fq * sqx) / det : 1.f;
        if (b > 0.f) { /* the min must be <= 0: refit the scale alone */
            b = 0.f;
            s = sqx / fq2;
        }
        float err = s * s * fq2 + n * b * b + sx2 + 2.f * s * b * fq - 2.f * s * sqx - 2.f * b * sx;
        if (err < best_err) {
            best_err = err;
            best_s = s;
            best_m = -b;
        }
    }
    *s_out = best_s > 0.f ? best_s : 0.f;
    *m_out = best_m;
}

/* sum (s*q - m - x)^2 over 32 values with q = clamp(round((x + m) / s), 0, 15) */
static float q4_sub_error(const float *x, float s, float m) {
    const float is = s > 0.f ? 1.f / s : 0.f;
    const lq_v4f vis = {is, is, is, is}, vs = {s, s, s, s}, vm = {m, m, m, m};
    lq_v4f acc = {0};
    for (int i = 0; i < 32; i += 4) {
        lq_v4f xv;
        memcpy(&xv, x + i, 16);
        lq_v4f q = round4(clamp4((xv + vm) * vis, 0.f, 15.f));
        lq_v4f e = vs * q - vm - xv;
        acc += e * e;
    }
    return hsum4(acc);
}

static void quantize_block_q4k(const float *x, block_q4_K *y) {
    float sc[8], mn[8], max_sc = 0.f, max_mn = 0.f;
    for (int j = 0; j < 8; j++) {
        fit_q4_sub(x + 32 * j, &sc[j], &mn[j]);
        max_sc = sc[j] > max_sc ? sc[j] : max_sc;
        max_mn = mn[j] > max_mn ? mn[j] : max_mn;
    }
    uint8_t ls[8], lm[8];
    float inv_sc = max_sc > 0.f ? 63.f / max_sc : 0.f;
    float inv_mn = max_mn > 0.f ? 63.f / max_mn : 0.f;
    for (int j = 0; j < 8; j++) {
        ls[j] = (uint8_t)clampi(nearest_int(inv_sc * sc[j]), 0, 63);
        lm[j] = (uint8_t)clampi(nearest_int(inv_mn * mn[j]), 0, 63);
    }
    y->d = lq_fp32_to_fp16(max_sc / 63.f);
    y->dmin = lq_fp32_to_fp16(max_mn / 63.f);
    /* with the super-scales as stored, each sub-block's 6-bit scale and min can still move by one
     * step either way: keep the pair with the smallest error on the requantised values */
    float d = lq_fp16_to_fp32(y->d), dmin = lq_fp16_to_fp32(y->dmin);
    for (int j = 0; j < 8; j++) {
        float best = INFINITY;
        int bs = ls[j], bm = lm[j];
        for (int a = ls[j] - 1; a <= ls[j] + 1; a++) {
            if (a < 0 || a > 63) continue;
            for (int c = lm[j] - 1; c <= lm[j] + 1; c++) {
                if (c < 0 || c > 63) continue;
                float e = q4_sub_error(x + 32 * j, d * (float)a, dmin * (float)c);
                if (e < best) best = e, bs = a, bm = c;
            }
        }
        ls[j] = (uint8_t)bs;
        lm[j] = (uint8_t)bm;
    }
    /* ggml's 12-byte packing: 6-bit scales/mins 0..3 in bytes 0..7, 4..7 split into nibbles
     * of bytes 8..11 with their top two bits in the spare bits of bytes 0..7 */
    memset(y->scales, 0, 12);
    for (int j = 0; j < 8; j++) {
        if (j < 4) {
            y->scales[j] = ls[j];
            y->scales[j + 4] = lm[j];
        } else {
            y->scales[j + 4] = (uint8_t)((ls[j] & 0x0f) | ((lm[j] & 0x0f) << 4));
            y->scales[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
            y->scales[j] |= (uint8_t)((lm[j] >> 4) << 6);
        }
    }
    uint8_t L[QK_K];
    for (int j = 0; j < 8; j++) {
        float s = d * (float)ls[j], m = dmin * (float)lm[j];
        float is = s > 0.f ? 1.f / s : 0.f;
        for (int i = 0; i < 32; i++) L[32 * j + i] = (uint8_t)clampi(nearest_int((x[32 * j + i] + m) * is), 0, 15);
    }
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) y->qs[32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + l + 32] << 4));
}

void lq_quantize_row_q4k(const float *x, block_q4_K *y, int64_t n) {
    for (int64_t b = 0; b < n / QK_K; b++) quantize_block_q4k(x + b * QK_K, y + b);
}

void lq_dequantize_row_q4k(const block_q4_K *x, float *y, int64_t n) {
    for (int64_t b = 0; b < n / QK_K; b++, x++) {
        float d = lq_fp16_to_fp32(x->d), dmin = lq_fp16_to_fp32(x->dmin);
        const uint8_t *q = x->qs, *s = x->scales;
        for (int j = 0; j < 8; j += 2) {
            int sc0, mn0, sc1, mn1;
            if (j < 4) {
                sc0 = s[j] & 63, mn0 = s[j + 4] & 63;
                sc1 = s[j + 1] & 63, mn1 = s[j + 5] & 63;
            } else {
                sc0 = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), mn0 = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
                sc1 = (s[j + 5] & 0x0f) | ((s[j - 3] >> 6) << 4), mn1 = (s[j + 5] >> 4) | ((s[j + 1] >> 6) << 4);
            }
            float d0 = d * (float)sc0, m0 = dmin * (float)mn0;
            float d1 = d * (float)sc1, m1 = dmin * (float)mn1;
            for (int l = 0; l < 32; l++) y[l] = d0 * (float)(q[l] & 0x0f) - m0;
            for (int l = 0; l < 32; l++) y[l + 32] = d1 * (float)(q[l] >> 4) - m1;
            y += 64;
            q += 32;
        }
    }
}

/* ---- Q6_K ---- */

/* Fit x[i] ~ s*q[i], q in -32..31, over 16 values. The largest |x| maps to -32 (the extra
 * negative level), so s carries the opposite sign of that value; candidates around that grid,
 * each refit by least squares, the best kept. */
static float fit_q6_sub(const float *x) {
    float amax = 0.f, vmax = 0.f;
    for (int i = 0; i < 16; i++)
        if (fabsf(x[i]) > amax) amax = fabsf(x[i]), vmax = x[i];
    if (amax < 1e-30f) return 0.f;
    float best = -1.f, best_s = 0.f;
    for (int k = -9; k <= 9; k++) {
        float iscale = -(32.f + 0.1f * (float)k) / vmax;
        const lq_v4f vis = {iscale, iscale, iscale, iscale};
        lq_v4f axq = {0}, aq2 = {0};
        for (int i = 0; i < 16; i += 4) {
            lq_v4f xv;
            memcpy(&xv, x + i, 16);
            lq_v4f q = round4(clamp4(vis * xv, -32.f, 31.f));
            axq += xv * q;
            aq2 += q * q;
        }
        float sxq = hsum4(axq), sq2 = hsum4(aq2);
        /* the error with the optimal s = sxq/sq2 is sum x^2 - sxq^2/sq2: maximise sxq^2/sq2 */
        if (sq2 > 0.f && sxq * sxq / sq2 > best) {
            best = sxq * sxq / sq2;
            best_s = sxq / sq2;
        }
    }
    return best_s;
}

static void quantize_block_q6k(const float *x, block_q6_K *y) {
    float sc[16], amax = 0.f, vmax = 0.f;
    for (int g = 0; g < 16; g++) {
        sc[g] = fit_q6_sub(x + 16 * g);
        if (fabsf(sc[g]) > amax) amax = fabsf(sc[g]), vmax = sc[g];
    }
    if (amax == 0.f) {
        memset(y, 0, sizeof(*y));
        memset(y->ql, 0x00, sizeof(y->ql));
        /* q = 32 (zero) everywhere: ql nibbles 0, qh bits 2 (value 32 = 0b10'0000) */
        memset(y->qh, 0xaa, sizeof(y->qh));
        return;
    }
    /* the largest scale maps to -128 (int8 has one more negative level) */
    float iscale = -128.f / vmax;
    for (int g = 0; g < 16; g++) y->scales[g] = (int8_t)clampi(nearest_int(iscale * sc[g]), -128, 127);
    y->d = lq_fp32_to_fp16(1.f / iscale);
    float d = lq_fp16_to_fp32(y->d);
    uint8_t L[QK_K];
    for (int g = 0; g < 16; g++) {
        float s = d * (float)y->scales[g];
        for (int i = 0; i < 16; i++)
            L[16 * g + i] = (uint8_t)(s != 0.f ? clampi(nearest_int(x[16 * g + i] / s), -32, 31) + 32 : 32);
    }
    for (int n = 0; n < QK_K; n += 128) {
        uint8_t *ql = y->ql + n / 2, *qh = y->qh + n / 4;
        for (int l = 0; l < 32; l++) {
            const uint8_t *v = L + n + l;
            ql[l] = (uint8_t)((v[0] & 0x0f) | ((v[64] & 0x0f) << 4));
            ql[l + 32] = (uint8_t)((v[32] & 0x0f) | ((v[96] & 0x0f) << 4));
            qh[l] = (uint8_t)((v[0] >> 4) | ((v[32] >> 4) << 2) | ((v[64] >> 4) << 4) | ((v[96] >> 4) << 6));
        }
    }
}

void lq_quantize_row_q6k(const float *x, block_q6_K *y, int64_t n) {
    for (int64_t b = 0; b < n / QK_K; b++) quantize_block_q6k(x + b * QK_K, y + b);
}

void lq_dequantize_row_q6k(const block_q6_K *x, float *y, int64_t n) {
    for (int64_t b = 0; b < n / QK_K; b++, x++) {
        float d = lq_fp16_to_fp32(x->d);
        const uint8_t *ql = x->ql, *qh = x->qh;
        const int8_t *sc = x->scales;
        for (int c = 0; c < QK_K; c += 128) {
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = ((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * (float)sc[is] * (float)q1;
                y[l + 32] = d * (float)sc[is + 2] * (float)q2;
                y[l + 64] = d * (float)sc[is + 4] * (float)q3;
                y[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
            y += 128;
            ql += 64;
            qh += 32;
            sc += 8;
        }
    }
}

/* ---- row bytes and the multi-threaded drivers ---- */

/* Values and bytes per block of every format whose layout is known (ggml's for the quants). */
static int block_layout(int fmt, int64_t *values, size_t *bytes) {
    switch (fmt) {
    case LQ_F32: *values = 1, *bytes = 4; return 1;
    case LQ_F16:
    case LQ_BF16: *values = 1, *bytes = 2; return 1;
    case LQ_Q4_0: *values = 32, *bytes = 18; return 1;
    case LQ_Q8_0: *values = 32, *bytes = 34; return 1;
    case LQ_Q4_K: *values = QK_K, *bytes = sizeof(block_q4_K); return 1;
    case LQ_Q5_K: *values = QK_K, *bytes = 176; return 1;
    case LQ_Q6_K: *values = QK_K, *bytes = sizeof(block_q6_K); return 1;
    case LQ_Q8_K: *values = QK_K, *bytes = sizeof(block_q8_K); return 1;
    default: return 0;
    }
}

size_t lq_row_bytes(int fmt, int64_t cols) {
    int64_t values;
    size_t bytes;
    if (cols <= 0 || !block_layout(fmt, &values, &bytes) || cols % values) return 0;
    return (size_t)(cols / values) * bytes;
}

int64_t lq_block_values(int fmt) {
    int64_t values;
    size_t bytes;
    return block_layout(fmt, &values, &bytes) ? values : 0;
}

typedef struct {
    int fmt;
    const void *src;
    void *dst;
} conv_job;

/* Work units: blocks of 256 values for block formats, 256-value runs for float formats
 * (every format's rows are a whole number of units' bytes apart, so rows do not matter). */
static void quantize_range(void *p, int64_t b0, int64_t b1, int tid) {
    (void)tid;
    conv_job *j = p;
    const float *x = (const float *)j->src + b0 * QK_K;
    int64_t n = (b1 - b0) * QK_K;
    switch (j->fmt) {
    case LQ_Q4_K: lq_quantize_row_q4k(x, (block_q4_K *)j->dst + b0, n); break;
    case LQ_Q6_K: lq_quantize_row_q6k(x, (block_q6_K *)j->dst + b0, n); break;
    case LQ_Q8_K: lq_active_kernels()->quantize_q8k(x, (block_q8_K *)j->dst + b0, n); break;
    }
}

typedef struct {
    int fmt;
    const float *src;
    void *dst;
    int64_t n;
} fconv_job;

static void quantize_float_range(void *p, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    fconv_job *j = p;
    i0 *= QK_K;
    i1 = i1 * QK_K < j->n ? i1 * QK_K : j->n;
    if (j->fmt == LQ_F32) {
        memcpy((float *)j->dst + i0, j->src + i0, (size_t)(i1 - i0) * 4);
    } else if (j->fmt == LQ_F16) {
        uint16_t *y = j->dst;
        for (int64_t i = i0; i < i1; i++) y[i] = lq_fp32_to_fp16(j->src[i]);
    } else { /* BF16, round to nearest even; NaN stays NaN */
        uint16_t *y = j->dst;
        for (int64_t i = i0; i < i1; i++) {
            uint32_t u;
            memcpy(&u, &j->src[i], 4);
            if ((u & 0x7fffffffu) > 0x7f800000u)
                y[i] = (uint16_t)((u >> 16) | 0x40);
            else
                y[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
        }
    }
}

int lq_quantize(int fmt, const float *src, void *dst, int64_t rows, int64_t cols) {
    if (fmt == LQ_BF16 || fmt == LQ_F16 || fmt == LQ_F32) {
        if (rows < 0 || cols <= 0) return LQ_E_SHAPE;
        fconv_job j = {fmt, src, dst, rows * cols};
        lq_parallel_for((j.n + QK_K - 1) / QK_K, 256, quantize_float_range, &j);
        return LQ_OK;
    }
    if (fmt != LQ_Q4_K && fmt != LQ_Q6_K && fmt != LQ_Q8_K) return LQ_E_FORMAT;
    if (rows < 0 || cols <= 0 || cols % QK_K) return LQ_E_SHAPE;
    conv_job j = {fmt, src, dst};
    lq_parallel_for(rows * (cols / QK_K), fmt == LQ_Q8_K ? 256 : 16, quantize_range, &j);
    return LQ_OK;
}

static void dequantize_range(void *p, int64_t b0, int64_t b1, int tid) {
    (void)tid;
    conv_job *j = p;
    float *y = (float *)j->dst + b0 * QK_K;
    int64_t n = (b1 - b0) * QK_K;
    switch (j->fmt) {
    case LQ_Q4_K: lq_dequantize_row_q4k((const block_q4_K *)j->src + b0, y, n); break;
    case LQ_Q6_K: lq_dequantize_row_q6k((const block_q6_K *)j->src + b0, y, n); break;
    case LQ_Q8_K: {
        const block_q8_K *x = (const block_q8_K *)j->src + b0;
        for (int64_t b = 0; b < b1 - b0; b++)
            for (int i = 0; i < QK_K; i++) y[b * QK_K + i] = x[b].d * (float)x[b].qs[i];
        break;
    }
    }
}

typedef struct {
    int fmt;
    const void *src;
    float *dst;
    int64_t n;
} fdeconv_job;

static void dequantize_float_range(void *p, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    fdeconv_job *j = p;
    i0 *= QK_K;
    i1 = i1 * QK_K < j->n ? i1 * QK_K : j->n;
    if (j->fmt == LQ_F32) {
        memcpy(j->dst + i0, (const float *)j->src + i0, (size_t)(i1 - i0) * 4);
    } else if (j->fmt == LQ_F16) {
        const uint16_t *x = j->src;
        for (int64_t i = i0; i < i1; i++) j->dst[i] = lq_fp16_to_fp32(x[i]);
    } else {
        const uint16_t *x = j->src;
        for (int64_t i = i0; i < i1; i++) {
            uint32_t u = (uint32_t)x[i] << 16;
            memcpy(&j->dst[i], &u, 4);
        }
    }
}

int lq_dequantize(int fmt, const void *src, float *dst, int64_t rows, int64_t cols) {
    if (fmt == LQ_BF16 || fmt == LQ_F16 || fmt == LQ_F32) {
        if (rows < 0 || cols <= 0) return LQ_E_SHAPE;
        fdeconv_job j = {fmt, src, dst, rows * cols};
        lq_parallel_for((j.n + QK_K - 1) / QK_K, 256, dequantize_float_range, &j);
        return LQ_OK;
    }
    if (fmt != LQ_Q4_K && fmt != LQ_Q6_K && fmt != LQ_Q8_K) return LQ_E_FORMAT;
    if (rows < 0 || cols <= 0 || cols % QK_K) return LQ_E_SHAPE;
    conv_job j = {fmt, src, dst};
    lq_parallel_for(rows * (cols / QK_K), 128, dequantize_range, &j);
    return LQ_OK;
}
