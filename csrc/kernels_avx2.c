/* AVX2 + FMA (+ F16C) kernels. Compiled for the baseline target with this file's own target
 * pragma; dispatch.c only selects the table when cpuid reports avx2 and fma.
 *
 * Q4_K / Q6_K x Q8_K: the weight quants are unpacked to unsigned bytes (Q4_K: 64 values at a
 * time, dotted with up to 8 activation rows while in registers; Q6_K: the whole block), then
 * per activation row: maddubs (u8 x s8 -> s16 pairs), madd with the sub-block scale (-> s32),
 * float multiply-adds per block with the combined scale. The Q4_K min term and the Q6_K -32
 * offset are folded in through the Q8_K bsums (sums of 16 activations), so neither costs a
 * pass over the values.
 */
#if defined(__x86_64__) || defined(_M_X64)

#pragma GCC target("avx2,fma,f16c")

#include "kernels_x86.h"

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* acc + scale * (float)(sum of the 8 int32 lanes of v), the lanes added exactly in integers.
 * Kept in xmm registers: a scalar int -> float conversion would merge into (and wait for) the
 * previous accumulator, serialising the blocks. */
static inline __m128 acc_block(__m128 acc, float scale, __m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_add_ss(acc, _mm_mul_ss(_mm_set_ss(scale), _mm_cvtepi32_ps(s)));
}

/* sum of the 8 lanes of acc minus those of acc_m (the min term), in a fixed order */
static inline float q4k_finish(__m256 acc, __m256 acc_m) {
    __m256 v = _mm256_sub_ps(acc, acc_m);
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

/* 8 bytes (two uint32) in the low half of an xmm: one 64-bit move (set_epi32 made a move and a
 * 2-uop insert, twice per block: the 64-bit move was 1.08x at T = 1, 1.06x at T = 2-3, hot rows) */
static inline __m128i lq_bytes8(const uint32_t v[2]) {
    return _mm_cvtsi64_si128((long long)((uint64_t)v[1] << 32 | v[0]));
}

/* shuffle controls broadcasting int16 lane j of a 128-bit vector to all 16 lanes */
static const uint8_t lane16_ctrl[8][32] __attribute__((aligned(32))) = {
#define L(j) {2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, \
              2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1, 2*j, 2*j+1}
    L(0), L(1), L(2), L(3), L(4), L(5), L(6), L(7)
#undef L
};

/* The 8 mins, each twice, as int16: madd with the 16 Q8_K bsums gives lane j = mins[j] *
 * (bsums[2j] + bsums[2j+1]), sub-block j's min term (values 32j..32j+31), exact in int32. One
 * madd per column and block; a horizontal add of the bsums first (4-lane result) cost ~4 more
 * uops per column-block. */
static inline __m256i q4k_mins_dup(const uint32_t mn[2]) {
    __m128i m8 = lq_bytes8(mn);
    return _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
}

static inline __m256 q4k_min_lanes(const block_q8_K *xb, __m256i mn_dup) {
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)xb->bsums), mn_dup));
}

#define LQ_COLS_MAX 8

/* Activation columns [0, T) in groups of at most MAX (<= 8), as even as possible (a group of 1
 * pays a whole unpack per column): COLS(k, x of the group, out of the group) with k a constant,
 * so each group size runs its own unrolled kernel. The row's bytes stay in L1 for later groups. */
#define LQ_EACH_COL_GROUP(MAX, T, x, x_stride, out, out_stride, COLS)                                \
    do {                                                                                         \
        int groups_ = ((T) + (MAX) - 1) / (MAX);                                                 \
        for (int t_ = 0, g_ = 0; g_ < groups_; g_++) {                                           \
            int n_ = ((T) - t_) / (groups_ - g_);                                                \
            const block_q8_K *xg_ = (x) + t_ * (x_stride);                                       \
            float *og_ = (out) + t_ * (out_stride);                                              \
            switch (n_) {                                                                        \
            case 1: COLS(1, xg_, og_); break;                                                    \
            case 2: COLS(2, xg_, og_); break;                                                    \
            case 3: COLS(3, xg_, og_); break;                                                    \
            case 4: COLS(4, xg_, og_); break;                                                    \
            case 5: COLS(5, xg_, og_); break;                                                    \
            case 6: COLS(6, xg_, og_); break;                                                    \
            case 7: COLS(7, xg_, og_); break;                                                    \
            case 8: COLS(8, xg_, og_); break;                                                    \
            default: break;                                                                      \
            }                                                                                    \
            t_ += n_;                                                                            \
        }                                                                                        \
    } while (0)

