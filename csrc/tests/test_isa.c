/* Cross-ISA kernel test: every kernel of one SIMD table against lq_kernels_scalar.
 *
 *   cc -O2 -DISA=neon csrc/tests/test_isa.c csrc/kernels_scalar.c csrc/kernels_neon.c -Icsrc -lm
 *   ./a.out [seed] [trials]        (under qemu-aarch64 -cpu max for NEON on x86)
 *
 * Prints one line per failure and a final "N passed, N failed" line; exits 1 on any failure,
 * 77 if this CPU cannot run the table (the automake "skipped" code).
 *
 * What "agree" means (the tolerances, derived):
 * - quantize_q8k: bit-exact d, qs and bsums. Every output is one correctly rounded IEEE operation
 *   (iscale = 127 / amax, d = amax / 127), one multiply and one round-to-nearest-even per quant,
 *   or an integer sum: there is no summation order to differ in, so any difference is a bug
 *   (rounding ties away from zero, d = 1 / iscale, a missed clamp, bytes left unwritten).
 * - Q4_K / Q6_K dots: the per-block integer sums are exact in both, so the only differences are
 *   float rounding in combining them: per block at most ~5 roundings (int->float, scale, min
 *   term, subtract, times the activation scale) on quantities bounded by that block's magnitude,
 *   plus one rounding per block of the running sum. With mag = sum over blocks and values of
 *   |xd| (|d| sc |q| |q8| + |dmin| m |q8|), each result is within (nb + 8) eps mag of the exact
 *   value, so two implementations differ by at most 2 (nb + 8) eps mag (eps = FLT_EPSILON).
 *   "exact" trials (d = dmin = xd = 1, small quants) make every float an integer below 2^24 and
 *   require bit equality, which pins down the integer paths on their own.
 * - gelu_mul: bit-exact. Every table runs the same C (lq_gelu_mul_f32: GCC vector extension,
 *   element-wise IEEE operations, no contraction), so any difference is a miscompiled or
 *   mis-dispatched kernel; a tail of 1-3 values goes through the same vector code. The scalar
 *   table's tanh is also checked against libm's double tanh rounded to f32 on 2^20 bit
 *   patterns spread over all f32: at most 1 ulp apart (lq_tanh4 is within ~2^-45 of tanh,
 *   so it can differ only next to a rounding tie, and libm's double tanh is itself within 1 ulp).
 * - f32 / f16 dots: the same products summed in different orders. The classic bound for a sum
 *   of n terms is (n - 1) eps sum|w x| for any order, so the tolerance is 2 (n + 8) eps mag with
 *   mag = sum |w x| (in double); small-integer trials again require bit equality.
 * The scalar result is also checked against the value this file decodes itself, in double, with
 * half the tolerance (one implementation's error), so a layout mistake shared by both tables
 * does not pass unnoticed.
 * The largest observed error / (eps mag) is printed, to show how far inside the bound we are. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blocks_ref.h"
#include "kernels.h"

#ifndef ISA
#error "compile with -DISA=<table>: avx2, avx512, avxvnni, amx, neon or neon_sdot"
#endif
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define STR_(a) #a
#define STR(a) STR_(a)

/* The table under test, or NULL with a reason when this CPU cannot run it (exit 77). */
#define ISA_neon 1
#define ISA_neon_sdot 2
#define ISA_avx2 3
#define ISA_avx512 4
#define ISA_avxvnni 5
#define ISA_amx 6
#define ISA_ID CAT(ISA_, ISA)
static const lq_kernels *table_under_test(const char **why) {
#if ISA_ID == ISA_neon_sdot
    *why = "this CPU lacks the ARMv8.2 dotprod extension (or the build has no sdot table)";
    return lq_neon_sdot_table();
#elif ISA_ID == ISA_avxvnni && defined(LQ_TEST_EMULATE_VNNI)
    *why = "this CPU lacks AVX2 (the AVX-VNNI table built with vpdpbusd emulated needs it)";
    return lq_avx2_usable() ? &lq_kernels_avxvnni : NULL;
#elif ISA_ID == ISA_amx && defined(LQ_TEST_EMULATE_AMX)
    *why = "this CPU lacks AVX2 (the AMX table built with its tiles emulated needs it)";
    return lq_amx_usable() ? &lq_kernels_amx : NULL; /* = lq_avx2_usable() in this build */
#elif ISA_ID == ISA_avx2 || ISA_ID == ISA_avx512 || ISA_ID == ISA_avxvnni || ISA_ID == ISA_amx
    *why = "this CPU (or OS) lacks the instructions of the table";
    return CAT(lq_, CAT(ISA, _usable))() ? &CAT(lq_kernels_, ISA) : NULL;
#else
    *why = "";
    return &CAT(lq_kernels_, ISA);
#endif
}

