/* AVX-512 (F/BW/VL) + AVX512-VNNI kernels: 512-bit vpdpbusd (Ice Lake, Sapphire Rapids, Zen 4+).
 * Compiled for the baseline with this file's target pragma; dispatch.c selects the table only
 * when lq_avx512_usable() (cpu_x86.c: cpuid and the OS's saved zmm/opmask state) says so.
 *
 * The per-row kernels are those of kernels_avxvnni.c on registers twice as wide: vpdpbusd of
 * unsigned weight quants by signed Q8_K quants into int32 lanes (exact), one multiply by the
 * sub-block scale per lane, an exact integer reduction per block, then the scalar kernel's float
 * operations in its order, so results are bit-identical to kernels_scalar.c. The Q4_K rows
 * kernel further down (its own comment) does up to 16 dots at a time, with the same bits. Float rows
 * and the Q8_K quantiser are the AVX2 ones (memory-bound; wider registers buy nothing there). */
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

/* qs bytes 0-63 hold sub-blocks 0 and 2 (low nibbles) and 1 and 3 (high); bytes 64-127 sub-blocks
 * 4, 6 and 5, 7. Register k pairs sub-blocks q4k_sub[k][0] (low half) and q4k_sub[k][1]. */
static const int q4k_sub[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};

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
        __m512i q[4], scale[4];
        for (int h = 0; h < 2; h++) {
            __m512i bytes = _mm512_loadu_si512((const void *)(wb->qs + 64 * h));
            q[2 * h] = _mm512_and_si512(bytes, m4);
            q[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), m4);
        }
        for (int k = 0; k < 4; k++) scale[k] = halves_epi32(sc[q4k_sub[k][0]], sc[q4k_sub[k][1]]);
        const __m128i mn16 = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)mn4[1], (int)mn4[0]));
        const float wd = _cvtsh_ss(wb->d), wdmin = _cvtsh_ss(wb->dmin); /* exact, as lq_fp16_to_fp32 */
        for (int t = 0; t < T; t++) {
            const block_q8_K *xb = &x[t * x_stride + b];
            /* sub-block j meets activations 32j..32j+31; totals fit int32 (see kernels_avxvnni.c) */
            __m512i s = _mm512_setzero_si512();
            for (int k = 0; k < 4; k++) {
                __m512i y = load_halves(xb->qs, 32 * q4k_sub[k][0], 32 * q4k_sub[k][1]);
                __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[k], y);
                s = _mm512_add_epi32(s, _mm512_mullo_epi32(p, scale[k]));
            }
            int32_t isum = _mm512_reduce_add_epi32(s), imin = q4k_min_term(xb, mn16);
            acc[t] = q4k_fold(acc[t], xb->d, wd, wdmin, isum, imin);
        }
    }
    for (int t = 0; t < T; t++) out[t * out_stride] = acc[t];
}

/* ---- Q4_K rows kernel: four rows, up to four columns, one register of dots ----
 *
 * The per-row kernel above pays, per block and activation row, a 16-lane horizontal sum, four
 * 32-bit multiplies by scale vectors built from scalars, and a scalar fold. On a Zen 5 EPYC it
 * ran the top-8 expert FFN 1.37-1.44x slower than the AVX2 table. The rows kernel below takes
 * four rows and up to four columns together:
 * - the activations are copied once per call into the order the weight registers hold the
 *   sub-blocks (y_block), with each sub-block's quant sum (two bsums) beside them, so every row
 *   reads them with plain loads;
 * - each 64-value chunk: vpdpbusd (u8 x s8, 4 products per 32-bit lane) for two rows; their
 *   sums fit 16 bits, so they are packed into one register and one vpdpwssd multiplies both by
 *   their sub-block scales (laid out by one vpermw per chunk and row pair) and accumulates;
 * - the sums of all 16 (row, column) dots are reduced together into one register (lane 4c + i),
 *   the min terms likewise, and one 16-lane fold does the scalar kernel's float operations in its
 *   order. Reducing and folding each column's four dots on its own cost up to a fifth of the
 *   time: hot 256 x 2816 rows, Zen 5, ns per row-block-column at T = 1, 2, 3, 4, 8: per column
 *   2.93, 2.18, 1.95, 1.89, 1.95; together 2.88, 1.98, 1.71, 1.56, 1.58 (2816 x 768: 3.46, 2.38,
 *   2.09, 2.00, 1.87 against 3.44, 2.15, 1.81, 1.63, 1.55). Sixteen rows a call at T = 1 (every
 *   lane a dot) were no faster hot and 0.8 of four rows' speed cold (16 interleaved streams).
 * The integer sums are exact and each lane does q4k_fold's float operations, so the results
 * equal kernels_scalar.c's bit for bit. */

