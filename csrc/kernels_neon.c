/* NEON kernels (aarch64). Same results as kernels_scalar.c: the integer parts of the K-quant
 * dot products are exact, only the order of the float additions differs.
 *
 * Int8 products come in two flavours:
 *   sdot  (vdotq_s32, ARMv8.2 dotprod: Graviton 2+, Apple M*, Ampere, Cortex-A76+), and
 *   smull (vmull_s8 + vpadalq_s16, plain ARMv8.0: Cortex-A53/A57/A72, Raspberry Pi 4).
 * Built with dotprod enabled (-march=armv8.2-a+dotprod, -mcpu=native on such a CPU) only the
 * sdot path exists. Built for baseline armv8-a (what distribution compilers and build_ext do)
 * with GCC on Linux, both exist and the CPU's HWCAP says whether the sdot one can run, so a wheel
 * built on a Raspberry Pi still uses sdot on a Graviton. They are two tables: "neon" (smull,
 * always there) and "neon_sdot" (lq_neon_sdot_table(), NULL where it cannot run); dispatch lists
 * both and prefers sdot, and LARQL_ISA / the tests can force either.
 *
 * The small-batch form (T activation rows) unpacks each weight block into registers once and
 * applies it to all T rows before touching the next block: weights are read once per call. */
#if defined(__aarch64__)

#include <arm_neon.h>
#include <stdbool.h>
#include <string.h>

#include "kernels.h"

#if defined(__ARM_FEATURE_DOTPROD)
#define LQ_HAVE_SDOT 1
#define LQ_SDOT_FN
static bool cpu_has_sdot(void) { return true; }
#elif defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#define LQ_HAVE_SDOT 1
/* The arch string must match the one arm_neon.h uses around vdotq_s32, or GCC refuses to inline. */
#define LQ_SDOT_FN __attribute__((target("arch=armv8.2-a+dotprod")))
static bool cpu_has_sdot(void) {
    static int cached = -1; /* benign race: every thread computes the same value */
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v < 0) {
        v = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
}
#else
#define LQ_HAVE_SDOT 0 /* only the smull table exists */
#endif


static inline float f16_to_f32(uint16_t h) {
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}

/* ---- int8 dot products: 16 products added into 4 int32 lanes ---------------------------------
 * Only lane totals are ever used, so the two paths may spread the sum over lanes differently. */

static inline int32x4_t dot16_smull(int32x4_t acc, int8x16_t a, int8x16_t b) {
    /* A pair of products fits int16: |a| <= 32 (Q4_K 0..15, Q6_K -32..31), |b| <= 128. */
    int16x8_t p = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    p = vmlal_high_s8(p, a, b);
    return vpadalq_s16(acc, p);
}

#if LQ_HAVE_SDOT
LQ_SDOT_FN static inline int32x4_t dot16_sdot(int32x4_t acc, int8x16_t a, int8x16_t b) {
    return vdotq_s32(acc, a, b);
}
#endif

/* `sdot` is a compile-time constant in every caller, so each kernel is compiled twice below
 * with the branch folded away. */
static inline __attribute__((always_inline)) int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t b,
                                                             bool sdot) {
#if LQ_HAVE_SDOT
    if (sdot) return dot16_sdot(acc, a, b);
#endif
    (void)sdot;
    return dot16_smull(acc, a, b);
}

/* Four int32x4 partial sums -> one vector holding their four totals, in order. */
static inline int32x4_t totals4(int32x4_t p0, int32x4_t p1, int32x4_t p2, int32x4_t p3) {
    return vpaddq_s32(vpaddq_s32(p0, p1), vpaddq_s32(p2, p3));
}

/* ---- Q4_K x Q8_K --------------------------------------------------------------------------- */

/* The 8 scales and 8 mins (6 bits each) of a Q4_K block, unpacked four bytes at a time:
 * bytes 0-3 hold scales 0-3 (+ top bits of scales 4-7), bytes 4-7 mins 0-3 (+ top bits of
 * mins 4-7), bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble). */