/* The VNNI tables fold each block into the float sum with the scalar kernel's own operations,
 * so their K-quant dots must equal scalar's bit for bit (tolerance 0), not just within the bound. */
#if ISA_ID == ISA_avx512 || ISA_ID == ISA_avxvnni || ISA_ID == ISA_amx
#define KQUANT_BIT_EXACT 1
#else
#define KQUANT_BIT_EXACT 0
#endif

static const lq_kernels *ref = &lq_kernels_scalar;
static const lq_kernels *isa;

static int n_pass, n_fail;
static double worst_ratio[5]; /* observed |diff| / (eps mag) per dot kernel */

/* ---- random numbers (splitmix64: tiny, good enough, reproducible from the seed) ---- */
static uint64_t rng_state;
static uint64_t rnd64(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static uint32_t rnd_below(uint32_t n) { return (uint32_t)(rnd64() % n); }
static int rnd_int(int lo, int hi) { return lo + (int)rnd_below((uint32_t)(hi - lo + 1)); }
static double rnd_unif(void) { return (double)(rnd64() >> 11) * 0x1.0p-53; }
static double rnd_normal(void) {
    double u = rnd_unif() + 1e-300, v = rnd_unif();
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}
static void rnd_bytes(uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)rnd64();
}
/* A finite f16 with a random sign and exponent in [emin, emax] (biased; 0 = subnormal). */
static uint16_t rnd_f16(int emin, int emax) {
    return (uint16_t)(rnd_below(2) << 15 | rnd_int(emin, emax) << 10 | rnd_below(1024));
}

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void fail(const char *fmt, ...) {
    n_fail++;
    if (n_fail > 30) return; /* the summary still counts them */
    va_list ap;
    va_start(ap, fmt);
    printf("FAIL ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
}

/* ---- weight blocks, with an independent decoder for the tolerance's magnitude term ---- */

enum { F_RANDOM, F_ZERO, F_MAX, F_BIG_D, F_TINY_D, F_NO_MIN, F_COUNT };
static const char *flavor_name[F_COUNT] = {"random", "zero", "max", "big-d", "tiny-d", "no-min"};
static int pick_flavor(void) { return rnd_below(10) < 6 ? F_RANDOM : (int)rnd_below(F_COUNT); }

static void make_q4k(block_q4_K *b, int flavor) {
    rnd_bytes((uint8_t *)b, sizeof *b);
    b->d = rnd_f16(8, 20); /* about 2^-7 .. 2^5 */
    b->dmin = rnd_f16(8, 20);
    switch (flavor) {
    case F_ZERO: memset(b, 0, sizeof *b); break;
    case F_MAX: memset(b->scales, 0xff, 12); memset(b->qs, 0xff, 128); b->d = 0x7bff; b->dmin = 0xfbff; break;
    case F_BIG_D: b->d = 0x7bff; b->dmin = 0x7bff; break;  /* 65504 */
    case F_TINY_D: b->d = 0x0001; b->dmin = 0x8003; break; /* subnormals */
    case F_NO_MIN: b->dmin = 0; break;
    }
}

static void make_q6k(block_q6_K *b, int flavor) {
    rnd_bytes((uint8_t *)b, sizeof *b);
    b->d = rnd_f16(8, 20);
    switch (flavor) {
    case F_ZERO: memset(b, 0, sizeof *b); break;
    case F_MAX: /* q = -32 everywhere, scale -128: the largest products */
        memset(b->ql, 0, 128); memset(b->qh, 0, 64); memset(b->scales, 0x80, 16); b->d = 0x7bff; break;
    case F_BIG_D: b->d = 0xfbff; break;
    case F_TINY_D: b->d = 0x8001; break;
    case F_NO_MIN: memset(b->ql, 0xff, 128); memset(b->qh, 0xff, 64); break; /* q = +31 everywhere */
    }
}

/* ---- activations ---- */

/* kind 0-4: the special rows below; anything else (or -1: pick at random) plain Gaussian.
 * Returns a name for the row, for failure messages. */
enum { X_KINDS = 5 };
static const char *x_kind_name[] = {"zero x", "spike x", "+-tie x", "halves x", "signed-zero x", "gaussian x"};
static const char *make_floats(float *x, int64_t n, int kind) {
    if (kind < 0) kind = (int)rnd_below(8);
    double scale = pow(10.0, rnd_unif() * 12.0 - 6.0);
    for (int64_t i = 0; i < n; i++) x[i] = (float)(scale * rnd_normal());
    if (kind == 0) memset(x, 0, n * sizeof *x);           /* all zero: d = 0 */
    if (kind == 1) x[rnd_below((uint32_t)n)] = (float)(scale * 1000.0); /* one spike */
    if (kind == 2 && n >= 2) {                            /* +a and -a tie for the largest */
        int64_t a = rnd_below((uint32_t)n), b = (a + 1 + rnd_below((uint32_t)n - 1)) % n;
        x[a] = (float)(scale * 50.0);
        x[b] = -x[a];
    }
    if (kind == 3) { /* iscale = 1 exactly and halves everywhere: round-half-even decides */
        for (int64_t i = 0; i < n; i++) x[i] = (float)(i % 11) - 5.5f;
        for (int64_t i = 0; i < n; i += QK_K) x[i] = (rnd_below(2) ? -127.0f : 127.0f);
    }
    if (kind == 4) for (int64_t i = 0; i < n; i++) x[i] = rnd_below(2) ? -0.0f : 0.0f;
    return x_kind_name[kind < X_KINDS ? kind : X_KINDS];
}

/* A Q8_K block built directly (quants in [lo, hi], bsums consistent); d = 1 for exact trials. */
static void make_q8k_raw(block_q8_K *y, int lo, int hi, float d) {
    y->d = d;
    for (int i = 0; i < QK_K; i++) y->qs[i] = (int8_t)rnd_int(lo, hi);
    for (int g = 0; g < QK_K / 16; g++) {
        int s = 0;
        for (int i = 0; i < 16; i++) s += y->qs[16 * g + i];
        y->bsums[g] = (int16_t)s;
    }
}

/* ---- checks ---- */

static void check_quantize(int64_t nb, int kind) {
    int64_t n = nb * QK_K;
    float *x = malloc(n * sizeof *x);
    block_q8_K *a = malloc(nb * sizeof *a), *b = malloc(nb * sizeof *b);
    memset(a, 0xab, nb * sizeof *a); /* every byte of the output must be written */
    memset(b, 0xab, nb * sizeof *b);
    make_floats(x, n, kind);
    ref->quantize_q8k(x, a, n);
    isa->quantize_q8k(x, b, n);
    for (int64_t i = 0; i < nb; i++) {
        int bad = -1;
        if (memcmp(&a[i].d, &b[i].d, 4)) bad = 0;
        else if (memcmp(a[i].qs, b[i].qs, QK_K)) bad = 1;
        else if (memcmp(a[i].bsums, b[i].bsums, sizeof a[i].bsums)) bad = 2;
        if (bad >= 0) {
            int j = 0;
            while (bad == 1 && a[i].qs[j] == b[i].qs[j]) j++;
            fail("quantize_q8k nb=%lld block %lld: %s differs (scalar d=%.9g, %s d=%.9g%s)", (long long)nb,
                 (long long)i, bad == 0 ? "d" : bad == 1 ? "qs" : "bsums", a[i].d, isa->name, b[i].d,
                 bad == 1 ? "; first differing quant shown below" : "");
            if (bad == 1)
                printf("     qs[%d]: scalar %d, %s %d, x=%.9g\n", j, a[i].qs[j], isa->name, b[i].qs[j],
                       x[i * QK_K + j]);
            free(x), free(a), free(b);
            return;
        }
    }
    n_pass++;
    free(x), free(a), free(b);
}

/* gelu_mul on n values of a few kinds (tiny, ordinary, large, tails of gelu and tanh, zeros
 * of both signs, infinities, NaN), both tables, bit for bit */
static void check_gelu(int64_t n) {
    float *g = malloc(n * sizeof *g), *u = malloc(n * sizeof *u), *a = malloc(n * sizeof *a),
          *b = malloc(n * sizeof *b);
    static const float special[] = {0.f, -0.f, INFINITY, -INFINITY, NAN, 1e-30f, -1e-30f, 1e-4f, -3e-4f,
                                    9.f, -9.f, 20.f, -20.f, 1e30f, -1e30f, 0.5f, -0.5f};
    for (int64_t i = 0; i < n; i++) {
        int kind = rnd_int(0, 4);
        g[i] = kind == 0 ? special[rnd_below(sizeof special / sizeof *special)]
                         : (float)(pow(10.0, rnd_unif() * 6 - 4 - (kind == 1 ? 20 : 0)) * rnd_normal());
        u[i] = (float)rnd_normal();
    }
    memset(a, 0xab, n * sizeof *a), memset(b, 0xab, n * sizeof *b);
    ref->gelu_mul(g, u, n, a);
    isa->gelu_mul(g, u, n, b);
    for (int64_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], 4)) {
            fail("gelu_mul n=%lld [%lld]: gate %a up %a: scalar %a, %s %a", (long long)n, (long long)i, g[i], u[i],
                 a[i], isa->name, b[i]);
            free(g), free(u), free(a), free(b);
            return;
        }
    n_pass++;
    free(g), free(u), free(a), free(b);
}

