/* The fused expert FFN: out[t] = sum_k w[t,k] * down_e(gelu_tanh(gate_e x[t]) * up_e x[t]).
 *
 * 1. Group the (token, slot) pairs by expert, so each expert's bytes are streamed once per call
 *    for all the tokens that chose it (the row kernels take up to 64 activation rows).
 * 2. Quantise every token's x to Q8_K once (K-quant gate_up) and gather each expert's tokens.
 * 3. Phase A, one work item per (expert, 64-row slice of the intermediate dimension): the gate
 *    and up rows of that slice and gelu(gate) * up. A top-8 batch of one token is 8 x 11 items,
 *    so every core streams weights and the last item costs little waiting. Then h -> Q8_K
 *    (K-quant down), padded with zeros to the down row length.
 * 4. Phase B, one work item per (expert, 256 output rows): a contiguous run of that expert's
 *    down bytes (long runs keep the hardware prefetchers streaming), into a per-pair buffer.
 * 5. Phase C: out[t] = sum of w * down over t's pairs in a fixed order, accumulated in double
 *    (each f32 product is exact there) and rounded to f32 once. Every value is computed by
 *    exactly one item in a fixed order, so results do not depend on the thread count.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define LQ_TCHUNK 64
#define LQ_GU_ROWS 64   /* intermediate rows (gate + up pairs) per phase-A item */
#define LQ_DOWN_ROWS 256 /* output rows per phase-B item (one expert's contiguous run) */

static int64_t pad256(int64_t n) { return (n + QK_K - 1) / QK_K * QK_K; }

static int valid_weight_fmt(int f) {
    return f == LQ_F32 || f == LQ_F16 || f == LQ_BF16 || f == LQ_Q4_K || f == LQ_Q6_K;
}

/* gelu with the tanh approximation, as torch's gelu(approximate="tanh") computes it in f32 */
static inline float gelu_tanh(float x) {
    const float beta = 0.7978845608028654f; /* sqrt(2 / pi) */
    const float kappa = 0.044715f;
    float inner = beta * (x + kappa * (x * x * x)); /* torch groups the cube first */
    return 0.5f * x * (1.f + tanhf(inner));
}

typedef struct {
    int32_t e;       /* expert id */
    int64_t p0, np;  /* its pairs: [p0, p0 + np) in pair order */
} group;

typedef struct {
    const lq_kernels *k;
    const lq_expert *experts;
    int64_t hidden, inter, hpad, ipad, nbh, nbi, n_slices;
    const group *groups;
    int64_t n_groups;
    const int32_t *pair_t;  /* token of each pair */
    const float *pair_w;    /* gate weight of each pair */
    const block_q8_K *xgq;  /* [np][nbh]: gathered Q8_K activations */
    const float *xgf;       /* [np][hidden]: gathered f32 activations */
    float *hf;              /* [np][ipad]: gelu(gate) * up, zero tail */
    block_q8_K *hq;         /* [np][nbi] */
    double *acc;            /* [T][hidden]: phase C's double sums */
    float *dn;              /* [np][hidden]: each pair's down projection, before weighting */
    int64_t np, n_down_slices;
    float *bf16_buf;        /* [threads][max(hidden, inter)]: a BF16 row widened to f32 */
    int64_t bf16_len;
} moe_job;

/* One weight row against n activation rows (n <= 64), any stored format. */
static void row_dot(const lq_kernels *k, int fmt, const uint8_t *w, int64_t ncols_f, int64_t nb,
                    const block_q8_K *xq, const float *xf, int64_t xf_stride, int n, float *out,
                    float *bf16_buf) {
    switch (fmt) {
    case LQ_Q4_K: k->dot_q4k(nb, w, xq, nb, n, out, 1); break;
    case LQ_Q6_K: k->dot_q6k(nb, w, xq, nb, n, out, 1); break;
    case LQ_F32: k->dot_f32(ncols_f, w, xf, xf_stride, n, out, 1); break;
    case LQ_F16: k->dot_f16(ncols_f, w, xf, xf_stride, n, out, 1); break;
    case LQ_BF16:
        for (int64_t i = 0; i < ncols_f; i++) {
            uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
            memcpy(&bf16_buf[i], &u, 4);
        }
        k->dot_f32(ncols_f, bf16_buf, xf, xf_stride, n, out, 1);
        break;
    }
}

