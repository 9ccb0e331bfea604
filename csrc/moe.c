/* The fused expert FFN: out[t] = sum_k w[t,k] * down_e(gelu_tanh(gate_e x[t]) * up_e x[t]).
 *
 * 1. Group the (token, slot) pairs by expert, so each expert's bytes are streamed once per call
 *    for all the tokens that chose it (the row kernels take up to LQ_MAX_T activation rows).
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
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define LQ_GU_ROWS 64   /* intermediate rows (gate + up pairs) per phase-A item */
#define LQ_DOWN_ROWS 256 /* output rows per phase-B item (one expert's contiguous run) */

static int64_t pad256(int64_t n) { return (n + QK_K - 1) / QK_K * QK_K; }

typedef struct {
    int32_t e;       /* expert id */
    int64_t p0, np;  /* its pairs: [p0, p0 + np) in pair order */
} group;

/* What the call needs to know about its slots before allocating anything. */
typedef struct {
    int64_t np;            /* (token, slot) pairs with an expert */
    int64_t n_groups;      /* distinct experts */
    int any_kq_gu, any_f_gu, any_kq_down;
} moe_census;

/* Every buffer of one lq_moe_ffn call: carved from one block, allocated together, freed together. */
typedef struct {
    int64_t *start;        /* [n_experts + 1]: counting-sort offsets of each expert's pairs */
    int64_t *fill;         /* [n_experts] */
    group *groups;         /* [n_groups] */
    int32_t *pair_t;       /* [np]: token of each pair */
    float *pair_w;         /* [np]: gate weight of each pair */
    block_q8_K *xq;        /* [T][nbh]: each token's x in Q8_K (K-quant gate_up only) */
    block_q8_K *xgq;       /* [np][nbh]: gathered in pair order */
    float *xgf;            /* [np][hidden]: gathered f32 activations (float gate_up only) */
    float *pad;            /* [hpad]: one x row padded with zeros to whole blocks */
    float *hf;             /* [np][ipad]: gelu(gate) * up, zero tail */
    block_q8_K *hq;        /* [np][nbi]: hf in Q8_K (K-quant down only) */
    float *dn;             /* [np][hidden]: each pair's down projection, before weighting */
    double *acc;           /* [T][hidden]: phase C's sums when the caller gives no out64 */
    void *block;           /* what the buffers are carved from */
    int kept;              /* block is kept_block (this call holds kept_busy) */
} moe_scratch;

/* One block kept from call to call (up to LQ_SCRATCH_KEEP bytes) for whichever call finds it
 * free; a concurrent call allocates its own. Allocated per call (malloc / calloc, ~1.4 MiB at
 * T = 8), glibc handed the pages back and every call took ~330 page faults (perf stat), on
 * the single-threaded path before and after the parallel phases: the T = 8 expert FFN spent
 * ~0.3-0.5 ms of ~6-8 ms in allocation, gathering into fresh pages and phase C's first touch of
 * acc. The kept block is never freed (at most LQ_SCRATCH_KEEP bytes for the process). */
#define LQ_SCRATCH_KEEP ((size_t)16 << 20)
static void *kept_block;
static size_t kept_size;
static atomic_flag kept_busy = ATOMIC_FLAG_INIT;

static void scratch_free(moe_scratch *s) {
    if (s->kept)
        atomic_flag_clear_explicit(&kept_busy, memory_order_release);
    else
        free(s->block);
    memset(s, 0, sizeof *s);
}

static size_t carve(size_t *off, size_t bytes) { /* 64-byte aligned offsets */
    size_t o = *off;
    *off = o + (bytes + 63) / 64 * 64;
    return o;
}

/* All or nothing: LQ_OK with every buffer the census asks for, or LQ_E_NOMEM with none.
 * Zeroed where a phase relies on zeros: start, pad, hf's tail and acc. */