static inline void q4k_scales_mins(const uint8_t s[12], uint8x8_t *scales, uint8x8_t *mins) {
    uint32_t a, b, c;
    memcpy(&a, s, 4);
    memcpy(&b, s + 4, 4);
    memcpy(&c, s + 8, 4);
    uint32_t sc_lo = a & 0x3f3f3f3f, mn_lo = b & 0x3f3f3f3f;
    uint32_t sc_hi = (c & 0x0f0f0f0f) | ((a >> 6) & 0x03030303) << 4;
    uint32_t mn_hi = ((c >> 4) & 0x0f0f0f0f) | ((b >> 6) & 0x03030303) << 4;
    *scales = vcreate_u8((uint64_t)sc_hi << 32 | sc_lo);
    *mins = vcreate_u8((uint64_t)mn_hi << 32 | mn_lo);
}

static inline __attribute__((always_inline)) void q4k_rows(int64_t nb, const void *w_row,
                                                           const block_q8_K *x, int64_t x_stride,
                                                           int T, float *out, int64_t out_stride,
                                                           bool sdot) {
    const block_q4_K *w = w_row;
    const uint8x16_t m4 = vdupq_n_u8(0x0f);
    float sum[LQ_MAX_T];
    for (int t = 0; t < T; t++) sum[t] = 0.0f;

    for (int64_t i = 0; i < nb; i++) {
        const block_q4_K *b = &w[i];
        LQ_PREFETCH(b, 0), LQ_PREFETCH(b, 64), LQ_PREFETCH(b, 128);
        /* q[k] holds values 16k..16k+15; sub-block s (32 values, one scale) is q[2s], q[2s+1]. */
        int8x16_t q[16];
        for (int c = 0; c < 4; c++) {
            uint8x16_t lo = vld1q_u8(b->qs + 32 * c), hi = vld1q_u8(b->qs + 32 * c + 16);
            q[4 * c + 0] = vreinterpretq_s8_u8(vandq_u8(lo, m4));
            q[4 * c + 1] = vreinterpretq_s8_u8(vandq_u8(hi, m4));
            q[4 * c + 2] = vreinterpretq_s8_u8(vshrq_n_u8(lo, 4));
            q[4 * c + 3] = vreinterpretq_s8_u8(vshrq_n_u8(hi, 4));
        }
        uint8x8_t sc8, mn8;
        q4k_scales_mins(b->scales, &sc8, &mn8);
        const uint16x8_t sc16 = vmovl_u8(sc8);
        const int32x4_t sc_lo = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(sc16)));
        const int32x4_t sc_hi = vreinterpretq_s32_u32(vmovl_high_u16(sc16));
        const int16x8_t mn = vreinterpretq_s16_u16(vmovl_u8(mn8));
        const float d = f16_to_f32(b->d), dmin = f16_to_f32(b->dmin);

        for (int t = 0; t < T; t++) {
            const block_q8_K *y = &x[t * x_stride + i];
            int32x4_t p[8];
            for (int s = 0; s < 8; s++) {
                int32x4_t acc = dot16(vdupq_n_s32(0), q[2 * s], vld1q_s8(y->qs + 32 * s), sdot);
                p[s] = dot16(acc, q[2 * s + 1], vld1q_s8(y->qs + 32 * s + 16), sdot);
            }
            int32x4_t isum4 = vmulq_s32(totals4(p[0], p[1], p[2], p[3]), sc_lo);
            isum4 = vmlaq_s32(isum4, totals4(p[4], p[5], p[6], p[7]), sc_hi);
            /* The min term needs only the per-sub-block sums of the activations: bsums. */
            int16x8_t bs = vpaddq_s16(vld1q_s16(y->bsums), vld1q_s16(y->bsums + 8));
            int32x4_t msum4 = vmlal_high_s16(vmull_s16(vget_low_s16(bs), vget_low_s16(mn)), bs, mn);
            sum[t] += y->d * (d * (float)vaddvq_s32(isum4) - dmin * (float)vaddvq_s32(msum4));
        }
    }
    for (int t = 0; t < T; t++) out[t * out_stride] = sum[t];
}

