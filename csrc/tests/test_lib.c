/* The whole library through its public API, best ISA against the scalar table.
 *
 *   cc -O2 -pthread csrc/tests/test_lib.c csrc/[a-z]*.c -Icsrc -lm && ./a.out [expected-best-isa]
 *
 * test_isa.c checks each SIMD kernel on its own; this checks what runs around them on the
 * target machine (for aarch64: under qemu-user): run-time dispatch picks the expected table,
 * the matmul driver (row split over threads, T chunks of 64, activations shorter than the padded
 * row) gives the value this file computes in double from its own block decoder, the best ISA
 * agrees with the scalar one, 1 and 2 threads give identical bits, and the MoE FFN agrees across
 * ISAs. Tolerances as in test_isa.c: 2 (n + 8) eps mag between two implementations, half that
 * against the double-precision value. Prints "N passed, N failed"; exits 1 on any failure. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blocks_ref.h"
#include "kernels.h" /* lq_parallel_for_guided: internal, but every csrc file is linked here */
#include "larql.h"

static int n_pass, n_fail;
static uint64_t rng = 42;

static double rnd_normal(void) {
    /* xorshift64 + Box-Muller: reproducible, no libc rand() state */
    double u[2];
    for (int i = 0; i < 2; i++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        u[i] = ((rng >> 11) + 0.5) * 0x1.0p-53;
    }
    return sqrt(-2.0 * log(u[0])) * cos(6.283185307179586 * u[1]);
}

static void check(int ok, const char *what) {
    if (ok) {
        n_pass++;
    } else {
        n_fail++;
        printf("FAIL %s\n", what);
    }
}

static int call(int rc, const char *what) {
    if (rc != LQ_OK) {
        n_fail++;
        printf("FAIL %s returned %d\n", what, rc);
    }
    return rc == LQ_OK;
}

static const char *fmt_name(int fmt) {
    return fmt == LQ_Q4_K ? "Q4_K" : fmt == LQ_Q6_K ? "Q6_K" : fmt == LQ_F16 ? "F16" : "F32";
}