/* NC activation columns (1..LQ_COLS_MAX) against one weight row, 64 values at a time: each
 * 64-value chunk (one byte register: sub-block 2c in the low nibbles, 2c+1 in the high) is
 * unpacked once, with its two scale vectors, and dotted with every column while in registers.
 * Per column and block: 8 maddubs (u8 x s8 -> s16 pairs, <= 2*15*127: no saturation), 8 madd
 * with the sub-block scale (-> s32), one madd for the min term, two float multiply-adds. NC is
 * a compile-time constant in every caller, so the per-column sums live in registers; the chunk
 * loop is kept rolled (unrolled, GCC reassociated the integer adds across chunks and spilled).
 * The integer sums are exact and each column's float operations are q4k_row1's whatever NC is,
 * so a column's result does not depend on the columns computed with it (batch invariance).
 * Measured on hot rows (64 rows x 11 blocks, Zen 3 AVX2, best of 300, interleaved with the
 * former kernel, which unpacked the whole block into 16 registers and spilled for T >= 2):
 * ns per column-block at T = 2, 3, 4, 8: 8.4, 7.3, 6.7, 5.9 -> 5.9, 5.1, 4.8, 4.5 (1.3-1.45x);
 * with groups of at most 4 columns T = 5..8 gained only 1.0-1.1x, so groups go up to 8. */
static inline __attribute__((always_inline)) void q4k_cols(int64_t nb, const block_q4_K *w, const block_q8_K *x,
                                                           int64_t x_stride, const int NC, float *out,
                                                           int64_t out_stride) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc[LQ_COLS_MAX], acc_m[LQ_COLS_MAX];
    for (int t = 0; t < NC; t++) acc[t] = _mm256_setzero_ps(), acc_m[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const block_q4_K *wb = &w[b];
        LQ_PREFETCH(wb, 0), LQ_PREFETCH(wb, 64), LQ_PREFETCH(wb, 128);
        uint32_t sc[2], mn[2];
        q4k_unpack_scales(wb->scales, sc, mn);
        const __m256i mn_dup = q4k_mins_dup(mn);
        const __m256i sc256 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(lq_bytes8(sc)));
        __m256i s[LQ_COLS_MAX];
        for (int t = 0; t < NC; t++) s[t] = _mm256_setzero_si256();
#pragma GCC unroll 1
        for (int c = 0; c < 4; c++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(wb->qs + 32 * c));
            __m256i lo = _mm256_and_si256(bytes, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m4);
            __m256i k0 = _mm256_shuffle_epi8(sc256, _mm256_load_si256((const __m256i *)lane16_ctrl[2 * c]));
            __m256i k1 = _mm256_shuffle_epi8(sc256, _mm256_load_si256((const __m256i *)lane16_ctrl[2 * c + 1]));
            for (int t = 0; t < NC; t++) {
                const int8_t *ys = x[t * x_stride + b].qs + 64 * c;
                __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)ys)), k0);
                __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(ys + 32))), k1);
                s[t] = _mm256_add_epi32(s[t], _mm256_add_epi32(p0, p1));
            }
        }
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(wb->d)), dmin = _mm256_set1_ps(_cvtsh_ss(wb->dmin)); /* F16C */
        for (int t = 0; t < NC; t++) {
            const block_q8_K *xb = &x[t * x_stride + b];
            /* broadcast(xd) * broadcast(d) rounds exactly as broadcast(xd * d), q4k_row1's form */
            const __m256 xd = _mm256_broadcast_ss(&xb->d);
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(xd, d), _mm256_cvtepi32_ps(s[t]), acc[t]);
            acc_m[t] = _mm256_fmadd_ps(_mm256_mul_ps(xd, dmin), q4k_min_lanes(xb, mn_dup), acc_m[t]);
        }
    }
    for (int t = 0; t < NC; t++) out[t * out_stride] = q4k_finish(acc[t], acc_m[t]);
}

/* One activation row (decode): stream 64 values at a time instead of unpacking the whole block
 * first, so nothing spills out of the 16 ymm registers. */