static int scratch_alloc(moe_scratch *s, const moe_census *c, int32_t n_experts, int64_t T, int64_t hidden,
                         int64_t hpad, int64_t inter, int64_t ipad, int want_acc) {
    int64_t nbh = hpad / QK_K, nbi = ipad / QK_K, np = c->np;
    size_t off = 0, o_xq = 0, o_xgq = 0, o_pad = 0, o_xgf = 0, o_hq = 0, o_acc = 0;
    size_t o_start = carve(&off, ((size_t)n_experts + 1) * sizeof(int64_t));
    size_t o_fill = carve(&off, ((size_t)n_experts + 1) * sizeof(int64_t));
    size_t o_groups = carve(&off, (size_t)c->n_groups * sizeof(group));
    size_t o_pair_t = carve(&off, (size_t)np * sizeof(int32_t));
    size_t o_pair_w = carve(&off, (size_t)np * sizeof(float));
    size_t o_hf = carve(&off, (size_t)(np * ipad) * sizeof(float));
    size_t o_dn = carve(&off, (size_t)(np * hidden) * sizeof(float));
    if (c->any_kq_gu) {
        o_xq = carve(&off, (size_t)(T * nbh) * sizeof(block_q8_K));
        o_xgq = carve(&off, (size_t)(np * nbh) * sizeof(block_q8_K));
        if (hpad != hidden) o_pad = carve(&off, (size_t)hpad * sizeof(float));
    }
    if (c->any_f_gu) o_xgf = carve(&off, (size_t)(np * hidden) * sizeof(float));
    if (c->any_kq_down) o_hq = carve(&off, (size_t)(np * nbi) * sizeof(block_q8_K));
    if (want_acc) o_acc = carve(&off, (size_t)(T * hidden) * sizeof(double));

    memset(s, 0, sizeof *s);
    uint8_t *m = NULL;
    int kept = 0;
    if (off <= LQ_SCRATCH_KEEP && !atomic_flag_test_and_set_explicit(&kept_busy, memory_order_acquire)) {
        if (kept_size < off) {
            void *grown = NULL;
            if (posix_memalign(&grown, 64, off) == 0) {
                free(kept_block);
                kept_block = grown, kept_size = off;
            }
        }
        if (kept_size >= off) m = kept_block, kept = 1;
        else atomic_flag_clear_explicit(&kept_busy, memory_order_release);
    }
    if (!m) {
        void *fresh = NULL;
        if (posix_memalign(&fresh, 64, off ? off : 64) != 0) return LQ_E_NOMEM;
        m = fresh;
    }
    s->block = m;
    s->kept = kept;
    s->start = (int64_t *)(m + o_start), s->fill = (int64_t *)(m + o_fill), s->groups = (group *)(m + o_groups);
    s->pair_t = (int32_t *)(m + o_pair_t), s->pair_w = (float *)(m + o_pair_w);
    s->hf = (float *)(m + o_hf), s->dn = (float *)(m + o_dn);
    memset(s->start, 0, ((size_t)n_experts + 1) * sizeof(int64_t));
    if (ipad != inter) /* phase A writes [0, inter) of every row; the tail must be 0 */
        for (int64_t q = 0; q < np; q++) memset(s->hf + q * ipad + inter, 0, (size_t)(ipad - inter) * sizeof(float));
    if (c->any_kq_gu) {
        s->xq = (block_q8_K *)(m + o_xq), s->xgq = (block_q8_K *)(m + o_xgq);
        if (hpad != hidden) {
            s->pad = (float *)(m + o_pad);
            memset(s->pad, 0, (size_t)hpad * sizeof(float));
        }
    }
    if (c->any_f_gu) s->xgf = (float *)(m + o_xgf);
    if (c->any_kq_down) s->hq = (block_q8_K *)(m + o_hq);
    if (want_acc) {
        s->acc = (double *)(m + o_acc);
        memset(s->acc, 0, (size_t)(T * hidden) * sizeof(double));
    }
    return LQ_OK;
}

