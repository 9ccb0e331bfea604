/* Vector glue of one decoder layer, fused so a decode step makes one call per step instead of
 * a handful of numpy passes (each of which pays Python overhead and cold caches after a large
 * matmul). Everything is f32 with the formulas the model uses (see larql/models/gemma4.py):
 *
 *   rms_norm(x, w) = x / sqrt(mean(x^2) + eps) * w            (w NULL: no weight)
 *   gelu_tanh(g)   = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
 *   RoPE           = neox rotate-half: (x1 c - x2 s, x2 c + x1 s)
 *
 * Plain C on the calling thread (these loops are short: the pool's wake-up would cost more),
 * except the decode attention, which is long enough to split. (The logit soft-cap stays in
 * numpy: libm's tanhf is ~5x slower than numpy's vectorised tanh, even on two threads.) Sums use eight partial accumulators so the compiler can vectorise
 * them without -ffast-math. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "larql.h"

static float dot_f32(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static void norm_row(const float *x, const float *w, float eps, int64_t n, float *y) {
    float r = sqrtf(dot_f32(x, x, n) * (1.0f / (float)n) + eps);
    if (w)
        for (int64_t i = 0; i < n; i++) y[i] = x[i] / r * w[i];
    else
        for (int64_t i = 0; i < n; i++) y[i] = x[i] / r;
}

int lq_rms_norm(const float *x, const float *w, float eps, int64_t rows, int64_t n, float *y) {
    if (rows < 0 || n < 1) return LQ_E_SHAPE;
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * n, w, eps, n, y + r * n);
    return LQ_OK;
}

int lq_rms_norm_q8k(const float *x, const float *w, float eps, int64_t rows, int64_t n, void *out) {
    if (rows < 0 || n < 1) return LQ_E_SHAPE;
    const int64_t padded = (n + QK_K - 1) / QK_K * QK_K;
    float *row = calloc((size_t)padded, sizeof(float)); /* the zero tail stays zero */
    if (!row) return LQ_E_NOMEM;
    const lq_kernels *k = lq_active_kernels();
    for (int64_t r = 0; r < rows; r++) {
        norm_row(x + r * n, w, eps, n, row);
        k->quantize_q8k(row, (block_q8_K *)out + r * (padded / QK_K), padded);
    }
    free(row);
    return LQ_OK;
}

int lq_norm_rope(float *x, const float *w, float eps, int64_t T, int64_t heads, int64_t d,
                 const float *cos_t, const float *sin_t) {
    if (T < 0 || heads < 1 || d < 2 || d % 2) return LQ_E_SHAPE;
    int64_t half = d / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + t * half, *s = sin_t + t * half;
        for (int64_t h = 0; h < heads; h++) {
            float *row = x + (t * heads + h) * d;
            norm_row(row, w, eps, d, row);
            for (int64_t i = 0; i < half; i++) {
                float x1 = row[i], x2 = row[i + half];
                row[i] = x1 * c[i] - x2 * s[i];
                row[i + half] = x2 * c[i] + x1 * s[i];
            }
        }
    }
    return LQ_OK;
}

int lq_gelu_mul(const float *gate, const float *up, int64_t n, float *out) {
    if (n < 0) return LQ_E_SHAPE;
    /* the experts' gelu (kernels.h), so a dense MLP and an expert round alike */
    lq_active_kernels()->gelu_mul(gate, up, n, out);
    return LQ_OK;
}

int lq_add_rms_norm(float *h, const float *a, const float *w, float eps, int64_t rows, int64_t n) {
    if (rows < 0 || n < 1) return LQ_E_SHAPE;
    for (int64_t r = 0; r < rows; r++) {
        const float *ar = a + r * n;
        float *hr = h + r * n;
        float rms = sqrtf(dot_f32(ar, ar, n) * (1.0f / (float)n) + eps);
        for (int64_t i = 0; i < n; i++) hr[i] += ar[i] / rms * w[i];
    }
    return LQ_OK;
}