/* One Q8_K block of an activation column in the weight registers' sub-block order. */
typedef struct {
    int8_t qs[4][64]; /* register k: sub-blocks q4k_sub[k][0] (low 32 bytes), q4k_sub[k][1] (high) */
    int16_t qsum[8];  /* sub-block j's quant sum: bsums[2j] + bsums[2j+1] (|.| <= 32 * 128) */
    float d;
    uint8_t pad[44];
} __attribute__((aligned(64))) y_block; /* 320 bytes */

static void y_fill(const block_q8_K *x, int64_t nb, y_block *y) {
    for (int64_t b = 0; b < nb; b++) {
        for (int k = 0; k < 4; k++)
            _mm512_store_si512((void *)y[b].qs[k], load_halves(x[b].qs, 32 * q4k_sub[k][0], 32 * q4k_sub[k][1]));
        __m256i bs = _mm256_loadu_si256((const __m256i *)x[b].bsums);
        __m256i pairs = _mm256_madd_epi16(bs, _mm256_set1_epi16(1)); /* 8 x int32, |.| <= 4096 */
        _mm_storeu_si128((__m128i *)y[b].qsum, _mm256_cvtepi32_epi16(pairs));
        y[b].d = x[b].d;
    }
}

/* Four 16-byte Q4_K block heads (d, dmin, 12 bytes of scales), one per 128-bit lane, unpacked
 * in place: each lane becomes the block's 8 scales then 8 mins as bytes (q4k_unpack_scales). */
static inline __m512i q4k_heads_unpack(__m512i h) {
    const __m512i lo_src =
        _mm512_broadcast_i32x4(_mm_setr_epi8(4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i hi_src =
        _mm512_broadcast_i32x4(_mm_setr_epi8(-1, -1, -1, -1, 4, 5, 6, 7, -1, -1, -1, -1, 8, 9, 10, 11));
    const __m512i lo_mask =
        _mm512_broadcast_i32x4(_mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15));
    __m512i a = _mm512_shuffle_epi8(h, lo_src);
    /* bytes 12-15 of each lane (mins 4-7) take the high nibble of scale bytes 8-11 */
    a = _mm512_mask_blend_epi8(0xf000f000f000f000ULL, a, _mm512_srli_epi16(a, 4));
    __m512i top = _mm512_and_si512(_mm512_srli_epi16(_mm512_shuffle_epi8(h, hi_src), 2), _mm512_set1_epi8(0x30));
    return _mm512_or_si512(_mm512_and_si512(a, lo_mask), top);
}

/* the first 32-bit lane of each 128-bit lane of v */
static inline __m128i lane_heads_epi32(__m512i v) {
    return _mm512_castsi512_si128(_mm512_permutexvar_epi32(_mm512_castsi128_si512(_mm_setr_epi32(0, 4, 8, 12)), v));
}

/* d (low 128 bits) and dmin (high) of the four heads, as f32 (exact, as lq_fp16_to_fp32) */
static inline __m256 q4k_heads_d(__m512i h) {
    const __m128i dd = lane_heads_epi32(h); /* per head: d | dmin << 16 */
    return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(dd), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
}

/* vpermw indices for the scale words of row pair pr = (pr, pr + 2) of a group of four rows and
 * chunk register k:
 * in 128-bit lane j, words 0-3 are row pr's scale and words 4-7 row pr + 2's, each of the
 * sub-block register k holds in that lane (q4k_sub[k][j >= 2]); the source has row i's 8 scales
 * as words 8i..8i+7. */
#define SW4(r, s) 8 * (r) + (s), 8 * (r) + (s), 8 * (r) + (s), 8 * (r) + (s)
#define SWK(a, b, s0, s1) SW4(a, s0), SW4(b, s0), SW4(a, s0), SW4(b, s0), SW4(a, s1), SW4(b, s1), SW4(a, s1), SW4(b, s1)
static const int16_t q4k_pair_scale_idx[2][4][32] __attribute__((aligned(64))) = {
    {{SWK(0, 2, 0, 2)}, {SWK(0, 2, 1, 3)}, {SWK(0, 2, 4, 6)}, {SWK(0, 2, 5, 7)}},
    {{SWK(1, 3, 0, 2)}, {SWK(1, 3, 1, 3)}, {SWK(1, 3, 4, 6)}, {SWK(1, 3, 5, 7)}}};
#undef SWK
#undef SW4

/* m[c] holds column c's four integer sums (lane i: row i) as four partials, one per 128-bit
 * lane: lane 4c + i of the result is the total (exact) */
static inline __m512i columns_total(__m512i m0, __m512i m1, __m512i m2, __m512i m3) {
    __m512i p01 = _mm512_add_epi32(_mm512_shuffle_i32x4(m0, m1, 0x44), _mm512_shuffle_i32x4(m0, m1, 0xee));
    __m512i p23 = _mm512_add_epi32(_mm512_shuffle_i32x4(m2, m3, 0x44), _mm512_shuffle_i32x4(m2, m3, 0xee));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(p01, p23, 0x88), _mm512_shuffle_i32x4(p01, p23, 0xdd));
}