/* lq_tanh4 itself (gelu_mul's tanh cannot be recovered exactly from its output) against libm's
 * double tanh rounded to f32, on 2^20 bit patterns spread over all f32. */
static void check_tanh_accuracy(void) {
    long worst = 0, exact = 0, n = 0;
    for (uint64_t bits = 0; bits < 0x100000000ULL; bits += 4 * 4093) {
        lq_v4f x, t;
        for (int j = 0; j < 4; j++) {
            uint32_t bj = (uint32_t)(bits + (uint64_t)j * 4093);
            memcpy(&x[j], &bj, 4);
        }
        lq_tanh4(&x, &t);
        for (int j = 0; j < 4; j++) {
            float xj = x[j], tj = t[j], r = (float)tanh((double)xj);
            if (xj != xj) {
                if (tj == tj) fail("tanh(NaN) = %a", tj);
                continue;
            }
            int32_t it, ir;
            memcpy(&it, &tj, 4), memcpy(&ir, &r, 4);
            long d = labs((long)it - (long)ir);
            n++, exact += d == 0, worst = d > worst ? d : worst;
            if (d > 1) fail("tanh(%a) = %a, libm's double tanh rounds to %a", xj, tj, r);
        }
    }
    printf("tanh: %ld of %ld values equal to libm's double tanh rounded, the rest within %ld ulp\n", exact, n, worst);
    n_pass++;
}