static float q4k_row1(int64_t nb, const block_q4_K *w, const block_q8_K *x) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc = _mm256_setzero_ps(), acc_m = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const block_q4_K *wb = &w[b];
        const block_q8_K *xb = &x[b];
        LQ_PREFETCH(wb, 0), LQ_PREFETCH(wb, 64), LQ_PREFETCH(wb, 128);
        uint32_t sc[2], mn[2];
        q4k_unpack_scales(wb->scales, sc, mn);
        const __m256i sc256 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(lq_bytes8(sc)));
        const __m256 pm = q4k_min_lanes(xb, q4k_mins_dup(mn));
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
        acc_m = _mm256_fmadd_ps(_mm256_set1_ps(dmin), pm, acc_m);
    }
    return q4k_finish(acc, acc_m);
}

/* int16 lanes [scale 2m x 8, scale 2m+1 x 8]: register m of a Q6_K block holds values
 * 32m..32m+31, and each int8 scale covers 16 of them */
static const uint8_t q6k_pair_ctrl[8][16] __attribute__((aligned(16))) = {
#define P(m) {2*m, 2*m, 2*m, 2*m, 2*m, 2*m, 2*m, 2*m, 2*m+1, 2*m+1, 2*m+1, 2*m+1, 2*m+1, 2*m+1, 2*m+1, 2*m+1}
    P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7)
#undef P
};

/* The same from the scales already widened to int16 (sc16: s0..s7 | s8..s15): broadcast the
 * 128-bit half holding pair m, then one in-lane shuffle (2m in the low lane, 2m+1 in the high). */
static const uint8_t q6k_pair16_ctrl[4][32] __attribute__((aligned(32))) = {
#define Q(k) {4*k, 4*k+1, 4*k, 4*k+1, 4*k, 4*k+1, 4*k, 4*k+1, 4*k, 4*k+1, 4*k, 4*k+1, 4*k, 4*k+1, 4*k, 4*k+1, \
              4*k+2, 4*k+3, 4*k+2, 4*k+3, 4*k+2, 4*k+3, 4*k+2, 4*k+3, 4*k+2, 4*k+3, 4*k+2, 4*k+3, 4*k+2, 4*k+3, \
              4*k+2, 4*k+3}
    Q(0), Q(1), Q(2), Q(3)
#undef Q
};

static inline __m256i q6k_scale_pair(__m128i sc8, int m) {
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, _mm_load_si128((const __m128i *)q6k_pair_ctrl[m])));
}

#define LQ_Q6K_COLS_MAX 8

/* Two registers of a Q6_K block's stored values (q + 32, unsigned 6 bits) from the 128-value
 * half whose ql / qh registers are given: pass 0 gives registers 4h and 4h+1 (values 0-63 of the
 * half), pass 1 registers 4h+2 and 4h+3, each with its pair of int16 scales; then dotted with
 * NC columns (the offset and the block's float fold: q6k_cols). */
#define Q6K_PASS(P)                                                                                          \
    do {                                                                                                     \
        const int ma = 4 * h + 2 * (P);                                                                      \
        __m256i qa = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4 * (P)), m4),                  \
                                     _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4 * (P)), m2), 4)); \
        __m256i qb = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4 * (P)), m4),                  \
                                     _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4 * (P) + 2), m2), 4)); \
        __m256i ka = q6k_scale_pair(sc8, ma), kb = q6k_scale_pair(sc8, ma + 1);                              \
        for (int t = 0; t < NC; t++) {                                                                       \
            const int8_t *ys = x[t * x_stride + b].qs + 32 * ma;                                             \
            __m256i pa = _mm256_madd_epi16(_mm256_maddubs_epi16(qa, _mm256_loadu_si256((const __m256i *)ys)), ka); \
            __m256i pb = _mm256_madd_epi16(_mm256_maddubs_epi16(qb, _mm256_loadu_si256((const __m256i *)(ys + 32))), kb); \
            s[t] = _mm256_add_epi32(s[t], _mm256_add_epi32(pa, pb));                                         \
        }                                                                                                    \
    } while (0)

/* NC activation columns (1..LQ_Q6K_COLS_MAX) against one Q6_K row, 64 values at a time, each
 * unpacked once and dotted with every column in registers (as q4k_cols). Per column and block
 * the int32 lanes are added exactly and folded into the float sum with one multiply-add, q6k_row1's
 * (and the scalar kernel's) arithmetic, so results are bit-identical to scalar at any NC.
 * Measured on hot rows (64 rows x 3 blocks, Zen 3, best of 300, in one process against the former
 * kernel, which unpacked the whole block into 16 registers and spilled): 1.11-1.17x per
 * column-block at T = 2..6, 1.04-1.06x at T = 7-8; groups of at most 4 lost 5-9% at T = 5..8. */