static void phase_a(void *p, int64_t i0, int64_t i1, int tid) {
    moe_job *j = p;
    float g[LQ_TCHUNK], u[LQ_TCHUNK];
    float *buf = j->bf16_buf ? j->bf16_buf + tid * j->bf16_len : NULL;
    for (int64_t item = i0; item < i1; item++) {
        const group *gr = &j->groups[item / j->n_slices];
        const lq_expert *ex = &j->experts[gr->e];
        int64_t r0 = (item % j->n_slices) * LQ_GU_ROWS;
        int64_t r1 = r0 + LQ_GU_ROWS < j->inter ? r0 + LQ_GU_ROWS : j->inter;
        int fmt = ex->gate_up_fmt;
        int kq = lq_is_kquant(fmt);
        size_t rb = lq_row_bytes(fmt, kq ? j->hpad : j->hidden);
        for (int64_t c0 = 0; c0 < gr->np; c0 += LQ_TCHUNK) {
            int n = (int)(gr->np - c0 < LQ_TCHUNK ? gr->np - c0 : LQ_TCHUNK);
            int64_t pc = gr->p0 + c0;
            const block_q8_K *xq = kq ? j->xgq + pc * j->nbh : NULL;
            const float *xf = kq ? NULL : j->xgf + pc * j->hidden;
            for (int64_t r = r0; r < r1; r++) {
                const uint8_t *wg = (const uint8_t *)ex->gate_up + (size_t)r * rb;
                const uint8_t *wu = (const uint8_t *)ex->gate_up + (size_t)(r + j->inter) * rb;
                row_dot(j->k, fmt, wg, j->hidden, j->nbh, xq, xf, j->hidden, n, g, buf);
                row_dot(j->k, fmt, wu, j->hidden, j->nbh, xq, xf, j->hidden, n, u, buf);
                for (int q = 0; q < n; q++) j->hf[(pc + q) * j->ipad + r] = gelu_tanh(g[q]) * u[q];
            }
        }
    }
}

/* h -> Q8_K for the pairs whose expert has a K-quant down projection (rows of ipad values,
 * zero tail included) */
static void quantize_h(void *p, int64_t q0, int64_t q1, int tid) {
    (void)tid;
    moe_job *j = p;
    for (int64_t gi = 0; gi < j->n_groups; gi++) {
        const group *gr = &j->groups[gi];
        if (!lq_is_kquant(j->experts[gr->e].down_fmt)) continue;
        int64_t a = gr->p0 > q0 ? gr->p0 : q0, b = gr->p0 + gr->np < q1 ? gr->p0 + gr->np : q1;
        for (int64_t q = a; q < b; q++) j->k->quantize_q8k(j->hf + q * j->ipad, j->hq + q * j->nbi, j->ipad);
    }
}

/* Phase B: one item per (expert, slice of LQ_DOWN_ROWS output rows), written to that pair's
 * own row of dn, so each item streams one contiguous run of one expert's down bytes. */
static void phase_b(void *p, int64_t i0, int64_t i1, int tid) {
    moe_job *j = p;
    float d[LQ_TCHUNK];
    float *buf = j->bf16_buf ? j->bf16_buf + tid * j->bf16_len : NULL;
    for (int64_t item = i0; item < i1; item++) {
        const group *gr = &j->groups[item / j->n_down_slices];
        const lq_expert *ex = &j->experts[gr->e];
        int64_t r0 = (item % j->n_down_slices) * LQ_DOWN_ROWS;
        int64_t r1 = r0 + LQ_DOWN_ROWS < j->hidden ? r0 + LQ_DOWN_ROWS : j->hidden;
        int fmt = ex->down_fmt;
        int kq = lq_is_kquant(fmt);
        size_t rb = lq_row_bytes(fmt, kq ? j->ipad : j->inter);
        for (int64_t c0 = 0; c0 < gr->np; c0 += LQ_TCHUNK) {
            int n = (int)(gr->np - c0 < LQ_TCHUNK ? gr->np - c0 : LQ_TCHUNK);
            int64_t pc = gr->p0 + c0;
            const block_q8_K *xq = kq ? j->hq + pc * j->nbi : NULL;
            const float *xf = kq ? NULL : j->hf + pc * j->ipad;
            for (int64_t r = r0; r < r1; r++) {
                const uint8_t *w = (const uint8_t *)ex->down + (size_t)r * rb;
                row_dot(j->k, fmt, w, j->inter, j->nbi, xq, xf, j->ipad, n, d, buf);
                for (int q = 0; q < n; q++) j->dn[(pc + q) * j->hidden + r] = d[q];
            }
        }
    }
}