int lq_ffn_combine(const float *h, const float *m1, const float *m2, const float *w1,
                   const float *w2, const float *w, float eps, float scalar, int64_t rows,
                   int64_t n, float *out) {
    if (rows < 0 || n < 1) return LQ_E_SHAPE;
    float *tmp = malloc((size_t)n * sizeof(float));
    if (!tmp) return LQ_E_NOMEM;
    for (int64_t r = 0; r < rows; r++) {
        const float *a = m1 + r * n, *b = m2 + r * n, *hr = h + r * n;
        float ra = sqrtf(dot_f32(a, a, n) * (1.0f / (float)n) + eps);
        float rb = sqrtf(dot_f32(b, b, n) * (1.0f / (float)n) + eps);
        for (int64_t i = 0; i < n; i++) tmp[i] = a[i] / ra * w1[i] + b[i] / rb * w2[i];
        float rt = sqrtf(dot_f32(tmp, tmp, n) * (1.0f / (float)n) + eps);
        float *o = out + r * n;
        for (int64_t i = 0; i < n; i++) o[i] = (hr[i] + tmp[i] / rt * w[i]) * scalar;
    }
    free(tmp);
    return LQ_OK;
}

int lq_route_topk(const float *logits, int64_t rows, int64_t n_experts, int32_t k,
                  const float *per_expert_scale, int32_t *ids, float *weights) {
    if (rows < 0 || k < 1 || k > n_experts) return LQ_E_SHAPE;
    for (int64_t r = 0; r < rows; r++) {
        const float *l = logits + r * n_experts;
        int32_t *id = ids + r * k;
        float *wt = weights + r * k;
        /* insertion into a descending top-k list; ties keep the lower expert id first */
        int32_t m = 0;
        for (int32_t e = 0; e < n_experts; e++) {
            float v = l[e];
            if (m == k && !(v > l[id[k - 1]])) continue;
            int32_t j = m < k ? m++ : k - 1;
            while (j > 0 && v > l[id[j - 1]]) { id[j] = id[j - 1]; j--; }
            id[j] = e;
        }
        float top = l[id[0]], sum = 0.0f;
        for (int32_t j = 0; j < k; j++) { wt[j] = expf(l[id[j]] - top); sum += wt[j]; }
        for (int32_t j = 0; j < k; j++) wt[j] = wt[j] / sum * per_expert_scale[id[j]];
    }
    return LQ_OK;
}

typedef struct {
    const float *q, *k, *v;
    const int64_t *pos;
    int64_t heads_per_kv, group, d, stride, n, q_pos, window; /* group: query heads per work item */
    float *out;
    int failed;
} attend_job;

/* Work items [begin, end), each `group` query heads that read one KV head: scores over the
 * visible slots, softmax, weighted sum of values.
 *   scores: the ISA table's f32 rows kernel, each key row dotted with the whole group's query
 *     rows, so it is read from memory once per group (2 query heads per KV head on Gemma 4's
 *     sliding layers, 8 on its global ones); the router's f32 matvec runs the same kernel.
 *   values: VSLOTS value rows at a time, read from memory once for all the group's heads; for
 *     each head VCHUNK outputs stay in registers over those rows, so o is loaded and stored
 *     once per VSLOTS rows, not per row. Each output still adds the slots in order: the bits
 *     of one `o += p * v` per slot. */
