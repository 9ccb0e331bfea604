/* AMX int8 tiles (Sapphire Rapids and later) for the multi-token paths: the K-quant rows kernels of
 * a T-token expert group (moe.c phases A and B) or a prefill matmul (matmul.c), when T >= LQ_AMX_MIN_T.
 * Below that, and for every other entry, the table is the AVX-512 VNNI one: one token per
 * weight row cannot fill a tile's 16 columns, and a tile op costs ~16 cycles whatever it holds.
 *
 * One tile op, tdpbusd C += A B, multiplies a 16 x 32 tile of unsigned weight quants (16 weight
 * rows, one Q4_K sub-block of 32 values each) by an 8 x 64-byte tile of signed Q8_K quants (the
 * same 32 values of up to 16 tokens, 4 consecutive values per 32-bit cell: the "VNNI" layout)
 * into 16 x 16 exact int32 sums (Q6_K: groups of 16 values, its stored q + 32 as the unsigned
 * bytes, 16 x 16 by 4 x 64-byte tiles). One sub-block per op because each (row, sub-block) has its
 * own scale: C is stored, and the scale multiply, the min or -32 term (from the Q8_K bsums) and the
 * float fold are plain C over 16 tokens at a time, which the compiler vectorises for this file's
 * target. Every integer sum is exact and each block is folded with the scalar kernel's own float
 * operations in its order (q4k_fold, q6k_fold), so results equal kernels_scalar.c's bit for bit,
 * like the VNNI tables.
 *
 * Tile state is per thread: each rows call loads the tile configuration and releases the tiles
 * at its end (so the thread pool's workers need no set-up, and a thread that never reaches here
 * never carries the 8 KiB of tile state). The OS must grant the tile data state first
 * (Linux >= 5.16: arch_prctl(ARCH_REQ_XCOMP_PERM)); lq_amx_usable() in cpu_x86.c asks once,
 * and without it the table is not listed.
 *
 * Tests: built with -DLQ_TEST_EMULATE_AMX, the tile instructions are C functions with the ISA's
 * semantics (Intel SDM, TDPBUSD: C[m][n] += sum over k of zero-extended A bytes times
 * sign-extended B bytes, 4 per cell), compiled for AVX2, so the layouts, tails, scales and fold
 * are tested against scalar on any AVX2 machine (tests/test_isa_native.py). LQ_AMX_MIN_T = 4
 * follows ktransformers' published crossover (AMX pays above ~4 tokens per expert). On real tiles
 * (a 2-vCPU amx-int8 Xeon) the results equal scalar's, but this table was slower than the AVX-512
 * one at every T measured (Q4_K 1.6-4.2x the time from T = 4 to 64), so dispatch ranks it below
 * avx512; docs/KERNELS.md has the measurements and where the time goes. */
#if defined(__x86_64__) || defined(_M_X64)

#include <stdint.h>

#if defined(LQ_TEST_EMULATE_AMX)
#pragma GCC target("avx2,fma,f16c")
#else
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#endif
#include "kernels_x86.h"

#define LQ_AMX_MIN_T 4  /* tokens per rows call from which the tiles are used */
#define AMX_M 16        /* weight rows per tile */
#define AMX_N 16        /* tokens per tile (16 int32 cells of 64 bytes) */
#define AMX_CHUNK 8     /* Q8_K blocks repacked at a time: 8 x 4 KiB on the stack */

/* The tiles: two independent (C, A, B) sets so consecutive sub-blocks overlap in the unit.
 * Macros, not an enum: GCC's tile intrinsics paste the number into the instruction's text. */
#define TC0 0
#define TC1 1
#define TA0 2
#define TA1 3
#define TB0 4
#define TB1 5

typedef struct {
    uint8_t palette; /* 1: 8 tiles of up to 16 rows x 64 bytes */
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) amx_config;

/* sub: values per sub-block (one scale each): 32 for Q4_K, 16 for Q6_K. */
static void config_init(amx_config *c, int sub) {
    memset(c, 0, sizeof *c);
    c->palette = 1;
    c->rows[TC0] = c->rows[TC1] = AMX_M, c->colsb[TC0] = c->colsb[TC1] = AMX_N * 4;
    c->rows[TA0] = c->rows[TA1] = AMX_M, c->colsb[TA0] = c->colsb[TA1] = (uint16_t)sub;
    c->rows[TB0] = c->rows[TB1] = (uint8_t)(sub / 4), c->colsb[TB0] = c->colsb[TB1] = AMX_N * 4;
}