typedef struct {
    const lq_kernels *k;
    const lq_expert *experts;
    int64_t hidden, inter, hpad, ipad, nbh, nbi, n_slices, n_down_slices;
    const moe_scratch *s;
    int64_t n_groups, np;
    double *acc; /* [T][hidden]: phase C's double sums (each f32 product is exact there) */
} moe_job;

/* n_rows consecutive weight rows against n activation rows (n <= LQ_MAX_T) through the table's
 * kernels (lq_dot_rows): Q8_K activations (xq, blocks of the padded row) for K-quant rows, f32
 * (xf) otherwise. Row r, column q goes to out[r * out_row_stride + q * out_stride]. */
static void rows_dot(const lq_kernels *k, int fmt, const uint8_t *w, size_t row_bytes, int64_t n_rows,
                     int64_t n_values, int64_t nb, const block_q8_K *xq, const float *xf, int64_t xf_stride, int n,
                     float *out, int64_t out_row_stride, int64_t out_stride) {
    if (lq_is_kquant(fmt))
        lq_dot_rows(k, fmt, nb, w, row_bytes, n_rows, xq, nb, n, out, out_row_stride, out_stride);
    else
        lq_dot_rows(k, fmt, n_values, w, row_bytes, n_rows, xf, xf_stride, n, out, out_row_stride, out_stride);
}

/* What one phase-A or phase-B work item reads: rows [r0, r1) of one expert's gate_up (down = 0)
 * or down projection, item = group * n_slices + slice. */
typedef struct {
    const group *gr;
    const uint8_t *w; /* the projection's first row */
    size_t rb;        /* bytes per row */
    int fmt, kq;
    int64_t r0, r1;
} moe_slice;

static moe_slice slice_of(const moe_job *j, int64_t item, int64_t n_slices, int64_t rows_per, int64_t rows,
                          int down) {
    const group *gr = &j->s->groups[item / n_slices];
    const lq_expert *ex = &j->experts[gr->e];
    int fmt = down ? ex->down_fmt : ex->gate_up_fmt, kq = lq_is_kquant(fmt);
    int64_t len = down ? (kq ? j->ipad : j->inter) : (kq ? j->hpad : j->hidden);
    int64_t r0 = (item % n_slices) * rows_per, r1 = r0 + rows_per < rows ? r0 + rows_per : rows;
    return (moe_slice){gr, down ? ex->down : ex->gate_up, lq_row_bytes(fmt, len), fmt, kq, r0, r1};
}

/* Phase A: one item per (expert, LQ_GU_ROWS slice of the intermediate rows): gate and up rows
 * of that slice against the expert's tokens, then gelu(gate) * up into hf. */
static void phase_a(void *p, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    moe_job *j = p;
    const moe_scratch *s = j->s;
    /* [column][row of the slice]: a column's gate and up values contiguous for the gelu loop */
    float g[LQ_MAX_T * LQ_GU_ROWS], u[LQ_MAX_T * LQ_GU_ROWS];
    for (int64_t item = i0; item < i1; item++) {
        moe_slice sl = slice_of(j, item, j->n_slices, LQ_GU_ROWS, j->inter, 0);
        for (int64_t c0 = 0; c0 < sl.gr->np; c0 += LQ_MAX_T) {
            int n = (int)(sl.gr->np - c0 < LQ_MAX_T ? sl.gr->np - c0 : LQ_MAX_T);
            int64_t pc = sl.gr->p0 + c0;
            const block_q8_K *xq = sl.kq ? s->xgq + pc * j->nbh : NULL;
            const float *xf = sl.kq ? NULL : s->xgf + pc * j->hidden;
            const uint8_t *wg = sl.w + (size_t)sl.r0 * sl.rb, *wu = sl.w + (size_t)(sl.r0 + j->inter) * sl.rb;
            rows_dot(j->k, sl.fmt, wg, sl.rb, sl.r1 - sl.r0, j->hidden, j->nbh, xq, xf, j->hidden, n, g, 1, LQ_GU_ROWS);
            rows_dot(j->k, sl.fmt, wu, sl.rb, sl.r1 - sl.r0, j->hidden, j->nbh, xq, xf, j->hidden, n, u, 1, LQ_GU_ROWS);
            for (int q = 0; q < n; q++)
                j->k->gelu_mul(g + q * LQ_GU_ROWS, u + q * LQ_GU_ROWS, sl.r1 - sl.r0, s->hf + (pc + q) * j->ipad + sl.r0);
        }
    }
}