/* Y = X W^T on the scalar table, the best table with 1 and with 2 threads. */
static void check_matmul(const char *best, int fmt, int64_t rows, int64_t cols, int64_t x_cols, int64_t T) {
    char what[160];
    snprintf(what, sizeof what, "matmul %s rows=%lld cols=%lld x_cols=%lld T=%lld", fmt_name(fmt), (long long)rows,
             (long long)cols, (long long)x_cols, (long long)T);
    size_t row_bytes = lq_row_bytes(fmt, cols);
    float *w = malloc(rows * cols * sizeof *w), *x = malloc(T * x_cols * sizeof *x);
    float *xpad = calloc(T * cols, sizeof *xpad), *wf = malloc(rows * cols * sizeof *wf);
    uint8_t *wq = malloc(rows * row_bytes);
    block_q8_K *xq = malloc(T * (cols / QK_K + 1) * sizeof *xq);
    float *y_ref = malloc(T * rows * sizeof(float)), *y1 = malloc(T * rows * sizeof(float)),
          *y2 = malloc(T * rows * sizeof(float));
    for (int64_t i = 0; i < rows * cols; i++) w[i] = (float)(0.05 * rnd_normal());
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < x_cols; c++) xpad[t * cols + c] = x[t * x_cols + c] = (float)rnd_normal();

    int ok = call(lq_quantize(fmt, w, wq, rows, cols), what) && call(lq_dequantize(fmt, wq, wf, rows, cols), what);
    ok = ok && call(lq_force_isa("scalar"), what) && call(lq_matmul(fmt, wq, rows, cols, x, x_cols, T, y_ref), what);
    ok = ok && call(lq_force_isa(best), what) && call(lq_set_num_threads(1), what) &&
         call(lq_matmul(fmt, wq, rows, cols, x, x_cols, T, y1), what);
    ok = ok && call(lq_set_num_threads(2), what) && call(lq_matmul(fmt, wq, rows, cols, x, x_cols, T, y2), what);
    int kquant = fmt == LQ_Q4_K || fmt == LQ_Q6_K;
    if (ok && kquant) ok = call(lq_quantize(LQ_Q8_K, xpad, xq, T, cols), what);
    if (ok) {
        int bad_ref = 0, bad_isa = 0;
        for (int64_t t = 0; t < T; t++) {
            for (int64_t r = 0; r < rows; r++) {
                double mag = 0, val = 0, chain = kquant ? (double)(cols / QK_K) : (double)x_cols;
                if (kquant) {
                    ref_q_row(fmt, wq + r * row_bytes, cols / QK_K, xq + t * (cols / QK_K), &mag, &val);
                } else {
                    for (int64_t c = 0; c < x_cols; c++) {
                        mag += fabs((double)wf[r * cols + c] * x[t * x_cols + c]);
                        val += (double)wf[r * cols + c] * x[t * x_cols + c];
                    }
                }
                double tol = 2.0 * (chain + 8.0) * FLT_EPSILON * mag;
                float a = y_ref[t * rows + r], b = y1[t * rows + r];
                if (!(fabs(a - val) <= tol / 2) && bad_ref++ == 0)
                    printf("     %s: scalar y[%lld,%lld] = %.9g, decoded in double %.9g\n", what, (long long)t,
                           (long long)r, a, val);
                if (!(fabs(a - b) <= tol) && bad_isa++ == 0)
                    printf("     %s: y[%lld,%lld] scalar %.9g, %s %.9g, tol %.3g\n", what, (long long)t, (long long)r,
                           a, best, b, tol);
            }
        }
        char msg[240];
        snprintf(msg, sizeof msg, "%s: scalar driver vs double-precision decode (%d bad)", what, bad_ref);
        check(bad_ref == 0, msg);
        snprintf(msg, sizeof msg, "%s: %s vs scalar (%d bad)", what, best, bad_isa);
        check(bad_isa == 0, msg);
        snprintf(msg, sizeof msg, "%s: 1 vs 2 threads not bit-identical", what);
        check(memcmp(y1, y2, T * rows * sizeof(float)) == 0, msg);
    }
    free(w), free(x), free(xpad), free(wf), free(wq), free(xq), free(y_ref), free(y1), free(y2);
}

/* The fused expert FFN: Q4_K gate_up, Q6_K down (rows padded to whole blocks), a skipped slot
 * and a repeated expert. The down input is re-quantised to Q8_K, where a last-bit difference in
 * h can move a quant by one step: about max|h| / 127 times one weight, far below 1% of the
 * largest output, while a wiring mistake is of the order of the output itself. */
static void check_moe(const char *best) {
    enum { E = 3, H = 256, I = 320, IP = 512, T = 4, K = 2 };
    static float gu[E][2 * I * H], dn[E][H * IP], x[T * H], out_ref[T * H], out_best[T * H];
    size_t gu_bytes = lq_row_bytes(LQ_Q4_K, H) * 2 * I, dn_bytes = lq_row_bytes(LQ_Q6_K, IP) * H;
    uint8_t *gq = malloc(E * gu_bytes), *dq = malloc(E * dn_bytes);
    lq_expert ex[E];
    int ok = 1;
    for (int e = 0; e < E && ok; e++) {
        for (int i = 0; i < 2 * I * H; i++) gu[e][i] = (float)(0.06 * rnd_normal());
        for (int r = 0; r < H; r++)
            for (int c = 0; c < IP; c++) dn[e][r * IP + c] = c < I ? (float)(0.05 * rnd_normal()) : 0.0f;
        ok = call(lq_quantize(LQ_Q4_K, gu[e], gq + e * gu_bytes, 2 * I, H), "moe gate_up quantize") &&
             call(lq_quantize(LQ_Q6_K, dn[e], dq + e * dn_bytes, H, IP), "moe down quantize");
        ex[e] = (lq_expert){gq + e * gu_bytes, dq + e * dn_bytes, LQ_Q4_K, LQ_Q6_K};
    }
    for (int i = 0; i < T * H; i++) x[i] = (float)rnd_normal();
    const int32_t ids[T * K] = {0, 2, 1, -1, 2, 2, 0, 1};
    const float wts[T * K] = {0.7f, 0.3f, 1.0f, 0.5f, 0.25f, 0.75f, 0.6f, 0.4f};
    ok = ok && call(lq_force_isa("scalar"), "moe") && call(lq_moe_ffn(ex, E, H, I, x, T, K, ids, wts, out_ref), "moe");
    ok = ok && call(lq_force_isa(best), "moe") && call(lq_moe_ffn(ex, E, H, I, x, T, K, ids, wts, out_best), "moe");
    if (ok) {
        double peak = 0, worst = 0;
        for (int i = 0; i < T * H; i++) {
            /* plain comparisons: GCC 12 -O3 for aarch64 crashes vectorising fmax reductions here */
            double a = fabs(out_ref[i]), d = fabs((double)out_ref[i] - out_best[i]);
            if (a > peak) peak = a;
            if (d > worst) worst = d;
        }
        char msg[160];
        snprintf(msg, sizeof msg, "moe_ffn %s vs scalar: max |diff| %.3g, 1%% of max |out| %.3g", best, worst,
                 0.01 * peak);
        check(peak > 0 && worst <= 0.01 * peak, msg);
    }
    free(gq), free(dq);
}