/* v[c]'s 128-bit lane i holds four partials of (column c, row i): lane 4c + i of the result is
 * their sum (exact) */
static inline __m512i lanes_total(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
    const __m512i to_columns = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    __m512i e01 = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
    __m512i e23 = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
    __m512i f = _mm512_add_epi32(_mm512_unpacklo_epi64(e01, e23), _mm512_unpackhi_epi64(e01, e23));
    return _mm512_permutexvar_epi32(to_columns, f); /* f: lane 4i + c */
}

static inline __m512i head_lanes(const block_q4_K *a, const block_q4_K *b, const block_q4_K *c, const block_q4_K *d) {
    __m512i h = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)a));
    h = _mm512_inserti32x4(h, _mm_loadu_si128((const __m128i *)b), 1);
    h = _mm512_inserti32x4(h, _mm_loadu_si128((const __m128i *)c), 2);
    return _mm512_inserti32x4(h, _mm_loadu_si128((const __m128i *)d), 3);
}

/* a Q4_K block's 256 quants as four registers in q4k_sub order */
static inline void q4k_quants(const block_q4_K *wb, __m512i q[4]) {
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    for (int h = 0; h < 2; h++) {
        __m512i bytes = _mm512_loadu_si512((const void *)(wb->qs + 64 * h));
        q[2 * h] = _mm512_and_si512(bytes, m4);
        q[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), m4);
    }
}

/* Integer sums of block b of rows w[0..3] with NC (1-4, a constant in each caller) activation
 * columns y, y + y_stride, ...: m[c] holds column c's four dots (lane i: row i) as partials, one
 * per 128-bit lane; v[c] their min-term partials (128-bit lane i: row i). */
static inline __attribute__((always_inline)) void q4k_block_sums(const block_q4_K *const w[4], int64_t b, __m512i u,
                                                                 const y_block *y, int64_t y_stride, const int NC,
                                                                 __m512i m[4], __m512i v[4]) {
    const __m512i words = _mm512_unpacklo_epi8(u, _mm512_setzero_si512()); /* lane i: row i's scales */
    const __m512i mins = _mm512_unpackhi_epi8(u, _mm512_setzero_si512());  /* lane i: row i's mins */
    __m512i t[2][4];
    _Pragma("GCC unroll 2") for (int pr = 0; pr < 2; pr++) { /* rows pr and pr + 2 side by side */
        __m512i qa[4], qb[4], sc[4];
        q4k_quants(&w[pr][b], qa);
        q4k_quants(&w[pr + 2][b], qb);
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++)
            sc[k] = _mm512_permutexvar_epi16(_mm512_load_si512((const void *)q4k_pair_scale_idx[pr][k]), words);
        _Pragma("GCC unroll 4") for (int c = 0; c < NC; c++) {
            const y_block *yb = &y[c * y_stride + b];
            /* vpdpbusd: 4 products per 32-bit lane, |.| <= 4 * 15 * 128, so the two rows' registers
             * pack into one of 16-bit words exactly, and one vpdpwssd scales and adds both: lanes
             * 0-1 of each 128-bit lane are row pr's, lanes 2-3 row pr + 2's */
            __m512i s = _mm512_setzero_si512();
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                const __m512i yk = _mm512_load_si512((const void *)yb->qs[k]);
                const __m512i da = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qa[k], yk);
                const __m512i db = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qb[k], yk);
                s = _mm512_dpwssd_epi32(s, _mm512_packs_epi32(da, db), sc[k]);
            }
            t[pr][c] = s;
        }
    }
    _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {
        if (c >= NC) { /* no column: zero dots */
            m[c] = v[c] = _mm512_setzero_si512();
            continue;
        }
        /* t[0]: rows 0, 0, 2, 2 in each 128-bit lane, t[1]: 1, 1, 3, 3 -> rows 0, 1, 2, 3 */
        const __m512i x = _mm512_mask_blend_epi32(0xaaaa, t[0][c], t[1][c]);
        const __m512i z = _mm512_mask_blend_epi32(0xaaaa, t[1][c], t[0][c]);
        m[c] = _mm512_add_epi32(x, _mm512_shuffle_epi32(z, _MM_PERM_CDAB));
        const __m128i qsum = _mm_loadu_si128((const __m128i *)y[c * y_stride + b].qsum);
        v[c] = _mm512_madd_epi16(mins, _mm512_broadcast_i32x4(qsum)); /* pairs of sub-blocks */
    }
}