/* h -> Q8_K for the pairs whose expert has a K-quant down projection (rows of ipad values,
 * zero tail included) */
static void quantize_h(void *p, int64_t q0, int64_t q1, int tid) {
    (void)tid;
    moe_job *j = p;
    const moe_scratch *s = j->s;
    for (int64_t gi = 0; gi < j->n_groups; gi++) {
        const group *gr = &s->groups[gi];
        if (!lq_is_kquant(j->experts[gr->e].down_fmt)) continue;
        int64_t a = gr->p0 > q0 ? gr->p0 : q0, b = gr->p0 + gr->np < q1 ? gr->p0 + gr->np : q1;
        for (int64_t q = a; q < b; q++) j->k->quantize_q8k(s->hf + q * j->ipad, s->hq + q * j->nbi, j->ipad);
    }
}

/* Phase B: one item per (expert, slice of LQ_DOWN_ROWS output rows), written to that pair's
 * own row of dn, so each item streams one contiguous run of one expert's down bytes. */
static void phase_b(void *p, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    moe_job *j = p;
    const moe_scratch *s = j->s;
    for (int64_t item = i0; item < i1; item++) {
        moe_slice sl = slice_of(j, item, j->n_down_slices, LQ_DOWN_ROWS, j->hidden, 1);
        for (int64_t c0 = 0; c0 < sl.gr->np; c0 += LQ_MAX_T) {
            int n = (int)(sl.gr->np - c0 < LQ_MAX_T ? sl.gr->np - c0 : LQ_MAX_T);
            int64_t pc = sl.gr->p0 + c0;
            const block_q8_K *xq = sl.kq ? s->hq + pc * j->nbi : NULL;
            const float *xf = sl.kq ? NULL : s->hf + pc * j->ipad;
            rows_dot(j->k, sl.fmt, sl.w + (size_t)sl.r0 * sl.rb, sl.rb, sl.r1 - sl.r0, j->inter, j->nbi, xq, xf,
                     j->ipad, n, s->dn + pc * j->hidden + sl.r0, 1, j->hidden);
        }
    }
}

/* Phase C: acc[t] = sum over t's pairs of w * dn[pair], in pair order (fixed: experts ascending,
 * then slot order), in double, one item per slice of output rows. */
static void phase_c(void *p, int64_t i0, int64_t i1, int tid) {
    (void)tid;
    moe_job *j = p;
    const moe_scratch *s = j->s;
    int64_t r0 = i0 * LQ_DOWN_ROWS, r1 = i1 * LQ_DOWN_ROWS < j->hidden ? i1 * LQ_DOWN_ROWS : j->hidden;
    for (int64_t q = 0; q < j->np; q++) {
        double *o = j->acc + (int64_t)s->pair_t[q] * j->hidden;
        const float *dq = s->dn + q * j->hidden;
        const double wq = s->pair_w[q];
        for (int64_t r = r0; r < r1; r++) o[r] += wq * (double)dq[r];
    }
}

