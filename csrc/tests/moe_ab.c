/* A/B timing of two builds of the expert FFN in one process (make -C csrc/tests moe-ab B=dir).
 *
 * The shared 2-vCPU machine this was written on changed speed by up to 30% within minutes, so
 * separate runs of `larql bench kernels` could not tell a 10% change from the noise. Here calls
 * of A (this tree's lq_moe_ffn) and B (lq_moe_ffn_B: another tree's moe.c and kernels_avx2.c,
 * symbols renamed by the Makefile) alternate call by call on the same cold bank, so drifting load
 * hits both alike; B/A of the medians is the figure (A against itself: within 1%).
 * Shapes: Gemma 4 26B A4B experts (hidden 2816, inter 704, Q4_K), top-8; T = 1 draws each call's
 * experts from a window of 8, T > 1 from a window of 24, sliding over the bank as the bench does.
 * usage: moe-ab [T=8] [n_experts=78] [calls=200] [distinct copies=n_experts: fewer = hot] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "larql.h"

int lq_moe_ffn_B(const lq_expert *experts, int32_t n_experts, int64_t hidden, int64_t inter, const float *x,
                 int64_t T, int32_t K, const int32_t *ids, const float *weights, float *out);

#define HID 2816
#define INTER 704

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
static uint64_t rs = 88172645463325252ull;
static double rnd(void) {
    rs ^= rs << 13, rs ^= rs >> 7, rs ^= rs << 17;
    return (rs >> 11) * (1.0 / 9007199254740992.0);
}
static float gauss(void) { return (float)(sqrt(-2 * log(rnd() + 1e-12)) * cos(6.283185307 * rnd())); }
static int cmpd(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    int T = argc > 1 ? atoi(argv[1]) : 8, nexp = argc > 2 ? atoi(argv[2]) : 78;
    int reps = argc > 3 ? atoi(argv[3]) : 200, ndist = argc > 4 ? atoi(argv[4]) : nexp;
    const int K = 8, span = T == 1 ? 8 : 24;
    if (T < 1 || nexp < span || reps < 4 || ndist < 1 || ndist > nexp) {
        fprintf(stderr, "usage: moe-ab [T] [n_experts >= %d] [calls >= 4] [distinct copies]\n", span);
        return 2;
    }
    size_t gub = lq_row_bytes(LQ_Q4_K, HID) * 2 * INTER, dnb = lq_row_bytes(LQ_Q4_K, 768) * HID, eb = gub + dnb;
    float *gu = malloc(sizeof(float) * 2 * INTER * HID), *dn = calloc((size_t)HID * 768, sizeof(float));
    for (size_t i = 0; i < (size_t)2 * INTER * HID; i++) gu[i] = gauss() * 0.02f;
    for (int r = 0; r < HID; r++)
        for (int c = 0; c < INTER; c++) dn[(size_t)r * 768 + c] = gauss() * 0.02f;
    uint8_t *one = malloc(eb);
    lq_quantize(LQ_Q4_K, gu, one, 2 * INTER, HID);
    lq_quantize(LQ_Q4_K, dn, one + gub, HID, 768);
    uint8_t *bank = aligned_alloc(256, (eb * ndist + 255) / 256 * 256);
    lq_expert *ex = malloc(sizeof(lq_expert) * nexp);
    for (int e = 0; e < ndist; e++) memcpy(bank + e * eb, one, eb);
    for (int e = 0; e < nexp; e++)
        ex[e] = (lq_expert){bank + (e % ndist) * eb, bank + (e % ndist) * eb + gub, LQ_Q4_K, LQ_Q4_K};
    float *x = malloc(sizeof(float) * T * HID), *w = malloc(sizeof(float) * T * K);
    float *oa = malloc(sizeof(float) * T * HID), *ob = malloc(sizeof(float) * T * HID);
    for (int i = 0; i < T * HID; i++) x[i] = gauss();
    for (int i = 0; i < T * K; i++) w[i] = (float)rnd();
    int ncalls = nexp / span;
    int32_t *ids = malloc(sizeof(int32_t) * ncalls * T * K);
    for (int c = 0; c < ncalls; c++)
        for (int t = 0; t < T; t++) {
            int pool[24];
            for (int i = 0; i < span; i++) pool[i] = c * span + i;
            for (int k = 0; k < K; k++) { /* K distinct experts of the window */
                int j = k + (int)(rnd() * (span - k)), tmp = pool[k];
                pool[k] = pool[j], pool[j] = tmp;
                ids[(c * T + t) * K + k] = pool[k];
            }
        }
    double *ta = malloc(sizeof(double) * reps), *tb = malloc(sizeof(double) * reps);
    for (int i = 0; i < 10; i++) {
        const int32_t *id = ids + (i % ncalls) * T * K;
        lq_moe_ffn(ex, nexp, HID, INTER, x, T, K, id, w, oa);
        lq_moe_ffn_B(ex, nexp, HID, INTER, x, T, K, id, w, ob);
        if (memcmp(oa, ob, sizeof(float) * T * HID)) {
            printf("A and B give different results\n");
            return 1;
        }
    }
    for (int i = 0; i < reps; i++) { /* A and B take turns going first, each on other experts */
        const int32_t *i1 = ids + (i % ncalls) * T * K, *i2 = ids + ((i + ncalls / 2) % ncalls) * T * K;
        double t0 = now();
        if (i & 1) lq_moe_ffn(ex, nexp, HID, INTER, x, T, K, i1, w, oa);
        else lq_moe_ffn_B(ex, nexp, HID, INTER, x, T, K, i1, w, ob);
        double t1 = now();
        if (i & 1) lq_moe_ffn_B(ex, nexp, HID, INTER, x, T, K, i2, w, ob);
        else lq_moe_ffn(ex, nexp, HID, INTER, x, T, K, i2, w, oa);
        double t2 = now();
        ta[i] = i & 1 ? t1 - t0 : t2 - t1, tb[i] = i & 1 ? t2 - t1 : t1 - t0;
    }
    qsort(ta, reps, sizeof(double), cmpd), qsort(tb, reps, sizeof(double), cmpd);
    printf("T=%d, %d experts (%d distinct): A median %.0f us (IQR %.0f-%.0f), B median %.0f us (IQR %.0f-%.0f), "
           "B/A %.3f\n", T, nexp, ndist, ta[reps / 2] * 1e6, ta[reps / 4] * 1e6, ta[3 * reps / 4] * 1e6,
           tb[reps / 2] * 1e6, tb[reps / 4] * 1e6, tb[3 * reps / 4] * 1e6, tb[reps / 2] / ta[reps / 2]);
    return 0;
}