#if defined(LQ_TEST_EMULATE_AMX)
/* The tile register file and its configuration, as the ISA defines them (test builds only). */
static __thread uint8_t emu_tile[8][16][64];
static __thread amx_config emu_cfg;
static void tile_loadconfig(const amx_config *c) { emu_cfg = *c; }
static void tile_release(void) { memset(&emu_cfg, 0, sizeof emu_cfg); }
static void tile_zero(int t) { memset(emu_tile[t], 0, sizeof emu_tile[t]); }
static void tile_load(int t, const void *base, size_t stride) {
    tile_zero(t); /* rows and bytes past the configured shape read as zero */
    for (int r = 0; r < emu_cfg.rows[t]; r++) memcpy(emu_tile[t][r], (const uint8_t *)base + r * stride, emu_cfg.colsb[t]);
}
static void tile_store(int t, void *base, size_t stride) {
    for (int r = 0; r < emu_cfg.rows[t]; r++) memcpy((uint8_t *)base + r * stride, emu_tile[t][r], emu_cfg.colsb[t]);
}
static void tile_dpbusd(int c, int a, int b) {
    for (int m = 0; m < emu_cfg.rows[c]; m++)
        for (int k = 0; k < emu_cfg.colsb[a] / 4; k++)
            for (int n = 0; n < emu_cfg.colsb[c] / 4; n++) {
                int32_t s;
                memcpy(&s, &emu_tile[c][m][4 * n], 4);
                for (int i = 0; i < 4; i++)
                    s += (int32_t)emu_tile[a][m][4 * k + i] * (int32_t)(int8_t)emu_tile[b][k][4 * n + i];
                memcpy(&emu_tile[c][m][4 * n], &s, 4);
            }
}
#define TILE_LOADCONFIG(c) tile_loadconfig(c)
#define TILE_RELEASE() tile_release()
#define TILE_ZERO(t) tile_zero(t)
#define TILE_LOAD(t, p, s) tile_load(t, p, s)
#define TILE_STORE(t, p, s) tile_store(t, p, s)
#define TILE_DPBUSD(c, a, b) tile_dpbusd(c, a, b)
#else
/* GCC's tileloadd and ldtilecfg asm statements take the address as a plain register (ldtilecfg:
 * its first 8 bytes), so the compiler does not know they read the buffers: a memory barrier
 * first keeps every store to them before the load. */
#define LQ_COMPILER_BARRIER() __asm__ volatile("" ::: "memory")
#define TILE_LOADCONFIG(c) do { LQ_COMPILER_BARRIER(); _tile_loadconfig(c); } while (0)
#define TILE_RELEASE() _tile_release()
#define TILE_ZERO(t) _tile_zero(t)
#define TILE_LOAD(t, p, s) do { LQ_COMPILER_BARRIER(); _tile_loadd(t, p, s); } while (0)
#define TILE_STORE(t, p, s) _tile_stored(t, p, s)
#define TILE_DPBUSD(c, a, b) _tile_dpbusd(c, a, b)
#endif

/* Up to AMX_N tokens' Q8_K blocks [b0, b0 + nbc) repacked for B tiles: cell [b][g][n] holds
 * quants 4g..4g+3 of token n's block b0 + b (g = 0..63), so the sub-block of values
 * [v, v + sub) is the (sub / 4) x 64-byte tile at [b][v / 4]. Tokens past nt are zero, so their
 * columns compute zeros that nobody reads. */
typedef struct {
    uint32_t cell[AMX_CHUNK][QK_K / 4][AMX_N];
    float d[AMX_CHUNK][AMX_N];            /* each token's block scale */
    int32_t bsum[AMX_CHUNK][16][AMX_N];   /* its 16 group sums */
} packed_x;

static void pack_x(const block_q8_K *x, int64_t x_stride, int nt, int64_t b0, int64_t nbc, packed_x *px) {
    memset(px, 0, sizeof *px);
    for (int n = 0; n < nt; n++)
        for (int64_t b = 0; b < nbc; b++) {
            const block_q8_K *xb = &x[n * x_stride + b0 + b];
            uint32_t g4[QK_K / 4];
            memcpy(g4, xb->qs, sizeof g4);
            for (int g = 0; g < QK_K / 4; g++) px->cell[b][g][n] = g4[g];
            px->d[b][n] = xb->d;
            for (int g = 0; g < 16; g++) px->bsum[b][g][n] = xb->bsums[g];
        }
}

/* One block of up to AMX_M weight rows: each row's 256 quants as unsigned bytes in value order
 * (Q4_K: the nibbles; Q6_K: q + 32, as stored), the scales of its sub-blocks (and Q4_K's
 * mins), and its f16 scales. Rows past nr stay zero. */