/* acc (lane 4c + i: row i, column c) after q4k_fold of block b: one reduction, one min-term sum
 * and one fold for all the dots */
static inline __attribute__((always_inline)) __m512 q4k_block_fold(__m512 acc, const block_q4_K *const w[4], int64_t b,
                                                                   const y_block *y, int64_t y_stride, const int NC) {
    const __m512i h = head_lanes(&w[0][b], &w[1][b], &w[2][b], &w[3][b]);
    __m512i m[4], v[4], isum, imin;
    q4k_block_sums(w, b, q4k_heads_unpack(h), y, y_stride, NC, m, v);
    if (NC == 1) { /* lanes 0-3 only: shorter trees */
        isum = _mm512_add_epi32(m[0], _mm512_shuffle_i32x4(m[0], m[0], 0x4e));
        isum = _mm512_add_epi32(isum, _mm512_shuffle_i32x4(isum, isum, 0xb1));
        imin = _mm512_add_epi32(v[0], _mm512_shuffle_epi32(v[0], _MM_PERM_BADC));
        imin = _mm512_add_epi32(imin, _mm512_shuffle_epi32(imin, _MM_PERM_CDAB));
        imin = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), imin);
    } else {
        isum = columns_total(m[0], m[1], m[2], m[3]), imin = lanes_total(v[0], v[1], v[2], v[3]);
    }
    /* per lane 4c + i: row i's d and dmin, column c's d (set from scalars: a vector load of four
     * floats just stored waits on store forwarding; T = 1 hot took 3.9 ns instead of 3.0) */
    const __m512 wd = _mm512_castps256_ps512(q4k_heads_d(h)); /* 128-bit lanes 0: d, 1: dmin */
    __m512 xd;
    if (NC == 1)
        xd = _mm512_set1_ps(y[b].d);
    else if (NC == 2)
        xd = _mm512_mask_blend_ps(0x00f0, _mm512_set1_ps(y[b].d), _mm512_set1_ps(y[y_stride + b].d));
    else
        xd = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                   _mm512_castps128_ps512(_mm_setr_ps(y[b].d, y[y_stride + b].d, y[2 * y_stride + b].d,
                                                                      NC == 4 ? y[3 * y_stride + b].d : 0.f)));
    /* q4k_fold on 16 lanes: the same operations, in the same order, per lane */
    const __m512 d = _mm512_mul_ps(xd, _mm512_shuffle_f32x4(wd, wd, 0x00));
    const __m512 dmin = _mm512_mul_ps(xd, _mm512_shuffle_f32x4(wd, wd, 0x55));
    acc = _mm512_add_ps(acc, _mm512_mul_ps(d, _mm512_cvtepi32_ps(isum)));
    return _mm512_sub_ps(acc, _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(imin)));
}

/* Rows [r0, r1) of w (nb blocks each) against NC activation columns y, y + y_stride, ..., four
 * rows at a time: out[(r - r0) * ors + c * os] = dot of row r with column c. Each row's quants and
 * scale registers are made once per block and used for every column. */