/* Phase C: acc[t] = sum over t's pairs of w * dn[pair], in pair order (fixed: experts ascending,
 * then slot order), in double, one item per slice of output rows. */
static void phase_c(void *p, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    moe_job *j = p;
    int64_t r0 = i0 * LQ_DOWN_ROWS, r1 = i1 * LQ_DOWN_ROWS < j->hidden ? i1 * LQ_DOWN_ROWS : j->hidden;
    for (int64_t q = 0; q < j->np; q++) {
        double *o = j->acc + (int64_t)j->pair_t[q] * j->hidden;
        const float *dq = j->dn + q * j->hidden;
        const double wq = j->pair_w[q];
        for (int64_t r = r0; r < r1; r++) o[r] += wq * (double)dq[r];
    }
}

int lq_moe_ffn(const lq_expert *experts, int32_t n_experts, int64_t hidden, int64_t inter, const float *x,
               int64_t T, int32_t K, const int32_t *ids, const float *weights, float *out) {
    return lq_moe_ffn64(experts, n_experts, hidden, inter, x, T, K, ids, weights, out, NULL);
}

int lq_moe_ffn64(const lq_expert *experts, int32_t n_experts, int64_t hidden, int64_t inter, const float *x,
                 int64_t T, int32_t K, const int32_t *ids, const float *weights, float *out, double *out64) {
    if (hidden < 1 || inter < 1 || T < 1 || K < 0 || n_experts < 0) return LQ_E_SHAPE;
    memset(out, 0, (size_t)(T * hidden) * sizeof(float));
    if (out64) memset(out64, 0, (size_t)(T * hidden) * sizeof(double));
    /* validate every slot before touching any weight */
    int any_kq_gu = 0, any_f_gu = 0, any_kq_down = 0, any_bf16 = 0;
    for (int64_t s = 0; s < T * K; s++) {
        int32_t e = ids[s];
        if (e < 0) continue;
        if (e >= n_experts || !experts[e].gate_up || !experts[e].down) return LQ_E_EXPERT;
        if (!valid_weight_fmt(experts[e].gate_up_fmt) || !valid_weight_fmt(experts[e].down_fmt))
            return LQ_E_FORMAT;
        if (lq_is_kquant(experts[e].gate_up_fmt)) any_kq_gu = 1; else any_f_gu = 1;
        if (lq_is_kquant(experts[e].down_fmt)) any_kq_down = 1;
        if (experts[e].gate_up_fmt == LQ_BF16 || experts[e].down_fmt == LQ_BF16) any_bf16 = 1;
    }
    moe_job j = {0};
    j.k = lq_active_kernels();
    j.experts = experts;
    j.hidden = hidden;
    j.inter = inter;
    j.hpad = pad256(hidden);
    j.ipad = pad256(inter);
    j.nbh = j.hpad / QK_K;
    j.nbi = j.ipad / QK_K;
    j.n_slices = (inter + LQ_GU_ROWS - 1) / LQ_GU_ROWS;

    /* group pairs by expert (counting sort keeps slot order within an expert) */
    int64_t *start = calloc((size_t)n_experts + 1, sizeof(int64_t));
    int64_t np = 0;
    if (!start) return LQ_E_NOMEM;
    for (int64_t s = 0; s < T * K; s++)
        if (ids[s] >= 0) start[ids[s] + 1]++, np++;
    if (np == 0) {
        free(start);
        return LQ_OK;
    }
    int64_t n_groups = 0;
    for (int32_t e = 0; e < n_experts; e++) {
        if (start[e + 1]) n_groups++;
        start[e + 1] += start[e];
    }
    int32_t *pair_t = malloc((size_t)np * sizeof(int32_t));
    float *pair_w = malloc((size_t)np * sizeof(float));
    group *groups = malloc((size_t)n_groups * sizeof(group));
    int64_t *fill = malloc((size_t)n_experts * sizeof(int64_t));
    block_q8_K *xq = any_kq_gu ? malloc((size_t)(T * j.nbh) * sizeof(block_q8_K)) : NULL;
    block_q8_K *xgq = any_kq_gu ? malloc((size_t)(np * j.nbh) * sizeof(block_q8_K)) : NULL;
    float *xgf = any_f_gu ? malloc((size_t)(np * hidden) * sizeof(float)) : NULL;
    float *hf = calloc((size_t)(np * j.ipad), sizeof(float));
    float *dn = malloc((size_t)(np * hidden) * sizeof(float));
    double *acc = out64 ? out64 : calloc((size_t)(T * hidden), sizeof(double));
    block_q8_K *hq = any_kq_down ? malloc((size_t)(np * j.nbi) * sizeof(block_q8_K)) : NULL;
    float *pad = any_kq_gu && j.hpad != hidden ? calloc((size_t)j.hpad, sizeof(float)) : NULL;
    j.bf16_len = hidden > inter ? hidden : inter;
    /* sized for the most threads the pool can ever have, so a concurrent resize cannot outgrow it
     * (untouched pages cost nothing) */
    float *bf16_buf = any_bf16 ? malloc((size_t)(LQ_MAX_THREADS * j.bf16_len) * sizeof(float)) : NULL;
    int rc = LQ_OK;
    if ((any_bf16 && !bf16_buf) || !pair_t || !pair_w || !groups || !fill || (any_kq_gu && (!xq || !xgq)) || (any_f_gu && !xgf) || !hf || !dn || !acc ||
        (any_kq_down && !hq) || (any_kq_gu && j.hpad != hidden && !pad)) {
        rc = LQ_E_NOMEM;
        goto done;
    }
    memcpy(fill, start, (size_t)n_experts * sizeof(int64_t));
    for (int64_t s = 0; s < T * K; s++) {
        int32_t e = ids[s];
        if (e < 0) continue;
        int64_t q = fill[e]++;
        pair_t[q] = (int32_t)(s / K);
        pair_w[q] = weights[s];
    }
    for (int32_t e = 0, g = 0; e < n_experts; e++)
        if (start[e + 1] > start[e]) groups[g++] = (group){e, start[e], start[e + 1] - start[e]};

    /* activations: Q8_K once per token, then gathered in pair order */
    if (any_kq_gu) {
        for (int64_t t = 0; t < T; t++) {
            const float *xt = x + t * hidden;
            if (pad) {
                memcpy(pad, xt, (size_t)hidden * sizeof(float));
                xt = pad;
            }
            j.k->quantize_q8k(xt, xq + t * j.nbh, j.hpad);
        }
        for (int64_t q = 0; q < np; q++)
            memcpy(xgq + q * j.nbh, xq + (int64_t)pair_t[q] * j.nbh, (size_t)j.nbh * sizeof(block_q8_K));
    }
    if (any_f_gu)
        for (int64_t q = 0; q < np; q++)
            memcpy(xgf + q * hidden, x + (int64_t)pair_t[q] * hidden, (size_t)hidden * sizeof(float));

    j.groups = groups;
    j.n_groups = n_groups;
    j.pair_t = pair_t;
    j.pair_w = pair_w;
    j.xgq = xgq;
    j.xgf = xgf;
    j.hf = hf;
    j.hq = hq;
    j.bf16_buf = bf16_buf;
    lq_parallel_for(n_groups * j.n_slices, 1, phase_a, &j);
    if (any_kq_down) lq_parallel_for(np, 16, quantize_h, &j); /* 16 pairs or fewer: inline */
    j.dn = dn;
    j.np = np;
    j.n_down_slices = (hidden + LQ_DOWN_ROWS - 1) / LQ_DOWN_ROWS;
    lq_parallel_for(n_groups * j.n_down_slices, 1, phase_b, &j);
    j.acc = acc;
    lq_parallel_for(j.n_down_slices, np * LQ_DOWN_ROWS >= 65536 ? 1 : j.n_down_slices, phase_c, &j);
    for (int64_t i = 0; i < T * hidden; i++) out[i] = (float)acc[i];
done:
    free(start);
    free(pair_t);
    free(pair_w);
    free(groups);
    free(fill);
    free(xq);
    free(xgq);
    free(xgf);
    free(hf);
    free(dn);
    if (acc != out64) free(acc);
    free(hq);
    free(pad);
    free(bf16_buf);
    return rc;
}
