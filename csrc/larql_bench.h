/* Benchmark-only C entry points (larql bench kernels, bench/bench_kernels.py).
 *
 * Not part of the public API in larql.h: build_ext.py hands this header to cffi in its own
 * cdef section so the benchmarks can reach it through larql.kernels, and nothing else uses it.
 */
#ifndef LARQL_BENCH_H
#define LARQL_BENCH_H

#include <stddef.h>
#include <stdint.h>

/* y[r] = fn(row r of w . xq) for every row, where fn has ggml's vec_dot signature (int n,
 * float *s, size_t bs, const void *vx, size_t bx, const void *vy, size_t by, int nrc). Spread
 * over the thread pool when `parallel` is non-zero, else run on the calling thread. Lets a
 * foreign kernel be timed on the same bytes without per-row Python cost. */
int lq_bench_vec_dot(const void *fn, int64_t n, const void *w, size_t row_bytes, int64_t rows,
                     const void *xq, float *y, int parallel);

/* Read nbytes of buf with the widest loads this CPU has (a plain streaming loop: the honest
 * read-bandwidth limit the kernels are measured against). Spread over the thread pool in 1 MiB
 * chunks when `parallel` is non-zero, else on the calling thread. *sink receives a value that
 * depends on every byte read, so no compiler can drop the loads. nbytes: a multiple of 256. */
int lq_bench_read(const void *buf, int64_t nbytes, int parallel, uint64_t *sink);

#endif
