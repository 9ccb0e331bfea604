/* larql public C API: the only declarations build_ext.py hands to cffi.
 *
 * Formats use the LYRW quant_format codes from the vindex spec so a file's
 * header value can be passed straight through. Every function returns 0 on
 * success or a negative LQ_E* code; nothing here prints or aborts, because
 * a server must survive bad input.
 *
 * Matrices are row-major, one weight row quantised on its own. `cols` is the
 * stored (padded) row length: a multiple of 256 for K-quants. Activations may
 * be shorter than `cols` (`x_cols`); the missing tail is treated as zero.
 */
#ifndef LARQL_H
#define LARQL_H

#include <stddef.h>
#include <stdint.h>

/* The format ids: the LYRW quant_format numbering (docs/FORMAT.md). larql.kernels reads them
 * (and the error codes below) from this header through cffi; nothing else defines them. */
enum {
    LQ_F32 = 0,
    LQ_F16 = 1,
    LQ_BF16 = 2,
    LQ_Q4_0 = 3, /* recognised in files (row sizes known), not computed */
    LQ_Q4_K = 4,
    LQ_Q6_K = 5,
    LQ_Q8_0 = 6, /* recognised in files, not computed */
    LQ_FP4 = 7,  /* recognised in files, layout unknown here */
    LQ_Q5_K = 8, /* recognised in files, not computed */
    LQ_Q8_K = 100 /* activations only: in memory or on the wire */
};

enum {
    LQ_OK = 0,
    LQ_E_FORMAT = -1,   /* unsupported format for this operation */
    LQ_E_SHAPE = -2,    /* cols not a multiple of the block size, x_cols > cols, T < 1 ... */
    LQ_E_EXPERT = -3,   /* expert id out of range or not present in the table */
    LQ_E_NOMEM = -4,
    LQ_E_ISA = -5       /* requested ISA not available on this CPU */
};

/* Bytes of one stored row of `cols` values, 0 if the format's layout is unknown or cols is not a
 * whole number of its blocks. */
size_t lq_row_bytes(int fmt, int64_t cols);
/* Values per block of a format (256 for K-quants, 32 for Q4_0/Q8_0, 1 for floats), 0 if unknown. */
int64_t lq_block_values(int fmt);

/* f32 rows -> fmt rows (Q4_K/Q6_K with a scale/min search; F16; F32 copy; Q8_K). Multi-threaded. */
int lq_quantize(int fmt, const float *src, void *dst, int64_t rows, int64_t cols);

/* fmt rows -> f32 rows (F32, F16, BF16, Q4_K, Q6_K, Q8_K). Multi-threaded. */
int lq_dequantize(int fmt, const void *src, float *dst, int64_t rows, int64_t cols);

/* Y[t, r] = sum_c W[r, c] * X[t, c] for t < T.
 * W: rows x cols in fmt. X: T rows of x_cols f32 (x_cols <= cols, zero tail), row stride x_cols.
 * Y: T rows of `rows` f32. For K-quant weights X is quantised to Q8_K once per call and the
 * dot products are integer; for F32/F16/BF16 weights the arithmetic is f32 (the exact path).
 * Every weight block is read once for all T columns. Multi-threaded over rows. */
int lq_matmul(int fmt, const void *w, int64_t rows, int64_t cols,
              const float *x, int64_t x_cols, int64_t T, float *y);

/* As lq_matmul with activations already in Q8_K: T rows of cols/256 blocks (K-quant W only). */
int lq_matmul_q8k(int fmt, const void *w, int64_t rows, int64_t cols,
                  const void *xq, int64_t T, float *y);

/* One expert's bytes: gate_up is [2*inter, hidden] (gate rows first), down is [hidden, inter],
 * each row padded to a whole number of blocks for K-quant formats. NULL gate_up = not present. */
typedef struct {
    const void *gate_up;
    const void *down;
    int32_t gate_up_fmt;
    int32_t down_fmt;
} lq_expert;

/* out[t] = sum_k weights[t,k] * down_e(gelu_tanh(gate_e(x[t])) * up_e(x[t])), e = ids[t,k].
 * x: T x hidden f32 (already normed), ids/weights: T x K. Work is grouped by expert so each
 * expert's bytes are read once per call; a negative id means "skip this slot".
 * Returns LQ_E_EXPERT (and leaves out zeroed) if any id is >= n_experts or absent. */