/* ---- Q6_K x Q8_K --------------------------------------------------------------------------- */

static inline __attribute__((always_inline)) void q6k_rows(int64_t nb, const void *w_row,
                                                           const block_q8_K *x, int64_t x_stride,
                                                           int T, float *out, int64_t out_stride,
                                                           bool sdot) {
    const block_q6_K *w = w_row;
    const uint8x16_t m4 = vdupq_n_u8(0x0f), m2 = vdupq_n_u8(0x03);
    const int8x16_t bias = vdupq_n_s8(32);
    float sum[LQ_MAX_T];
    for (int t = 0; t < T; t++) sum[t] = 0.0f;

    for (int64_t i = 0; i < nb; i++) {
        const block_q6_K *b = &w[i];
        LQ_PREFETCH(b, 0), LQ_PREFETCH(b, 64), LQ_PREFETCH(b, 128), LQ_PREFETCH(b, 192);
        /* q[g] holds values 16g..16g+15, which share scales[g]. Per 128 values ggml stores
         * 64 bytes of ql (low nibbles: values 0-63, high nibbles: 64-127) and 32 bytes of qh
         * (2-bit fields at shifts 0, 2, 4, 6 for values 0-31, 32-63, 64-95, 96-127). */
        int8x16_t q[16];
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b->ql + 64 * h, *qh = b->qh + 32 * h;
            uint8x16_t l0 = vld1q_u8(ql), l1 = vld1q_u8(ql + 16), l2 = vld1q_u8(ql + 32),
                       l3 = vld1q_u8(ql + 48);
            uint8x16_t h0 = vld1q_u8(qh), h1 = vld1q_u8(qh + 16);
            uint8x16_t u[8] = {
                vorrq_u8(vandq_u8(l0, m4), vshlq_n_u8(vandq_u8(h0, m2), 4)),
                vorrq_u8(vandq_u8(l1, m4), vshlq_n_u8(vandq_u8(h1, m2), 4)),
                vorrq_u8(vandq_u8(l2, m4), vshlq_n_u8(vandq_u8(vshrq_n_u8(h0, 2), m2), 4)),
                vorrq_u8(vandq_u8(l3, m4), vshlq_n_u8(vandq_u8(vshrq_n_u8(h1, 2), m2), 4)),
                vorrq_u8(vshrq_n_u8(l0, 4), vshlq_n_u8(vandq_u8(vshrq_n_u8(h0, 4), m2), 4)),
                vorrq_u8(vshrq_n_u8(l1, 4), vshlq_n_u8(vandq_u8(vshrq_n_u8(h1, 4), m2), 4)),
                vorrq_u8(vshrq_n_u8(l2, 4), vshlq_n_u8(vshrq_n_u8(h0, 6), 4)),
                vorrq_u8(vshrq_n_u8(l3, 4), vshlq_n_u8(vshrq_n_u8(h1, 6), 4)),
            };
            for (int k = 0; k < 8; k++) q[8 * h + k] = vsubq_s8(vreinterpretq_s8_u8(u[k]), bias);
        }
        const int8x16_t sc8 = vld1q_s8(b->scales);
        const int16x8_t sc16_lo = vmovl_s8(vget_low_s8(sc8)), sc16_hi = vmovl_high_s8(sc8);
        const int32x4_t sc[4] = {vmovl_s16(vget_low_s16(sc16_lo)), vmovl_high_s16(sc16_lo),
                                 vmovl_s16(vget_low_s16(sc16_hi)), vmovl_high_s16(sc16_hi)};
        const float d = f16_to_f32(b->d);

        for (int t = 0; t < T; t++) {
            const block_q8_K *y = &x[t * x_stride + i];
            int32x4_t p[16];
            for (int g = 0; g < 16; g++) p[g] = dot16(vdupq_n_s32(0), q[g], vld1q_s8(y->qs + 16 * g), sdot);
            int32x4_t isum4 = vmulq_s32(totals4(p[0], p[1], p[2], p[3]), sc[0]);
            isum4 = vmlaq_s32(isum4, totals4(p[4], p[5], p[6], p[7]), sc[1]);
            isum4 = vmlaq_s32(isum4, totals4(p[8], p[9], p[10], p[11]), sc[2]);
            isum4 = vmlaq_s32(isum4, totals4(p[12], p[13], p[14], p[15]), sc[3]);
            sum[t] += y->d * d * (float)vaddvq_s32(isum4);
        }
    }
    for (int t = 0; t < T; t++) out[t * out_stride] = sum[t];
}

