/* Y = X W^T for a weight matrix in any stored format, multi-threaded over row ranges.
 *
 * K-quant weights: X is quantised to Q8_K once per call, then each thread takes row ranges and
 * runs the ISA's row kernel against up to LQ_TCHUNK activation rows at a time, so a weight row
 * is streamed from memory once and reused from L1 for every column of the chunk.
 * Float weights (F32, F16, BF16): the same with f32 arithmetic, only over the x_cols given.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define LQ_TCHUNK 64

typedef struct {
    const lq_kernels *k;
    int fmt;
    const uint8_t *w;
    size_t row_bytes;
    int64_t rows, nb;      /* nb: blocks per row (K-quants) or values per row used (floats) */
    const void *x;         /* block_q8_K[T][nb] or float[T][x_stride] */
    int64_t x_stride;
    int64_t T;
    float *y;              /* [T][rows] */
} mm_job;

static void bf16_row_to_f32(const uint16_t *w, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)w[i] << 16;
        memcpy(&out[i], &u, 4);
    }
}

static void mm_range(void *p, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    mm_job *j = p;
    float *tmp = NULL;
    if (j->fmt == LQ_BF16) {
        tmp = malloc((size_t)j->nb * sizeof(float));
        if (!tmp) return; /* checked up front by the caller; cannot happen for sane sizes */
    }
    for (int64_t t0 = 0; t0 < j->T; t0 += LQ_TCHUNK) {
        int T = (int)(j->T - t0 < LQ_TCHUNK ? j->T - t0 : LQ_TCHUNK);
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *wr = j->w + (size_t)r * j->row_bytes;
            float *out = j->y + t0 * j->rows + r;
            switch (j->fmt) {
            case LQ_Q4_K:
                j->k->dot_q4k(j->nb, wr, (const block_q8_K *)j->x + t0 * j->nb, j->nb, T, out, j->rows);
                break;
            case LQ_Q6_K:
                j->k->dot_q6k(j->nb, wr, (const block_q8_K *)j->x + t0 * j->nb, j->nb, T, out, j->rows);
                break;
            case LQ_F32:
                j->k->dot_f32(j->nb, wr, (const float *)j->x + t0 * j->x_stride, j->x_stride, T, out, j->rows);
                break;
            case LQ_F16:
                j->k->dot_f16(j->nb, wr, (const float *)j->x + t0 * j->x_stride, j->x_stride, T, out, j->rows);
                break;
            case LQ_BF16:
                bf16_row_to_f32((const uint16_t *)wr, tmp, j->nb);
                j->k->dot_f32(j->nb, tmp, (const float *)j->x + t0 * j->x_stride, j->x_stride, T, out, j->rows);
                break;
            }
        }
    }
    free(tmp);
}

/* rows per work item: enough bytes (16 KiB) that the atomic hand-out is noise, small enough that
 * the items balance and a worker the OS preempts mid-item holds the caller up only briefly */
static int64_t row_grain(size_t row_bytes, int64_t rows) {
    int64_t g = (int64_t)(16384 / (row_bytes ? row_bytes : 1));
    if (g < 1) g = 1;
    int n = lq_get_num_threads();
    int64_t even = (rows + 4 * n - 1) / (4 * n); /* at least ~4 items per thread */
    if (g > even) g = even;
    return g < 1 ? 1 : g;
}

static int matmul_q8(const lq_kernels *k, int fmt, const void *w, int64_t rows, int64_t cols,
                     const block_q8_K *xq, int64_t T, float *y) {
    mm_job j = {k, fmt, w, lq_row_bytes(fmt, cols), rows, cols / QK_K, xq, cols / QK_K, T, y};
    lq_parallel_for(rows, row_grain(j.row_bytes, rows), mm_range, &j);
    return LQ_OK;
}

int lq_matmul(int fmt, const void *w, int64_t rows, int64_t cols, const float *x, int64_t x_cols,
              int64_t T, float *y) {
    if (fmt != LQ_F32 && fmt != LQ_F16 && fmt != LQ_BF16 && fmt != LQ_Q4_K && fmt != LQ_Q6_K)
        return LQ_E_FORMAT;
    if (rows < 0 || T < 1 || x_cols < 1 || x_cols > cols || lq_row_bytes(fmt, cols) == 0) return LQ_E_SHAPE;
    if (rows == 0) return LQ_OK;
    const lq_kernels *k = lq_active_kernels();
    if (!lq_is_kquant(fmt)) {
        mm_job j = {k, fmt, w, lq_row_bytes(fmt, cols), rows, x_cols, x, x_cols, T, y};
        if (fmt == LQ_BF16) { /* make sure the per-thread row buffer can exist */
            void *probe = malloc((size_t)x_cols * sizeof(float));
            if (!probe) return LQ_E_NOMEM;
            free(probe);
        }
        lq_parallel_for(rows, row_grain(j.row_bytes, rows), mm_range, &j);
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
    int rc = matmul_q8(k, fmt, w, rows, cols, xq, T, y);
    free(xq);
    free(pad);
    return rc;
}

int lq_matmul_q8k(int fmt, const void *w, int64_t rows, int64_t cols, const void *xq, int64_t T, float *y) {
    if (!lq_is_kquant(fmt)) return LQ_E_FORMAT;
    if (rows < 0 || T < 1 || lq_row_bytes(fmt, cols) == 0) return LQ_E_SHAPE;
    if (rows == 0) return LQ_OK;
    return matmul_q8(lq_active_kernels(), fmt, w, rows, cols, xq, T, y);
}