enum { K_Q4K, K_Q6K, K_F32, K_F16, K_BF16 };
static const char *kname[] = {"dot_q4k", "dot_q6k", "dot_f32", "dot_f16", "dot_bf16"};
static const int kfmt[] = {LQ_Q4_K, LQ_Q6_K, LQ_F32, LQ_F16, LQ_BF16};

/* Run both tables with the given strides, check untouched gaps in out, compare per row. */
static void compare_dot(int kernel, const char *mode, int64_t n_or_nb, int T, const void *w, const void *x,
                        int64_t x_stride, const double *mag, const double *exact_val, double chain, int exact,
                        const char *w_desc,
                        const char **x_desc) {
    int64_t os = 1 + rnd_below(3);
    float *oa = malloc(T * os * sizeof(float)), *ob = malloc(T * os * sizeof(float));
    const float sentinel = -12345.678f;
    for (int64_t i = 0; i < T * os; i++) oa[i] = ob[i] = sentinel;
    ref->dot[kfmt[kernel]](n_or_nb, w, x, x_stride, T, oa, os);
    isa->dot[kfmt[kernel]](n_or_nb, w, x, x_stride, T, ob, os);
    int ok = 1;
    for (int t = 0; t < T && ok; t++) {
        for (int64_t g = 1; g < os; g++) {
            if (memcmp(&ob[t * os + g], &sentinel, 4)) {
                fail("%s %s T=%d n=%lld: wrote out[%lld], outside out_stride=%lld", kname[kernel], mode, T,
                     (long long)n_or_nb, (long long)(t * os + g), (long long)os);
                ok = 0;
            }
        }
        double a = oa[t * os], b = ob[t * os], diff = fabs(a - b);
        double bound = exact ? 0.0 : 2.0 * (chain + 8.0) * FLT_EPSILON * mag[t];
        double tol = KQUANT_BIT_EXACT && (kernel == K_Q4K || kernel == K_Q6K) ? 0.0 : bound;
        if (!(diff <= tol)) { /* also catches NaN */
            fail("%s %s T=%d n=%lld row %d: scalar %.9g, %s %.9g, |diff| %.3g > tol %.3g\n"
                 "     (mag %.3g, value in double from the test's own decoder %.9g)\n"
                 "     weights: %s; activations: %s",
                 kname[kernel], mode, T, (long long)n_or_nb, t, a, isa->name, b, diff, tol, mag[t], exact_val[t],
                 w_desc, x_desc[t]);
            ok = 0;
        }
        /* The reference itself against the test's own decoder, in double: one implementation's
         * share of the bound. Catches a layout mistake both tables might share. */
        double dref = fabs(a - exact_val[t]);
        if (ok && !(dref <= bound / 2)) {
            fail("%s %s T=%d n=%lld row %d: the scalar reference %.9g is off the value decoded in double"
                 " %.9g by %.3g > %.3g\n     weights: %s; activations: %s",
                 kname[kernel], mode, T, (long long)n_or_nb, t, a, exact_val[t], dref, bound / 2, w_desc, x_desc[t]);
            ok = 0;
        }
        if (!exact && mag[t] > 0) {
            double r = diff / (FLT_EPSILON * mag[t]);
            if (r > worst_ratio[kernel]) worst_ratio[kernel] = r;
        }
    }
    if (ok) n_pass++;
    free(oa), free(ob);
}