/* Each body is compiled once per int8 path (the `sdot` argument folds away). */
static void q4k_smull(int64_t nb, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os) {
    q4k_rows(nb, w, x, xs, T, out, os, false);
}
static void q6k_smull(int64_t nb, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os) {
    q6k_rows(nb, w, x, xs, T, out, os, false);
}
#if LQ_HAVE_SDOT
LQ_SDOT_FN static void q4k_sdot(int64_t nb, const void *w, const void *x, int64_t xs, int T, float *out,
                                int64_t os) {
    q4k_rows(nb, w, x, xs, T, out, os, true);
}
LQ_SDOT_FN static void q6k_sdot(int64_t nb, const void *w, const void *x, int64_t xs, int T, float *out,
                                int64_t os) {
    q6k_rows(nb, w, x, xs, T, out, os, true);
}
#endif

/* ---- f32 / f16 rows x f32 activations ------------------------------------------------------- */

enum { W_F32, W_F16, W_BF16 }; /* the stored float format of a row */

static inline __attribute__((always_inline)) float32x4_t load4(const void *w, int64_t i, int kind) {
    if (kind == W_F16) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)w + i)));
    if (kind == W_BF16) /* bf16 -> f32 is the top half: exact */
        return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((const uint16_t *)w + i), 16));
    return vld1q_f32((const float *)w + i);
}

static inline float load1(const void *w, int64_t i, int kind) {
    if (kind == W_F16) return f16_to_f32(((const uint16_t *)w)[i]);
    if (kind == W_BF16) {
        uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float *)w)[i];
}

/* The row is walked in chunks of 64 values kept in registers; each chunk is applied to every
 * activation row before the next is loaded. Four accumulators per row hide the FMA latency. */
static inline __attribute__((always_inline)) void float_rows(int64_t n, const void *w, const float *x,
                                                             int64_t x_stride, int T, float *out,
                                                             int64_t out_stride, int kind) {
    float32x4_t acc[LQ_MAX_T][4];
    float tail[LQ_MAX_T];
    for (int t = 0; t < T; t++) {
        for (int k = 0; k < 4; k++) acc[t][k] = vdupq_n_f32(0.0f);
        tail[t] = 0.0f;
    }
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        if (kind != W_F32) /* 64 values, 128 bytes; f32 rows stream well without (see kernels.h) */
            LQ_PREFETCH(w, 2 * i), LQ_PREFETCH(w, 2 * i + 64);
        float32x4_t wv[16];
        for (int k = 0; k < 16; k++) wv[k] = load4(w, i + 4 * k, kind);
        for (int t = 0; t < T; t++) {
            const float *xt = x + t * x_stride + i;
            float32x4_t a[4] = {acc[t][0], acc[t][1], acc[t][2], acc[t][3]};
            for (int k = 0; k < 16; k++) a[k % 4] = vfmaq_f32(a[k % 4], wv[k], vld1q_f32(xt + 4 * k));
            for (int k = 0; k < 4; k++) acc[t][k] = a[k];
        }
    }
    for (; i + 4 <= n; i += 4) {
        float32x4_t wv = load4(w, i, kind);
        for (int t = 0; t < T; t++) acc[t][0] = vfmaq_f32(acc[t][0], wv, vld1q_f32(x + t * x_stride + i));
    }
    for (; i < n; i++) {
        float wi = load1(w, i, kind);
        for (int t = 0; t < T; t++) tail[t] += wi * x[t * x_stride + i];
    }
    for (int t = 0; t < T; t++) {
        float32x4_t s = vaddq_f32(vaddq_f32(acc[t][0], acc[t][1]), vaddq_f32(acc[t][2], acc[t][3]));
        out[t * out_stride] = vaddvq_f32(s) + tail[t];
    }
}

