/* Internal: block layouts (ggml-compatible, byte for byte) and the per-ISA kernel table.
 * One file per ISA (kernels_scalar.c, kernels_avx2.c, kernels_neon.c, ...) fills an
 * lq_kernels table; dispatch.c picks one at runtime. Drivers (matmul.c, moe.c) only
 * call through the table, so every ISA is tested against the scalar reference. */
#ifndef LARQL_KERNELS_H
#define LARQL_KERNELS_H

#include "larql.h"

#define QK_K 256

typedef struct {
    uint16_t d;          /* f16 super-block scale for the 6-bit scales */
    uint16_t dmin;       /* f16 super-block scale for the 6-bit mins */
    uint8_t scales[12];  /* 8 scales + 8 mins, 6 bits each, ggml packing */
    uint8_t qs[128];     /* per 64 values: 32 bytes, low nibble = value i, high nibble = value i+32 */
} block_q4_K;            /* 144 bytes */

typedef struct {
    uint8_t ql[128];     /* low 4 bits */
    uint8_t qh[64];      /* high 2 bits */
    int8_t scales[16];   /* one per 16 values */
    uint16_t d;          /* f16 */
} block_q6_K;            /* 210 bytes */

typedef struct {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16]; /* sum of each group of 16 quants: folds the Q4_K min term */
} block_q8_K;            /* 292 bytes */

/* A row-times-activations kernel: one weight row (nb blocks, or n values for float formats)
 * against T activation rows. Activation row t starts at x + t * x_stride (in blocks for Q8_K,
 * in floats for f32). out[t * out_stride] receives the dot product. T >= 1 and small (<= 64). */
typedef void (*lq_dot_q_fn)(int64_t nb, const void *w_row, const block_q8_K *x, int64_t x_stride,
                            int T, float *out, int64_t out_stride);
typedef void (*lq_dot_f_fn)(int64_t n, const void *w_row, const float *x, int64_t x_stride,
                            int T, float *out, int64_t out_stride);

typedef struct {
    const char *name;
    lq_dot_q_fn dot_q4k;   /* Q4_K row x Q8_K activations */
    lq_dot_q_fn dot_q6k;   /* Q6_K row x Q8_K activations */
    lq_dot_f_fn dot_f32;   /* f32 row x f32 activations */
    lq_dot_f_fn dot_f16;   /* f16 row x f32 activations */
    void (*quantize_q8k)(const float *x, block_q8_K *y, int64_t n); /* n multiple of 256 */
} lq_kernels;

extern const lq_kernels lq_kernels_scalar;
#if defined(__x86_64__) || defined(_M_X64)
extern const lq_kernels lq_kernels_avx2;
#endif
#if defined(__aarch64__)
extern const lq_kernels lq_kernels_neon;
#endif

/* Software prefetch of weight bytes LQ_PREFETCH_AHEAD past the block a row kernel is reading
 * (the scalar reference does not prefetch). Past the end of a row it fetches the next row, which
 * is the one the same thread reads next; past the end of the matrix it is harmless (a prefetch
 * never faults). Measured on a cold bank 4x the LLC (AMD EPYC Zen 3, AVX2, shared 2 vCPU; ratio
 * to a C read of the same cold bytes timed call by call, two runs each):
 *   Q4_K gate_up matvec, 1 thread  0.70-0.72 -> 0.90-0.92;  down 0.69-0.73 -> 0.76-0.77
 *   top-8 expert FFN T=1, 2 threads 0.59-0.65 -> 0.69-0.80
 *   f16 2112x2816 matvec           0.63-0.70 -> 0.67-0.72 (within the noise; kept)
 *   f32 rows: 0.80-0.91 -> 0.72-0.82, worse: the hardware prefetcher keeps up, so not used there.
 * 2, 4 and 8 KiB ahead measured alike (within the noise); T0 and NTA hints alike. */
#define LQ_PREFETCH_AHEAD 4096
#define LQ_PREFETCH(p, off) __builtin_prefetch((const char *)(p) + LQ_PREFETCH_AHEAD + (off), 0, 3)

/* The table in use (dispatch.c). */
const lq_kernels *lq_active_kernels(void);

/* f16 <-> f32 without relying on hardware support (exact for every f16 value). */
float lq_fp16_to_fp32(uint16_t h);
uint16_t lq_fp32_to_fp16(float f);

/* ---- Internals shared by the C files (added to the contract; nothing above changes) ---- */

static inline int lq_is_kquant(int fmt) { return fmt == LQ_Q4_K || fmt == LQ_Q6_K; }

/* Persistent thread pool (threadpool.c). fn(ctx, begin, end, thread_id) is called on disjoint
 * ranges covering [0, n), each at most `grain` long; the calling thread works too. Jobs from
 * concurrent callers are serialised. 0 <= thread_id < lq_get_num_threads(). */
typedef void (*lq_range_fn)(void *ctx, int64_t begin, int64_t end, int thread_id);
#define LQ_MAX_THREADS 256 /* thread_id < LQ_MAX_THREADS always */
void lq_parallel_for(int64_t n, int64_t grain, lq_range_fn fn, void *ctx);

/* Scalar block quantisers / dequantisers (quant.c); n is a multiple of QK_K. */
void lq_quantize_row_q4k(const float *x, block_q4_K *y, int64_t n);
void lq_quantize_row_q6k(const float *x, block_q6_K *y, int64_t n);
void lq_dequantize_row_q4k(const block_q4_K *x, float *y, int64_t n);
void lq_dequantize_row_q6k(const block_q6_K *x, float *y, int64_t n);

#endif