static inline __attribute__((always_inline)) void q6k_cols(int64_t nb, const block_q6_K *w, const block_q8_K *x,
                                                           int64_t x_stride, const int NC, float *out,
                                                           int64_t out_stride) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(0x03);
    __m128 acc[LQ_Q6K_COLS_MAX];
    for (int t = 0; t < NC; t++) acc[t] = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const block_q6_K *wb = &w[b];
        LQ_PREFETCH(wb, 0), LQ_PREFETCH(wb, 64), LQ_PREFETCH(wb, 128), LQ_PREFETCH(wb, 192);
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)wb->scales);
        __m256i s[LQ_Q6K_COLS_MAX];
        for (int t = 0; t < NC; t++) s[t] = _mm256_setzero_si256();
#pragma GCC unroll 1
        for (int h = 0; h < 2; h++) {
            const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(wb->ql + 64 * h));
            const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(wb->ql + 64 * h + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(wb->qh + 32 * h));
            Q6K_PASS(0);
            Q6K_PASS(1);
        }
        const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
        const float d = _cvtsh_ss(wb->d);
        for (int t = 0; t < NC; t++) {
            const block_q8_K *xb = &x[t * x_stride + b];
            /* the stored values are q + 32: subtract 32 * sum_g scale_g * bsum_g */
            __m256i off = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)xb->bsums), sc16);
            acc[t] = acc_block(acc[t], xb->d * d, _mm256_sub_epi32(s[t], _mm256_slli_epi32(off, 5)));
        }
    }
    for (int t = 0; t < NC; t++) out[t * out_stride] = _mm_cvtss_f32(acc[t]);
}

/* One activation row: 128 values (4 registers of quants) at a time.
 * Q6_K values are stored as q + 32 and the 32 * activation part is taken back through the bsums,
 * so the 8 int32 lanes hold large partial sums that cancel only across lanes: they are added in
 * integers (exact) before the one float multiply-add per block, exactly the scalar kernel's
 * arithmetic, so the result is bit-identical to it and never loses the cancellation to rounding. */
static float q6k_row1(int64_t nb, const block_q6_K *w, const block_q8_K *x) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(0x03);
    __m128 acc = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const block_q6_K *wb = &w[b];
        const block_q8_K *xb = &x[b];
        LQ_PREFETCH(wb, 0), LQ_PREFETCH(wb, 64), LQ_PREFETCH(wb, 128), LQ_PREFETCH(wb, 192);
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
            const __m256i half = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11)
                                   : _mm256_permute2x128_si256(sc16, sc16, 0x00);
            __m256i k0 = _mm256_shuffle_epi8(half, _mm256_load_si256((const __m256i *)q6k_pair16_ctrl[0]));
            __m256i k1 = _mm256_shuffle_epi8(half, _mm256_load_si256((const __m256i *)q6k_pair16_ctrl[1]));
            __m256i k2 = _mm256_shuffle_epi8(half, _mm256_load_si256((const __m256i *)q6k_pair16_ctrl[2]));
            __m256i k3 = _mm256_shuffle_epi8(half, _mm256_load_si256((const __m256i *)q6k_pair16_ctrl[3]));
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(
                                          _mm256_maddubs_epi16(q0, _mm256_loadu_si256((const __m256i *)ys)), k0));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(
                                          _mm256_maddubs_epi16(q1, _mm256_loadu_si256((const __m256i *)(ys + 32))), k1));
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(
                                          _mm256_maddubs_epi16(q2, _mm256_loadu_si256((const __m256i *)(ys + 64))), k2));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(
                                          _mm256_maddubs_epi16(q3, _mm256_loadu_si256((const __m256i *)(ys + 96))), k3));
        }
        acc = acc_block(acc, xb->d * _cvtsh_ss(wb->d), _mm256_add_epi32(s0, s1));
    }
    return _mm_cvtss_f32(acc);
}

/* The rows kernels (lq_rows_fn) of both K-quants: q4k_row1 / q6k_row1 per row (T = 1), or column
 * groups of q4k_cols / q6k_cols (LQ_EACH_COL_GROUP) per row, with the T and column-group dispatch
 * done once per call instead of once per row, and each result stored straight to its place.
 * fmt is a constant in each caller (rows_q4k, rows_q6k), so each gets its own format's code only.
 * Expert FFN T = 8 (8 tokens x top-8 of 24 experts), hot weights, 1 thread, a C harness
 * alternating the builds 4 times: phase B (down rows of 3 blocks) 4.3-4.5 -> 3.8-4.1 ms per call,
 * the call's best time 10.6-10.75 -> 9.84-10.05 ms; phase A (rows of 11 blocks) within the noise. */