typedef struct {
    uint8_t q[AMX_M][QK_K];
    int32_t sc[AMX_M][16], mn[AMX_M][8];
    float d[AMX_M], dmin[AMX_M];
} unpacked_w;

static void unpack_w(int fmt, const uint8_t *w, size_t row_bytes, int nr, int64_t b, unpacked_w *uw) {
    for (int r = 0; r < nr; r++) {
        if (fmt == LQ_Q4_K) {
            const block_q4_K *wb = (const block_q4_K *)(w + r * row_bytes) + b;
            LQ_PREFETCH(wb, 0), LQ_PREFETCH(wb, 64), LQ_PREFETCH(wb, 128);
            /* qs bytes 32j..32j+31: low nibbles are sub-block 2j, high nibbles sub-block 2j+1 */
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 32; l++) {
                    uint8_t v = wb->qs[32 * j + l];
                    uw->q[r][64 * j + l] = v & 0x0f;
                    uw->q[r][64 * j + 32 + l] = v >> 4;
                }
            uint32_t sc4[2], mn4[2];
            q4k_unpack_scales(wb->scales, sc4, mn4);
            const uint8_t *sc = (const uint8_t *)sc4, *mn = (const uint8_t *)mn4;
            for (int s = 0; s < 8; s++) uw->sc[r][s] = sc[s], uw->mn[r][s] = mn[s];
            uw->d[r] = lq_fp16_to_fp32(wb->d), uw->dmin[r] = lq_fp16_to_fp32(wb->dmin);
        } else {
            const block_q6_K *wb = (const block_q6_K *)(w + r * row_bytes) + b;
            LQ_PREFETCH(wb, 0), LQ_PREFETCH(wb, 64), LQ_PREFETCH(wb, 128), LQ_PREFETCH(wb, 192);
            __m256i q[8];
            q6k_unpack_256(wb, q);
            for (int m = 0; m < 8; m++) _mm256_storeu_si256((__m256i *)&uw->q[r][32 * m], q[m]);
            for (int g = 0; g < 16; g++) uw->sc[r][g] = wb->scales[g];
            uw->d[r] = lq_fp16_to_fp32(wb->d);
        }
    }
}

/* acc[r][n] += block b of rows x tokens, folded as the scalar kernel folds it */
static void block_tiles(int fmt, const unpacked_w *uw, const packed_x *px, int64_t b, float acc[AMX_M][AMX_N]) {
    const int sub = fmt == LQ_Q4_K ? 32 : 16, n_sub = QK_K / sub;
    int32_t c[16][AMX_M][AMX_N]; /* sub-block s's exact dot of every row with every token */
    for (int s = 0; s < n_sub; s += 2) {
        TILE_LOAD(TA0, &uw->q[0][sub * s], QK_K);
        TILE_LOAD(TA1, &uw->q[0][sub * (s + 1)], QK_K);
        TILE_LOAD(TB0, &px->cell[b][sub / 4 * s][0], AMX_N * 4);
        TILE_LOAD(TB1, &px->cell[b][sub / 4 * (s + 1)][0], AMX_N * 4);
        TILE_ZERO(TC0);
        TILE_ZERO(TC1);
        TILE_DPBUSD(TC0, TA0, TB0);
        TILE_DPBUSD(TC1, TA1, TB1);
        TILE_STORE(TC0, &c[s][0][0], AMX_N * 4);
        TILE_STORE(TC1, &c[s + 1][0][0], AMX_N * 4);
    }
    for (int r = 0; r < AMX_M; r++) {
        int32_t isum[AMX_N] = {0}, imin[AMX_N] = {0};
        if (fmt == LQ_Q4_K) {
            /* |dot| <= 32 * 15 * 128 per sub-block; isum <= 8 * 63 * 61440, imin alike: int32 */
            for (int s = 0; s < 8; s++)
                for (int n = 0; n < AMX_N; n++) {
                    isum[n] += uw->sc[r][s] * c[s][r][n];
                    imin[n] += uw->mn[r][s] * (px->bsum[b][2 * s][n] + px->bsum[b][2 * s + 1][n]);
                }
            for (int n = 0; n < AMX_N; n++)
                acc[r][n] = q4k_fold(acc[r][n], px->d[b][n], uw->d[r], uw->dmin[r], isum[n], imin[n]);
        } else {
            /* the stored values are q + 32: each group gives back 32 * its bsum; |group dot| <=
             * 16 * 63 * 128, times |scale| <= 128, 16 groups: int32 */
            for (int g = 0; g < 16; g++)
                for (int n = 0; n < AMX_N; n++) isum[n] += uw->sc[r][g] * (c[g][r][n] - 32 * px->bsum[b][g][n]);
            for (int n = 0; n < AMX_N; n++) acc[r][n] = q6k_fold(acc[r][n], px->d[b][n], uw->d[r], isum[n]);
        }
    }
}