#define VCHUNK 16 /* output values per register block */
#define VSLOTS 4   /* value rows per pass: read once from memory, then from L1 for every head */
static void attend_range(void *ctx, int64_t begin, int64_t end, int thread_id) {
    (void)thread_id;
    attend_job *j = ctx;
    const lq_kernels *k = lq_active_kernels();
    const int64_t d = j->d, n = j->n, g = j->group;
    float *p = malloc((size_t)(g * (n ? n : 1)) * sizeof(float)); /* scores, then weights [g][n] */
    if (!p) { j->failed = 1; return; }
    for (int64_t item = begin; item < end; item++) {
        const int64_t h0 = item * g, kv = h0 / j->heads_per_kv;
        const float *kh = j->k + kv * j->stride * d, *vh = j->v + kv * j->stride * d;
        float *out = j->out + h0 * d;
        if (n) lq_dot_rows(k, LQ_F32, d, kh, (size_t)d * sizeof(float), n, j->q + h0 * d, d, (int)g, p, 1, n);
        int any = 0;
        for (int64_t s = 0; s < n; s++) {
            int64_t dist = j->q_pos - j->pos[s];
            if (j->pos[s] < 0 || dist < 0 || (j->window > 0 && dist >= j->window))
                for (int64_t a = 0; a < g; a++) p[a * n + s] = -INFINITY;
            else
                any = 1;
        }
        memset(out, 0, (size_t)(g * d) * sizeof(float));
        if (!any) continue; /* nothing visible (cannot happen in decode): zeros */
        for (int64_t a = 0; a < g; a++) { /* softmax: max, exp, sum, then the weights */
            float *pa = p + a * n, mx = -INFINITY, sum = 0.0f;
            for (int64_t s = 0; s < n; s++)
                if (pa[s] > mx) mx = pa[s];
            for (int64_t s = 0; s < n; s++) {
                pa[s] = pa[s] == -INFINITY ? 0.0f : expf(pa[s] - mx);
                sum += pa[s];
            }
            for (int64_t s = 0; s < n; s++) pa[s] = pa[s] / sum;
        }
        for (int64_t s0 = 0; s0 < n; s0 += VSLOTS) {
            const int64_t ns = n - s0 < VSLOTS ? n - s0 : VSLOTS;
            const float *vb = vh + s0 * d;
            for (int64_t a = 0; a < g; a++) {
                const float *w = p + a * n + s0;
                float *o = out + a * d;
                int64_t i = 0;
                for (; i + VCHUNK <= d; i += VCHUNK) {
                    lq_v4fu *ov = (lq_v4fu *)(o + i);
                    lq_v4f acc0 = ov[0], acc1 = ov[1], acc2 = ov[2], acc3 = ov[3];
                    for (int64_t s = 0; s < ns; s++) {
                        const float ws = w[s];
                        if (ws == 0.0f) continue; /* masked, or underflowed: as if not there */
                        const lq_v4fu *vr = (const lq_v4fu *)(vb + s * d + i);
                        acc0 += ws * vr[0], acc1 += ws * vr[1], acc2 += ws * vr[2], acc3 += ws * vr[3];
                    }
                    ov[0] = acc0, ov[1] = acc1, ov[2] = acc2, ov[3] = acc3;
                }
                for (; i < d; i++) {
                    float acc = o[i];
                    for (int64_t s = 0; s < ns; s++)
                        if (w[s] != 0.0f) acc += w[s] * vb[s * d + i];
                    o[i] = acc;
                }
            }
        }
    }
    free(p);
}

int lq_attend_one(const float *q, int64_t heads, int64_t d, const float *k, const float *v,
                  int64_t kv_heads, int64_t stride, const int64_t *pos, int64_t n, int64_t q_pos,
                  int64_t window, float *out) {
    if (heads < 1 || kv_heads < 1 || heads % kv_heads || d < 1 || n < 0 || n > stride)
        return LQ_E_SHAPE;
    /* Work items of whole KV heads, split into smaller groups of query heads only when there
     * are fewer KV heads than threads. Against one head at a time with scalar-order dots and a
     * per-slot `o += p * v` pass, on the 2-vCPU dev VM (Zen 3, AVX2), 16 query heads, 2 threads,
     * warm: 8 KV heads of 256 at 1000 positions 2.5 -> 1.1-1.5 ms, 2 KV heads of 512 at 2000
     * positions 5.6 -> 3.2-3.9 ms (both compute-bound: time halves with a second thread). */
    int64_t per_kv = heads / kv_heads, group = per_kv;
    int threads = lq_get_num_threads();
    while (group > 1 && group % 2 == 0 && (kv_heads * (per_kv / group) < threads || group > LQ_MAX_T))
        group /= 2;
    if (group > LQ_MAX_T) group = 1; /* an odd group above the rows kernel's T: one head at a time */
    attend_job j = {q, k, v, pos, per_kv, group, d, stride, n, q_pos, window, out, 0};
    lq_parallel_for(heads / group, 1, attend_range, &j);
    return j.failed ? LQ_E_NOMEM : LQ_OK;
}
