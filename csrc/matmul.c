/* Y = X W^T for a weight matrix in any stored format, multi-threaded over row ranges.
 *
 * K-quant weights: X is quantised to Q8_K once per call, then each thread takes row ranges and
 * runs the ISA's row kernel against up to LQ_MAX_T activation rows at a time, so a weight row
 * is streamed from memory once and reused from L1 for every column of the chunk.
 * Float weights (F32, F16, BF16): the same with f32 arithmetic, only over the x_cols given.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

typedef struct {
    const lq_kernels *k;
    int fmt;               /* through the table's rows kernel (lq_dot_rows) */
    const uint8_t *w;
    size_t row_bytes;
    int64_t rows, n;       /* n: blocks per row (K-quants) or values per row used (floats) */
    const uint8_t *x;      /* block_q8_K[T][n] or float[T][x_stride] */
    int64_t x_stride;      /* in blocks or floats, as the row kernel takes it */
    size_t x_row_bytes;
    int64_t T;
    float *y;              /* [T][rows] */
} mm_job;

static void mm_range(void *p, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    mm_job *j = p;
    for (int64_t t0 = 0; t0 < j->T; t0 += LQ_MAX_T) {
        int T = (int)(j->T - t0 < LQ_MAX_T ? j->T - t0 : LQ_MAX_T);
        const uint8_t *x = j->x + t0 * j->x_row_bytes;
        /* one call per range: the T and column-group split is made once, not once per row */
        lq_dot_rows(j->k, j->fmt, j->n, j->w + (size_t)r0 * j->row_bytes, j->row_bytes, r1 - r0, x, j->x_stride, T,
                    j->y + t0 * j->rows + r0, 1, j->rows);
    }
}

/* The smallest work item: enough bytes (16 KiB) that the atomic hand-out is noise, in whole
 * 16-row runs so two threads never write the same 64-byte line of y (T = 1). Items are handed
 * out guided (lq_parallel_for_guided): each thread first takes a long contiguous run of rows,
 * which its hardware prefetcher streams best, and the small last items balance the threads.
 * Measured against fixed 16 KiB items (which alternated between the threads), interleaved in one
 * process (each build on its own experts, so neither finds the other's bytes in cache, and
 * LARQL_SPIN_US=0 so one build's spinning workers do not steal the other's cores), cold bank,
 * 2 threads: gate_up and down matvec 1.17-1.18x (IQR 1.08-1.26); one thread unchanged. In
 * `larql bench kernels` (one pool, spinning as in use) the 2-thread matvecs went from 0.47-0.55
 * (gate_up) / 0.40-0.50 (down) of the C read bandwidth to 0.81-1.00 / 0.72-0.93 with this and
 * the kernel changes together. */
static int64_t row_grain(size_t row_bytes, int64_t rows) {
    int64_t g = (int64_t)(16384 / (row_bytes ? row_bytes : 1));
    g = (g + 15) / 16 * 16;
    int n = lq_get_num_threads();
    int64_t even = (rows + 4 * n - 1) / (4 * n); /* small matrices: still ~4 items per thread */
    if (g > even) g = even;
    return g < 1 ? 1 : g;
}

/* n values (floats) or blocks (K-quants) per row; x rows of x_stride floats or blocks */
static void run_matmul(const lq_kernels *k, int fmt, const void *w, int64_t rows, int64_t cols, int64_t n,
                       const void *x, int64_t x_stride, int64_t T, float *y) {
    size_t x_row_bytes = (size_t)x_stride * (lq_is_kquant(fmt) ? sizeof(block_q8_K) : sizeof(float));
    mm_job j = {k, fmt, w, lq_row_bytes(fmt, cols), rows, n, x, x_stride, x_row_bytes, T, y};
    lq_parallel_for_guided(rows, row_grain(j.row_bytes, rows), mm_range, &j);
}

int lq_matmul(int fmt, const void *w, int64_t rows, int64_t cols, const float *x, int64_t x_cols,
              int64_t T, float *y) {
    if (!lq_is_weight_fmt(fmt)) return LQ_E_FORMAT;
    if (rows < 0 || T < 1 || x_cols < 1 || x_cols > cols || lq_row_bytes(fmt, cols) == 0) return LQ_E_SHAPE;
    if (rows == 0) return LQ_OK;
    const lq_kernels *k = lq_active_kernels();
    if (!lq_is_kquant(fmt)) {
        run_matmul(k, fmt, w, rows, cols, x_cols, x, x_cols, T, y);
        return LQ_OK;
    }
    /* quantise X once: each activation row padded with zeros to cols */
    int64_t nb = cols / QK_K;
    block_q8_K *xq = malloc((size_t)(T * nb) * sizeof(block_q8_K));
    float *pad = x_cols < cols ? calloc((size_t)cols, sizeof(float)) : NULL;
    if (!xq || (x_cols < cols && !pad)) {
        free(xq);
        free(pad);
        return LQ_E_NOMEM;
    }
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * x_cols;
        if (pad) {
            memcpy(pad, xt, (size_t)x_cols * sizeof(float));
            xt = pad;
        }
        k->quantize_q8k(xt, xq + t * nb, cols);
    }
    run_matmul(k, fmt, w, rows, cols, nb, xq, nb, T, y);
    free(xq);
    free(pad);
    return LQ_OK;
}

int lq_matmul_q8k(int fmt, const void *w, int64_t rows, int64_t cols, const void *xq, int64_t T, float *y) {
    if (!lq_is_kquant(fmt)) return LQ_E_FORMAT;
    if (rows < 0 || T < 1 || lq_row_bytes(fmt, cols) == 0) return LQ_E_SHAPE;
    if (rows == 0) return LQ_OK;
    run_matmul(lq_active_kernels(), fmt, w, rows, cols, cols / QK_K, xq, cols / QK_K, T, y);
    return LQ_OK;
}