static inline __attribute__((always_inline)) void q4k_run_cols(int64_t nb, const uint8_t *w, size_t row_bytes,
                                                               int64_t r0, int64_t r1, const y_block *y,
                                                               int64_t y_stride, const int NC, float *out, int64_t ors,
                                                               int64_t os, size_t ahead, size_t step) {
    for (int64_t r = r0; r < r1; r += 4) {
        const block_q4_K *w4[4];
        for (int i = 0; i < 4; i++) /* past the end: repeat the last row */
            w4[i] = (const block_q4_K *)(w + (size_t)(r + i < r1 ? r + i : r1 - 1) * row_bytes);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            /* a group of four rows >= 8 KiB ahead, linearly, at the pace this one is read */
            const char *p = (const char *)w4[0] + ahead + (size_t)b * step;
            for (size_t o = 0; o < step; o += 64) __builtin_prefetch(p + o, 0, 3);
            acc = q4k_block_fold(acc, w4, b, y, y_stride, NC);
        }
        float dots[16];
        _mm512_storeu_ps(dots, acc);
        for (int c = 0; c < NC; c++)
            for (int i = 0; i < 4 && r + i < r1; i++) out[(r - r0 + i) * ors + c * os] = dots[4 * c + i];
    }
}

/* Activation blocks the rows kernel copies at a time (30 KiB on the stack): more columns than
 * fit are taken in chunks, each over the same rows (which stay in L1/L2 meanwhile). */
#define Y_BLOCKS 96
#define ROW_RUN 16 /* rows per pass over the column chunks */

void lq_avx512_rows_q4k(int64_t nb, const void *w, size_t row_bytes, int64_t n_rows, const void *x_rows,
                        int64_t x_stride, int T, float *out, int64_t ors, int64_t os) {
    const block_q8_K *x = x_rows;
    if (nb > Y_BLOCKS || n_rows == 1) { /* too wide for the copy, or one row (a group would be 3/4 waste) */
        for (int64_t r = 0; r < n_rows; r++)
            lq_avx512_dot_q4k(nb, (const uint8_t *)w + (size_t)r * row_bytes, x, x_stride, T, out + r * ors, os);
        return;
    }
    y_block y[Y_BLOCKS];
    /* Four rows are read side by side, so the bytes LQ_PREFETCH_AHEAD past each row are rows of
     * the same pass. Each block step prefetches 1/nb of a group of four rows at least 8 KiB
     * ahead instead: one linear stream per thread. LM-head-shaped matvec (131072 x 2816 Q4_K,
     * 198 MiB, cold), x the C read of the same bytes timed call by call, median of 9, Zen 5:
     * each row's next group's blocks 0.79-0.85 on 1 thread, 0.82-0.87 on 2; linear 8-12 KiB
     * ahead 0.85-0.91 and 0.94-0.99 (the AVX2 table: 0.69-0.75, 0.94-1.2); 16-24 KiB 0.82-0.84,
     * 0.90-0.95; none 0.59, 0.78. (Sixteen rows a call, one lane per dot at T = 1, were no
     * faster hot and 0.8 of four rows' speed cold: sixteen interleaved streams.) */
    const size_t group = 4 * row_bytes, ahead = group * ((8192 + group - 1) / group), step = (group + nb - 1) / nb;
    const int chunk = (int)(Y_BLOCKS / nb) < T ? (int)(Y_BLOCKS / nb) : T; /* columns per copy */
    /* The stream's first `ahead` bytes, which no block step prefetches, all at once: an expert
     * FFN calls this per 64- or 256-row slice, so a call's start is often cold. Top-8 expert FFN,
     * 256 MiB bank, Zen 5, 2 threads, A/B alternating, 4 runs: T = 8 2.14-2.42 ms against
     * 2.40-2.61; T = 1 unchanged (0.62-0.70 against 0.65-0.71). Twice that lead: no better. */
    const size_t lead = ahead < (size_t)n_rows * row_bytes ? ahead : (size_t)n_rows * row_bytes;
    for (size_t o = 0; o < lead; o += 64) __builtin_prefetch((const char *)w + o, 0, 3);
    for (int64_t r0 = 0; r0 < n_rows; r0 += ROW_RUN) {
        const int64_t r1 = r0 + ROW_RUN < n_rows ? r0 + ROW_RUN : n_rows;
        for (int t0 = 0; t0 < T; t0 += chunk) {
            const int nc = T - t0 < chunk ? T - t0 : chunk;
            if (r0 == 0 || chunk < T)
                for (int t = 0; t < nc; t++) y_fill(x + (t0 + t) * x_stride, nb, y + t * nb);
            /* the columns in groups of at most four, as even as possible (T = 5: 3 + 2) */
            for (int c = 0, groups = (nc + 3) / 4, g = 0; g < groups; g++) {
                const int n = (nc - c) / (groups - g);
                const y_block *yc = y + c * nb;
                float *oc = out + r0 * ors + (t0 + c) * os;
                switch (n) {
                case 1: q4k_run_cols(nb, w, row_bytes, r0, r1, yc, nb, 1, oc, ors, os, ahead, step); break;
                case 2: q4k_run_cols(nb, w, row_bytes, r0, r1, yc, nb, 2, oc, ors, os, ahead, step); break;
                case 3: q4k_run_cols(nb, w, row_bytes, r0, r1, yc, nb, 3, oc, ors, os, ahead, step); break;
                default: q4k_run_cols(nb, w, row_bytes, r0, r1, yc, nb, 4, oc, ors, os, ahead, step); break;
                }
                c += n;
            }
        }
    }
}