static inline __attribute__((always_inline)) void rows_kquant(const int fmt, int64_t nb, const void *w,
                                                              size_t row_bytes, int64_t n_rows, const void *x_rows,
                                                              int64_t x_stride, int T, float *out,
                                                              int64_t out_row_stride, int64_t out_stride) {
    const uint8_t *w8 = w;
    const block_q8_K *x = x_rows;
    if (T == 1) {
        for (int64_t r = 0; r < n_rows; r++) {
            const uint8_t *wr = w8 + (size_t)r * row_bytes;
            out[r * out_row_stride] = fmt == LQ_Q4_K ? q4k_row1(nb, (const block_q4_K *)wr, x)
                                                     : q6k_row1(nb, (const block_q6_K *)wr, x);
        }
        return;
    }
#define KQ_ROWS(k, xg, og)                                                                               \
    for (int64_t r = 0; r < n_rows; r++) {                                                               \
        const uint8_t *wr = w8 + (size_t)r * row_bytes;                                                  \
        if (fmt == LQ_Q4_K)                                                                              \
            q4k_cols(nb, (const block_q4_K *)wr, xg, x_stride, k, og + r * out_row_stride, out_stride);  \
        else                                                                                             \
            q6k_cols(nb, (const block_q6_K *)wr, xg, x_stride, k, og + r * out_row_stride, out_stride);  \
    }
    LQ_EACH_COL_GROUP(fmt == LQ_Q4_K ? LQ_COLS_MAX : LQ_Q6K_COLS_MAX, T, x, x_stride, out, out_stride, KQ_ROWS);
#undef KQ_ROWS
}

LQ_KQUANT_ROWS_ENTRIES(rows_kquant)

/* The table's lq_row_fn for the K-quants: one row of the rows kernel (one copy of each column
 * group's code, not two; the drivers call the rows kernels, so dot is the fallback's shape). */
static void dot_q4k(int64_t nb, const void *w_row, const void *x, int64_t x_stride, int T, float *out,
                    int64_t out_stride) {
    rows_q4k(nb, w_row, 0, 1, x, x_stride, T, out, 0, out_stride);
}

static void dot_q6k(int64_t nb, const void *w_row, const void *x, int64_t x_stride, int T, float *out,
                    int64_t out_stride) {
    rows_q6k(nb, w_row, 0, 1, x, x_stride, T, out, 0, out_stride);
}

/* Float rows: four activation rows at a time share each weight load (and f16 conversion); the
 * rest one by one. Both paths sum every column in the same order (two 8-lane accumulators over
 * 16-value steps, then the tail), so a column's result does not depend on how many columns came
 * with it: a batch gives bit-identical results to one-at-a-time calls. */
