/* Benchmark helper: time a foreign ggml-style vec_dot over matrix rows from C (see larql.h). */
#include "kernels.h"

typedef void (*ggml_vec_dot_fn)(int n, float *s, size_t bs, const void *vx, size_t bx, const void *vy,
                                size_t by, int nrc);

typedef struct {
    ggml_vec_dot_fn fn;
    int n;
    const uint8_t *w;
    size_t row_bytes;
    const void *xq;
    float *y;
} bench_job;

static void bench_range(void *p, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    bench_job *j = p;
    for (int64_t r = r0; r < r1; r++) j->fn(j->n, &j->y[r], 0, j->w + (size_t)r * j->row_bytes, 0, j->xq, 0, 1);
}

int lq_bench_vec_dot(const void *fn, int64_t n, const void *w, size_t row_bytes, int64_t rows, const void *xq,
                     float *y, int parallel) {
    if (!fn || n < 1 || rows < 0) return LQ_E_SHAPE;
    bench_job j = {(ggml_vec_dot_fn)fn, (int)n, w, row_bytes, xq, y};
    if (parallel)
        lq_parallel_for(rows, 16, bench_range, &j);
    else
        bench_range(&j, 0, rows, 0);
    return LQ_OK;
}