/* Check every slot before touching any weight, and count what the call will need. */
static int census(const lq_expert *experts, int32_t n_experts, const int32_t *ids, int64_t n_slots,
                  moe_census *c) {
    memset(c, 0, sizeof *c);
    uint8_t seen_stack[256], *seen = n_experts <= 256 ? seen_stack : calloc((size_t)n_experts, 1);
    if (!seen) return LQ_E_NOMEM;
    if (seen == seen_stack) memset(seen, 0, sizeof seen_stack);
    int rc = LQ_OK;
    for (int64_t s = 0; s < n_slots && rc == LQ_OK; s++) {
        int32_t e = ids[s];
        if (e < 0) continue;
        if (e >= n_experts || !experts[e].gate_up || !experts[e].down) {
            rc = LQ_E_EXPERT;
        } else if (!lq_is_weight_fmt(experts[e].gate_up_fmt) || !lq_is_weight_fmt(experts[e].down_fmt)) {
            rc = LQ_E_FORMAT;
        } else {
            if (lq_is_kquant(experts[e].gate_up_fmt)) c->any_kq_gu = 1; else c->any_f_gu = 1;
            if (lq_is_kquant(experts[e].down_fmt)) c->any_kq_down = 1;
            c->np++;
            if (!seen[e]) seen[e] = 1, c->n_groups++;
        }
    }
    if (seen != seen_stack) free(seen);
    return rc;
}

/* Pairs grouped by expert (a counting sort keeps slot order within an expert). */
static void group_pairs(moe_scratch *s, int32_t n_experts, const int32_t *ids, const float *weights,
                        int64_t n_slots, int32_t K) {
    for (int64_t i = 0; i < n_slots; i++)
        if (ids[i] >= 0) s->start[ids[i] + 1]++;
    for (int32_t e = 0, g = 0; e < n_experts; e++) {
        if (s->start[e + 1]) s->groups[g++] = (group){e, s->start[e], s->start[e + 1]};
        s->start[e + 1] += s->start[e];
    }
    memcpy(s->fill, s->start, (size_t)n_experts * sizeof(int64_t));
    for (int64_t i = 0; i < n_slots; i++) {
        int32_t e = ids[i];
        if (e < 0) continue;
        int64_t q = s->fill[e]++;
        s->pair_t[q] = (int32_t)(i / K);
        s->pair_w[q] = weights[i];
    }
}

/* Activations in pair order: Q8_K once per token (or the caller's Q8_K rows) then gathered
 * (K-quant gate_up), and f32 (float gate_up). */
static void gather_inputs(moe_scratch *s, const lq_kernels *k, const moe_census *c, const float *x,
                          const void *xq_in, int64_t T, int64_t hidden, int64_t hpad) {
    int64_t nbh = hpad / QK_K;
    if (c->any_kq_gu && !xq_in) {
        for (int64_t t = 0; t < T; t++) {
            const float *xt = x + t * hidden;
            if (s->pad) {
                memcpy(s->pad, xt, (size_t)hidden * sizeof(float));
                xt = s->pad;
            }
            k->quantize_q8k(xt, s->xq + t * nbh, hpad);
        }
    }
    /* the caller's blocks are used as they are; read as bytes: they may lie at any address in a
     * frame received from the wire */
    const uint8_t *xq = xq_in ? (const uint8_t *)xq_in : (const uint8_t *)s->xq;
    const size_t row = (size_t)nbh * sizeof(block_q8_K);
    if (c->any_kq_gu)
        for (int64_t q = 0; q < c->np; q++) memcpy(s->xgq + q * nbh, xq + (size_t)s->pair_t[q] * row, row);
    if (c->any_f_gu)
        for (int64_t q = 0; q < c->np; q++)
            memcpy(s->xgf + q * hidden, x + (int64_t)s->pair_t[q] * hidden, (size_t)hidden * sizeof(float));
}

int lq_moe_ffn(const lq_expert *experts, int32_t n_experts, int64_t hidden, int64_t inter, const float *x,
               int64_t T, int32_t K, const int32_t *ids, const float *weights, float *out) {
    return lq_moe_ffn64(experts, n_experts, hidden, inter, x, T, K, ids, weights, out, NULL);
}

