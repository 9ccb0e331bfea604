/* Benchmark-only helpers (larql_bench.h): time a foreign ggml-style vec_dot over matrix rows
 * from C, and the plain read loop whose bandwidth every kernel figure is divided by. */
#include <string.h>

#include "kernels.h"
#include "larql_bench.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

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

/* ---- read bandwidth ---- */

#define READ_CHUNK (1 << 20) /* bytes per work item: long runs keep the hardware prefetchers busy */

/* Portable loop: eight independent 64-bit accumulators per 64 bytes; -O3 turns it into 128-bit
 * loads on SSE2 and NEON. */
static uint64_t read_generic(const uint8_t *p, int64_t n) {
    uint64_t a[8] = {0};
    for (int64_t i = 0; i + 64 <= n; i += 64) {
        uint64_t v[8];
        memcpy(v, p + i, 64);
        for (int k = 0; k < 8; k++) a[k] ^= v[k];
    }
    return a[0] ^ a[1] ^ a[2] ^ a[3] ^ a[4] ^ a[5] ^ a[6] ^ a[7];
}

#if defined(__x86_64__) || defined(_M_X64)
/* 32-byte loads, four accumulators per 256 bytes (the widest loads every x86 ISA table uses;
 * on the machines measured 64-byte loads read no faster from DRAM). */
__attribute__((target("avx2"))) static uint64_t read_avx2(const uint8_t *p, int64_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i + 256 <= n; i += 256) {
        a0 = _mm256_xor_si256(a0, _mm256_load_si256((const __m256i *)(p + i)));
        a1 = _mm256_xor_si256(a1, _mm256_load_si256((const __m256i *)(p + i + 32)));
        a2 = _mm256_xor_si256(a2, _mm256_load_si256((const __m256i *)(p + i + 64)));
        a3 = _mm256_xor_si256(a3, _mm256_load_si256((const __m256i *)(p + i + 96)));
        a0 = _mm256_xor_si256(a0, _mm256_load_si256((const __m256i *)(p + i + 128)));
        a1 = _mm256_xor_si256(a1, _mm256_load_si256((const __m256i *)(p + i + 160)));
        a2 = _mm256_xor_si256(a2, _mm256_load_si256((const __m256i *)(p + i + 192)));
        a3 = _mm256_xor_si256(a3, _mm256_load_si256((const __m256i *)(p + i + 224)));
    }
    __m256i a = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, a);
    return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3];
}
#endif

typedef struct {
    const uint8_t *buf;
    int64_t nbytes;
    int wide;
    uint64_t sink[LQ_MAX_THREADS];
} read_job;

static void read_range(void *p, int64_t c0, int64_t c1, int tid) {
    read_job *j = p;
    int64_t b0 = c0 * READ_CHUNK, b1 = c1 * READ_CHUNK < j->nbytes ? c1 * READ_CHUNK : j->nbytes;
    uint64_t s;
#if defined(__x86_64__) || defined(_M_X64)
    s = j->wide ? read_avx2(j->buf + b0, b1 - b0) : read_generic(j->buf + b0, b1 - b0);
#else
    s = read_generic(j->buf + b0, b1 - b0);
#endif
    j->sink[tid] ^= s;
}

int lq_bench_read(const void *buf, int64_t nbytes, int parallel, uint64_t *sink) {
    if (!buf || nbytes < 0 || nbytes % 256 || ((uintptr_t)buf & 31)) return LQ_E_SHAPE;
    read_job j;
    memset(&j, 0, sizeof j);
    j.buf = buf;
    j.nbytes = nbytes;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    j.wide = __builtin_cpu_supports("avx2");
#endif
    int64_t chunks = (nbytes + READ_CHUNK - 1) / READ_CHUNK;
    if (parallel)
        lq_parallel_for(chunks, 1, read_range, &j);
    else
        read_range(&j, 0, chunks, 0);
    uint64_t s = 0;
    for (int t = 0; t < LQ_MAX_THREADS; t++) s ^= j.sink[t];
    *sink = s;
    return LQ_OK;
}