/* K-quant dots: random blocks of mixed flavours against quantised random activations, then an
 * exact trial with unit scales. */
static void check_kquant(int kernel, int64_t nb, int T, int exact) {
    size_t bsize = kernel == K_Q4K ? sizeof(block_q4_K) : sizeof(block_q6_K);
    uint8_t *w = malloc(nb * bsize);
    int64_t xs = nb + rnd_below(3); /* padded activation rows: the stride must be honoured */
    block_q8_K *x = calloc(T * xs, sizeof *x);
    float *xf = malloc(nb * QK_K * sizeof *xf);
    double *mag = calloc(T, sizeof *mag), *val = calloc(T, sizeof *val);
    const char **x_desc = calloc(T, sizeof *x_desc);
    char w_desc[16 * 12] = "";

    for (int64_t i = 0; i < nb; i++) {
        int flavor = exact ? F_RANDOM : pick_flavor();
        if (i < 12) snprintf(w_desc + strlen(w_desc), 16, "%s%s", i ? " " : "", flavor_name[flavor]);
        if (kernel == K_Q4K) {
            block_q4_K *b = (block_q4_K *)(w + i * bsize);
            make_q4k(b, flavor);
            if (exact) b->d = b->dmin = 0x3c00; /* 1.0 */
        } else {
            block_q6_K *b = (block_q6_K *)(w + i * bsize);
            make_q6k(b, flavor);
            if (exact) b->d = 0x3c00;
        }
    }
    for (int t = 0; t < T; t++) {
        if (exact) {
            int r = kernel == K_Q4K ? 4 : 1; /* keeps every partial sum an integer below 2^24 */
            for (int64_t i = 0; i < nb; i++) make_q8k_raw(&x[t * xs + i], -r, r, 1.0f);
            x_desc[t] = "small Q8_K quants, d = 1";
        } else if (rnd_below(8) == 0) { /* full int8 range, -128 included, arbitrary d */
            for (int64_t i = 0; i < nb; i++) make_q8k_raw(&x[t * xs + i], -128, 127, (float)rnd_normal());
            x_desc[t] = "raw Q8_K quants in [-128, 127]";
        } else {
            x_desc[t] = make_floats(xf, nb * QK_K, -1);
            ref->quantize_q8k(xf, &x[t * xs], nb * QK_K);
        }
    }
    for (int t = 0; t < T; t++)
        ref_q_row(kernel == K_Q4K ? LQ_Q4_K : LQ_Q6_K, w, nb, &x[t * xs], &mag[t], &val[t]);
    compare_dot(kernel, exact ? "exact" : "random", nb, T, w, x, xs, mag, val, (double)nb, exact, w_desc,
                x_desc);
    free(w), free(x), free(xf), free(mag), free(val), free(x_desc);
}