/* x (f32) or xq (Q8_K, K-quant gate_up only): the two entry points below. */
static int moe_ffn(const lq_expert *experts, int32_t n_experts, int64_t hidden, int64_t inter, const float *x,
                   const void *xq, int64_t T, int32_t K, const int32_t *ids, const float *weights, float *out,
                   double *out64) {
    if (hidden < 1 || inter < 1 || T < 1 || K < 0 || n_experts < 0) return LQ_E_SHAPE;
    memset(out, 0, (size_t)(T * hidden) * sizeof(float));
    if (out64) memset(out64, 0, (size_t)(T * hidden) * sizeof(double));
    moe_census c;
    int rc = census(experts, n_experts, ids, T * K, &c);
    if (rc != LQ_OK) return rc;
    if (xq && c.any_f_gu) return LQ_E_FORMAT; /* a float gate_up needs the f32 activations */
    if (c.np == 0) return LQ_OK;
    moe_job j = {.k = lq_active_kernels(), .experts = experts, .hidden = hidden, .inter = inter,
                 .hpad = pad256(hidden), .ipad = pad256(inter), .n_groups = c.n_groups, .np = c.np};
    j.nbh = j.hpad / QK_K;
    j.nbi = j.ipad / QK_K;
    j.n_slices = (inter + LQ_GU_ROWS - 1) / LQ_GU_ROWS;
    j.n_down_slices = (hidden + LQ_DOWN_ROWS - 1) / LQ_DOWN_ROWS;
    moe_scratch s;
    if (scratch_alloc(&s, &c, n_experts, T, hidden, j.hpad, inter, j.ipad, !out64) != LQ_OK) return LQ_E_NOMEM;
    j.acc = out64 ? out64 : s.acc;
    j.s = &s;

    group_pairs(&s, n_experts, ids, weights, T * K, K);
    gather_inputs(&s, j.k, &c, x, xq, T, hidden, j.hpad);
    /* Items handed out guided, like matmul's rows: each thread first takes a long run of
     * consecutive items (one expert's slices, contiguous bytes), which the prefetchers stream,
     * and the short last claims balance the threads. Against one item per claim (which
     * alternated the slices between the threads), 256 MiB bank, 2 threads, Zen 5, 6 A/B pairs:
     * T = 8 median 2.37 ms against 2.57, T = 1 0.67 against 0.69. */
    lq_parallel_for_guided(c.n_groups * j.n_slices, 1, phase_a, &j);
    if (c.any_kq_down) lq_parallel_for(c.np, 16, quantize_h, &j); /* 16 pairs or fewer: inline */
    lq_parallel_for_guided(c.n_groups * j.n_down_slices, 1, phase_b, &j);
    lq_parallel_for(j.n_down_slices, c.np * LQ_DOWN_ROWS >= 65536 ? 1 : j.n_down_slices, phase_c, &j);
    for (int64_t i = 0; i < T * hidden; i++) out[i] = (float)j.acc[i];
    scratch_free(&s);
    return LQ_OK;
}

int lq_moe_ffn64(const lq_expert *experts, int32_t n_experts, int64_t hidden, int64_t inter, const float *x,
                 int64_t T, int32_t K, const int32_t *ids, const float *weights, float *out, double *out64) {
    return moe_ffn(experts, n_experts, hidden, inter, x, NULL, T, K, ids, weights, out, out64);
}

int lq_moe_ffn64_q8k(const lq_expert *experts, int32_t n_experts, int64_t hidden, int64_t inter, const void *xq,
                     int64_t T, int32_t K, const int32_t *ids, const float *weights, float *out, double *out64) {
    if (!xq) return LQ_E_SHAPE;
    return moe_ffn(experts, n_experts, hidden, inter, NULL, xq, T, K, ids, weights, out, out64);
}