/* vpermw indices that lay a Q6_K block's 16 scales (as int16) beside packs_epi32(p[k], p[k+1]):
 * in 128-bit lane j, words 0-3 are p[k]'s lanes 4j..4j+3 (group 4k + j) and words 4-7 are
 * p[k+1]'s (group 4k + 4 + j). Row 0 for k = 0, row 1 for k = 2. */
static const int16_t q6k_pair_scale_idx[2][32] __attribute__((aligned(64))) = {
    {0, 0, 0, 0, 4, 4, 4, 4, 1, 1, 1, 1, 5, 5, 5, 5, 2, 2, 2, 2, 6, 6, 6, 6, 3, 3, 3, 3, 7, 7, 7, 7},
    {8, 8, 8, 8, 12, 12, 12, 12, 9, 9, 9, 9, 13, 13, 13, 13,
     10, 10, 10, 10, 14, 14, 14, 14, 11, 11, 11, 11, 15, 15, 15, 15}};

/* One Q6_K row against T columns. Per 64-value chunk k one vpdpbusd gives 16 lanes of 4 products
 * (|lane| <= 4 * 63 * 128 = 32256, inside int16), so two chunks' lanes are packed to 16-bit words
 * and one vpdpwssd multiplies both by their group scales: 2 packs + 2 vpdpwssd per block-column
 * instead of 4 vpmulld (2 uops each) and 3 adds. On a 2-vCPU AMX Xeon, hot 256 x 2816 rows,
 * ns per row-block-column at T = 1, 4, 8, 16, 32: the vpmulld kernel 9.0, 6.4, 6.0, 5.9, 5.8
 * against AVX2's bit-identical kernel's 9.2, 5.8, 5.2, 5.2, 5.1; this one 8.0, 5.3, 4.75, 4.8, 4.8. */
void lq_avx512_dot_q6k(int64_t nb, const void *w_row, const void *x_rows, int64_t x_stride, int T, float *out,
                    int64_t out_stride) {
    const block_q6_K *w = w_row;
    const block_q8_K *x = x_rows;
    const __m512i m4 = _mm512_set1_epi8(0x0f), m2 = _mm512_set1_epi8(0x03);
    /* per-16-bit-lane shifts of the qh bits: low 256 bits one field, high 256 bits the next */
    const __m512i shift_a = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    const __m512i shift_b = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1);
    const __m512i idx01 = _mm512_load_si512((const void *)q6k_pair_scale_idx[0]);
    const __m512i idx23 = _mm512_load_si512((const void *)q6k_pair_scale_idx[1]);
    float acc[LQ_MAX_T];
    for (int t = 0; t < T; t++) acc[t] = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const block_q6_K *wb = &w[b];
        LQ_PREFETCH(wb, 0), LQ_PREFETCH(wb, 64), LQ_PREFETCH(wb, 128), LQ_PREFETCH(wb, 192);
        __m512i q[4]; /* q[k]: unsigned 6-bit values (q + 32) 64k..64k+63 */
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
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wb->scales));
        const __m512i sc512 = _mm512_castsi256_si512(sc16);
        const __m512i scale01 = _mm512_permutexvar_epi16(idx01, sc512);
        const __m512i scale23 = _mm512_permutexvar_epi16(idx23, sc512);
        const float wd = _cvtsh_ss(wb->d);
        for (int t = 0; t < T; t++) {
            const block_q8_K *xb = &x[t * x_stride + b];
            __m512i p[4];
            for (int k = 0; k < 4; k++)
                p[k] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[k],
                                           _mm512_loadu_si512((const void *)(xb->qs + 64 * k)));
            __m512i s = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_packs_epi32(p[0], p[1]), scale01);
            s = _mm512_dpwssd_epi32(s, _mm512_packs_epi32(p[2], p[3]), scale23);
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
    .rows = {[LQ_Q4_K] = lq_avx512_rows_q4k},
};

#endif
