/* Independent decoders for the C tests: a second reading of the block layouts in kernels.h,
 * written from the format description rather than from kernels_scalar.c, used for the error
 * bounds and for a double-precision value of each dot product. */
#ifndef LARQL_TESTS_BLOCKS_REF_H
#define LARQL_TESTS_BLOCKS_REF_H

#include <math.h>
#include <stdlib.h>

#include "kernels.h"

/* value i = dq[i] - mq[i]: d * scale * q and dmin * min. Both are exact in f32 (at most 11 + 6 + 4
 * significant bits), as is every Q6_K value (11 + 7 + 5: |scale| <= 128, |q - 32| <= 32). */
static void q4k_decode(const block_q4_K *b, float *dq, float *mq) {
    const uint8_t *s = b->scales;
    float d = lq_fp16_to_fp32(b->d), dmin = lq_fp16_to_fp32(b->dmin);
    for (int j = 0; j < 8; j++) {
        int sc, m;
        if (j < 4) {
            sc = s[j] & 63;
            m = s[j + 4] & 63;
        } else {
            sc = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4;
            m = (s[j + 4] >> 4) | (s[j] >> 6) << 4;
        }
        for (int l = 0; l < 32; l++) {
            uint8_t byte = b->qs[32 * (j / 2) + l];
            int q = (j & 1) ? byte >> 4 : byte & 15;
            dq[32 * j + l] = d * sc * q;
            mq[32 * j + l] = dmin * m;
        }
    }
}

static void q6k_decode(const block_q6_K *b, float *v) {
    float d = lq_fp16_to_fp32(b->d);
    for (int i = 0; i < QK_K; i++) {
        int h = i / 128, r = i % 128, l = r % 32, k = r / 32; /* k: which of the 4 fields */
        int lo = (b->ql[64 * h + l + 32 * (k & 1)] >> (4 * (k >> 1))) & 15;
        int hi = (b->qh[32 * h + l] >> (2 * k)) & 3;
        v[i] = d * b->scales[i / 16] * ((lo | hi << 4) - 32);
    }
}

/* One K-quant weight row (nb blocks) against one Q8_K activation row, in double:
 * *val = the dot product, *mag = the sum of |every term a kernel may round|:
 * |xd| (|d sc q| + |dmin m|) |q8| per value (Q4_K), |xd d sc (q - 32)| |q8| (Q6_K). */
static void ref_q_row(int fmt, const void *row, int64_t nb, const block_q8_K *x, double *mag, double *val) {
    float dq[QK_K], mq[QK_K] = {0};
    *mag = *val = 0.0;
    for (int64_t i = 0; i < nb; i++) {
        if (fmt == LQ_Q4_K) q4k_decode((const block_q4_K *)row + i, dq, mq);
        else q6k_decode((const block_q6_K *)row + i, dq);
        for (int l = 0; l < QK_K; l++) {
            *mag += fabs((double)x[i].d) * (fabs((double)dq[l]) + fabs((double)mq[l])) * abs(x[i].qs[l]);
            *val += (double)x[i].d * ((double)dq[l] - (double)mq[l]) * x[i].qs[l];
        }
    }
}

#endif