static inline __m256 ld_f32(const void *w, int64_t i) { return _mm256_loadu_ps((const float *)w + i); }
static inline __m256 ld_f16(const void *w, int64_t i) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
}
static inline __m256 ld_bf16(const void *w, int64_t i) { /* bf16 -> f32: the top half, exact */
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
static inline float el_f32(const void *w, int64_t i) { return ((const float *)w)[i]; }
static inline float el_f16(const void *w, int64_t i) { return _cvtsh_ss(((const uint16_t *)w)[i]); }
static inline float el_bf16(const void *w, int64_t i) {
    uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#define COL_FMA(k, off) a##k##off = _mm256_fmadd_ps(w##off, _mm256_loadu_ps(x##k + i + 8 * off), a##k##off)
#define DEFINE_FLOAT_DOT(NAME, LD, EL, PF_ESZ)                                                               \
    void NAME(int64_t n, const void *w, const void *x_rows, int64_t x_stride, int T, float *out,         \
                     int64_t out_stride) {                                                                \
        const float *x = x_rows;                                                                          \
        int t = 0;                                                                                        \
        for (; t + 4 <= T; t += 4) {                                                                      \
            const float *x0 = x + t * x_stride, *x1 = x0 + x_stride, *x2 = x1 + x_stride,                 \
                        *x3 = x2 + x_stride;                                                              \
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,      \
                   a30 = a00, a31 = a00;                                                                  \
            int64_t i = 0;                                                                                \
            for (; i + 16 <= n; i += 16) {                                                                \
                if (PF_ESZ) LQ_PREFETCH(w, i * PF_ESZ);                                                            \
                __m256 w0 = LD(w, i), w1 = LD(w, i + 8);                                                  \
                COL_FMA(0, 0); COL_FMA(0, 1); COL_FMA(1, 0); COL_FMA(1, 1);                               \
                COL_FMA(2, 0); COL_FMA(2, 1); COL_FMA(3, 0); COL_FMA(3, 1);                               \
            }                                                                                             \
            if (i + 8 <= n) {                                                                             \
                __m256 w0 = LD(w, i);                                                                     \
                COL_FMA(0, 0); COL_FMA(1, 0); COL_FMA(2, 0); COL_FMA(3, 0);                               \
                i += 8;                                                                                   \
            }                                                                                             \
            float s0 = hsum_ps(_mm256_add_ps(a00, a01)), s1 = hsum_ps(_mm256_add_ps(a10, a11));           \
            float s2 = hsum_ps(_mm256_add_ps(a20, a21)), s3 = hsum_ps(_mm256_add_ps(a30, a31));           \
            for (; i < n; i++) {                                                                          \
                float wi = EL(w, i);                                                                      \
                s0 += wi * x0[i], s1 += wi * x1[i], s2 += wi * x2[i], s3 += wi * x3[i];                   \
            }                                                                                             \
            out[t * out_stride] = s0, out[(t + 1) * out_stride] = s1;                                     \
            out[(t + 2) * out_stride] = s2, out[(t + 3) * out_stride] = s3;                               \
        }                                                                                                 \
        for (; t < T; t++) {                                                                              \
            const float *x0 = x + t * x_stride;                                                           \
            __m256 a00 = _mm256_setzero_ps(), a01 = a00;                                                  \
            int64_t i = 0;                                                                                \
            for (; i + 16 <= n; i += 16) {                                                                \
                if (PF_ESZ) LQ_PREFETCH(w, i * PF_ESZ);                                                            \
                __m256 w0 = LD(w, i), w1 = LD(w, i + 8);                                                  \
                COL_FMA(0, 0); COL_FMA(0, 1);                                                             \
            }                                                                                             \
            if (i + 8 <= n) {                                                                             \
                __m256 w0 = LD(w, i);                                                                     \
                COL_FMA(0, 0);                                                                            \
                i += 8;                                                                                   \
            }                                                                                             \
            float s0 = hsum_ps(_mm256_add_ps(a00, a01));                                                  \
            for (; i < n; i++) s0 += EL(w, i) * x0[i];                                                    \
            out[t * out_stride] = s0;                                                                     \
        }                                                                                                 \
    }

/* PF_ESZ: bytes per weight to prefetch by, 0 = none (f32: the hardware prefetcher keeps up).
 * Not static: the wider x86 tables (AVX-512, AVX-VNNI) share these float kernels. */
DEFINE_FLOAT_DOT(lq_avx2_dot_f32, ld_f32, el_f32, 0)
DEFINE_FLOAT_DOT(lq_avx2_dot_f16, ld_f16, el_f16, 2)
DEFINE_FLOAT_DOT(lq_avx2_dot_bf16, ld_bf16, el_bf16, 2)

/* Same bytes as the scalar quantiser: iscale = 127/amax, round half to even (the default
 * MXCSR mode of cvtps2dq), d = amax/127. */
void lq_avx2_quantize_q8k(const float *x, block_q8_K *y, int64_t n) {
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

/* The same code as every table's, in 256-bit registers: 2.2x faster than the SSE2 build. */
void lq_avx2_gelu_mul(const float *gate, const float *up, int64_t n, float *out) {
    lq_gelu_mul_f32(gate, up, n, out);
}

const lq_kernels lq_kernels_avx2 = {
    .name = "avx2",
    .dot = {[LQ_F32] = lq_avx2_dot_f32, [LQ_F16] = lq_avx2_dot_f16, [LQ_BF16] = lq_avx2_dot_bf16,
            [LQ_Q4_K] = dot_q4k, [LQ_Q6_K] = dot_q6k},
    .quantize_q8k = lq_avx2_quantize_q8k,
    .gelu_mul = lq_avx2_gelu_mul,
    .rows = {[LQ_Q4_K] = rows_q4k, [LQ_Q6_K] = rows_q6k},
};

#endif