/* The rows kernels (lq_dot_rows: the table's rows entry, or its per-row fallback) against the
 * same table's dot called row by row, bit for bit: the contract says a driver may use either.
 * With KQUANT_BIT_EXACT that is also the scalar reference's dot. Rows sit a padded row_bytes
 * apart and the outputs at both strides, with sentinels in every gap. */
static void check_rows(int kernel, int64_t nb, int T, int n_rows) {
    size_t bsize = kernel == K_Q4K ? sizeof(block_q4_K) : sizeof(block_q6_K);
    size_t row_bytes = nb * bsize + bsize * rnd_below(2);
    int fmt = kfmt[kernel];
    uint8_t *w = malloc(row_bytes * n_rows);
    rnd_bytes(w, row_bytes * n_rows);
    for (int r = 0; r < n_rows; r++)
        for (int64_t i = 0; i < nb; i++) {
            uint8_t *b = w + r * row_bytes + i * bsize;
            if (kernel == K_Q4K) make_q4k((block_q4_K *)b, pick_flavor());
            else make_q6k((block_q6_K *)b, pick_flavor());
        }
    int64_t xs = nb + rnd_below(3);
    block_q8_K *x = calloc(T * xs, sizeof *x);
    float *xf = malloc(nb * QK_K * sizeof *xf);
    for (int t = 0; t < T; t++) {
        make_floats(xf, nb * QK_K, -1);
        ref->quantize_q8k(xf, &x[t * xs], nb * QK_K);
    }
    /* row-major (row stride 1 .. 2 past T * os) or column-major (column stride past n_rows) */
    int64_t os, ors;
    if (rnd_below(2)) os = 1 + rnd_below(2), ors = T * os + rnd_below(2);
    else ors = 1 + rnd_below(2), os = n_rows * ors + rnd_below(2);
    int64_t n_out = (n_rows - 1) * ors + (T - 1) * os + 1;
    float *oa = malloc(n_out * sizeof(float)), *ob = malloc(n_out * sizeof(float)), *oc = malloc(n_out * sizeof(float));
    const float sentinel = -12345.678f;
    for (int64_t i = 0; i < n_out; i++) oa[i] = ob[i] = oc[i] = sentinel;
    for (int r = 0; r < n_rows; r++) {
        isa->dot[fmt](nb, w + r * row_bytes, x, xs, T, oa + r * ors, os);
        ref->dot[fmt](nb, w + r * row_bytes, x, xs, T, oc + r * ors, os);
    }
    lq_dot_rows(isa, fmt, nb, w, row_bytes, n_rows, x, xs, T, ob, ors, os);
    int ok = 1;
    for (int64_t i = 0; i < n_out && ok; i++) {
        if (memcmp(&oa[i], &ob[i], 4)) {
            fail("rows %s nb=%lld T=%d n_rows=%d out[%lld] (strides %lld, %lld): dot row by row %a, rows %a",
                 kname[kernel], (long long)nb, T, n_rows, (long long)i, (long long)ors, (long long)os, oa[i], ob[i]);
            ok = 0;
        } else if (KQUANT_BIT_EXACT && memcmp(&oc[i], &ob[i], 4)) {
            fail("rows %s nb=%lld T=%d n_rows=%d out[%lld]: scalar %a, %s rows %a", kname[kernel], (long long)nb, T,
                 n_rows, (long long)i, oc[i], isa->name, ob[i]);
            ok = 0;
        }
    }
    if (ok) n_pass++;
    free(w), free(x), free(xf), free(oa), free(ob), free(oc);
}