/* lq_parallel_for_guided: every index in exactly one range, every range starting at a multiple
 * of grain and (but the last) at least one grain long, whatever the thread count. */
typedef struct {
    int64_t grain, n;
    _Atomic int *hits;
    _Atomic int bad;
} guided_job;

static void guided_range(void *p, int64_t b, int64_t e, int tid) {
    guided_job *j = p;
    (void)tid;
    if (b % j->grain || e <= b || e > j->n || (e - b < j->grain && e != j->n)) j->bad = 1;
    for (int64_t i = b; i < e; i++) j->hits[i]++;
}

static void check_guided(void) {
    static const int64_t ns[] = {1, 15, 16, 17, 1000, 4097};
    static const int64_t grains[] = {1, 16, 48};
    for (int threads = 1; threads <= 3; threads++) {
        lq_set_num_threads(threads);
        for (int a = 0; a < 6; a++)
            for (int g = 0; g < 3; g++) {
                guided_job j = {grains[g], ns[a], calloc((size_t)ns[a], sizeof(int)), 0};
                lq_parallel_for_guided(j.n, j.grain, guided_range, &j);
                int ok = !j.bad;
                for (int64_t i = 0; i < j.n; i++) ok = ok && j.hits[i] == 1;
                char msg[128];
                snprintf(msg, sizeof msg, "parallel_for_guided n=%lld grain=%lld threads=%d", (long long)j.n,
                         (long long)j.grain, threads);
                check(ok, msg);
                free((void *)j.hits);
            }
    }
    lq_set_num_threads(0);
}

int main(int argc, char **argv) {
    const char *avail = lq_available_isas();
    const char *best = strrchr(avail, ' ') ? strrchr(avail, ' ') + 1 : avail;
    printf("test_lib: ISAs \"%s\", default %s\n", avail, lq_isa());
    if (argc > 1) {
        char msg[160];
        snprintf(msg, sizeof msg, "expected %s to be the best ISA here, got %s", argv[1], best);
        check(strcmp(best, argv[1]) == 0, msg);
    }
    check(strcmp(lq_isa(), best) == 0 || getenv("LARQL_ISA") != NULL, "the default table is not the best one");

    static const int fmts[] = {LQ_Q4_K, LQ_Q6_K, LQ_F16, LQ_BF16, LQ_F32};
    static const int64_t Ts[] = {1, 5, 70}; /* 70: more than one chunk of 64 columns */
    /* every table dispatch lists (not only the best), each forced in turn against scalar */
    char names[128];
    snprintf(names, sizeof names, "%s", avail);
    for (char *save = NULL, *isa = strtok_r(names, " ", &save); isa; isa = strtok_r(NULL, " ", &save)) {
        if (strcmp(isa, "scalar") == 0) continue;
        printf("-- %s\n", isa);
        for (int f = 0; f < 5; f++)
            for (int i = 0; i < 3; i++) check_matmul(isa, fmts[f], 37, 768, 704, Ts[i]);
        check_moe(isa);
    }
    lq_force_isa(NULL);
    check_guided();

    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