int lq_moe_ffn(const lq_expert *experts, int32_t n_experts, int64_t hidden, int64_t inter,
               const float *x, int64_t T, int32_t K, const int32_t *ids, const float *weights,
               float *out);

/* As lq_moe_ffn; the weighted sum is accumulated in double and rounded to f32 once (lq_moe_ffn
 * does the same). out64, if not NULL, also receives the double sums (T x hidden): shards of one
 * layer add those and round once, so any split of the experts gives lq_moe_ffn's f32 result. */
int lq_moe_ffn64(const lq_expert *experts, int32_t n_experts, int64_t hidden, int64_t inter,
                 const float *x, int64_t T, int32_t K, const int32_t *ids, const float *weights,
                 float *out, double *out64);

/* As lq_moe_ffn64 with x already normed and in Q8_K: T rows of ceil(hidden / 256) blocks, as
 * lq_quantize(LQ_Q8_K) makes them from the row padded with zeros. The blocks are used as they
 * are (not dequantised and quantised again, which can move a scale by one ulp), so activations
 * quantised by this library give lq_moe_ffn64's result bit for bit. Every expert named must
 * have a K-quant gate_up: LQ_E_FORMAT otherwise. */
int lq_moe_ffn64_q8k(const lq_expert *experts, int32_t n_experts, int64_t hidden, int64_t inter,
                     const void *xq, int64_t T, int32_t K, const int32_t *ids, const float *weights,
                     float *out, double *out64);

/* Thread pool: size from LARQL_NUM_THREADS, default all online cores. */
int lq_set_num_threads(int n);
int lq_get_num_threads(void);

/* Kernel dispatch: "scalar", "avx2", "avx512", "neon"... lq_force_isa(NULL) restores the best. */
const char *lq_isa(void);
int lq_force_isa(const char *name);
/* Space-separated list of ISAs usable on this CPU, best last. */
const char *lq_available_isas(void);

/* Vector glue of a decoder layer (csrc/vecops.c), f32, on the calling thread unless noted.
 * Rows of n floats.
 * y = x / sqrt(mean(x^2) + eps) * w (w NULL: no weight); y may equal x. */
int lq_rms_norm(const float *x, const float *w, float eps, int64_t rows, int64_t n, float *y);
/* out = Q8_K of rms_norm(x, w) per row (n padded with zeros to whole blocks): the same bytes as
 * lq_rms_norm then lq_quantize(LQ_Q8_K), in one call on this thread (a client's q8k input:
 * two Python calls and their arrays cost ~10 us warm, several times that cold). */
int lq_rms_norm_q8k(const float *x, const float *w, float eps, int64_t rows, int64_t n, void *out);
/* In place on x [T, heads, d]: RMSNorm each head (weight w, may be NULL), then neox
 * rotate-half RoPE with cos/sin [T, d/2]. */
int lq_norm_rope(float *x, const float *w, float eps, int64_t T, int64_t heads, int64_t d,
                 const float *cos_t, const float *sin_t);
/* out = gelu_tanh(gate) * up over n floats. */
int lq_gelu_mul(const float *gate, const float *up, int64_t n, float *out);
/* h += rms_norm(a, w), in place. */
int lq_add_rms_norm(float *h, const float *a, const float *w, float eps, int64_t rows, int64_t n);
/* out = (h + rms_norm(rms_norm(m1, w1) + rms_norm(m2, w2), w)) * scalar. */
int lq_ffn_combine(const float *h, const float *m1, const float *m2, const float *w1,
                   const float *w2, const float *w, float eps, float scalar, int64_t rows,
                   int64_t n, float *out);
/* Per row of router logits [rows, n_experts]: the k largest (descending, ties to the lower id),
 * softmax over those k, times per_expert_scale[id]. ids/weights are [rows, k]. */
int lq_route_topk(const float *logits, int64_t rows, int64_t n_experts, int32_t k,
                  const float *per_expert_scale, int32_t *ids, float *weights);
/* One query position's attention (scale 1.0) over a KV cache: q [heads, d]; k, v
 * [kv_heads, stride, d] of which slots [0, n) are read; pos [n] (-1 = empty). A slot is
 * visible when 0 <= q_pos - pos (< window when window > 0). out [heads, d]. Heads are
 * spread over the thread pool. */
int lq_attend_one(const float *q, int64_t heads, int64_t d, const float *k, const float *v,
                  int64_t kv_heads, int64_t stride, const int64_t *pos, int64_t n, int64_t q_pos,
                  int64_t window, float *out);

#endif
