/* larql public C API: the only declarations build_ext.py hands to cffi.
 *
 * Formats use the LYRW quant_format codes from the vindex spec so a file's
 * header value can be passed straight through. Every function returns 0 on
 * success or a negative LQ_E* code; nothing here prints or aborts, because
 * a server must survive bad input.
 *
 * Matrices are row-major, one weight row quantised on its own. `cols` is the
 * stored (padded) row length: a multiple of 256 for K-quants. Activations may
 * be shorter than `cols` (`x_cols`); the missing tail is treated as zero.
 */
#ifndef LARQL_H
#define LARQL_H

#include <stddef.h>
#include <stdint.h>

enum {
    LQ_F32 = 0,
    LQ_F16 = 1,
    LQ_BF16 = 2,
    LQ_Q4_K = 4,
    LQ_Q6_K = 5,
    LQ_Q8_K = 100 /* activations only: in memory or on the wire */
};

enum {
    LQ_OK = 0,
    LQ_E_FORMAT = -1,   /* unsupported format for this operation */
    LQ_E_SHAPE = -2,    /* cols not a multiple of the block size, x_cols > cols, T < 1 ... */
    LQ_E_EXPERT = -3,   /* expert id out of range or not present in the table */
    LQ_E_NOMEM = -4,
    LQ_E_ISA = -5       /* requested ISA not available on this CPU */
};

/* Bytes of one stored row of `cols` values, 0 if the format or length is invalid. */
size_t lq_row_bytes(int fmt, int64_t cols);

/* f32 rows -> fmt rows (Q4_K/Q6_K with a scale/min search; F16; F32 copy; Q8_K). Multi-threaded. */
int lq_quantize(int fmt, const float *src, void *dst, int64_t rows, int64_t cols);

/* fmt rows -> f32 rows (F32, F16, BF16, Q4_K, Q6_K, Q8_K). Multi-threaded. */
int lq_dequantize(int fmt, const void *src, float *dst, int64_t rows, int64_t cols);

/* Y[t, r] = sum_c W[r, c] * X[t, c] for t < T.
 * W: rows x cols in fmt. X: T rows of x_cols f32 (x_cols <= cols, zero tail), row stride x_cols.
 * Y: T rows of `rows` f32. For K-quant weights X is quantised to Q8_K once per call and the
 * dot products are integer; for F32/F16/BF16 weights the arithmetic is f32 (the exact path).
 * Every weight block is read once for all T columns. Multi-threaded over rows. */
int lq_matmul(int fmt, const void *w, int64_t rows, int64_t cols,
              const float *x, int64_t x_cols, int64_t T, float *y);

/* As lq_matmul with activations already in Q8_K: T rows of cols/256 blocks (K-quant W only). */
int lq_matmul_q8k(int fmt, const void *w, int64_t rows, int64_t cols,
                  const void *xq, int64_t T, float *y);

/* One expert's bytes: gate_up is [2*inter, hidden] (gate rows first), down is [hidden, inter],
 * each row padded to a whole number of blocks for K-quant formats. NULL gate_up = not present. */
typedef struct {
    const void *gate_up;
    const void *down;
    int32_t gate_up_fmt;
    int32_t down_fmt;
} lq_expert;

/* out[t] = sum_k weights[t,k] * down_e(gelu_tanh(gate_e(x[t])) * up_e(x[t])), e = ids[t,k].
 * x: T x hidden f32 (already normed), ids/weights: T x K. Work is grouped by expert so each
 * expert's bytes are read once per call; a negative id means "skip this slot".
 * Returns LQ_E_EXPERT (and leaves out zeroed) if any id is >= n_experts or absent. */
int lq_moe_ffn(const lq_expert *experts, int32_t n_experts, int64_t hidden, int64_t inter,
               const float *x, int64_t T, int32_t K, const int32_t *ids, const float *weights,
               float *out);

/* Thread pool: size from LARQL_NUM_THREADS, default all online cores. */
int lq_set_num_threads(int n);
int lq_get_num_threads(void);

/* Kernel dispatch: "scalar", "avx2", "avx512", "neon"... lq_force_isa(NULL) restores the best. */
const char *lq_isa(void);
int lq_force_isa(const char *name);
/* Space-separated list of ISAs usable on this CPU, best last. */
const char *lq_available_isas(void);

/* Benchmark helper (larql bench kernels): y[r] = fn(row r of w . xq) for every row, where fn has
 * ggml's vec_dot signature (int n, float *s, size_t bs, const void *vx, size_t bx, const void *vy,
 * size_t by, int nrc). Spread over the thread pool when `parallel` is non-zero, else run on the
 * calling thread. Lets a foreign kernel be timed on the same bytes without per-row Python cost. */
int lq_bench_vec_dot(const void *fn, int64_t n, const void *w, size_t row_bytes, int64_t rows,
                     const void *xq, float *y, int parallel);

#endif