#if defined(LQ_TEST_EMULATE_AMX)
/* The kernels below LQ_AMX_MIN_T: the scalar ones, which the AVX-512 ones equal bit for bit (what
 * the real build uses cannot run on the machines this build is for). */
static void dot_q4k(int64_t n, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os) {
    lq_kernels_scalar.dot[LQ_Q4_K](n, w, x, xs, T, out, os);
}
static void dot_q6k(int64_t n, const void *w, const void *x, int64_t xs, int T, float *out, int64_t os) {
    lq_kernels_scalar.dot[LQ_Q6_K](n, w, x, xs, T, out, os);
}
static void rows_q4k_small(int64_t nb, const void *w, size_t row_bytes, int64_t n_rows, const void *x, int64_t xs,
                           int T, float *out, int64_t ors, int64_t os) {
    for (int64_t r = 0; r < n_rows; r++) dot_q4k(nb, (const uint8_t *)w + r * row_bytes, x, xs, T, out + r * ors, os);
}
#else
#define dot_q4k lq_avx512_dot_q4k
#define dot_q6k lq_avx512_dot_q6k
#define rows_q4k_small lq_avx512_rows_q4k /* decode: four rows at a time (kernels_avx512.c) */
#endif

static inline __attribute__((always_inline)) void rows_kquant(int fmt, int64_t nb, const void *w, size_t row_bytes,
                                                              int64_t n_rows, const void *x_rows, int64_t x_stride,
                                                              int T, float *out, int64_t ors, int64_t os) {
    const uint8_t *wr = w;
    if (T < LQ_AMX_MIN_T) {
        if (fmt == LQ_Q4_K)
            rows_q4k_small(nb, w, row_bytes, n_rows, x_rows, x_stride, T, out, ors, os);
        else
            for (int64_t r = 0; r < n_rows; r++)
                dot_q6k(nb, wr + r * row_bytes, x_rows, x_stride, T, out + r * ors, os);
        return;
    }
    const block_q8_K *x = x_rows;
    amx_config cfg;
    config_init(&cfg, fmt == LQ_Q4_K ? 32 : 16);
    TILE_LOADCONFIG(&cfg);
    packed_x px;
    unpacked_w uw;
    memset(&uw, 0, sizeof uw);
    for (int t0 = 0; t0 < T; t0 += AMX_N) {
        int nt = T - t0 < AMX_N ? T - t0 : AMX_N;
        for (int64_t b0 = 0; b0 < nb; b0 += AMX_CHUNK) {
            int64_t nbc = nb - b0 < AMX_CHUNK ? nb - b0 : AMX_CHUNK;
            pack_x(x + t0 * x_stride, x_stride, nt, b0, nbc, &px);
            for (int64_t r0 = 0; r0 < n_rows; r0 += AMX_M) {
                int nr = n_rows - r0 < AMX_M ? (int)(n_rows - r0) : AMX_M;
                float acc[AMX_M][AMX_N] = {{0}}; /* the running sums live in out between chunks */
                if (b0 > 0)
                    for (int r = 0; r < nr; r++)
                        for (int n = 0; n < nt; n++) acc[r][n] = out[(r0 + r) * ors + (t0 + n) * os];
                if (nr < AMX_M) memset(&uw, 0, sizeof uw); /* rows past nr read as zero */
                for (int64_t b = 0; b < nbc; b++) {
                    unpack_w(fmt, wr + r0 * row_bytes, row_bytes, nr, b0 + b, &uw);
                    block_tiles(fmt, &uw, &px, b, acc);
                }
                for (int r = 0; r < nr; r++)
                    for (int n = 0; n < nt; n++) out[(r0 + r) * ors + (t0 + n) * os] = acc[r][n];
            }
        }
    }
    TILE_RELEASE();
}

LQ_KQUANT_ROWS_ENTRIES(rows_kquant)

const lq_kernels lq_kernels_amx = {
    .name = "amx",
    .dot = {[LQ_F32] = lq_avx2_dot_f32, [LQ_F16] = lq_avx2_dot_f16, [LQ_BF16] = lq_avx2_dot_bf16,
            [LQ_Q4_K] = dot_q4k, [LQ_Q6_K] = dot_q6k},
    .quantize_q8k = lq_avx2_quantize_q8k,
    .gelu_mul = lq_avx2_gelu_mul,
    .rows = {[LQ_Q4_K] = rows_q4k, [LQ_Q6_K] = rows_q6k},
};

#endif