static void dot_f32(int64_t n, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os) {
    float_rows(n, w, x, xs, T, out, os, W_F32);
}
static void dot_f16(int64_t n, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os) {
    float_rows(n, w, x, xs, T, out, os, W_F16);
}
static void dot_bf16(int64_t n, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os) {
    float_rows(n, w, x, xs, T, out, os, W_BF16);
}

/* ---- f32 -> Q8_K ----------------------------------------------------------------------------
 * The scalar rule, bit for bit: iscale = 127 / amax, q = round-to-nearest-even(x * iscale)
 * clamped to [-127, 127], d = amax / 127. Each quant is one correctly rounded multiply and one
 * rounding, so there is nothing for the vector order to change. */
static void quantize_q8k(const float *x, block_q8_K *y, int64_t n) {
    for (int64_t ib = 0; ib < n / QK_K; ib++, x += QK_K) {
        block_q8_K *out = &y[ib];
        float32x4_t vmax = vdupq_n_f32(0.0f);
        for (int j = 0; j < QK_K; j += 4) vmax = vmaxnmq_f32(vmax, vabsq_f32(vld1q_f32(x + j)));
        const float amax = vmaxnmvq_f32(vmax); /* maxnm skips NaNs, as the scalar's `a > amax` does */
        if (!(amax > 0.0f)) {
            memset(out, 0, sizeof *out);
            continue;
        }
        const float iscale = 127.0f / amax;
        for (int g = 0; g < QK_K / 16; g++) {
            int32x4_t r[4];
            for (int k = 0; k < 4; k++) r[k] = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + 16 * g + 4 * k), iscale));
            /* |x * iscale| <= 127 up to one rounding, so the saturating narrows only ever clamp
             * a 127.00001 to 127, which the rounding already did: the result stays in [-127, 127]. */
            int16x8_t a = vcombine_s16(vqmovn_s32(r[0]), vqmovn_s32(r[1]));
            int16x8_t b = vcombine_s16(vqmovn_s32(r[2]), vqmovn_s32(r[3]));
            int8x16_t qv = vcombine_s8(vqmovn_s16(a), vqmovn_s16(b));
            vst1q_s8(out->qs + 16 * g, qv);
            out->bsums[g] = (int16_t)vaddlvq_s8(qv);
        }
        out->d = amax / 127.0f;
    }
}

static void gelu_mul(const float *gate, const float *up, int64_t n, float *out) {
    lq_gelu_mul_f32(gate, up, n, out);
}

const lq_kernels lq_kernels_neon = {
    .name = "neon",
    .dot = {[LQ_F32] = dot_f32, [LQ_F16] = dot_f16, [LQ_BF16] = dot_bf16, [LQ_Q4_K] = q4k_smull,
            [LQ_Q6_K] = q6k_smull},
    .quantize_q8k = quantize_q8k,
    .gelu_mul = gelu_mul,
};

#if LQ_HAVE_SDOT
static const lq_kernels neon_sdot = {
    .name = "neon_sdot",
    .dot = {[LQ_F32] = dot_f32, [LQ_F16] = dot_f16, [LQ_BF16] = dot_bf16, [LQ_Q4_K] = q4k_sdot,
            [LQ_Q6_K] = q6k_sdot},
    .quantize_q8k = quantize_q8k,
    .gelu_mul = gelu_mul,
};
#endif

const lq_kernels *lq_neon_sdot_table(void) {
#if LQ_HAVE_SDOT
    return cpu_has_sdot() ? &neon_sdot : NULL;
#else
    return NULL;
#endif
}

#endif /* __aarch64__ */