/* bf16 by truncation (any finite f32 gives a finite bf16 here: the values stay below 1e5) */
static uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}
static double bf16_value(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void check_float(int kernel, int64_t n, int T, int exact) {
    int64_t xs = n + rnd_below(5);
    float *x = malloc(T * xs * sizeof *x);
    void *w = malloc(n * 4);
    double *mag = calloc(T, sizeof *mag), *val = calloc(T, sizeof *val);
    const char **x_desc = calloc(T, sizeof *x_desc);
    for (int64_t i = 0; i < n; i++) {
        float v = exact ? (float)rnd_int(-8, 8) : (float)(pow(10.0, rnd_unif() * 8 - 4) * rnd_normal());
        if (kernel == K_F32) ((float *)w)[i] = v;
        else if (kernel == K_F16) ((uint16_t *)w)[i] = exact ? lq_fp32_to_fp16(v) : rnd_f16(0, 30); /* any finite */
        else ((uint16_t *)w)[i] = bf16_bits(v); /* small integers are exact in bf16 */
    }
    for (int t = 0; t < T; t++) {
        float *xt = x + t * xs;
        if (exact) {
            for (int64_t i = 0; i < n; i++) xt[i] = (float)rnd_int(-8, 8);
            x_desc[t] = "small integers";
        } else {
            x_desc[t] = make_floats(xt, n, -1);
        }
        for (int64_t i = 0; i < n; i++) {
            double wi = kernel == K_F32   ? ((float *)w)[i]
                        : kernel == K_F16 ? lq_fp16_to_fp32(((uint16_t *)w)[i])
                                          : bf16_value(((uint16_t *)w)[i]);
            mag[t] += fabs(wi * xt[i]);
            val[t] += wi * xt[i];
        }
    }
    compare_dot(kernel, exact ? "exact" : "random", n, T, w, x, xs, mag, val, (double)n, exact,
                exact ? "small integers" : kernel == K_F32 ? "random f32" : kernel == K_F16 ? "random finite f16"
                                                                                   : "random bf16", x_desc);
    free(x), free(w), free(mag), free(val), free(x_desc);
}

int main(int argc, char **argv) {
    uint64_t seed = argc > 1 ? strtoull(argv[1], NULL, 0) : 20260101;
    int trials = argc > 2 ? atoi(argv[2]) : 4;
    rng_state = seed;

    const char *why;
    isa = table_under_test(&why);
    if (!isa) {
        printf("SKIP: %s table: %s\n", STR(ISA), why);
        return 77;
    }
    printf("test_isa: %s vs %s, seed %llu, %d trials per shape", isa->name, ref->name,
           (unsigned long long)seed, trials);
    printf("\n");

    static const int Ts[] = {1, 2, 3, 7, 64};
    static const int64_t nbs[] = {1, 3, 11};
    static const int64_t odd_n[] = {1, 3, 17, 64, 100, 704}; /* float rows need not fill a block */

    for (int r = 0; r < trials; r++)
        for (int k = 0; k < 3; k++) check_quantize(nbs[k], -1);
    for (int r = 0; r < 2 * trials; r++) /* each special row kind: ties, halves, zeros, ... */
        for (int kind = 0; kind < X_KINDS; kind++) check_quantize(1, kind);

    check_tanh_accuracy();
    static const int64_t gelu_n[] = {1, 2, 3, 4, 5, 7, 64, 1001, 4096};
    for (int r = 0; r < trials; r++)
        for (int k = 0; k < 9; k++) check_gelu(gelu_n[k]);

    for (int i = 0; i < 5; i++) {
        for (int k = 0; k < 3; k++) {
            for (int r = 0; r < trials; r++) {
                check_kquant(K_Q4K, nbs[k], Ts[i], 0);
                check_kquant(K_Q6K, nbs[k], Ts[i], 0);
                check_float(K_F32, nbs[k] * QK_K, Ts[i], 0);
                check_float(K_F16, nbs[k] * QK_K, Ts[i], 0);
                check_float(K_BF16, nbs[k] * QK_K, Ts[i], 0);
            }
            check_kquant(K_Q4K, nbs[k], Ts[i], 1);
            check_kquant(K_Q6K, nbs[k], Ts[i], 1);
            check_float(K_F32, nbs[k] * QK_K, Ts[i], 1);
            check_float(K_F16, nbs[k] * QK_K, Ts[i], 1);
            check_float(K_BF16, nbs[k] * QK_K, Ts[i], 1);
        }
        for (int k = 0; k < 6; k++) {
            check_float(K_F32, odd_n[k], Ts[i], 0);
            check_float(K_F16, odd_n[k], Ts[i], 0);
            check_float(K_F32, odd_n[k], Ts[i], 1);
            check_float(K_F16, odd_n[k], Ts[i], 1);
            check_float(K_BF16, odd_n[k], Ts[i], 0);
            check_float(K_BF16, odd_n[k], Ts[i], 1);
        }
    }
    static const int rows_T[] = {1, 2, 3, 5, 8, 9, 17, 64};
    for (int r = 0; r < trials; r++)
        for (int i = 0; i < 8; i++)
            for (int k = 0; k < 3; k++) {
                check_rows(K_Q4K, nbs[k], rows_T[i], 1 + rnd_below(6));
                check_rows(K_Q6K, nbs[k], rows_T[i], 1 + rnd_below(6));
            }
    /* more rows than one 16-row AMX tile holds, with and without a partial last tile */
    static const int many_rows[] = {16, 17, 40};
    for (int i = 0; i < 8; i++)
        for (int k = 0; k < 3; k++) {
            check_rows(K_Q4K, nbs[k], rows_T[i], many_rows[(i + k) % 3]);
            check_rows(K_Q6K, nbs[k], rows_T[i], many_rows[(i + k) % 3]);
        }
    printf("rows kernels: %s\n", isa->rows[LQ_Q4_K] ? "the table's own" : "none (the per-row fallback)");
    printf("worst |diff|/(eps*mag): q4k %.2f, q6k %.2f, f32 %.2f, f16 %.2f, bf16 %.2f (tolerance is 2*(n+8))\n",
           worst_ratio[0], worst_ratio[1], worst_ratio[2], worst_ratio[3], worst_ratio[4]);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
